"""What the AWS backends (SQS queues, S3 objects) share: loading the SDK, and reading the code of its errors."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any


def new_session(*services: str) -> Any:
    """Import the AWS SDK and make a session with the models of ``services`` loaded. Call it in a worker thread: the
    first load reads many files."""
    from aiobotocore.session import get_session  # here: the SDK costs a second of imports, paid in the thread

    session = get_session()
    loader = session.get_component("data_loader")
    for service in services:
        loader.load_service_model(service, "service-2")
        with contextlib.suppress(Exception):
            loader.load_service_model(service, "endpoint-rule-set-1")
    for name in ("endpoints", "partitions", "sdk-default-configuration", "_retry"):
        with contextlib.suppress(Exception):
            loader.load_data(name)
    return session


def error_code(err: BaseException) -> tuple[str, int, str]:
    """(code, HTTP status, message) of an AWS error; the code is the status when the answer named none, "" when
    ``err`` is no answer of AWS at all."""
    response: Mapping[str, Any] = getattr(err, "response", None) or {}
    error = response.get("Error") or {}
    status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    code = str(error.get("Code") or status or "")
    return code, status, str(error.get("Message") or "")
