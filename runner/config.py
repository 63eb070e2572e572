"""Runner settings: every option is a command-line flag and, failing that, an environment variable.

The environment rule is studio-go-runner's (``envflag``): an option not given on the command line is read from the
variable named by upper-casing the flag and replacing ``-`` and ``.`` with ``_`` (``--queue-match`` ->
``QUEUE_MATCH``); the command line wins. Flags also accept Go's single-dash spelling (``-queue-match x``) so existing
manifests keep working. Unlike the Go runner, which ignored values it could not parse, every value is validated and
all problems are reported together, so one restart fixes them all.
"""

from __future__ import annotations

import argparse
import difflib
import os
import pwd
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import platformdirs

from runner.amqp_endpoint import AmqpEndpoint, redact_url
from runner.expand import expand_variables
from runner.outcome import MAX_DELIVERIES
from runner.queues.matcher import DEFAULT_MATCH, QueueMatcher
from runner.units import DURATION_FORM, SIZE_FORM, format_duration, format_size, parse_duration, parse_size

PROG = "python -m runner"
APP_NAME = "studio-runner"

_TRUE = frozenset({"true", "t", "yes", "y", "on", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "off", "0"})
_LOG_FORMATS = ("auto", "text", "json")
_SPOT_PROVIDERS = ("aws", "gcp")


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` holds one readable sentence per bad option."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("; ".join(self.problems))


def main_error(err: ConfigError) -> str:
    """The text to print on stderr before exiting with code 2."""
    return "\n".join(["studio-runner: invalid configuration:", *(f"  - {problem}" for problem in err.problems)])


DEFAULT_PROM_ADDRESS = ":9090"  # also where `python -m runner check` looks when PROM_ADDRESS is unset


@dataclass(frozen=True)
class Settings:
    working_dir: Path
    queue_root: Path
    queue_match: str
    queue_mismatch: str
    cache_dir: Path
    cache_size: int  # bytes; 0 disables the artifact cache
    file_roots: tuple[Path, ...]  # file:// artifacts only below these; () = anywhere
    env_cache_dir: Path
    env_cache_size: int  # bytes; 0 = unbounded
    max_cores: int  # 0 = all logical CPUs
    max_mem: int  # bytes; 0 = all available RAM
    max_disk: int  # bytes all experiments together may reserve; 0 = free space above a 10 % reserve
    max_output_size: int  # bytes of an experiment's output kept (its head and tail); 0 = all of it
    cpu_only: bool
    require_gpu: bool  # refuse to start without a usable GPU, even where no NVIDIA driver is installed
    debug: bool
    allow_env_secrets: bool
    metrics_queue_limit: int  # queues labelled by name in /metrics; the rest are counted together
    prom_address: str  # "" when the HTTP server is off
    log_format: str  # auto | text | json
    limit_tasks: int  # 0 = no limit
    limit_idle_duration: float  # seconds; 0 = off
    limit_interval: float  # seconds; accepted for compatibility only
    stop_grace: float  # seconds
    drain_timeout: float  # seconds
    status_interval: float  # seconds
    retry_failed: int
    max_deliveries: int
    max_message_size: int  # bytes; a longer message is dead-lettered unread
    poll_interval: float  # seconds
    amqp_url: str  # "" = RabbitMQ off; holds the password: shown only through redact_url
    amqp_mgt_url: str  # "" = derived from amqp_url
    amqp_discover_interval: float  # seconds
    amqp_orphan_grace: float  # seconds
    sqs_certs: Path | None  # one sub-directory of AWS credentials per account; None = no such directory
    sqs_timeout: float  # seconds, for each discrete SQS call
    sqs_visibility: float  # seconds a received SQS message stays invisible before its lease is extended
    pubsub_project: str  # Google Cloud project whose Pub/Sub subscriptions are served; "" = Pub/Sub off
    pubsub_ack_deadline: float  # seconds a pulled Pub/Sub message is held per lease extension
    aws_region: str  # region of the SQS queues reached with the default AWS credential chain; "" = none
    s3_ca: Path | None
    s3_cert: Path | None
    s3_key: Path | None
    s3_part_size: int  # bytes
    transfer_concurrency: int
    encrypt_dir: Path | None  # the runner's message key, in studio-go-runner's layout; None = no encrypted requests
    request_signatures_dir: Path | None  # one ssh-ed25519 public key per queue-name prefix
    clear_text_messages: bool  # whether unencrypted requests are accepted
    response_signatures_dir: Path | None  # experimenters' RSA report keys, one per queue-name prefix
    slack_hook: str  # webhook URL for runner notices; "" = none. The URL is the credential: never logged
    spot_notice: str  # "" = off, "aws" or "gcp": whose metadata service announces the machine's reclaim
    spot_budget: float  # seconds; caps the provider's notice time; 0 = the provider's
    metadata_endpoint: str  # base URL of the metadata service; "" = the provider's own
    sandbox: str  # auto | on | off
    sandbox_read: tuple[Path, ...]  # directories experiments may read besides the system and their own
    experiment_user: str  # "" = the runner's user

    k8s_configmap: str  # the cluster-wide ConfigMap of cluster control (runner/k8s.py)
    k8s_namespace: str  # where the ConfigMaps are; "" = the pod's own namespace
    k8s_kubeconfig: Path | None  # None = the pod's service account (in a cluster) or cluster control off

    @property
    def shared_broker(self) -> bool:
        """Whether a network broker is served: whoever can publish there is not this machine's owner."""
        return bool(self.amqp_url or self.sqs_certs or self.aws_region or self.pubsub_project)

    def queue_matcher(self) -> QueueMatcher:
        return QueueMatcher.from_strings(self.queue_match, self.queue_mismatch)

    def prom_listen(self) -> tuple[str, int] | None:
        """Where the HTTP server listens: ``(host, port)`` with host "" for every interface, or None when off."""
        return listen_address(self.prom_address) if self.prom_address else None

    def summary(self) -> dict[str, str]:
        """Every setting as text for the startup log line; passwords in URLs are masked."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _ZERO_SIZE_MEANS:
                out[f.name] = format_size(value) if value else _ZERO_SIZE_MEANS[f.name]
            elif isinstance(value, bool):
                out[f.name] = "true" if value else "false"
            elif isinstance(value, float):  # every float setting is a duration in seconds
                out[f.name] = format_duration(value) if value else "0s"
            else:
                out[f.name] = str(value)
        out["prom_address"] = self.prom_address or "off"
        out["amqp_url"] = redact_url(self.amqp_url) or "off"
        out["amqp_mgt_url"] = redact_url(self.amqp_mgt_url) or "derived from amqp_url"
        out["slack_hook"] = hidden_url(self.slack_hook) or "off"
        return out


_ZERO_SIZE_MEANS = {
    "cache_size": "0 (cache disabled)",
    "env_cache_size": "0 (unbounded)",
    "max_mem": "0 (all available)",
    "max_disk": "0 (free space)",
    "max_output_size": "0 (unlimited)",
}


# --- converters: each turns option text into a value or raises _Invalid with what is wrong --------------------------


class _Invalid(ValueError):
    """``reason`` completes a sentence whose subject is the offending value: "'abc' <reason>"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_Converter = Callable[[str, Mapping[str, str]], Any]


def _size(text: str, environ: Mapping[str, str]) -> int:
    try:
        return parse_size(text)
    except ValueError:
        raise _Invalid("is not a byte size") from None


def _memory(text: str, environ: Mapping[str, str]) -> int:
    value = _size(text, environ)
    total = _physical_memory()
    if total is not None and value > total:
        raise _Invalid(f"is more than the {format_size(total)} of RAM in this machine")
    return value


def _message_size(text: str, environ: Mapping[str, str]) -> int:
    value = _size(text, environ)
    if value < 1024:
        raise _Invalid("is less than 1 KiB: no StudioML request is that short")
    return value


def _duration(text: str, environ: Mapping[str, str]) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise _Invalid("is not a duration") from None
    if seconds < 0:
        raise _Invalid("is negative")
    return seconds


def _positive_duration(text: str, environ: Mapping[str, str]) -> float:
    seconds = _duration(text, environ)
    if seconds == 0:
        raise _Invalid("is zero")
    return seconds


def _count(text: str, environ: Mapping[str, str]) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise _Invalid("is not a whole number") from None
    if value < 0:
        raise _Invalid("is negative")
    return value


def _at_least_one(text: str, environ: Mapping[str, str]) -> int:
    value = _count(text, environ)
    if value < 1:
        raise _Invalid("is zero")
    return value


def _cores(text: str, environ: Mapping[str, str]) -> int:
    value = _count(text, environ)
    available = os.cpu_count()
    if available is not None and value > available:
        raise _Invalid(f"is more than the {available} logical CPUs of this machine")
    return value


def _bool(text: str, environ: Mapping[str, str]) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise _Invalid("is not a boolean")


def _regex(text: str, environ: Mapping[str, str]) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise _Invalid(f"is not a valid regular expression ({exc})") from None
    return text


def _optional_regex(text: str, environ: Mapping[str, str]) -> str:
    return _regex(text, environ) if text.strip() else ""


def _spot_provider(text: str, environ: Mapping[str, str]) -> str:
    word = text.strip().lower()
    if word in ("", "off"):
        return ""
    if word not in _SPOT_PROVIDERS:
        raise _Invalid("is not a spot notice provider")
    return word


def _http_url(text: str, environ: Mapping[str, str]) -> str:
    url = text.strip().rstrip("/")
    if url and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
        raise _Invalid("is not an http(s) URL")
    return url


def _k8s_name(text: str, environ: Mapping[str, str]) -> str:
    name = text.strip()
    if len(name) > 253 or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name):
        raise _Invalid("is not a Kubernetes object name")
    return name


def _k8s_namespace(text: str, environ: Mapping[str, str]) -> str:
    name = text.strip()
    if name and (len(name) > 63 or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)):
        raise _Invalid("is not a Kubernetes namespace name")
    return name


def _log_format(text: str, environ: Mapping[str, str]) -> str:
    word = text.strip().lower()
    if word not in _LOG_FORMATS:
        raise _Invalid("is not a log format")
    return word


def listen_address(address: str) -> tuple[str, int]:
    """``host:port``, ``:port`` or ``[v6]:port`` as (host, port); host "" means every interface. Raises ValueError."""
    host, colon, port = address.strip().rpartition(":")
    if not colon or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ValueError("is not a listen address with a port")
    bracketed = host.startswith("[") and host.endswith("]")
    if ":" in host and not bracketed:  # a bare IPv6 host would make the port ambiguous
        raise ValueError("needs brackets around its IPv6 host")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _address(text: str, environ: Mapping[str, str]) -> str:
    address = text.strip()
    if address.lower() in ("", "off"):
        return ""
    try:
        listen_address(address)
    except ValueError as err:
        raise _Invalid(str(err)) from None
    return address


def _path(text: str, environ: Mapping[str, str]) -> Path:
    """Expand ``~`` and ``${VAR}``/``$VAR`` from ``environ`` (not ``os.environ``, so tests and callers stay in
    control) and make the path absolute. An unset variable is an error: silently expanding it to "" would send
    work to a surprising directory."""
    try:
        expanded = expand_variables(text, environ)
    except ValueError as err:
        raise _Invalid(str(err)) from None
    if expanded == "~" or expanded.startswith("~/"):
        expanded = (environ.get("HOME") or str(Path.home())) + expanded[1:]
    path = Path(expanded).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise _Invalid("exists and is not a directory")
    return path


def _optional_dir(text: str, environ: Mapping[str, str]) -> Path | None:
    return _path(text, environ) if text.strip() else None


def hidden_url(url: str) -> str:
    """``url`` with only its scheme and host shown: a webhook's path is its password."""
    if not url:
        return ""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}/****"


def _webhook_url(text: str, environ: Mapping[str, str]) -> str:
    if not text.strip():
        return ""
    try:
        url = expand_variables(text.strip(), environ)
        parts = urlsplit(url)
    except ValueError as err:
        raise _Invalid(str(err)) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Invalid("is not an http:// or https:// URL with a host")
    return url


def _dir_list(text: str, environ: Mapping[str, str]) -> tuple[Path, ...]:
    return tuple(_path(part.strip(), environ) for part in text.split(",") if part.strip())


def _sandbox_mode(text: str, environ: Mapping[str, str]) -> str:
    word = text.strip().lower()
    if word == "auto":
        return word
    if word in _TRUE or word in _FALSE:
        return "on" if word in _TRUE else "off"
    raise _Invalid("is not a sandbox mode")


def _user(text: str, environ: Mapping[str, str]) -> str:
    name = text.strip()
    if not name:
        return ""
    try:
        if name.isascii() and name.isdigit():
            pwd.getpwuid(int(name))
        else:
            pwd.getpwnam(name)
    except (KeyError, OverflowError):
        raise _Invalid("is not a user of this machine") from None
    return name


def _optional_file(text: str, environ: Mapping[str, str]) -> Path | None:
    if not text.strip():
        return None
    path = Path(os.path.expanduser(text.strip())).absolute()
    if not path.is_file():
        raise _Invalid("is not a readable file")
    return path


def _ack_deadline(text: str, environ: Mapping[str, str]) -> float:
    seconds = _duration(text, environ)
    if not 10 <= seconds <= 600:
        raise _Invalid("is outside Pub/Sub's ack deadlines (10s to 10m)")
    return seconds


def _project(text: str, environ: Mapping[str, str]) -> str:
    project = text.strip()
    if project and not re.fullmatch(r"[a-z][a-z0-9.:-]{2,62}", project):
        raise _Invalid("is not a Google Cloud project id")
    return project


def _region(text: str, environ: Mapping[str, str]) -> str:
    region = text.strip().lower()
    if region and not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", region):
        raise _Invalid("is not an AWS region name")
    return region


def _part_size(text: str, environ: Mapping[str, str]) -> int:
    value = _size(text, environ)
    if not 5 << 20 <= value <= 5 << 30:
        raise _Invalid("is outside S3's part sizes (5mib to 5gib)")
    return value


def _amqp_url(text: str, environ: Mapping[str, str]) -> str:
    if not text.strip():
        return ""
    try:
        url = expand_variables(text, environ)
        AmqpEndpoint.parse(url)
    except ValueError as err:
        raise _Invalid(str(err)) from None
    return url


def _amqp_management_url(text: str, environ: Mapping[str, str]) -> str:
    if not text.strip():
        return ""
    try:
        url = expand_variables(text, environ)
        AmqpEndpoint.parse("amqp://localhost/", url)
    except ValueError as err:
        raise _Invalid(str(err).removeprefix("management URL ")) from None
    return url


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # not every platform can tell
        return None


def _cache_root() -> Path:
    return platformdirs.user_cache_path(APP_NAME)


def _queue_root_default(environ: Mapping[str, str]) -> str:
    # The StudioML client's own local queue, so `studio run --queue local_x` reaches the runner with no setup.
    home = environ.get("STUDIOML_HOME", "").strip()
    return f"{home}/queue" if home else "~/.studioml/queue"


# --- the option table ---------------------------------------------------------------------------------------------

_PATH_FORM = "a directory path (~, $VAR and ${VAR} are expanded)"
_COUNT_FORM = "a whole number, 0 or more"
_BOOL_FORM = "true or false (also 1/0, yes/no)"


@dataclass(frozen=True)
class _Option:
    flag: str  # without dashes, e.g. "queue-match"
    group: str
    parse: _Converter
    default: str | Callable[[Mapping[str, str]], str]  # text, converted like any given value
    form: str  # the accepted form, quoted in problems
    help: str
    metavar: str = ""
    shown_default: str = ""  # how --help shows a computed default
    blank_is_value: bool = False  # "" means something for this option, so an empty env var is not "unset"
    switch: bool = False  # a boolean flag that takes no value on the command line
    secret: bool = False  # the value may hold a password: problems show it masked
    mask: Callable[[str], str] | None = None  # how problems show a secret value; default: its URL password masked

    @property
    def env(self) -> str:
        return self.flag.upper().replace("-", "_").replace(".", "_")

    @property
    def field(self) -> str:
        return self.flag.replace("-", "_")

    def default_text(self, environ: Mapping[str, str]) -> str:
        return self.default(environ) if callable(self.default) else self.default


_QUEUES = "queues"
_STORAGE = "storage"
_RESOURCES = "resources"
_LIFECYCLE = "lifecycle"
_ISOLATION = "isolation"
_JOB = "job mode"
_OPERATIONS = "operations"
_PRIVACY = "privacy"
_CLUSTER = "cluster"

_GROUP_TITLES = {
    _QUEUES: "queues (where experiments come from)",
    _STORAGE: "storage (directories and caches)",
    _RESOURCES: "resources (what experiments may use on this machine)",
    _ISOLATION: "isolation (what experiments can reach on this machine; docs/security.md)",
    _LIFECYCLE: "lifecycle (stopping, draining and retrying experiments)",
    _JOB: "job mode (exit when the work is done: Kubernetes Jobs, scale to zero)",
    _OPERATIONS: "operations (metrics, logs, debugging)",
    _PRIVACY: "privacy (encrypted and signed requests: docs/privacy.md)",
    _CLUSTER: "cluster control (Kubernetes ConfigMaps: docs/kubernetes.md)",
}

_OPTIONS: tuple[_Option, ...] = (
    _Option(
        "queue-root",
        _QUEUES,
        _path,
        _queue_root_default,
        _PATH_FORM,
        "directory of local file queues; the StudioML client's own local queue by default",
        metavar="DIR",
        shown_default="$STUDIOML_HOME/queue, else ~/.studioml/queue",
    ),
    _Option(
        "queue-match",
        _QUEUES,
        _regex,
        DEFAULT_MATCH,
        f"a Python regular expression such as {DEFAULT_MATCH}",
        "regular expression a queue name must match to be served",
        metavar="REGEX",
    ),
    _Option(
        "queue-mismatch",
        _QUEUES,
        _optional_regex,
        "",
        "a Python regular expression, or empty",
        "regular expression a queue name must not match; empty = no exclusion",
        metavar="REGEX",
        blank_is_value=True,
    ),
    _Option(
        "poll-interval",
        _QUEUES,
        _positive_duration,
        "1s",
        f"{DURATION_FORM}, above 0",
        "how often local queue directories on network filesystems (NFS, EFS, SMB) are looked at for messages "
        "written by other machines; elsewhere the kernel reports new messages at once",
        metavar="DURATION",
    ),
    _Option(
        "max-message-size",
        _QUEUES,
        _message_size,
        # A real request (a full pip freeze included) is 6 KB; SQS carried at most 256 KiB for years. The bound
        # keeps the decoding of the worst message this size can hold to a few milliseconds of the event loop.
        "256kib",
        f"{SIZE_FORM}, 1 KiB or more",
        "longest message body that is decoded; a longer one is dead-lettered unread (outcome rejected)",
        metavar="SIZE",
    ),
    _Option(
        "amqp-url",
        _QUEUES,
        _amqp_url,
        "",
        "amqp://user:password@host:port/vhost or amqps://..., or empty ($VAR and ${VAR} are expanded)",
        "RabbitMQ server whose StudioML queues are served (user and password default to guest); empty = none",
        metavar="URL",
        blank_is_value=True,
        secret=True,
    ),
    _Option(
        "amqp-mgt-url",
        _QUEUES,
        _amqp_management_url,
        "",
        "http(s)://[user:password@]host:port, or empty ($VAR and ${VAR} are expanded)",
        "RabbitMQ management API used to discover queues; empty = the AMQP host at its port + 10000 (https for "
        "amqps). Credentials given here replace those of --amqp-url",
        metavar="URL",
        blank_is_value=True,
        secret=True,
    ),
    _Option(
        "amqp-discover-interval",
        _QUEUES,
        _positive_duration,
        "10s",
        f"{DURATION_FORM}, above 0",
        "how often RabbitMQ queues are listed; new queues are served and deleted ones dropped without a restart",
        metavar="DURATION",
    ),
    _Option(
        "amqp-orphan-grace",
        _QUEUES,
        _positive_duration,
        "2m",
        f"{DURATION_FORM}, above 0",
        "how long a runner may stay disconnected from RabbitMQ before other runners return the messages it "
        "holds to their queues (docs/rabbitmq.md)",
        metavar="DURATION",
    ),
    _Option(
        "sqs-certs",
        _QUEUES,
        _optional_dir,
        "",
        f"{_PATH_FORM}, or empty",
        "directory with one sub-directory of AWS credentials and config files per account whose SQS queues are "
        "served (read again at every discovery); empty = none",
        metavar="DIR",
        blank_is_value=True,
    ),
    _Option(
        "aws-region",
        _QUEUES,
        _region,
        "",
        "an AWS region such as us-west-2, or empty",
        "serve the SQS queues of this region reached with the default AWS credential chain (environment, shared "
        "files, IRSA, instance profile); empty = only --sqs-certs accounts. Also the default region for S3",
        metavar="REGION",
        blank_is_value=True,
    ),
    _Option(
        "sqs-timeout",
        _QUEUES,
        _positive_duration,
        "15s",
        f"{DURATION_FORM}, above 0",
        "time limit of each discrete SQS call (listing queues, extending leases, settling)",
        metavar="DURATION",
    ),
    _Option(
        "sqs-visibility",
        _QUEUES,
        _positive_duration,
        "2m",
        f"{DURATION_FORM}, above 0",
        "how long a received SQS message stays invisible to other runners; the lease is extended every third of "
        "it while the experiment runs, and a message of a runner that died reappears after it",
        metavar="DURATION",
    ),
    _Option(
        "pubsub-project",
        _QUEUES,
        _project,
        "",
        "a Google Cloud project id, or empty",
        "serve the Pub/Sub subscriptions of this project (<queue>_sub serves the StudioML client's topic <queue>; "
        "set --queue-match to their names); credentials from GOOGLE_APPLICATION_CREDENTIALS or the metadata server, "
        "PUBSUB_EMULATOR_HOST for an emulator; empty = Pub/Sub off",
        metavar="PROJECT",
        blank_is_value=True,
    ),
    _Option(
        "pubsub-ack-deadline",
        _QUEUES,
        _ack_deadline,
        "60s",
        f"{DURATION_FORM}, 10s to 10m",
        "how long a pulled Pub/Sub message is held for this runner; extended on receipt, then every third of it "
        "while the experiment runs, and a message of a runner that died is delivered again after it",
        metavar="DURATION",
    ),
    _Option(
        "working-dir",
        _STORAGE,
        _path,
        lambda _env: str(_cache_root() / "work"),
        _PATH_FORM,
        "root of the experiment directories; its filesystem is the one --max-disk accounts for",
        metavar="DIR",
        shown_default="<user cache>/studio-runner/work",
    ),
    _Option(
        "file-roots",
        _STORAGE,
        _dir_list,
        "",
        "comma-separated directories, or empty",
        "file:// artifacts may only name paths below these directories (symlinks followed); empty = any path the "
        "runner can read or write, which suits a workstation but not a runner fed by a shared broker",
        metavar="DIR,...",
        blank_is_value=True,
    ),
    _Option(
        "cache-dir",
        _STORAGE,
        _path,
        lambda _env: str(_cache_root() / "artifacts"),
        _PATH_FORM,
        "artifact download cache",
        metavar="DIR",
        shown_default="<user cache>/studio-runner/artifacts",
    ),
    _Option(
        "cache-size",
        _STORAGE,
        _size,
        "10gib",
        f"{SIZE_FORM}, or 0",
        "byte budget of the artifact cache; 0 disables the cache",
        metavar="SIZE",
    ),
    _Option(
        "env-cache-dir",
        _STORAGE,
        _path,
        lambda _env: str(_cache_root() / "envs"),
        _PATH_FORM,
        "cache of built Python environments; runners on one host or volume may share it",
        metavar="DIR",
        shown_default="<user cache>/studio-runner/envs",
    ),
    _Option(
        "env-cache-size",
        _STORAGE,
        _size,
        "20gib",
        f"{SIZE_FORM}, or 0",
        "disk budget of the environment cache (with uv's cache inside it); least recently used environments "
        "nobody uses are evicted beyond it; 0 = unbounded",
        metavar="SIZE",
    ),
    _Option(
        "allow-env-secrets",
        _STORAGE,
        _bool,
        "false",
        _BOOL_FORM,
        "use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from an experiment's config.env for artifacts "
        "that carry no credentials",
        switch=True,
    ),
    _Option(
        "s3-ca",
        _STORAGE,
        _optional_file,
        "",
        "a PEM file path, or empty",
        "CA certificates to trust for self-hosted S3 endpoints; setting any --s3-* TLS option makes them https",
        metavar="FILE",
        blank_is_value=True,
    ),
    _Option(
        "s3-cert",
        _STORAGE,
        _optional_file,
        "",
        "a PEM file path, or empty",
        "client certificate for S3 endpoints (may also hold the key)",
        metavar="FILE",
        blank_is_value=True,
    ),
    _Option(
        "s3-key",
        _STORAGE,
        _optional_file,
        "",
        "a PEM file path, or empty",
        "private key of --s3-cert",
        metavar="FILE",
        blank_is_value=True,
    ),
    _Option(
        "s3-part-size",
        _STORAGE,
        _part_size,
        "8mib",
        "a byte size from 5mib to 5gib",
        "part size of S3 multipart uploads; larger objects are uploaded in parts of this size",
        metavar="SIZE",
    ),
    _Option(
        "transfer-concurrency",
        _STORAGE,
        _at_least_one,
        "16",
        "a whole number, 1 or more",
        "object-store requests in flight at once across all experiments (ranged downloads, upload parts)",
        metavar="N",
    ),
    _Option(
        "max-cores",
        _RESOURCES,
        _cores,
        "0",
        f"a whole number from 0 (all) to {os.cpu_count() or 'the CPU count'}",
        "logical CPUs experiments may reserve; 0 = all",
        metavar="N",
    ),
    _Option(
        "max-mem",
        _RESOURCES,
        _memory,
        "0",
        f"{SIZE_FORM}, or 0",
        "RAM experiments may reserve; 0 = all available RAM",
        metavar="SIZE",
    ),
    _Option(
        "max-disk",
        _RESOURCES,
        _size,
        "0",
        f"{SIZE_FORM}, or 0",
        "disk all experiments together may reserve on the working-dir filesystem; 0 = all free space above a "
        "10 % reserve (studio-go-runner used this value as a minimum-free mark instead)",
        metavar="SIZE",
    ),
    _Option(
        "max-output-size",
        _RESOURCES,
        _size,
        "64mib",
        f"{SIZE_FORM}, or 0",
        "output (stdout and stderr) kept of each experiment: beyond it the first and the last half are kept and "
        "a note says how much was left out between them; the last half is held in memory until the process ends; "
        "0 = keep everything",
        metavar="SIZE",
    ),
    _Option(
        "cpu-only",
        _RESOURCES,
        _bool,
        "false",
        _BOOL_FORM,
        "use no GPUs, even when this machine has some",
        switch=True,
    ),
    _Option(
        "require-gpu",
        _RESOURCES,
        _bool,
        "false",
        _BOOL_FORM,
        "refuse to start without a usable GPU; without it a machine with no NVIDIA driver at all runs CPU-only work",
        switch=True,
    ),
    _Option(
        "sandbox",
        _ISOLATION,
        _sandbox_mode,
        "auto",
        "one of auto, on, off",
        "confine experiments with Landlock to the system, their environment, their own directory and the "
        "--sandbox-read directories; auto = on when a network broker (RabbitMQ, SQS, Pub/Sub) is served, off for "
        "local queues only; on refuses to start where the kernel has no Landlock",
        metavar="MODE",
    ),
    _Option(
        "sandbox-read",
        _ISOLATION,
        _dir_list,
        "",
        "comma-separated directories, or empty",
        "directories sandboxed experiments may read besides the system's (datasets, shared models); none may hold "
        "the runner's own directories or credentials",
        metavar="DIR,...",
        blank_is_value=True,
    ),
    _Option(
        "experiment-user",
        _ISOLATION,
        _user,
        "",
        "a user name or number of this machine, or empty",
        "run experiments as this unprivileged user (the runner must run as root); empty = the runner's user "
        "(root experiments then run without capabilities when sandboxed)",
        metavar="USER",
        blank_is_value=True,
    ),
    _Option(
        "stop-grace",
        _LIFECYCLE,
        _duration,
        "30s",
        DURATION_FORM,
        "time between SIGTERM and SIGKILL when an experiment's processes are stopped",
        metavar="DURATION",
    ),
    _Option(
        "drain-timeout",
        _LIFECYCLE,
        _duration,
        "30s",
        DURATION_FORM,
        "on SIGTERM/SIGINT, how long running experiments may finish before they are interrupted and requeued",
        metavar="DURATION",
    ),
    _Option(
        "status-interval",
        _LIFECYCLE,
        _positive_duration,
        "10s",
        f"{DURATION_FORM}, above 0",
        "how often an experiment's _status artifact is checked for a stop request",
        metavar="DURATION",
    ),
    _Option(
        "retry-failed",
        _LIFECYCLE,
        _count,
        "0",
        _COUNT_FORM,
        "how many more times a failed experiment is run",
        metavar="N",
    ),
    _Option(
        "max-deliveries",
        _LIFECYCLE,
        _at_least_one,
        str(MAX_DELIVERIES),
        "a whole number, 1 or more",
        "deliveries that may end in an infrastructure error before the message is dead-lettered",
        metavar="N",
    ),
    _Option(
        "spot-notice",
        _LIFECYCLE,
        _spot_provider,
        "off",
        "one of off, aws, gcp",
        "watch this cloud's metadata service for the notice that a spot or preemptible machine is taken back "
        "(AWS: IMDSv2 spot/instance-action; GCE: instance/preempted); a notice drains within the time the provider "
        "gives (AWS: until the notice's time, about 2m; GCE: 30s): experiments are interrupted at once, upload what "
        "fits and are requeued, and the runner exits 0 (docs/kubernetes.md)",
        metavar="PROVIDER",
    ),
    _Option(
        "spot-budget",
        _LIFECYCLE,
        _duration,
        "0",
        DURATION_FORM,
        "at most this long for a drain started by a spot notice, when less than the provider gives is left (GKE's "
        "graceful node shutdown kills pods after 15s of the 30s); 0 = the provider's time",
        metavar="DURATION",
    ),
    _Option(
        "metadata-endpoint",
        _LIFECYCLE,
        _http_url,
        "",
        "an http(s) URL, or empty",
        "base URL of the metadata service --spot-notice watches; empty = the provider's own "
        "(http://169.254.169.254, http://metadata.google.internal)",
        metavar="URL",
        blank_is_value=True,
    ),
    _Option(
        "limit-tasks",
        _JOB,
        _count,
        "0",
        _COUNT_FORM,
        "stop taking work after this many experiments and exit when they finish; 0 = no limit",
        metavar="N",
    ),
    _Option(
        "limit-idle-duration",
        _JOB,
        _duration,
        "0",
        DURATION_FORM,
        "exit after this long with nothing running; 0 = never",
        metavar="DURATION",
    ),
    _Option(
        "limit-interval",
        _JOB,
        _duration,
        "5m",
        DURATION_FORM,
        "accepted for compatibility with studio-go-runner; limits are checked continuously",
        metavar="DURATION",
    ),
    _Option(
        "prom-address",
        _OPERATIONS,
        _address,
        DEFAULT_PROM_ADDRESS,
        "host:port or :port (port 0 picks a free port), or off",
        "listen address of the HTTP server (/metrics, /healthz, /readyz, /status); empty or off disables it",
        metavar="ADDR",
        blank_is_value=True,
    ),
    _Option(
        "metrics-queue-limit",
        _OPERATIONS,
        _count,
        "200",
        "a whole number",
        "queues labelled by name in /metrics at a time; series of further queues are summed under "
        "queue='_other', and a queue's series go when the queue does",
        metavar="N",
    ),
    _Option(
        "slack-hook",
        _OPERATIONS,
        _webhook_url,
        "",
        "an http(s) URL, or empty ($VAR and ${VAR} are expanded)",
        "Slack incoming-webhook URL (or any webhook taking Slack's JSON) told of runner start and stop and of "
        "failed experiments, rate-limited; empty = none (docs/notifications.md)",
        metavar="URL",
        blank_is_value=True,
        secret=True,
        mask=hidden_url,
    ),
    _Option(
        "log-format",
        _OPERATIONS,
        _log_format,
        "auto",
        "one of auto, text, json",
        "log line format; auto = text on a terminal, json otherwise",
        metavar="FORMAT",
    ),
    _Option(
        "debug",
        _OPERATIONS,
        _bool,
        "false",
        _BOOL_FORM,
        "keep experiment directories and log at debug level (request bodies and secrets are never logged)",
        switch=True,
    ),
    _Option(
        "encrypt-dir",
        _PRIVACY,
        _optional_dir,
        "./certs/message",
        f"{_PATH_FORM}, or empty",
        "the runner's message key as studio-go-runner's secrets mount it: encryption/ssh-privatekey (PEM RSA, "
        "passphrase-protected), encryption/ssh-publickey, passphrase/ssh-passphrase. Without it encrypted requests "
        "are handed back to their queue; empty = none",
        metavar="DIR",
        blank_is_value=True,
    ),
    _Option(
        "request-signatures-dir",
        _PRIVACY,
        _optional_dir,
        "./certs/queues/signing",
        f"{_PATH_FORM}, or empty",
        "one file per queue-name prefix holding the experimenter's 'ssh-ed25519 AAAA...' public key; encrypted "
        "requests must be signed by the key of the longest prefix of their queue's name; re-read while running",
        metavar="DIR",
        blank_is_value=True,
    ),
    _Option(
        "response-signatures-dir",
        _PRIVACY,
        _optional_dir,
        "./certs/queues/response-encrypt",
        f"{_PATH_FORM}, or empty",
        "one file per queue-name prefix holding an experimenter's RSA public key (PEM); when <queue>_response exists "
        "and the longest prefix of its name has a key, experiments from <queue> publish reports there, encrypted "
        "for that key; re-read while running; empty = no reports",
        metavar="DIR",
        blank_is_value=True,
    ),
    _Option(
        "clear-text-messages",
        _PRIVACY,
        _bool,
        "true",
        _BOOL_FORM,
        "accept unencrypted requests; =false dead-letters them (studio-go-runner 0.14 defaulted to false)",
        switch=True,
    ),
    _Option(
        "k8s-configmap",
        _CLUSTER,
        _k8s_name,
        "studioml-go-runner",
        "a Kubernetes object name",
        "in a Kubernetes pod, the ConfigMap whose STATE (Running, DrainAndSuspend, DrainAndTerminate), QUEUE_MATCH "
        "and QUEUE_MISMATCH steer every runner of the namespace, live; the ConfigMap named after the pod ($HOSTNAME) "
        "overrides it for one runner",
        metavar="NAME",
    ),
    _Option(
        "k8s-namespace",
        _CLUSTER,
        _k8s_namespace,
        "",
        "a Kubernetes namespace name, or empty",
        "namespace of those ConfigMaps; empty = the pod's own",
        metavar="NAMESPACE",
        blank_is_value=True,
    ),
    _Option(
        "k8s-kubeconfig",
        _CLUSTER,
        _optional_file,
        "",
        "a kubeconfig file, or empty",
        "reach the cluster with this kubeconfig instead of the pod's service account (outside a pod: tests, "
        "a workstation); empty = cluster control only inside a pod",
        metavar="FILE",
        blank_is_value=True,
    ),
)

_BY_FLAG: Mapping[str, _Option] = {option.flag: option for option in _OPTIONS}


def option_default(flag: str) -> Any:
    """The default of option ``flag`` (one that does not depend on the environment), converted as a given value
    would be: what a backend built without Settings (a test, a bench) takes as its constructor's default, so that
    every default is written in the option table only."""
    option = _BY_FLAG[flag]
    return option.parse(option.default_text({}), {})


# --- the parser ---------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Reports instead of exiting, and matches option names exactly, as Go's flag package does."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError([message])

    def _get_option_tuples(self, option_string: str) -> list[tuple[argparse.Action, str, str | None]]:
        # argparse expands single-dash prefixes even with allow_abbrev=False (-c would mean -cpu-only).
        return []


class _HelpFormatter(argparse.HelpFormatter):
    """Shows one spelling per option; the description says that the single-dash one works too."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=max(60, min(120, shutil.get_terminal_size().columns - 2)))

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        if action.nargs == 0:
            return action.option_strings[0]
        return f"{action.option_strings[0]} {action.metavar}"


def build_parser() -> argparse.ArgumentParser:
    """The parser of the serve command: options as text, --help, and errors raised as ConfigError.

    load_settings reads the options itself (see _scan_options) and uses this parser for --help and to find unknown
    arguments; the parser also works on its own, where each option's value is its raw text."""
    parser = _Parser(
        prog=PROG,
        usage="%(prog)s [serve] [options] | submit | show | stop | check | keys | version",
        epilog=(
            "other commands: 'submit' queues a workspace like `studio run` (submit --help); 'show [KEY]' prints an "
            "experiment's output and _results.json; 'stop KEY' asks a running experiment to stop; "
            "'check [HOST:PORT]' exits 0 when this runner's /healthz answers; 'keys init DIR' makes a message key "
            "for encrypted requests (docs/privacy.md); 'version'."
        ),
        description=(
            "Runs StudioML experiments taken from queues. Every option not given on the command line is read from "
            "the environment variable shown with it (the option name upper-cased, '-' replaced by '_'); the "
            "command line wins. Options also accept studio-go-runner's single-dash form (-queue-match x). "
            "Sizes: 512mb, 16gib, 1.5 GB. Durations: 90s, 1h30m, 2d. Booleans: true/false, 1/0, yes/no."
        ),
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
        add_help=False,
    )
    parser.add_argument("--help", "-h", "-help", action="help", help="show this help and exit")
    groups = {key: parser.add_argument_group(title) for key, title in _GROUP_TITLES.items()}
    for option in _OPTIONS:
        shown = option.shown_default or option.default_text({}) or '""'
        help_text = f"{option.help} (default: {shown}; env {option.env})".replace("%", "%%")
        names = (f"--{option.flag}", f"-{option.flag}")
        group = groups[option.group]
        if option.switch:
            group.add_argument(
                *names, dest=option.field, action="store_const", const="true", default=argparse.SUPPRESS, help=help_text
            )
        else:
            group.add_argument(
                *names, dest=option.field, metavar=option.metavar, default=argparse.SUPPRESS, help=help_text
            )
    return parser


def _scan_options(argv: Sequence[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """Read the known options from ``argv`` as Go's flag package does; return their text by field, the arguments
    left for argparse (help, unknown ones), and problems.

    Doing this ourselves rather than through argparse keeps Go's meaning for two spellings argparse reads
    differently: ``-debug=false`` (argparse switches take no value) and a value that starts with a dash
    (``-queue-mismatch -test$``: Go always takes the next argument as the value)."""
    given: dict[str, str] = {}
    rest: list[str] = []
    problems: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        if token == "--":
            rest.extend([token, *tokens])
            break
        body = token.lstrip("-")
        name, eq, value = body.partition("=")
        option = _BY_FLAG.get(name) if len(token) - len(body) in (1, 2) else None
        if option is None:
            rest.append(token)
        elif eq:
            given[option.field] = value
        elif option.switch:
            given[option.field] = "true"
        elif (following := next(tokens, None)) is not None:
            given[option.field] = following
        else:
            problems.append(f"--{option.flag} ({option.env}): needs a value; expected {option.form}")
    return given, rest, problems


def _unknown_argument_problems(extras: Sequence[str]) -> list[str]:
    problems: list[str] = []
    after_option = False
    for token in extras:
        if token.startswith("-") and token != "--":
            name = token.lstrip("-").partition("=")[0]
            close = difflib.get_close_matches(name, list(_BY_FLAG), n=1, cutoff=0.75)
            hint = f"; did you mean --{close[0]}?" if close else f"; see {PROG} --help"
            problems.append(f"unknown option {token!r}{hint}")
            after_option = "=" not in token
        elif after_option:  # most likely the value of the unknown option just reported: one mistake, one problem
            after_option = False
        elif token != "--":
            problems.append(f"unexpected argument {token!r}; options take the form --name value")
    return problems


def load_settings(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    """Build Settings from the serve command's arguments and the environment, or raise ConfigError listing every
    problem. ``argv`` holds only the serve options (not the program or command name). ``--help`` exits with 0."""
    given, rest, problems = _scan_options(argv)
    _, extras = build_parser().parse_known_args(rest)  # prints help and exits for --help
    problems += _unknown_argument_problems(extras)
    values: dict[str, Any] = {}
    for option in _OPTIONS:
        from_env = False
        if option.field in given:
            text = given[option.field]
        else:
            env_text = environ.get(option.env)
            # An empty variable counts as unset (manifests often template blanks), unless "" is a real value.
            if env_text is not None and (env_text.strip() or option.blank_is_value):
                text, from_env = env_text, True
            else:
                text = option.default_text(environ)
        source = f"from {option.env}" if from_env else option.env
        try:
            if not text.strip() and not option.blank_is_value:
                raise _Invalid("is empty")
            values[option.field] = option.parse(text, environ)
        except _Invalid as invalid:
            shown = _shown((option.mask or redact_url)(text) if option.secret else text)
            problems.append(f"--{option.flag} ({source}): {shown} {invalid.reason}; expected {option.form}")
    if problems:
        raise ConfigError(problems)
    return Settings(**values)


def _shown(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")
