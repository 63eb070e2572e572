"""The chaos ledger: what every experiment run did, told by the experiments themselves over loopback TCP.

Each run of a chaos experiment opens one connection to the harness's ledger server and keeps it open for its whole
life: it sends ``start <key> <pid> <time> <from-step> <dir>`` when it begins and ``end <key> <pid> <time>`` when
its work is done, and waits for the server's ``ok`` after each line, so a line the experiment got past is on
record. The server notes when the connection closes: the kernel closes it when the process dies, however it dies
(exit, SIGKILL, its runner's SIGKILL taking it down), so a run's interval is [start, close] with no clock of the
experiment's own at the end.

Why TCP on loopback and not a file: experiments may be sandboxed to write only their own directory (Landlock), but
their network is not restricted, and the harness learns about a run even when its runner dies before uploading
anything.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class Run:
    """One run of one experiment key: one process, one ledger connection."""

    key: str
    pid: int
    started: float
    from_step: int
    directory: str
    ended: float | None = None  # when the experiment said its work was done
    closed: float | None = None  # when its connection closed: the process is gone

    @property
    def completed(self) -> bool:
        return self.ended is not None

    @property
    def alive(self) -> bool:
        return self.closed is None

    def overlaps(self, other: Run) -> bool:
        """Both processes were alive at the same moment."""
        self_end = self.closed if self.closed is not None else float("inf")
        other_end = other.closed if other.closed is not None else float("inf")
        return self.started < other_end and other.started < self_end


@dataclass
class LedgerServer:
    """A threaded TCP server on a free loopback port; ``runs`` is everything it has heard, in order."""

    runs: list[Run] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _changed: threading.Condition = field(init=False)
    _socket: socket.socket = field(init=False)
    _threads: list[threading.Thread] = field(default_factory=list)
    _connections: set[socket.socket] = field(default_factory=set)
    _closing: bool = False

    def __post_init__(self) -> None:
        self._changed = threading.Condition(self._lock)
        self._socket = socket.create_server(("127.0.0.1", 0), backlog=128)
        accept = threading.Thread(target=self._accept, name="chaos-ledger", daemon=True)
        accept.start()
        self._threads.append(accept)

    @property
    def address(self) -> str:
        host, port = self._socket.getsockname()[:2]
        return f"{host}:{port}"

    def close(self) -> None:
        self._closing = True
        self._socket.close()
        with self._lock:
            for conn in list(self._connections):
                conn.close()

    # -- queries (thread-safe copies) ---------------------------------------------------------------------------

    def snapshot(self) -> list[Run]:
        with self._lock:
            return [Run(**vars(r)) for r in self.runs]

    def by_key(self) -> dict[str, list[Run]]:
        grouped: dict[str, list[Run]] = defaultdict(list)
        for run in self.snapshot():
            grouped[run.key].append(run)
        return dict(grouped)

    def wait_for(self, check: object, timeout: float, what: str) -> list[Run]:
        """Wait until ``check(runs)`` is true (woken by every ledger change); the runs at that moment."""
        assert callable(check)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                runs = [Run(**vars(r)) for r in self.runs]
                if check(runs):
                    return runs
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
                self._changed.wait(min(left, 1.0))

    # -- server ---------------------------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._socket.accept()
            except OSError:
                return
            with self._lock:
                self._connections.add(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), name="chaos-ledger-conn", daemon=True)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        run: Run | None = None
        buffer = b""
        try:
            while True:
                try:
                    chunk = conn.recv(4096)
                except OSError:
                    break
                if not chunk:
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    run = self._record(line.decode(), run)
                    try:
                        conn.sendall(b"ok\n")
                    except OSError:
                        break
        finally:
            conn.close()
            with self._changed:
                self._connections.discard(conn)
                if run is not None:
                    run.closed = time.time()
                self._changed.notify_all()

    def _record(self, line: str, run: Run | None) -> Run | None:
        words = line.split()
        with self._changed:
            if words and words[0] == "start" and len(words) >= 6:
                run = Run(words[1], int(words[2]), float(words[3]), int(words[4]), words[5])
                self.runs.append(run)
            elif words and words[0] == "end" and run is not None:
                run.ended = float(words[3])
            self._changed.notify_all()
        return run
