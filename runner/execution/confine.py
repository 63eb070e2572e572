"""The sandbox's launcher: ``python -I -m runner.execution.confine [options] -- program args...``.

The runner starts each sandboxed experiment through this small program instead of running setup code in a forked
copy of itself: a fork of the runner without ``vfork`` copies its page tables while the event loop waits (45 ms for
300 MB on the machine this was written on), and Python code in a forked multi-threaded process can deadlock. This
launcher is a fresh single-threaded process; it confines itself, then ``execve``s the experiment's program with the
same pid, process group and descriptors:

1. read the experiment's environment from ``--env-fd`` (a memfd the runner wrote; the launcher itself runs with an
   empty environment and ``-I``, so nothing the submitter put in ``config.env`` -- ``LD_PRELOAD``, ``PYTHONPATH`` --
   steers it while it still has the runner's privileges);
2. ``--user UID:GID``: drop the supplementary groups and become that user (the runner is root);
3. ``--drop-capabilities``: give up every capability (a root runner's experiment that stays root);
4. ``--ruleset-fd``: enter the Landlock ruleset the runner built (no_new_privs first);
5. close the two descriptors and exec the program.

Any failure is written to stderr (the experiment's output) and ends the launcher with exit code 126, or 127 when
the program cannot be executed, as a shell would; the program is never run unconfined.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from runner.execution import landlock, privileges

CANNOT_CONFINE = 126
CANNOT_EXECUTE = 127


class _Usage(Exception):
    pass


def _options(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    options: dict[str, str] = {}
    rest = list(argv)
    while rest and rest[0] != "--":
        name = rest.pop(0)
        if name == "--drop-capabilities":
            options[name] = ""
        elif name in ("--env-fd", "--ruleset-fd", "--user") and rest:
            options[name] = rest.pop(0)
        else:
            raise _Usage(f"unknown launcher option {name!r}")
    if not rest[1:]:
        raise _Usage("no program to run after --")
    return options, rest[1:]


def _read_environment(fd: int) -> dict[str, str]:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    environment = json.loads(b"".join(chunks))
    if not isinstance(environment, dict):
        raise ValueError("the environment is not a mapping")
    return {str(name): str(value) for name, value in environment.items()}


def confine(options: dict[str, str]) -> dict[str, str]:
    """Steps 1-4 above, in this process; the experiment's environment."""
    environment = _read_environment(int(options["--env-fd"])) if "--env-fd" in options else {}
    if "--user" in options:
        uid, _, gid = options["--user"].partition(":")
        os.setgroups([])
        os.setgid(int(gid))
        os.setuid(int(uid))  # as root this sets the real, effective and saved ids: there is no way back
    if "--drop-capabilities" in options:
        privileges.drop_capabilities()
    if "--ruleset-fd" in options:
        fd = int(options["--ruleset-fd"])
        landlock.enforce(fd)
        os.close(fd)
    return environment


def main(argv: Sequence[str]) -> int:
    try:
        options, program = _options(argv)
        environment = confine(options)
    except (_Usage, OSError, ValueError) as err:
        print(f"[runner] could not confine the experiment: {err}", file=sys.stderr, flush=True)
        return CANNOT_CONFINE
    try:
        os.execvpe(program[0], program, environment)
    except OSError as err:
        print(f"[runner] could not start {program[0]}: {err}", file=sys.stderr, flush=True)
    return CANNOT_EXECUTE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
