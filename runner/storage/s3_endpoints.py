"""Where an ``s3://host[:port]/bucket/key`` URL points (studio-go-runner's rule, reference §5.1, its gaps fixed).

* ``s3.amazonaws.com``, ``s3-<region>.amazonaws.com``, ``s3.<region>.amazonaws.com`` (and ``.amazonaws.com.cn``)
  are AWS: the region is the host's, else the artifact's ``credentials.aws.region``, else the runner's default
  region; the SDK picks AWS's own endpoint for it, over TLS.
* Any other host is a self-hosted S3 (MinIO, moto, ``storage.googleapis.com``), addressed path-style as
  ``<scheme>://host[:port]/bucket/key``. The scheme is https when the runner has ``--s3-ca``/``--s3-cert``/
  ``--s3-key``, the port is 443 or the host is Google Cloud Storage; plain http otherwise (the StudioML client's
  URLs never say which, and an in-cluster MinIO usually speaks plain http).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from runner.request import AwsCredentials
from runner.storage.base import StorageError

SCHEME: Final = "s3"
DEFAULT_REGION: Final = "us-east-1"
GCS_HOST: Final = "storage.googleapis.com"
_AWS_REGIONAL_HOST = re.compile(
    r"s3[.-](?:dualstack\.)?(?P<region>[a-z]{2}(?:-gov)?-[a-z]+-\d+)\.amazonaws\.com(?:\.cn)?"
)


@dataclass(frozen=True)
class Endpoint:
    """An S3 service: ``url`` None means AWS S3's own endpoint for ``region``; anything else is self-hosted."""

    url: str | None
    region: str

    @property
    def path_style(self) -> bool:
        return self.url is not None

    @property
    def identity(self) -> str:
        """Names the server for cache keys: AWS S3 is one namespace whatever the region."""
        return self.url or "aws"

    def __str__(self) -> str:
        return self.url or f"AWS S3 ({self.region})"

    @classmethod
    def from_url(cls, url: str, region: str) -> Endpoint:
        """An endpoint given as an http(s) URL (the StudioML client's ``database.endpoint``)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise StorageError(f"endpoint {url!r} is not an http:// or https:// URL")
        host = parts.hostname.lower()
        aws = aws_host_region(host)
        if aws is not None:
            return cls(None, aws or region or DEFAULT_REGION)
        netloc = f"[{host}]" if ":" in host else host
        if parts.port:
            netloc += f":{parts.port}"
        return cls(f"{parts.scheme}://{netloc}", region or DEFAULT_REGION)


@dataclass(frozen=True)
class S3Location:
    endpoint: Endpoint
    bucket: str
    key: str

    @property
    def url(self) -> str:
        """How errors and logs name the object."""
        host = urlsplit(self.endpoint.url).netloc if self.endpoint.url else f"s3.{self.endpoint.region}.amazonaws.com"
        return f"s3://{host}/{self.bucket}/{self.key}"


def aws_host_region(host: str) -> str | None:
    """The region an AWS S3 host names ("" for the global host), or None when ``host`` is not AWS S3."""
    if host in ("s3.amazonaws.com", "s3.amazonaws.com.cn"):
        return ""
    if host == "s3-external-1.amazonaws.com":
        return "us-east-1"
    match = _AWS_REGIONAL_HOST.fullmatch(host)
    return match["region"] if match else None


def locate(url: str, *, credentials: AwsCredentials | None, default_region: str, tls: bool) -> S3Location:
    """Where ``s3://host[:port]/bucket/key`` points; ``tls`` is whether the runner was given TLS options."""
    parts = urlsplit(url)
    if parts.scheme.lower() != SCHEME:
        raise StorageError(f"not an s3:// URL: {url!r}")
    try:
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        raise StorageError(f"{url!r}: the host or port is not valid") from None
    if not host:
        raise StorageError(f"{url!r}: no endpoint host (expected s3://host[:port]/bucket/key)")
    bucket, _, key = parts.path.lstrip("/").partition("/")
    if not bucket or not key:
        raise StorageError(f"{url!r}: expected s3://host[:port]/bucket/key")
    asked = credentials.region if credentials is not None else ""
    aws = aws_host_region(host)
    if aws is not None:
        return S3Location(Endpoint(None, aws or asked or default_region or DEFAULT_REGION), bucket, key)
    secure = tls or port == 443 or host == GCS_HOST
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    # Google's interoperability API signs with the region "auto"; MinIO and moto take any, us-east-1 by convention.
    fallback = "auto" if host == GCS_HOST else (default_region or DEFAULT_REGION)
    endpoint = Endpoint(f"{'https' if secure else 'http'}://{netloc}", asked or fallback)
    return S3Location(endpoint, bucket, key)


def describe_credentials(credentials: AwsCredentials | None) -> str:
    """Which credentials a request used, fit for an error message (never the secret)."""
    if credentials is None:
        return "with the runner's own AWS credentials (the artifact carries none)"
    if not credentials.access_key and not credentials.secret_access_key:
        return "anonymously (the artifact's credentials are empty)"
    key = credentials.access_key
    shown = f"{key[:4]}…{key[-4:]}" if len(key) > 10 else "…"
    return f"with the artifact's access key {shown}"


@dataclass(frozen=True)
class TlsOptions:
    """``--s3-ca`` (a CA bundle to trust), ``--s3-cert``/``--s3-key`` (a client certificate); any forces TLS."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @property
    def enabled(self) -> bool:
        return any((self.ca_file, self.cert_file, self.key_file))

    def client_cert(self) -> str | tuple[str, str] | None:
        """The SDK's ``client_cert``: the certificate file (which may hold the key too), or certificate and key."""
        if self.cert_file is None:
            return None
        return (str(self.cert_file), str(self.key_file)) if self.key_file else str(self.cert_file)
