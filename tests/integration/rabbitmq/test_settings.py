"""Where the RabbitMQ broker is and how it is configured (no server needed)."""

from __future__ import annotations

import pytest

from runner.amqp_endpoint import AmqpEndpoint, redact_url
from runner.config import ConfigError, load_settings
from runner.expand import expand_variables
from runner.queues.rabbitmq import message_identity, prior_deliveries


def test_the_management_api_is_derived_from_the_amqp_url_as_studio_go_runner_does() -> None:
    plain = AmqpEndpoint.parse("amqp://alice:pw@rabbit.example:5672/")
    assert plain.management_url == "http://rabbit.example:15672"
    assert (plain.user, plain.password, plain.vhost) == ("alice", "pw", "/")
    tls = AmqpEndpoint.parse("amqps://alice:pw@rabbit.example/prod")
    assert tls.management_url == "https://rabbit.example:15671" and tls.port == 5671 and tls.vhost == "prod"
    assert AmqpEndpoint.parse("amqp://rabbit.example:6000/%2f").management_url == "http://rabbit.example:16000"


def test_credentials_in_the_management_url_replace_those_of_the_amqp_url() -> None:
    endpoint = AmqpEndpoint.parse("amqp://alice:pw@rabbit:5672/", "https://bob:s%40cret@mgmt.example/rabbit/")
    assert endpoint.management_url == "https://mgmt.example/rabbit"
    assert (endpoint.user, endpoint.password) == ("bob", "s@cret")
    assert endpoint.url == "amqp://bob:s%40cret@rabbit:5672/"


def test_no_credentials_mean_guest_and_the_vhost_is_decoded() -> None:
    endpoint = AmqpEndpoint.parse("amqp://rabbit/team%2Fa")
    assert (endpoint.user, endpoint.password, endpoint.vhost) == ("guest", "guest", "team/a")
    assert endpoint.project == "amqp://rabbit:5672/team%2Fa"
    assert endpoint.shown == "amqp://guest@rabbit:5672/team%2Fa"


def test_tls_options_of_the_amqp_url_also_apply_to_the_management_api() -> None:
    endpoint = AmqpEndpoint.parse("amqps://u:p@rabbit/?no_verify_ssl=1&heartbeat=30")
    assert dict(endpoint.tls_options) == {"no_verify_ssl": "1"}
    context = endpoint.management_ssl()
    assert context is not None and not context.check_hostname
    assert AmqpEndpoint.parse("amqp://u:p@rabbit/").management_ssl() is None


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://u:p@rabbit/", "must start with amqp:// or amqps://"),
        ("amqp:///vhost", "has no host"),
        ("amqp://u:p@rabbit:notaport/", "is not a URL with a valid host and port"),
    ],
)
def test_unusable_amqp_urls_are_refused_without_repeating_the_password(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as caught:
        AmqpEndpoint.parse(url)
    assert "p@" not in str(caught.value)


def test_the_password_never_shows_in_the_endpoint_or_redacted_urls() -> None:
    endpoint = AmqpEndpoint.parse("amqp://alice:hunter22@rabbit/")
    assert "hunter22" not in repr(endpoint) and "hunter22" not in endpoint.shown
    assert redact_url("amqp://alice:hunter22@rabbit:5672/v") == "amqp://alice:****@rabbit:5672/v"
    assert redact_url("amqp://rabbit/") == "amqp://rabbit/"
    assert redact_url("") == ""


def test_variables_are_expanded_and_a_missing_one_is_an_error() -> None:
    assert expand_variables("amqp://u:${PW}@$HOST/", {"PW": "x", "HOST": "h"}) == "amqp://u:x@h/"
    with pytest.raises(ValueError, match=r"refers to \$PW, which is not set"):
        expand_variables("amqp://u:${PW}@h/", {})


def test_amqp_settings_are_read_expanded_and_never_echo_the_password() -> None:
    environ = {"AMQP_URL": "amqp://runner:${RMQ_PW}@rabbit:5672/", "RMQ_PW": "t0p-secret"}
    settings = load_settings(["--amqp-orphan-grace", "30s"], environ)
    assert settings.amqp_url == "amqp://runner:t0p-secret@rabbit:5672/"
    assert settings.amqp_orphan_grace == 30.0 and settings.amqp_discover_interval == 10.0
    summary = settings.summary()
    assert summary["amqp_url"] == "amqp://runner:****@rabbit:5672/"
    assert "t0p-secret" not in str(summary)
    assert load_settings([], {}).summary()["amqp_url"] == "off"


def test_bad_amqp_settings_are_reported_with_the_password_masked() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            ["--amqp-url", "rabbit://runner:t0p-secret@rabbit/", "--amqp-mgt-url", "ftp://x"],
            {},
        )
    text = "\n".join(caught.value.problems)
    assert "--amqp-url (AMQP_URL): 'rabbit://runner:****@rabbit/' must start with amqp:// or amqps://" in text
    assert "--amqp-mgt-url (AMQP_MGT_URL): 'ftp://x' must be http:// or https:// with a host" in text
    assert "t0p-secret" not in text
    with pytest.raises(ConfigError, match=r"refers to \$NOPE, which is not set"):
        load_settings([], {"AMQP_URL": "amqp://u:${NOPE}@rabbit/"})


def test_attempts_count_our_republish_header_and_quorum_delivery_counts() -> None:
    assert prior_deliveries(None) == 0
    assert prior_deliveries({"x-studio-runner-deliveries": 2}) == 2
    assert prior_deliveries({"x-delivery-count": 3}) == 3
    assert prior_deliveries({"x-studio-runner-deliveries": 4, "x-delivery-count": 1}) == 4
    assert prior_deliveries({"x-studio-runner-deliveries": "junk", "x-delivery-count": True}) == 0


def test_a_request_is_named_by_its_message_id_or_else_by_its_body() -> None:
    assert message_identity("abc-123", b"{}") == "abc-123"
    assert message_identity(None, b"{}") == message_identity(None, b"{}") != message_identity(None, b"{ }")
    long_id = message_identity("x" * 200, b"{}")
    assert len(long_id) == 32 and "." not in long_id
