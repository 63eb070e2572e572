"""Where a RabbitMQ server is: the AMQP URL and its management API, parsed and checked as studio-go-runner does.

A value object of the settings: configuration and ``submit`` check URLs with it without loading the AMQP client
stack, which only the RabbitMQ broker (``runner/queues/rabbitmq.py``) needs.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote, urlsplit

_DEFAULT_PORTS: Final = {"amqp": 5672, "amqps": 5671}
_MANAGEMENT_PORT_OFFSET: Final = 10000  # 5672 -> 15672, as studio-go-runner derives it
_TLS_QUERY_KEYS: Final = ("cafile", "certfile", "keyfile", "no_verify_ssl")


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``****``; for logs and problem reports."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return parts._replace(netloc=f"{user}:****@{netloc[2]}").geturl()


@dataclass(frozen=True)
class AmqpEndpoint:
    """A RabbitMQ server as this runner reaches it: AMQP URL, management API, credentials and virtual host."""

    url: str  # the AMQP URL with credentials: give it to the AMQP client only, never log it
    management_url: str  # management API base URL without credentials or trailing slash
    user: str
    password: str
    vhost: str
    host: str
    port: int
    tls_options: tuple[tuple[str, str], ...] = ()  # cafile/certfile/keyfile/no_verify_ssl from the AMQP URL query

    def __repr__(self) -> str:
        return f"AmqpEndpoint({self.shown!r}, management={self.management_url!r})"

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def project(self) -> str:
        """The server and virtual host without credentials (studio-go-runner's project key)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/{quote(self.vhost, safe='')}"

    @property
    def shown(self) -> str:
        """How log lines name this server: user, host, port and virtual host; never the password."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{quote(self.user, safe='')}@{host}:{self.port}/{quote(self.vhost, safe='')}"

    @classmethod
    def parse(cls, amqp_url: str, management_url: str = "") -> AmqpEndpoint:
        """Check ``amqp_url`` (and the optional ``management_url``) and derive what is missing as studio-go-runner
        does: the management API is on the same host at the AMQP port + 10000, over https for amqps; credentials
        in ``management_url`` replace those of ``amqp_url`` for both. No credentials at all means guest/guest.
        Raises ValueError with a reason that never contains the password."""
        try:
            parts = urlsplit(amqp_url.strip())
            port = parts.port
        except ValueError:
            raise ValueError("is not a URL with a valid host and port") from None
        if parts.scheme not in _DEFAULT_PORTS:
            raise ValueError("must start with amqp:// or amqps://")
        if not parts.hostname:
            raise ValueError("has no host")
        host = parts.hostname
        port = port or _DEFAULT_PORTS[parts.scheme]
        user = unquote(parts.username) if parts.username else "guest"
        password = unquote(parts.password) if parts.password is not None else ("guest" if not parts.username else "")
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        query = dict(_query_pairs(parts.query))
        tls_options = tuple((k, query[k]) for k in _TLS_QUERY_KEYS if k in query)
        if management_url.strip():
            try:
                mgt = urlsplit(management_url.strip())
                mgt_port = mgt.port
            except ValueError:
                raise ValueError("management URL is not a URL with a valid host and port") from None
            if mgt.scheme not in ("http", "https") or not mgt.hostname:
                raise ValueError("management URL must be http:// or https:// with a host")
            if mgt.username:
                user = unquote(mgt.username)
                password = unquote(mgt.password or "")
            mgt_host = f"[{mgt.hostname}]" if ":" in mgt.hostname else mgt.hostname
            base = f"{mgt.scheme}://{mgt_host}" + (f":{mgt_port}" if mgt_port else "") + mgt.path.rstrip("/")
        else:
            mgt_scheme = "https" if parts.scheme == "amqps" else "http"
            bracketed = f"[{host}]" if ":" in host else host
            base = f"{mgt_scheme}://{bracketed}:{port + _MANAGEMENT_PORT_OFFSET}"
        bracketed = f"[{host}]" if ":" in host else host
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{bracketed}:{port}"
        url = parts._replace(netloc=netloc).geturl()
        return cls(url, base, user, password, vhost, host, port, tls_options)

    def management_ssl(self) -> ssl.SSLContext | None:
        """TLS settings for an https management API, from the same query options the AMQP URL gives for amqps."""
        if not self.management_url.startswith("https:"):
            return None
        options = dict(self.tls_options)
        context = ssl.create_default_context(cafile=options.get("cafile"))
        if options.get("certfile"):
            context.load_cert_chain(options["certfile"], options.get("keyfile"))
        if options.get("no_verify_ssl", "0") not in ("", "0"):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def _query_pairs(query: str) -> list[tuple[str, str]]:
    pairs = []
    for item in query.split("&"):
        if item:
            key, _, value = item.partition("=")
            pairs.append((unquote(key), unquote(value)))
    return pairs
