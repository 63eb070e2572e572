"""Requirement lines that would make the build tools read this machine's files, and what becomes of them.

The environment is built by uv (or pip) running as the runner, outside any sandbox, so a requirement line is a way
into the runner's disk: ``-r /home/runner/.aws/credentials`` makes uv print the file's first line as an unknown
package name, ``x @ file:///srv/queue/other-experiment/workspace`` builds (runs the ``setup.py`` of) a directory
someone else wrote, and ``${HOME}`` is filled in by the tools from the runner's own environment. No line may name
a local file or directory, however it is spelled: ``-f``/``-i``/``--extra-index-url`` with anything but an
http(s) URL (short, long, ``=``, attached, quoted or abbreviated as pip allows), ``-r``/``-c`` at all (an included
file, even a remote one, may itself include a local path), bare paths (``/``, ``./``, ``../``, ``~``), archive file
names, ``file:`` URLs and VCS URLs over ``file:``.

Two shapes are *skipped* with a warning rather than refused: ``-e <path>`` and ``name @ file:///...``. They are
what ``pip freeze`` writes for packages installed from the submitter's own disk, and real clients send their whole
freeze (docs/environments.md), so failing on them would fail every such experiment; skipped, nothing of this
machine is read either way (whether the path exists here is not even looked at, so the answer tells nothing about
this runner). Everything else that names a local path is *refused*: the experiment fails with the reason.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from runner.clip import clip
from runner.execution.envtypes import EnvBuildError

_REMOTE = re.compile(r"^https?://[^/\s]", re.IGNORECASE)
_VCS_REMOTE = re.compile(r"^(?:git|hg|svn|bzr)\+(?:https?|ssh|git|svn|sftp|ftp|lp)[:/]", re.IGNORECASE)
_URL_SCHEME = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*):")
# pip's and uv's ${NAME} (pip: [A-Z0-9_]+); any braces are refused, whatever is inside them.
_ENV_REFERENCE = re.compile(r"\$\{[^}]*\}")
# A shell word: runs of unquoted characters and quoted strings (each alternative starts differently: no backtracking).
_WORD = re.compile(r"""(?:[^\s'"]+|'[^']*'|"[^"]*")+""")
_UNQUOTE = re.compile(r"'([^']*)'|" + r'"([^"]*)"')
# A PEP 508 name, optional extras, then the rest of the line.
_NAMED = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?\s*(?:\[[^\]]*\])?\s*(.*)$")
_ARCHIVE_SUFFIXES = (
    ".whl",
    ".zip",
    ".tar",
    ".tar.gz",
    ".tgz",
    ".tar.bz2",
    ".tbz",
    ".tbz2",
    ".tar.xz",
    ".txz",
    ".tar.lz",
    ".tlz",
    ".tar.lzma",
    ".tar.zst",
)

# Options whose value is a file, a directory or an index location, by long name; short spellings map onto them.
_FILE_OPTIONS = ("requirement", "constraint", "editable", "find-links", "index-url", "extra-index-url")
_SHORT = {"r": "requirement", "c": "constraint", "e": "editable", "f": "find-links", "i": "index-url"}
# Other options of a requirements file, so that an exact one is never taken for an abbreviation of the above.
_OTHER_OPTIONS = frozenset(
    {
        "no-index",
        "pre",
        "prefer-binary",
        "require-hashes",
        "only-binary",
        "no-binary",
        "trusted-host",
        "use-feature",
        "hash",
        "config-settings",
        "global-option",
        "install-option",
    }
)


class Verdict(enum.Enum):
    SKIP = "skipped"
    REFUSE = "refused"


@dataclass(frozen=True)
class LocalReference:
    verdict: Verdict
    reason: str


class RefusedRequirements(EnvBuildError):
    """Requirement lines that name this runner's files; trying again cannot help."""

    def __init__(self, refused: list[tuple[str, str]]) -> None:
        shown = [f"requirement {shown_line(line)} refused: {reason}" for line, reason in refused[:3]]
        if len(refused) > 3:
            shown.append(f"and {len(refused) - 3} more")
        super().__init__("; ".join(shown), retryable=False)
        self.refused = refused


def shown_line(line: str) -> str:
    """A requirement line as it appears in warnings and reasons: quoted, and cut when it is long."""
    return repr(clip(line, 200))


def local_reference(line: str) -> LocalReference | None:
    """Whether (and why) ``line`` -- comment-free, whitespace squeezed, ``${VAR}`` of config.env expanded -- names
    something on this machine; None for a line that may be given to the build tools."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return _refuse("it holds characters that cannot be written as UTF-8")
    if "\0" in line:
        return _refuse("it holds a NUL byte")
    if (unset := _ENV_REFERENCE.search(line)) is not None:
        return _refuse(
            f"{clip(unset.group(), 40)} is not set in config.env, and the build tools would fill it in from "
            "this runner's own environment"
        )
    tokens = _tokens(line)
    if not tokens:
        return None
    if tokens[0].startswith("-"):
        return _options(tokens)
    return _requirement(line, tokens)


def _refuse(reason: str) -> LocalReference:
    return LocalReference(Verdict.REFUSE, reason)


def _tokens(line: str) -> list[str]:
    """The words of ``line`` with shell quotes removed, as pip (shlex) and uv read option values; linear in the
    line's length, unlike shlex, and an unbalanced quote is simply left out."""
    return [_UNQUOTE.sub(lambda m: m.group(1) or m.group(2) or "", word) for word in _WORD.findall(line)]


def _remote(value: str) -> bool:
    return _REMOTE.match(value) is not None or _VCS_REMOTE.match(value) is not None


def _options(tokens: list[str]) -> LocalReference | None:
    """An option line: every option that takes a file, directory or index must be given an http(s) URL."""
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token.startswith("-") or token == "-":
            continue
        option, attached = _option(token)
        if option is None:
            continue
        value = attached
        if value is None and i < len(tokens):
            value = tokens[i]
            i += 1
        if value is None:
            continue  # the tools report the missing value themselves; nothing is read
        if option == "editable":
            if _VCS_REMOTE.match(value) is None:
                return LocalReference(Verdict.SKIP, "an editable install from the submitter's machine")
            continue
        if option in ("requirement", "constraint"):
            # Not even from a URL: an included file may itself say -r /etc/passwd, and the tools would read that.
            return _refuse(
                f"--{option} includes another file ({clip(value, 100)!r}), which is not read here; list its "
                "requirements in pythonenv or config.pip instead"
            )
        if not _REMOTE.match(value):
            return _refuse(
                f"--{option} names a file or directory on this runner ({clip(value, 100)!r}); only an http(s) "
                "URL may follow -f, --index-url and --extra-index-url"
            )
    return None


def _option(token: str) -> tuple[str | None, str | None]:
    """The file-taking option ``token`` spells (long, abbreviated as pip's optparse allows, or short with its value
    attached) and the value attached to it, if any; (None, None) for any other option."""
    if token.startswith("--"):
        name, eq, value = token[2:].partition("=")
        name = name.lower()
        if not name or name in _OTHER_OPTIONS:
            return None, None
        matches = [option for option in _FILE_OPTIONS if option.startswith(name)]
        if not matches:
            return None, None
        return matches[0], value if eq else None
    letter, rest = token[1:2], token[2:]
    option = _SHORT.get(letter)
    if option is None:
        return None, None
    rest = rest.removeprefix("=")
    return option, rest or None


def _requirement(line: str, tokens: list[str]) -> LocalReference | None:
    # Per-requirement options after the requirement (``--hash``) are fine; file-taking ones are not.
    options = [t for t in tokens[1:] if t.startswith("-")]
    if options and (found := _options(tokens[tokens.index(options[0]) :])) is not None:
        return found if found.verdict is Verdict.REFUSE else _refuse("an option naming a local path")
    named = _NAMED.match(line)
    rest = named.group(1).split(" -", 1)[0].strip() if named else ""
    if named is not None and rest.startswith("@"):
        url = rest[1:].split(";", 1)[0].strip()
        if _remote(url):
            return None
        if _URL_SCHEME.match(url) and not re.match(r"^[A-Za-z]:[\\/]", url):
            # ``name @ file:///...``: what pip freeze writes for a package installed from the submitter's disk.
            return LocalReference(Verdict.SKIP, "a package installed from the submitter's disk")
        return _refuse(f"it names a local path ({clip(url, 100)!r}) instead of a URL")
    head = tokens[0]
    if named is not None and (not rest or rest[0] in "(<>=!~;"):
        if head.lower().endswith(_ARCHIVE_SUFFIXES) and not rest:
            return _refuse("it names a local archive file; only packages from an index or a URL are installed")
        return None  # name, extras, version specifiers, markers: from the index
    if _remote(head):
        return None
    if _URL_SCHEME.match(head) and not re.match(r"^[A-Za-z]:[\\/]", head):
        return _refuse(f"it names a local location ({clip(head, 100)!r}); only http(s) and VCS URLs are fetched")
    return _refuse(f"it names a local path ({clip(head, 100)!r}); only packages from an index or a URL are installed")
