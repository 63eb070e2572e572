"""The AWS accounts an SQS broker reads queues with: ``--sqs-certs`` directories and the default credential chain.

``--sqs-certs DIR`` holds one sub-directory per account, as studio-go-runner expects and its Kubernetes examples
mount them (a Secret per account)::

    DIR/<account>/credentials     AWS shared-credentials file: [default] aws_access_key_id, aws_secret_access_key
                                  (aws_session_token optional)
    DIR/<account>/config          AWS config file: [default] or [profile default] with region (endpoint_url optional)

File names do not matter: whichever file holds ``aws_access_key_id`` is the credentials file, whichever holds
``region`` the config. Names starting with ``.`` are skipped (Kubernetes keeps its ``..data`` links there), and
symlinks are followed. The directory is read again at every discovery, so accounts that appear, change (a rotated
Secret) or disappear are picked up while the runner runs.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# The key of the account that uses the runner's default AWS credential chain (never a directory name: it has a '/').
CHAIN: str = "default/chain"
_PROFILE = "default"


class AccountError(ValueError):
    """A credentials directory cannot be used; the text says why."""


@dataclass(frozen=True)
class AccountConfig:
    """Everything an SQS client for one account is built from; when it changes, the client is rebuilt."""

    name: str
    region: str
    access_key: str = ""
    secret_key: str = field(default="", repr=False)
    session_token: str = field(default="", repr=False)
    endpoint_url: str = ""

    @property
    def uses_chain(self) -> bool:
        return self.name == CHAIN

    def describe(self) -> str:
        where = "the default AWS credential chain" if self.uses_chain else f"credentials directory '{self.name}'"
        return f"{where} ({self.region})"


def chain_account(region: str) -> AccountConfig:
    return AccountConfig(CHAIN, region)


def _sections(path: Path) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(interpolation=None, strict=False, default_section="\0none")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AccountError(f"{path.name} is not a text file") from None
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as err:
        raise AccountError(f"{path.name} is not an AWS credentials or config file: {err.message}") from None
    return {name: {k.strip().lower(): v.strip() for k, v in parser[name].items()} for name in parser.sections()}


def _profile(sections: dict[str, dict[str, str]]) -> dict[str, str]:
    """The default profile's settings: ``[default]`` or ``[profile default]``, or the only section there is."""
    for name in (_PROFILE, f"profile {_PROFILE}"):
        if name in sections:
            return sections[name]
    if len(sections) == 1:
        return next(iter(sections.values()))
    return {}


def _files(directory: Path) -> Iterator[Path]:
    with os.scandir(directory) as entries:
        for entry in entries:
            if not entry.name.startswith(".") and entry.is_file():  # follows symlinks, as Secret volumes need
                yield Path(entry.path)


def read_account(directory: Path, default_region: str) -> AccountConfig:
    """The account a credentials directory describes; AccountError says what is missing or wrong."""
    settings: dict[str, str] = {}
    for path in sorted(_files(directory)):
        profile = _profile(_sections(path))
        for key, value in profile.items():
            settings.setdefault(key, value)
    key_id = settings.get("aws_access_key_id", "")
    secret = settings.get("aws_secret_access_key", "")
    if not key_id or not secret:
        raise AccountError(
            "no credentials file with aws_access_key_id and aws_secret_access_key in its [default] profile"
        )
    region = settings.get("region", "") or default_region
    if not region:
        raise AccountError("no config file with a region in its [default] profile, and no --aws-region to fall back on")
    return AccountConfig(
        name=directory.name,
        region=region,
        access_key=key_id,
        secret_key=secret,
        session_token=settings.get("aws_session_token", ""),
        endpoint_url=settings.get("endpoint_url", ""),
    )


def scan_accounts(root: Path, default_region: str) -> tuple[dict[str, AccountConfig], dict[str, str]]:
    """Every usable account under ``root``, and a problem for each sub-directory (or ``root``) that is not usable."""
    accounts: dict[str, AccountConfig] = {}
    problems: dict[str, str] = {}
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return {}, {str(root): "the --sqs-certs directory does not exist"}
    except NotADirectoryError:
        return {}, {str(root): "--sqs-certs is not a directory"}
    except OSError as err:
        return {}, {str(root): f"the --sqs-certs directory cannot be read: {err.strerror or err}"}
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            accounts[entry.name] = read_account(Path(entry.path), default_region)
        except AccountError as err:
            problems[entry.name] = str(err)
        except OSError as err:
            problems[entry.name] = f"cannot be read: {err.strerror or err}"
    return accounts, problems
