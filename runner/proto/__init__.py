"""The report schema (``reports.proto`` beside this file) as the runner uses it: no generated code.

``reports.pb`` is ``reports.proto`` compiled by protoc into a FileDescriptorSet (``nox -s proto``). Loading it into
a pool of our own gives the ``Report`` message class; reports are built as protojson-shaped dicts, checked against
the schema by ``json_format.ParseDict`` (a misspelt field or enum value raises) and written by
``json_format.MessageToJson``, the protojson form studio-go-runner published. A descriptor set instead of checked-in
``_pb2`` code: generated code is tied to the protobuf release that generated it (it refuses older runtimes), a
descriptor is the same bytes for every release.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    json_format,
    message_factory,
    timestamp_pb2,
    wrappers_pb2,
)
from google.protobuf.message import Message

PACKAGE = "dev.studio_go_runner.reports"
SCHEMA_FILE = "reports.proto"
DESCRIPTOR_FILE = "reports.pb"


def schema_text() -> str:
    """The published schema, as experimenters compile it to read reports."""
    return resources.files(__package__).joinpath(SCHEMA_FILE).read_text()


class ReportSchema:
    """The ``Report`` message class of a private descriptor pool. Blocking to build (a package file is read)."""

    def __init__(self) -> None:
        pool = descriptor_pool.DescriptorPool()
        for dependency in (any_pb2, timestamp_pb2, wrappers_pb2):
            pool.AddSerializedFile(dependency.DESCRIPTOR.serialized_pb)
        compiled = descriptor_pb2.FileDescriptorSet.FromString(
            resources.files(__package__).joinpath(DESCRIPTOR_FILE).read_bytes()
        )
        for file in compiled.file:
            pool.Add(file)
        self.report_class: type[Message] = message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"{PACKAGE}.Report")
        )

    def to_json(self, report: dict[str, Any]) -> bytes:
        """``report`` (protojson field names: ``experimentId``, ``logging``...) as compact protojson; raises
        json_format.ParseError when it does not fit the schema."""
        message = json_format.ParseDict(report, self.report_class())
        return json_format.MessageToJson(message, indent=None).encode()
