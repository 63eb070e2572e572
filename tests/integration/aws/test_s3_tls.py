"""--s3-ca/--s3-cert/--s3-key: a self-hosted S3 over TLS with its own certificate authority (moto serving https
with a certificate made here)."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from runner.request import AwsCredentials
from runner.storage.base import StorageError
from runner.storage.s3 import S3Store
from runner.storage.s3_endpoints import TlsOptions
from tests.integration.aws.conftest import REGION, Moto, start_moto, unique
from tests.integration.helpers import stop_process


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_authority(directory: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


@pytest.fixture(scope="module")
def tls_moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Moto, Path, Path]]:
    """moto over https with a certificate for 127.0.0.1 from a private CA; yields (server, CA, another CA)."""
    directory = tmp_path_factory.mktemp("tls")
    ca_key, ca_cert, ca_file = make_authority(directory, "runner-test-ca")
    _, _, other_ca = make_authority(directory, "someone-else")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = start_moto("-s", "-c", str(directory / "server.pem"), "-k", str(directory / "server.key"), scheme="https")
    try:
        yield server, ca_file, other_ca
    finally:
        stop_process(server.proc)


async def test_with_the_servers_ca_the_store_speaks_https_and_verifies_the_certificate(
    tls_moto: tuple[Moto, Path, Path], tmp_path: Path
) -> None:
    server, ca_file, _ = tls_moto
    store = S3Store(tls=TlsOptions(ca_file=ca_file))
    try:
        credentials = AwsCredentials(server.key_id, server.secret, region=REGION)
        url = f"s3://{server.host}/{unique('tls')}/ws.tar"
        assert store.locate(url, credentials).endpoint.url == f"https://{server.host}"
        await store.ensure_bucket(store.locate(url, credentials), credentials)
        (tmp_path / "ws.tar").write_bytes(b"over tls")
        bound = store.with_credentials(credentials)
        await bound.upload(tmp_path / "ws.tar", url)
        await bound.download(url, tmp_path / "back.tar")
        assert (tmp_path / "back.tar").read_bytes() == b"over tls"
    finally:
        await store.close()


async def test_a_certificate_from_an_untrusted_authority_is_refused_with_a_hint(
    tls_moto: tuple[Moto, Path, Path], tmp_path: Path
) -> None:
    server, _, other_ca = tls_moto
    store = S3Store(tls=TlsOptions(ca_file=other_ca), attempts=1)
    try:
        url = f"s3://{server.host}/any-bucket/ws.tar"
        with pytest.raises(StorageError, match=r"TLS with https://127\.0\.0\.1:\d+ failed.*--s3-ca") as caught:
            await store.with_credentials(AwsCredentials(server.key_id, server.secret)).stat(url)
        assert url in str(caught.value)
    finally:
        await store.close()
