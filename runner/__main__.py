"""``python -m runner [serve] [options]`` runs the service; ``submit``, ``show``, ``stop``, ``check``, ``keys``,
``version``."""

from __future__ import annotations

import asyncio
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from runner import __version__, logs
from runner.config import DEFAULT_PROM_ADDRESS, ConfigError, listen_address, load_settings, main_error
from runner.execution import privileges

COMMANDS = ("serve", "submit", "show", "stop", "check", "keys", "version")


def serve(argv: Sequence[str]) -> int:
    try:
        settings = load_settings(argv, os.environ)
    except ConfigError as err:
        print(main_error(err), file=sys.stderr)
        return 2
    logs.configure(settings.log_format, debug=settings.debug)
    # The runner's /proc/<pid>/environ, mem and fds hold its secrets: closed to its user's other processes,
    # experiments included (docs/security.md). Programs it starts are dumpable again.
    privileges.make_not_dumpable()
    # Imported here, not at the top: `--help` and bad options are answered without loading any broker stack.
    from runner.service import Runner, StartupRefused

    try:
        asyncio.run(Runner(settings).serve())
    except KeyboardInterrupt:  # a signal that arrived before the handlers were installed
        return 130
    except StartupRefused:  # already logged, with what to do about it
        return 1
    return 0


def check(argv: Sequence[str]) -> int:
    """Exit 0 when the runner on this machine answers /healthz (for exec probes and scripts)."""
    address = argv[0] if argv else (os.environ.get("PROM_ADDRESS") or DEFAULT_PROM_ADDRESS)
    if address.strip().lower() in ("", "off"):
        print("check: the HTTP server is off (--prom-address off)", file=sys.stderr)
        return 1
    try:
        host, port = listen_address(address)
    except ValueError as err:
        print(f"check: {address!r} {err}", file=sys.stderr)
        return 2
    shown = f"[{host}]" if ":" in host else (host or "127.0.0.1")
    url = f"http://{shown}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            print(response.read().decode().strip())
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as err:
        print(f"check: {url}: {err}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args and args[0] in COMMANDS else "serve"
    rest = args[1:] if args and args[0] in COMMANDS else args
    if command == "version":
        print(f"studio-runner {__version__}")
        return 0
    if command == "check":
        return check(rest)
    if command == "keys":
        from runner import keys

        return keys.main(rest, os.environ)
    if command in ("submit", "show", "stop"):
        from runner import submit

        return {"submit": submit.submit, "show": submit.show, "stop": submit.stop}[command](rest, os.environ)
    return serve(rest)


if __name__ == "__main__":
    sys.exit(main())
