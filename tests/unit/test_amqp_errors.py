"""How AMQP connection failures are described: one sentence, found without hanging whatever the error chain."""

from __future__ import annotations

import ssl

from runner.amqp_endpoint import AmqpEndpoint
from runner.queues.rabbitmq import describe_connect_error

ENDPOINT = AmqpEndpoint.parse("amqp://guest:guest@127.0.0.1:5672/%2f", "")


def test_an_error_chain_that_loops_is_described_without_hanging() -> None:
    # What aiormq leaves when the broker dies under it: the reader's and the connection's errors each other's context.
    reset = ConnectionResetError(104, "Connection reset by peer")
    closed = RuntimeError("Server connection reset")
    closed.__context__ = reset
    reset.__context__ = closed
    assert describe_connect_error(closed, ENDPOINT) == "RuntimeError: Server connection reset"


def test_a_tls_failure_behind_a_connection_error_is_named() -> None:
    tls = ssl.SSLCertVerificationError("certificate verify failed")
    wrapper = ConnectionError("cannot connect")
    wrapper.__cause__ = tls
    described = describe_connect_error(wrapper, ENDPOINT)
    assert described.startswith("TLS failed:") and "certificate verify failed" in described and "cafile" in described
