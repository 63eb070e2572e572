"""An experiment's requirement lines, as the submitter sent them, turned into lines this runner can install.

Real clients send ``pythonenv`` as the full ``pip freeze`` of the submitting environment: pinned lines, ``pip``,
``setuptools`` and ``studioml`` among them, and now and then references to files, directories or editable checkouts
that exist only on the submitter's machine. ``config.pip`` lists more packages, installed after ``pythonenv``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from runner.execution.local_refs import RefusedRequirements, Verdict, local_reference, shown_line

_COMMENT = re.compile(r"(^|\s+)#.*$")  # pip's rule: '#' starts a comment at the start or after whitespace
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PKG_RESOURCES = re.compile(r"^pkg[-_.]resources\b", re.IGNORECASE)
_EDITABLE = re.compile(r"^(?:-e|--editable)(?:\s+|=)(.*)$")
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
            notes.append(f"requirement {shown_line(line)} installed as {shown_line(rewritten)}")
        out.append(rewritten)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Normalisation


def _expand(line: str, env: Mapping[str, str]) -> str:
    """``${NAME}`` replaced by its value in config.env; an unset one stays, and the line is then refused."""
    return _ENV_REFERENCE.sub(lambda match: env.get(match.group(1), match.group(0)), line)


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


def _clean(
    entries: Sequence[str], env: Mapping[str, str], warnings: list[str], refused: list[tuple[str, str]]
) -> list[str]:
    requirements: list[str] = []
    for entry in entries:
        for raw in _logical_lines(entry):
            line = " ".join(_COMMENT.sub("", raw).split())
            if not line:
                continue
            line = _expand(line, env)
            if _PKG_RESOURCES.match(line):
                continue
            local = local_reference(line)
            if local is not None and local.verdict is Verdict.REFUSE:
                refused.append((line, local.reason))
                continue
            if local is not None:
                warnings.append(f"requirement {shown_line(line)} skipped: {local.reason}")
                continue
            if (editable := _EDITABLE.match(line)) is not None:
                line = editable.group(1).strip()
                warnings.append(f"requirement {shown_line(line)} installed as a regular package, not in editable mode")
            requirements.append(line)
    return requirements


def normalise_requirements(
    pythonenv: Sequence[str], pip: Sequence[str], env: Mapping[str, str], *, gpus: bool = False
) -> tuple[list[str], list[str]]:
    """Turn an experiment's ``pythonenv`` and ``config.pip`` into requirement lines this runner can install.

    Returns ``(requirements, warnings)``; every warning is meant for the experiment's owner. Comments, blank lines
    and ``pkg-resources`` (a bogus entry Ubuntu's pip freeze produces) are dropped, continuation lines joined, runs
    of blanks squeezed, and ``${VAR}`` expanded from ``config.env`` (``env``). No line may make the build tools read
    this machine's files (:mod:`runner.execution.local_refs`): editable installs of local directories and
    ``name @ file://`` packages (what a freeze writes for the submitter's own disk) are skipped with a warning; any
    other line naming a local path, an included requirements file or a ``${VAR}`` config.env does not set raises
    :class:`RefusedRequirements`. ``-e git+...`` becomes a plain ``git+...`` install. VCS references, http(s) URLs
    and index options with http(s) URLs are kept. ``pip``, ``setuptools`` and
    ``studioml`` pins are kept: they are part of the environment the experiment was written against.

    ``config.pip`` comes after ``pythonenv``; as it was a second ``pip install`` in studio-go-runner, a project it
    names replaces the same project's line from ``pythonenv``. A line repeated word for word is installed once.
    ``gpus`` says whether the experiment was given GPUs, for the ``tensorflow`` rules (see ``_tensorflow_rules``).
    """
    warnings: list[str] = []
    refused: list[tuple[str, str]] = []
    first = _clean(pythonenv, env, warnings, refused)
    then = _clean(pip, env, warnings, refused)
    if refused:
        raise RefusedRequirements(refused)
    replaced = {name for line in then if (name := requirement_name(line)) is not None}
    kept = []
    for line in first:
        if requirement_name(line) in replaced:
            warnings.append(f"requirement {shown_line(line)} replaced by config.pip")
            continue
        kept.append(line)
    unique = list(dict.fromkeys([*kept, *then]))
    return _tensorflow_rules(unique, gpus, warnings), warnings
