"""One structured event per log line: readable ``key=value`` text on a terminal, JSON for log collectors.

Context travels in ``extra`` (``log.info("experiment started", extra={"key": k, "queue": q})``) and is rendered
as fields in both formats. Credentials must never be passed here: the lifecycle logs keys, queues and URLs only.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from pythonjsonlogger.json import JsonFormatter

_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


def event_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """``extra`` for a log call, renaming keys that LogRecord reserves (``filename``, ``message``…) with a ``_``."""
    return {(f"{k}_" if k in _STANDARD_ATTRS else k): v for k, v in fields.items()}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    """``2026-11-23T19:30:00.123Z INFO  experiment started key=... queue=local:local_x``."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [f"{stamp} {record.levelname:<5} {record.getMessage()}"]
        for key, value in _fields(record).items():
            text = str(value)
            parts.append(f"{key}={text!r}" if (" " in text or not text) else f"{key}={text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(log_format: str = "auto", *, debug: bool = False, stream: Any = None) -> None:
    """Install the runner's handler on the root logger (replacing earlier ones, so it can be called twice)."""
    stream = stream if stream is not None else sys.stderr
    if log_format == "auto":
        log_format = "text" if getattr(stream, "isatty", lambda: False)() else "json"
    handler = logging.StreamHandler(stream)
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                datefmt="%Y-%m-%dT%H:%M:%S%z",
            )
        )
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # Library chatter at INFO drowns the lifecycle events operators look for.
    for noisy in ("aiohttp.access", "aiormq", "aio_pika", "botocore", "aiobotocore", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
