"""A private RabbitMQ node for tests and benchmarks: its own directory, loopback ports, processes stopped by PID.

It runs the unwrapped ``/usr/lib/rabbitmq/bin/rabbitmq-server`` (Debian's ``rabbitmq-server`` package) with every
path and port of its own, plus its own ``epmd``, so nothing outside its temporary directory is touched and several
nodes can run side by side. The delivery-acknowledgement timeout is short and checked often, so tests can show that
long experiments survive it.
"""

from __future__ import annotations

import base64
import glob
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
INSTALL_HINT = "apt-get install -y rabbitmq-server (.ci/run does this on CI)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _epmd() -> str:
    found = shutil.which("epmd") or next(iter(sorted(glob.glob("/usr/lib/erlang/erts-*/bin/epmd"), reverse=True)), "")
    if not found:
        raise FileNotFoundError(f"epmd not found; {INSTALL_HINT}")
    return found


def _parent_of(pid: int) -> int:
    """The parent pid of process ``pid`` (from /proc; the command name may contain spaces and parentheses)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


class RabbitNode:
    """Start with ``start()``; ``kill()`` + ``start()`` restarts it on the same ports with the same data."""

    def __init__(self, *, consumer_timeout_ms: int = 3000, tick_ms: int = 500) -> None:
        if not RABBITMQ_SERVER.exists():
            raise FileNotFoundError(f"{RABBITMQ_SERVER} is missing; {INSTALL_HINT}")
        self.dir = Path(tempfile.mkdtemp(prefix="rmq-"))
        self.amqp_port, self.mgmt_port, dist_port, self.epmd_port = (free_port() for _ in range(4))
        self.amqps_port = free_port()
        self.consumer_timeout_ms = consumer_timeout_ms
        # An amqps listener too, with a certificate from a CA of the node's own (self.ca_file) for 127.0.0.1.
        tls = write_certificates(self.dir / "tls")
        self.ca_file = tls["ca"]
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            f"listeners.ssl.default = 127.0.0.1:{self.amqps_port}\n"
            f"ssl_options.cacertfile = {tls['ca']}\n"
            f"ssl_options.certfile = {tls['cert']}\n"
            f"ssl_options.keyfile = {tls['key']}\n"
            "ssl_options.verify = verify_none\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
            "management.tcp.ip = 127.0.0.1\n"
            f"management.tcp.port = {self.mgmt_port}\n"
            f"consumer_timeout = {consumer_timeout_ms}\n"
            "collect_statistics_interval = 500\n"
        )
        # How often channels check the acknowledgement timeout (60 s by default: far too coarse for a test).
        (self.dir / "advanced.config").write_text(f"[{{rabbit, [{{channel_tick_interval, {tick_ms}}}]}}].\n")
        (self.dir / "enabled_plugins").write_text("[rabbitmq_management].\n")
        d = self.dir
        self.env = dict(
            os.environ,
            HOME=str(d),
            RABBITMQ_NODENAME=f"test{self.amqp_port}@localhost",
            RABBITMQ_DIST_PORT=str(dist_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_EPMD_PORT=str(self.epmd_port),
            RABBITMQ_MNESIA_BASE=str(d / "mnesia"),
            RABBITMQ_LOG_BASE=str(d / "log"),
            RABBITMQ_CONFIG_FILE=str(d / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(d / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
            RABBITMQ_PLUGINS_EXPAND_DIR=str(d / "plugins-expand"),
            RABBITMQ_PID_FILE=str(d / "rabbit.pid"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        self._epmd: subprocess.Popen[bytes] | None = None
        self._server: subprocess.Popen[bytes] | None = None

    # -- processes -----------------------------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        out = (self.dir / "server.out").open("ab")
        if self._epmd is None or self._epmd.poll() is not None:
            self._epmd = subprocess.Popen(
                [_epmd(), "-address", "127.0.0.1", "-port", str(self.epmd_port)], env=self.env, stdout=out, stderr=out
            )
        # Its own session: kill() reaches the script and beam.smp (its child) through the process group.
        self._server = subprocess.Popen(
            [str(RABBITMQ_SERVER)], env=self.env, stdout=out, stderr=out, cwd=self.dir, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._server.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited with {self._server.returncode}:\n{self.server_output()}")
            try:
                if self.api("GET", "/api/overview")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"rabbitmq-server not ready after {timeout}s:\n{self.server_output()}")

    def kill(self) -> None:
        """Kill the node at once, as a crash would; epmd stays. beam.smp goes first, so that the start script (our
        child) reaps it; then anything left in the node's process group."""
        server, self._server = self._server, None
        if server is None or server.poll() is not None:
            return
        try:
            beam = int((self.dir / "rabbit.pid").read_text().strip())
            if _parent_of(beam) == server.pid:  # never a stale pid that now belongs to someone else
                os.kill(beam, signal.SIGKILL)
                server.wait(5)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass  # no pid file yet, or the script did not exit: the group kill below covers it
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait(10)

    def stop(self) -> None:
        self.kill()
        epmd, self._epmd = self._epmd, None
        if epmd is not None and epmd.poll() is None:
            epmd.kill()
            epmd.wait(10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def server_output(self) -> str:
        path = self.dir / "server.out"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    # -- addresses -----------------------------------------------------------------------------------------------

    def amqp_url(self, vhost: str = "/", user: str = "guest", password: str = "guest") -> str:
        credentials = f"{quote(user, safe='')}:{quote(password, safe='')}"
        return f"amqp://{credentials}@127.0.0.1:{self.amqp_port}/{quote(vhost, safe='')}"

    def amqps_url(self, vhost: str = "/", query: str = "") -> str:
        """The node's TLS listener; ``query`` carries the TLS options (``cafile=...``) as a runner's URL would."""
        url = f"amqps://guest:guest@127.0.0.1:{self.amqps_port}/{quote(vhost, safe='')}"
        return f"{url}?{query}" if query else url

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.mgmt_port}"

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """A management API call as guest; (status, decoded JSON or None)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.management_url}{path}", data=data, method=method)
        request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                text = response.read()
                return response.status, json.loads(text) if text else None
        except urllib.error.HTTPError as err:
            return err.code, None

    def add_vhost(self, vhost: str) -> None:
        name = quote(vhost, safe="")
        assert self.api("PUT", f"/api/vhosts/{name}", {})[0] in (201, 204)
        permissions = {"configure": ".*", "write": ".*", "read": ".*"}
        assert self.api("PUT", f"/api/permissions/{name}/guest", permissions)[0] in (201, 204)

    def delete_vhost(self, vhost: str) -> None:
        self.api("DELETE", f"/api/vhosts/{quote(vhost, safe='')}")


def write_certificates(directory: Path) -> dict[str, Path]:
    """A CA and a server certificate signed by it for 127.0.0.1 and localhost, as PEM files in ``directory``."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "studio-runner test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": directory / "ca.pem", "cert": directory / "server.pem", "key": directory / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths
