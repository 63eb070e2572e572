"""An experiment's requirement lines, as the submitter sent them, turned into lines this runner can install.

Real clients send ``pythonenv`` as the full ``pip freeze`` of the submitting environment: pinned lines, ``pip``,
``setuptools`` and ``studioml`` among them, and now and then references to files, directories or editable checkouts
that exist only on the submitter's machine. ``config.pip`` lists more packages, installed after ``pythonenv``.
"""

from __future__ import annotations

import re
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

_COMMENT = re.compile(r"(^|\s+)#.*$")  # pip's rule: '#' starts a comment at the start or after whitespace
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PKG_RESOURCES = re.compile(r"^pkg[-_.]resources\b", re.IGNORECASE)
_EDITABLE = re.compile(r"^(?:-e|--editable)(?:\s+|=)(.*)$")
_VCS_URL = re.compile(r"^(?:git|hg|svn|bzr)\+", re.IGNORECASE)
_FILE_URL = re.compile(r"\bfile:[^\s;]+", re.IGNORECASE)
_REQUIREMENT_FILE = re.compile(r"^(?:-r|--requirement|-c|--constraint)(?:\s+|=)(.*)$")
_LOCAL_PATH = re.compile(r"^(?:/|\./|\.\./|~|[A-Za-z]:[\\/]|\.\\)")
# A PEP 508 requirement: name, optional [extras], then the rest (version specifiers, "@ url", "; marker").
_REQUIREMENT = re.compile(r"^([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(\[[^\]]*\])?\s*(.*)$")
# "==1.2.3" or "===1.2.3" without wildcards, optionally followed by a marker.
_PINNED = re.compile(r"^===?\s*([0-9A-Za-z][0-9A-Za-z.+!_-]*)\s*(?:;.*)?$")
_OPTIONS = re.compile(r"\s+--[A-Za-z-]+(?:[ =]\S+)?")  # per-requirement options: --hash=sha256:..., --config-settings
_SPECIFIER_START = ("@", "(", "<", ">", "=", "!", "~", ";")
_RELEASE = re.compile(r"^(\d+)(?:\.(\d+))?")


def canonical_name(name: str) -> str:
    """PEP 503: names differing only in case, ``-``, ``_`` and ``.`` are the same project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _parse(line: str) -> tuple[str, str, str] | None:
    """``(canonical name, extras, rest)`` of a PEP 508 requirement; None for options, URLs and paths."""
    if line.startswith("-"):
        return None
    match = _REQUIREMENT.match(line)
    if match is None:
        return None
    rest = _OPTIONS.sub("", match.group(3)).strip()
    if rest and not rest.startswith(_SPECIFIER_START):
        return None  # "git+https://...", "C:\\...", "pkg.tar.gz": the "name" was only the start of something else
    return canonical_name(match.group(1)), match.group(2) or "", rest


def requirement_name(line: str) -> str | None:
    """The canonical project name a requirement line installs, or None (options, URLs, paths)."""
    parsed = _parse(line)
    return parsed[0] if parsed else None


def _pinned_version(line: str) -> str | None:
    parsed = _parse(line)
    pinned = _PINNED.match(parsed[2]) if parsed else None
    return pinned.group(1) if pinned else None


def is_pinned(line: str) -> bool:
    """True for a line that names exactly one artifact: ``name==version`` or ``name @ url``.

    Option lines (``--index-url ...``) are neither pinned nor not; callers skip them.
    """
    parsed = _parse(line)
    return parsed is not None and (_PINNED.match(parsed[2]) is not None or parsed[2].startswith("@"))


def is_pinned_closure(requirements: Sequence[str]) -> bool:
    """True when every requirement line is pinned, as in a ``pip freeze``: installing needs no resolution.

    A list that is pinned but not closed (a dependency is missing) is found out after installing, by checking the
    installed packages' dependencies.
    """
    lines = [line for line in requirements if not line.startswith("-")]
    return bool(lines) and all(is_pinned(line) for line in lines)


def key_lines(requirements: Sequence[str]) -> list[str]:
    """The requirement lines as they enter the cache key.

    A pinned closure is a set: order, name spelling (``PyYAML``/``pyyaml``) and spacing do not change what gets
    installed, so they do not change the key either. Any other list keeps its order.
    """
    if not is_pinned_closure(requirements):
        return list(requirements)
    canonical = set()
    for line in requirements:
        parsed = _parse(line)
        if parsed is None:
            canonical.add(line)
            continue
        name, extras, rest = parsed
        if extras:
            extras = "[" + ",".join(sorted(canonical_name(e) for e in extras[1:-1].split(",") if e.strip())) + "]"
        canonical.add(name + extras + "".join(rest.split()))
    return sorted(canonical)


# ---------------------------------------------------------------------------------------------------------------
# tensorflow and tensorflow-gpu

_TF_GPU_SPLIT = (2, 1)  # from 2.1 on, the tensorflow package itself runs on GPUs
_TF_GPU = "tensorflow-gpu"


def _release(version: str) -> tuple[int, int] | None:
    match = _RELEASE.match(version)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def _tensorflow_rules(lines: list[str], gpus: bool, notes: list[str]) -> list[str]:
    """studio-go-runner's GPU rewrite, kept only where it still means something.

    ``tensorflow`` has included GPU support since 2.1 and ``tensorflow-gpu`` is no longer published (its 2.12
    release is a stub that refuses to install), yet the StudioML client still renames ``tensorflow`` to
    ``tensorflow-gpu`` whenever the experiment asks for GPUs. So: ``tensorflow-gpu`` without a version, or pinned at
    2.1 or later, becomes ``tensorflow`` (same environment on CPU and GPU runners); ``tensorflow`` pinned before 2.1
    becomes ``tensorflow-gpu`` when GPUs were allocated and no ``tensorflow-gpu`` is listed, as the Go runner did.
    """
    names = {requirement_name(line) for line in lines}
    out = []
    for line in lines:
        name = requirement_name(line)
        match = _REQUIREMENT.match(line)
        if match is None or name not in ("tensorflow", _TF_GPU):
            out.append(line)
            continue
        version = _pinned_version(line)
        release = _release(version) if version else None
        rest = (match.group(2) or "") + match.group(3)
        rewritten = line
        if name == _TF_GPU and (not match.group(3).strip() or (release is not None and release >= _TF_GPU_SPLIT)):
            rewritten = "tensorflow" + rest
        elif name == "tensorflow" and gpus and _TF_GPU not in names and release and release < _TF_GPU_SPLIT:
            rewritten = _TF_GPU + rest
        if rewritten != line:
            notes.append(f"requirement {line!r} installed as {rewritten!r}")
        out.append(rewritten)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Normalisation


def _file_url_path(url: str) -> Path:
    parsed = urllib.parse.urlparse(url.split("#", 1)[0])
    return Path(urllib.request.url2pathname(parsed.path))


def _expand(line: str, env: Mapping[str, str], warnings: list[str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in env:
            return env[name]
        warnings.append(f"requirement {line!r}: ${{{name}}} is not set in config.env; left as it is")
        return match.group(0)

    return _ENV_REFERENCE.sub(one, line)


def _local_only(line: str) -> str | None:
    """Why ``line`` cannot be installed here (it names something on the submitter's disk), or None."""
    if (editable := _EDITABLE.match(line)) is not None and not _VCS_URL.match(editable.group(1).strip()):
        return "an editable install from the submitter's machine"
    if (included := _REQUIREMENT_FILE.match(line)) is not None:
        if not Path(included.group(1).strip()).is_file():
            return "a requirements file that does not exist on this runner"
        return None
    for url in _FILE_URL.findall(line):
        if not _file_url_path(url).exists():
            return "a file:// reference to a path that does not exist on this runner"
    if _LOCAL_PATH.match(line):
        path = Path(line.split(";", 1)[0].split("#", 1)[0].strip()).expanduser()
        if not path.is_absolute() or not path.exists():
            return "a local path that does not exist on this runner"
    return None


def _logical_lines(entry: str) -> list[str]:
    """pip's reading of a requirements text: a line ending in a backslash continues on the next one."""
    out: list[str] = []
    pending = ""
    for raw in entry.splitlines():
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        out.append(pending + raw)
        pending = ""
    if pending:
        out.append(pending)
    return out


def _clean(entries: Sequence[str], env: Mapping[str, str], warnings: list[str]) -> list[str]:
    requirements: list[str] = []
    for entry in entries:
        for raw in _logical_lines(entry):
            line = " ".join(_COMMENT.sub("", raw).split())
            if not line:
                continue
            line = _expand(line, env, warnings)
            if _PKG_RESOURCES.match(line):
                continue
            reason = _local_only(line)
            if reason is not None:
                warnings.append(f"requirement {line!r} skipped: {reason}")
                continue
            if (editable := _EDITABLE.match(line)) is not None:
                line = editable.group(1).strip()
                warnings.append(f"requirement {line!r} installed as a regular package, not in editable mode")
            requirements.append(line)
    return requirements


def normalise_requirements(
    pythonenv: Sequence[str], pip: Sequence[str], env: Mapping[str, str], *, gpus: bool = False
) -> tuple[list[str], list[str]]:
    """Turn an experiment's ``pythonenv`` and ``config.pip`` into requirement lines this runner can install.

    Returns ``(requirements, warnings)``; every warning is meant for the experiment's owner. Comments, blank lines
    and ``pkg-resources`` (a bogus entry Ubuntu's pip freeze produces) are dropped, continuation lines joined, runs
    of blanks squeezed, and ``${VAR}`` expanded from ``config.env`` (``env``). Lines that only make sense on the
    submitter's machine -- editable installs of local directories, ``file://`` references and bare paths that do
    not exist here, included requirement files that are not here -- are skipped with a warning; ``-e git+...``
    becomes a plain ``git+...`` install. VCS references and index options are kept. ``pip``, ``setuptools`` and
    ``studioml`` pins are kept: they are part of the environment the experiment was written against.

    ``config.pip`` comes after ``pythonenv``; as it was a second ``pip install`` in studio-go-runner, a project it
    names replaces the same project's line from ``pythonenv``. A line repeated word for word is installed once.
    ``gpus`` says whether the experiment was given GPUs, for the ``tensorflow`` rules (see ``_tensorflow_rules``).
    """
    warnings: list[str] = []
    first = _clean(pythonenv, env, warnings)
    then = _clean(pip, env, warnings)
    replaced = {name for line in then if (name := requirement_name(line)) is not None}
    kept = []
    for line in first:
        if requirement_name(line) in replaced:
            warnings.append(f"requirement {line!r} replaced by config.pip")
            continue
        kept.append(line)
    unique = list(dict.fromkeys([*kept, *then]))
    return _tensorflow_rules(unique, gpus, warnings), warnings
