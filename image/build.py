"""Build the runner's image with buildah on a Debian base made here, then try it: ``nox -s image``.

No image registry is reachable from some build machines, so the base is made locally: ``debootstrap`` (minbase,
plus Debian's ``python3``, ``python3-venv`` and ``ca-certificates``) from the Debian mirror this machine's apt uses,
trimmed like Debian's slim images, imported into buildah's storage. It stands in for the Containerfile's default base
(``python:3.11-slim-bookworm``) and is made once: the rootfs tarball and buildah's storage live in the cache
directory (``--cache``, ``$IMAGE_CACHE``, else ``~/.cache/studio-runner-image``), never in the repository.

The suite is trixie, not bookworm: bookworm's ``python3`` is 3.11.2, and the runner cannot be installed on it
(gcloud-aio-pubsub 8 requires Python >= 3.11.3). python:3.11-slim-bookworm has a later 3.11 built from source.

Then ``buildah bud --isolation chroot`` builds the Containerfile. The host's CA bundle and package index reach the
``RUN`` steps as build secrets, so nothing of them lands in a layer. Finally, in the built image: ``python -m runner
--help``; an experiment from ``examples/hello`` end to end on a local queue (``submit``, ``--limit-tasks 1``,
``show``); the time from ``buildah run`` to ``/readyz`` answering. The figures (image size, build time, start to
ready) are printed at the end.

Needs root (buildah's storage, chroot isolation, debootstrap) and network to the Debian mirror and the package
index. ``buildah`` and ``debootstrap`` are installed with apt-get when missing.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Debian suite -> the version of its python3 package, which the image then says it supports (PYTHON_VERSIONS).
SUITES = {"trixie": "3.13", "bookworm": "3.11"}
DEFAULT_SUITE = "trixie"
# What the base adds to debootstrap's minbase: the interpreter, `python3 -m venv` (the build bootstraps uv with it,
# as it would on python:3.11-slim) and the CA certificates that pip and uv need for HTTPS.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
DEFAULT_TAG = "localhost/studio-runner:dev"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
READY_TIMEOUT = 120.0
RUN_TIMEOUT = 900.0  # an experiment builds its environment from the package index: minutes on a loaded machine

# Debian's slim images drop these at install time; the base does the same so later apt-get installs stay small.
_DPKG_EXCLUDES = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
"""
_TRIMMED = (
    "var/cache/apt/archives/*.deb",
    "var/cache/apt/*.bin",
    "var/lib/apt/lists/*",
    "var/cache/debconf/*-old",
    "var/log/*.log",
    "var/log/apt/*",
    "usr/share/man/*",
    "usr/share/info/*",
    "usr/share/lintian/*",
)


def log(message: str) -> None:
    print(f"image: {message}", flush=True)


def run(
    cmd: Sequence[str],
    *,
    stdout: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    log("$ " + re.sub(r"://[^/@\s]+@", "://***@", " ".join(cmd)))  # an index URL may carry a password
    return subprocess.run(cmd, check=True, text=True, stdout=stdout, env=env, timeout=timeout)


def ensure_tools() -> None:
    """buildah and debootstrap from Debian's packages, installed when missing (root, as on these machines)."""
    missing = [pkg for pkg, exe in (("buildah", "buildah"), ("debootstrap", "debootstrap")) if not shutil.which(exe)]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"image: needs {', '.join(missing)}: sudo apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-q"], env=env)
    run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env)


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses for the main archive (not -security), else deb.debian.org."""
    sources = Path("/etc/apt")
    files = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*"))]
    for path in files:
        if path.suffix not in ("", ".list", ".sources") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        uris: list[str] = re.findall(r"^URIs:\s*(.+)$", text, re.MULTILINE)
        for uri in uris:
            for one in uri.split():
                if one.rstrip("/").endswith("/debian"):
                    return one
        for match in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.MULTILINE):
            if match.group(1).rstrip("/").endswith("/debian"):
                return match.group(1)
    return DEFAULT_MIRROR


def package_index() -> str:
    """The index pip or uv on this machine would use, for the build's RUN steps; "" means PyPI.

    Environment first (uv's, then pip's names), then pip's config files; ``file://`` indexes are skipped, as the
    build cannot see this machine's directories.
    """
    for name in ("UV_DEFAULT_INDEX", "UV_INDEX_URL", "PIP_INDEX_URL"):
        if (value := os.environ.get(name, "").strip()) and not value.startswith("file:"):
            return value
    home = Path.home()
    config_files = [Path("/etc/pip.conf"), Path("/etc/xdg/pip/pip.conf"), home / ".pip/pip.conf"]
    config_files.append(home / ".config/pip/pip.conf")
    if os.environ.get("PIP_CONFIG_FILE"):
        config_files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    found = ""
    for path in config_files:  # later files win, as in pip
        parser = configparser.ConfigParser()
        with contextlib.suppress(OSError, configparser.Error):
            parser.read(path)
            value = str(parser.get("global", "index-url", fallback="")).strip()
            if value and not value.startswith("file:"):
                found = value
    return found


def ca_bundle() -> Path | None:
    for candidate in (os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


class Buildah:
    """buildah with its storage under the cache directory, so the base and the build layers are reused."""

    def __init__(self, cache: Path) -> None:
        self.prefix = ["buildah", "--root", str(cache / "storage"), "--runroot", str(cache / "run")]

    def __call__(self, *args: str, capture: bool = False) -> str:
        result = run([*self.prefix, *args], stdout=subprocess.PIPE if capture else None)
        return result.stdout.strip() if capture else ""

    def has_image(self, name: str) -> bool:
        return self.image_id(name) is not None

    def image_id(self, name: str) -> str | None:
        cmd = [*self.prefix, "inspect", "--type", "image", "--format", "{{.FromImageID}}", name]
        found = subprocess.run(cmd, capture_output=True, text=True)
        return found.stdout.strip() if found.returncode == 0 else None

    def remove_untagged(self, image_id: str) -> None:
        """Drop an image the tag has moved away from: its last layers (the runner's virtualenv) are its own."""
        cmd = [*self.prefix, "images", "--json", "--filter", "dangling=true"]
        listed = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout or "[]")
        if any(image_id.startswith(entry["id"]) for entry in listed):
            self("rmi", image_id)

    def image_size(self, name: str) -> str:
        """What the image takes unpacked, as buildah prints it ("233 MB")."""
        return str(json.loads(self("images", "--json", name, capture=True))[0]["size"])

    def compressed_size(self, name: str, scratch: Path) -> int:
        """Bytes a registry would store and a node would pull: the gzip-compressed layers and the config."""
        layout = scratch / "oci-layout"
        shutil.rmtree(layout, ignore_errors=True)
        try:
            self("push", "--quiet", "--compression-format", "gzip", name, f"oci:{layout}:measure")
            index = json.loads((layout / "index.json").read_text())
            digest = index["manifests"][0]["digest"].split(":", 1)[1]
            manifest = json.loads((layout / "blobs" / "sha256" / digest).read_text())
            return sum(int(part["size"]) for part in [manifest["config"], *manifest["layers"]])
        finally:
            shutil.rmtree(layout, ignore_errors=True)

    @contextlib.contextmanager
    def container(self, image: str) -> Iterator[str]:
        name = self("from", "--pull-never", image, capture=True).splitlines()[-1]
        try:
            yield name
        finally:
            self("rm", name)


def base_image(suite: str) -> str:
    return f"localhost/studio-runner-base:{suite}"


def make_rootfs_tarball(tarball: Path, suite: str, mirror: str) -> None:
    """debootstrap the base into a scratch directory, trim it like Debian's slim images, pack it."""
    rootfs = tarball.with_suffix(".rootfs")
    shutil.rmtree(rootfs, ignore_errors=True)
    try:
        include = ",".join(BASE_PACKAGES)
        run(["debootstrap", "--variant=minbase", f"--include={include}", suite, str(rootfs), mirror])
        (rootfs / "etc/dpkg/dpkg.cfg.d/01-slim").write_text(_DPKG_EXCLUDES)
        (rootfs / "etc/apt/apt.conf.d/01-slim").write_text(
            'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n'
            'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };\n'
        )
        for pattern in _TRIMMED:
            for path in rootfs.glob(pattern):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        for doc in (rootfs / "usr/share/doc").iterdir():  # keep the licences, as Debian's slim images do
            for item in doc.iterdir() if doc.is_dir() and not doc.is_symlink() else ():
                if item.name != "copyright":
                    shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
        locale = rootfs / "usr/share/locale"
        for item in locale.iterdir():
            if item.name != "locale.alias":
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        partial = tarball.with_suffix(".partial")
        run(["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", str(partial), "."])
        partial.rename(tarball)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def ensure_base(buildah: Buildah, cache: Path, suite: str, mirror: str, fresh: bool) -> None:
    tarball = cache / f"debian-{suite}-python3.tar"
    image = base_image(suite)
    if fresh:
        tarball.unlink(missing_ok=True)
        if buildah.has_image(image):
            buildah("rmi", image)
    if buildah.has_image(image):
        log(f"base {image} already in {cache / 'storage'} (--fresh-base remakes it)")
        return
    if not tarball.exists():
        started = time.monotonic()
        make_rootfs_tarball(tarball, suite, mirror)
        log(f"debootstrap from {mirror}: {time.monotonic() - started:.0f} s")
    ctr = buildah("from", "scratch", capture=True).splitlines()[-1]
    try:
        buildah("add", ctr, str(tarball), "/")
        buildah(
            "config",
            "--env",
            "LANG=C.UTF-8",
            "--env",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--cmd",
            "python3",
            "--label",
            f"org.opencontainers.image.description=Debian {suite} minbase with python3, made by debootstrap",
            ctr,
        )
        buildah("commit", "--rm", "--format", "docker", ctr, image)
    except BaseException:
        subprocess.run([*buildah.prefix, "rm", ctr], capture_output=True)
        raise


def build(buildah: Buildah, cache: Path, tag: str, base: str, python_versions: str) -> float:
    """``buildah bud`` the Containerfile; returns the seconds it took."""
    revision = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    args = [
        "bud",
        "--isolation",
        "chroot",
        "--layers",
        "--format",
        "docker",  # OCI image configs have no HEALTHCHECK
        "-f",
        str(REPO / "Containerfile"),
        "-t",
        tag,
        "--build-arg",
        f"BASE={base}",
        "--build-arg",
        f"VERSION={tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['version']}",
        "--build-arg",
        f"REVISION={revision.stdout.strip()}",
        "--build-arg",
        f"CREATED={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
    ]
    if base.startswith("localhost/"):
        args.append("--pull-never")  # made here; no registry has it
    if python_versions:
        args += ["--build-arg", f"PYTHON_VERSIONS={python_versions}"]
    with tempfile.TemporaryDirectory(dir=cache, prefix="secrets.") as secrets:
        if (bundle := ca_bundle()) is not None:
            args += ["--secret", f"id=ca_bundle,src={bundle}"]
        if index := package_index():
            index_file = Path(secrets) / "index_url"
            index_file.write_text(index)
            index_file.chmod(0o600)
            args += ["--secret", f"id=index_url,src={index_file}"]
        shown_index = urllib.parse.urlsplit(index).hostname if index else "PyPI"  # no credentials in the log
        log(f"package index: {shown_index}; CA bundle: {bundle or 'the base image’s own'}")
        started = time.monotonic()
        buildah(*args, str(REPO))
        return time.monotonic() - started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def runtime_mounts() -> list[str]:
    """What the experiment's environment build needs from this machine: its CA bundle (for HTTPS interception)."""
    bundle = ca_bundle()
    if bundle is None:
        return []
    inside = "/etc/ssl/certs/ca-certificates.crt"
    return ["-v", f"{bundle}:{inside}:ro", "-e", f"SSL_CERT_FILE={inside}"]


def index_env() -> list[str]:
    return ["-e", f"UV_DEFAULT_INDEX={index}"] if (index := package_index()) else []


def start_to_ready(buildah: Buildah, ctr: str, config: ImageConfig, *, probe: bool = False) -> float:
    """Seconds from ``buildah run`` of the image's ENTRYPOINT to ``/readyz`` answering 200.

    With ``probe``, the image's HEALTHCHECK command is then run beside it and must pass. The runner is stopped with
    SIGTERM (through buildah, then dumb-init) and must exit 0.
    """
    port = free_port()
    address = f"127.0.0.1:{port}"
    cmd = [*buildah.prefix, "run", "--isolation", "chroot", ctr, "--", *config.entrypoint]
    cmd += ["--prom-address", address, "--cpu-only"]
    started = time.monotonic()
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://{address}/readyz"
        while (elapsed := time.monotonic() - started) < READY_TIMEOUT:
            if process.poll() is not None:
                raise RuntimeError(f"the runner exited with {process.returncode} before it was ready")
            with contextlib.suppress(OSError, urllib.error.URLError), urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    break
            time.sleep(0.02)
        else:
            raise RuntimeError(f"/readyz did not answer within {READY_TIMEOUT:.0f} s")
        if probe:
            in_image = [*buildah.prefix, "run", "--isolation", "chroot", "-e", f"PROM_ADDRESS={address}", ctr, "--"]
            run([*in_image, *config.healthcheck])
            log("HEALTHCHECK passed")
        # As a container runtime would: SIGTERM to the container's first process (buildah run itself does not
        # forward signals; it kills). dumb-init passes it to the runner, which drains and exits 0.
        os.kill(descendant(process.pid, Path(config.entrypoint[0]).name), signal.SIGTERM)
        if (code := process.wait(timeout=120)) != 0:
            raise RuntimeError(f"the runner exited with {code} on SIGTERM")
        return elapsed
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def descendant(pid: int, name: str) -> int:
    """The first process called ``name`` below ``pid`` (chroot isolation shares this machine's process table)."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            text = stat.read_text()
            comm, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
            child = int(stat.parent.name)
            names[child] = comm
            children.setdefault(int(rest[1]), []).append(child)
    queue = [pid]
    while queue:
        current = queue.pop(0)
        if current != pid and names.get(current) == name[:15]:
            return current
        queue += children.get(current, [])
    raise RuntimeError(f"no {name} process below {pid}")


class ImageConfig:
    """What the checks take from the built image's configuration rather than repeat."""

    def __init__(self, buildah: Buildah, tag: str) -> None:
        config = json.loads(buildah("inspect", "--type", "image", tag, capture=True))["Docker"]["config"]
        self.entrypoint: list[str] = config["Entrypoint"]
        test: list[str] = config["Healthcheck"]["Test"]
        if test[0] != "CMD":
            raise RuntimeError(f"HEALTHCHECK is not in exec form: {test}")
        self.healthcheck = test[1:]
        self.user: str = config["User"]


def try_image(buildah: Buildah, tag: str) -> list[float]:
    """The checks run in the built image; returns the start-to-ready times measured."""
    config = ImageConfig(buildah, tag)
    if config.user.split(":")[0] in ("", "0", "root"):
        raise RuntimeError(f"the image runs as root (USER {config.user!r})")
    with buildah.container(tag) as ctr:
        in_image = [*buildah.prefix, "run", "--isolation", "chroot"]
        runner = [*config.entrypoint]
        run([*in_image, ctr, "--", *runner, "--help"], stdout=subprocess.DEVNULL)
        examples = ["-v", f"{REPO / 'examples'}:/examples:ro"]
        run([*in_image, *examples, ctr, "--", *runner, "submit", "--queue", "local_image",
             "--workspace", "/examples/hello", "train.py", "--epochs", "2"])  # fmt: skip
        started = time.monotonic()
        run([*in_image, *runtime_mounts(), *index_env(), ctr, "--", *runner, "--limit-tasks", "1",
             "--prom-address", "off", "--cpu-only"], timeout=RUN_TIMEOUT)  # fmt: skip
        log(f"experiment (environment build included): {time.monotonic() - started:.1f} s")
        shown = run([*in_image, ctr, "--", *runner, "show"], stdout=subprocess.PIPE)
        print(shown.stdout, flush=True)
        # The last line needs humanize, which the runner installed into the experiment's environment.
        if "epoch 2/2 loss=" not in shown.stdout or "saved " not in shown.stdout or '"succeeded"' not in shown.stdout:
            raise RuntimeError("`show` printed no complete output of a successful experiment")
        return [start_to_ready(buildah, ctr, config, probe=attempt == 0) for attempt in range(3)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    default_cache = os.environ.get("IMAGE_CACHE") or str(Path.home() / ".cache" / "studio-runner-image")
    parser.add_argument("--cache", type=Path, default=Path(default_cache), help="default: %(default)s ($IMAGE_CACHE)")
    parser.add_argument("--tag", default=DEFAULT_TAG, help="default: %(default)s")
    parser.add_argument("--base", help="build on this image instead of the debootstrap base (needs a registry)")
    mirror = os.environ.get("DEBIAN_MIRROR") or apt_mirror()
    parser.add_argument("--mirror", default=mirror, help="Debian mirror for debootstrap; default: %(default)s")
    parser.add_argument("--suite", choices=sorted(SUITES), default=DEFAULT_SUITE, help="default: %(default)s")
    parser.add_argument(
        "--python-versions", help='PYTHON_VERSIONS build argument, e.g. "3.13 3.12"; default: the base\'s python3'
    )
    parser.add_argument("--fresh-base", action="store_true", help="debootstrap the base again")
    args = parser.parse_args(argv)

    ensure_tools()
    cache: Path = args.cache.resolve()
    if cache.is_relative_to(REPO):
        sys.exit(f"image: keep the cache ({cache}) outside the repository")
    cache.mkdir(parents=True, exist_ok=True)
    buildah = Buildah(cache)
    if args.base is None:
        ensure_base(buildah, cache, args.suite, args.mirror, args.fresh_base)
    python_versions = args.python_versions or ("" if args.base else SUITES[args.suite])
    previous = buildah.image_id(args.tag)
    seconds = build(buildah, cache, args.tag, args.base or base_image(args.suite), python_versions)
    if previous is not None and previous != buildah.image_id(args.tag):
        buildah.remove_untagged(previous)
    size, compressed = buildah.image_size(args.tag), buildah.compressed_size(args.tag, cache)
    ready = try_image(buildah, args.tag)
    log(f"image {args.tag}: {size} unpacked, {compressed / 1e6:.0f} MB compressed; built in {seconds:.0f} s")
    log(f"start to /readyz: {statistics.median(ready):.2f} s (median of {', '.join(f'{r:.2f}' for r in ready)} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
