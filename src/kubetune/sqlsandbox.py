"""Untrusted SQL runs here: in long-lived worker processes, each under a memory limit, that the parent kills at a
hard deadline.

Predictions are model output and contexts and gold queries are whatever a user brings; :mod:`kubetune.sqlcheck`
bounds what SQLite lets it bound (its progress handler stops a statement after a step budget or ``timeout_s``;
values, queries and results are capped), but a single C call can still run long or allocate much between two
progress checks, and Python code around the queries (filling the tables, comparing results) has no such check.
So the parent only sends text and receives small answers; the worker builds the test-suite databases, runs the
queries and compares the results:

* **memory**: SQLite's own heap is capped at a quarter of ``memory_limit_bytes`` (default MEMORY_LIMIT_BYTES;
  ``PRAGMA hard_heap_limit``, counted by SQLite: the same query fails the same way on every run), and the whole
  worker at ``memory_limit_bytes`` of address space (``RLIMIT_AS``). An allocation past either fails in the
  worker ("out of memory"), which is the query's error; a worker that dies of it anyway is replaced.
* **time**: every request has a deadline (building a suite: ``2 × databases × timeout_s`` for the context, the
  fill and the gold query on each database; checking a query: ``databases × timeout_s``; showing one:
  ``timeout_s``; each plus GRACE_S). Past it the parent kills the worker (SIGKILL), starts another and answers
  "stopped after … (hard limit)". The next request of the same suite rebuilds it there first (deterministic: the
  same databases).

A worker is ``python -m kubetune.sqlsandbox`` (a fresh interpreter: no torch, no model, no open files of the
parent, and unlike multiprocessing's spawn and forkserver it never re-imports the caller's ``__main__``), talking
over a socket pair with pickled messages. It serves many requests: one costs a round trip (~0.1 ms); starting a
worker ~0.1 s.
"""

from __future__ import annotations

import atexit
import os
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from kubetune.sqlbounds import MAX_SQL_CHARS
from kubetune.sqlcheck import Outcome, QuerySuite

MEMORY_LIMIT_BYTES = 1 << 30  # per worker, address space: the evaluate pod has 4Gi; scoring takes ~20 MB RSS
SQLITE_HEAP_SHARE = 4  # SQLite may allocate a quarter of the memory limit (PRAGMA hard_heap_limit)
GRACE_S = 2.0  # over the sum of the per-statement timeouts: starting Python work, filling tables, comparing
STARTUP_TIMEOUT_S = 60.0  # python -m kubetune.sqlsandbox: ~0.1 s on an idle machine
MAX_CONTEXT_CHARS = 1_000_000  # a schema: ten statements of MAX_SQL_CHARS; a longer one is not sent at all
SHARED_WORKERS = 4  # of shared_pool(): concurrent requests (UI users) before one waits for a free worker


class WorkerLost(Exception):
    """The worker was killed at the deadline, or died (memory); the message says which, for an outcome's error."""


def _serve(conn, memory_limit_bytes: int) -> None:
    """The worker: set the limits, then answer requests until the pipe closes."""
    _die_with_parent()
    resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
    # SQLite's own allocations, counted by SQLite: a query past it fails the same way on every run, whatever the
    # worker's heap looks like after earlier requests (the address-space limit is the backstop for the rest)
    process_wide = sqlite3.connect(":memory:")
    process_wide.execute(f"PRAGMA hard_heap_limit = {memory_limit_bytes // SQLITE_HEAP_SHARE}")
    process_wide.close()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash leaves no core file on the volume
    os.environ["TZ"] = "UTC"  # date(x, 'localtime') must not depend on the node
    time.tzset()
    conn.send(("ready", None))
    suite: QuerySuite | None = None
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if op == "build":
                if suite is not None:
                    suite.close()
                suite = None
                suite = QuerySuite(*args[:2], **args[2])
                reply = ("ok", suite.gold_error)
            elif op == "check":  # several predictions: one outcome message each, then the reply
                for pred in args:
                    conn.send(("outcome", suite.check(pred, on_parsed=lambda: conn.send(("parsed", None)))))
                reply = ("ok", None)
            elif op == "table":
                sql, limit = args
                try:
                    names, rows = suite.table(sql)
                    reply = ("ok", (names, rows[:limit], len(rows)))
                except ValueError as exc:
                    reply = ("error", str(exc))
            else:
                reply = ("error", f"unknown request {op!r}")
        except MemoryError:
            reply = ("error", "out of memory")
        except Exception as exc:  # a defect of ours, not of the query: one line for the outcome, no traceback
            reply = ("error", f"scoring failed ({type(exc).__name__}: {exc})")
        conn.send(reply)


def _die_with_parent() -> None:
    """SIGKILL this worker when its parent dies (Linux prctl PR_SET_PDEATHSIG): a query stuck in one C call
    would otherwise outlive a killed evaluate or UI process until it returned."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pipe's end still stops it between queries
        pass


def _peak_rss_bytes(pid: int) -> int:
    """The process's peak resident memory (VmHWM), 0 where /proc does not say."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class _Worker:
    def __init__(self, memory_limit_bytes: int):
        self.memory_limit_bytes = memory_limit_bytes
        ours, theirs = socket.socketpair()
        # the folder that holds this kubetune, first: a source tree's copy, not another one installed
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (package_root,
                                                                          os.environ.get("PYTHONPATH"))))}
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kubetune.sqlsandbox", str(theirs.fileno()), str(memory_limit_bytes)],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env)
        self.conn = Connection(ours.detach())
        # Deadlines count the work, not the interpreter's start (seconds on a loaded node)
        if not self.conn.poll(STARTUP_TIMEOUT_S):
            self.kill()
            raise WorkerLost(f"the SQL worker did not start within {STARTUP_TIMEOUT_S:g} s")
        try:
            self.conn.recv()
        except (EOFError, OSError):
            self.kill()
            raise WorkerLost(f"the SQL worker did not start (exit code {self.process.returncode})") from None

    def call(self, op: str, args, deadline_s: float, on_message: Callable[[str, object], None] | None = None):
        """The reply to one request: ``("ok", value)`` or ``("error", why)``. Messages sent before the reply
        (``("parsed", None)``, ``("outcome", Outcome)``) go to ``on_message``; each outcome starts the deadline
        afresh (it is per query). Raises WorkerLost after killing the worker."""
        until = time.monotonic() + deadline_s
        try:
            self.conn.send((op, args))
            while True:
                if not self.conn.poll(max(until - time.monotonic(), 0)):
                    self.kill()
                    raise WorkerLost(f"stopped after {deadline_s:g} s (hard limit)")
                kind, value = self.conn.recv()
                if kind in ("ok", "error"):
                    return kind, value
                if on_message is not None:
                    on_message(kind, value)
                if kind == "outcome":
                    until = time.monotonic() + deadline_s
        except (EOFError, OSError):
            try:
                code = self.process.wait(1)
            except subprocess.TimeoutExpired:
                code = None
            self.kill()
            raise WorkerLost(f"the SQL worker died (exit code {code}; memory limit "
                             f"{self.memory_limit_bytes // 2**20} MiB)") from None

    def peak_rss_bytes(self) -> int:
        return _peak_rss_bytes(self.process.pid) if self.alive else 0

    def kill(self) -> None:
        if self.alive:
            self.process.kill()
        self.process.wait()
        self.conn.close()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class SandboxPool:
    """Up to ``workers`` worker processes, started when first needed and kept for the next request. Thread-safe:
    a thread holds one worker for a whole suite (:meth:`worker`); a thread that finds all of them busy waits."""

    def __init__(self, workers: int = 1, memory_limit_bytes: int = MEMORY_LIMIT_BYTES):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.size = workers
        self.memory_limit_bytes = memory_limit_bytes
        self._idle: list[_Worker] = []
        self._started = 0
        self._free = threading.Condition()
        self.peak_rss_bytes = 0  # the largest of the workers' peaks seen so far (at each kill and release)
        self.replaced = 0  # workers killed at a deadline or lost to memory

    @contextmanager
    def worker(self) -> Iterator["_Slot"]:
        with self._free:
            while not self._idle and self._started >= self.size:
                self._free.wait()
            worker = self._idle.pop() if self._idle else None
            if worker is None:
                self._started += 1
        slot = _Slot(self, worker)
        try:
            yield slot
        finally:
            with self._free:
                if slot.current is not None and slot.current.alive:
                    self._note_peak(slot.current)
                    self._idle.append(slot.current)
                else:
                    self._started -= 1
                self._free.notify()

    def _note_peak(self, worker: _Worker) -> None:
        self.peak_rss_bytes = max(self.peak_rss_bytes, worker.peak_rss_bytes())

    def close(self) -> None:
        with self._free:
            for worker in self._idle:
                worker.kill()
            self._started -= len(self._idle)
            self._idle = []

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Slot:
    """One worker held by one thread; replaced (``generation`` + 1) when it is lost."""

    def __init__(self, pool: SandboxPool, worker: _Worker | None):
        self.pool, self.current = pool, worker
        self.generation = 0

    def call(self, op: str, args, deadline_s: float, on_message: Callable[[str, object], None] | None = None):
        if self.current is None or not self.current.alive:
            self.current = None
            self.current = _Worker(self.pool.memory_limit_bytes)
            self.generation += 1
        try:
            return self.current.call(op, args, deadline_s, on_message)
        except WorkerLost:
            self.pool._note_peak(self.current)  # dead: /proc no longer says; kept for the living ones
            self.pool.replaced += 1
            self.current = None
            raise


@dataclass
class Shown:
    """A query's result as :meth:`SandboxedSuite.table` shows it: the first rows and how many there were."""

    columns: list[str]
    rows: list[tuple]
    total_rows: int


class SandboxedSuite:
    """:class:`kubetune.sqlcheck.QuerySuite` in a worker of ``pool``, with the same ``gold_error``, ``check``
    and a ``table`` that returns the first ``limit`` rows. Holds one worker from entering to closing."""

    def __init__(self, pool: SandboxPool, context: str, gold: str, *, databases: int = 3, rows: int = 12,
                 timeout_s: float = 2.0, seed: int = 0, grace_s: float = GRACE_S):
        self._args = (context, _clip(gold), {"databases": databases, "rows": rows, "timeout_s": timeout_s,
                                             "seed": seed})
        self.build_deadline_s = 2 * databases * timeout_s + grace_s
        self.check_deadline_s = databases * timeout_s + grace_s
        self.table_deadline_s = timeout_s + grace_s
        self._pool = pool
        self._hold = pool.worker()
        self._slot = self._hold.__enter__()
        self._built: int | None = None  # the slot generation that holds the suite
        self.gold_error: str | None = None
        self._broken: str | None = None  # the suite could not be built at all
        if len(context) > MAX_CONTEXT_CHARS:
            self._broken = self.gold_error = f"context: longer than {MAX_CONTEXT_CHARS:,} characters"
        else:
            self._build()

    def _build(self) -> None:
        try:
            _, self.gold_error = self._slot.call("build", self._args, self.build_deadline_s)
            self._built = self._slot.generation
        except WorkerLost as exc:
            self._broken = self.gold_error = f"context: test-suite databases not built: {exc}"

    def _ready(self) -> bool:
        if self._broken:
            return False
        if self._built != self._slot.generation or not (self._slot.current and self._slot.current.alive):
            self._build()  # the worker that held it was lost to an earlier query
        return not self._broken

    def check(self, pred: str) -> Outcome:
        return self.check_many([pred])[0]

    def check_many(self, preds: list[str]) -> list[Outcome]:
        """The outcome of each of ``preds``, in one request (one round trip, not one per query). Each query keeps
        its own hard deadline; one that is killed is a miss and the rest go on in a new worker."""
        outcomes: list[Outcome] = []
        while len(outcomes) < len(preds):
            if not self._ready():
                return outcomes + [Outcome(parsed=False, executed=False, match=False, error=self._broken)
                                   for _ in preds[len(outcomes):]]
            parsed = False  # whether the query being run has compiled

            def note(kind: str, value) -> None:
                nonlocal parsed
                if kind == "parsed":
                    parsed = True
                elif kind == "outcome":
                    outcomes.append(value)
                    parsed = False

            try:
                kind, value = self._slot.call("check", [_clip(p) for p in preds[len(outcomes):]],
                                              self.check_deadline_s, note)
            except WorkerLost as exc:
                kind, value = "error", str(exc)
            if kind == "error":  # the query being run: killed, or out of memory outside SQLite
                outcomes.append(Outcome(parsed=parsed, executed=False, match=False, error=value))
        return outcomes

    def table(self, sql: str, limit: int) -> Shown:
        """Column names and the first ``limit`` rows of ``sql`` on the first database; ValueError saying why not."""
        if not self._ready():
            raise ValueError(self._broken)
        try:
            kind, value = self._slot.call("table", (_clip(sql), limit), self.table_deadline_s)
        except WorkerLost as exc:
            raise ValueError(str(exc)) from None
        if kind == "error":
            raise ValueError(value)
        return Shown(*value)

    def close(self) -> None:
        if self._hold is not None:
            self._hold.__exit__(None, None, None)
            self._hold = None

    def __enter__(self) -> "SandboxedSuite":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _clip(sql: str) -> str:
    """What the worker needs of a query: one character past MAX_SQL_CHARS already makes it too long."""
    return sql[:MAX_SQL_CHARS + 1]


_shared: SandboxPool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> SandboxPool:
    """The process's pool of SHARED_WORKERS workers (the UI's, and :func:`compare`'s), closed at exit."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = SandboxPool(SHARED_WORKERS)
            atexit.register(_shared.close)
        return _shared


def compare(context: str, gold: str, pred: str, *, databases: int = 3, rows: int = 12, timeout_s: float = 2.0,
            seed: int = 0, pool: SandboxPool | None = None) -> Outcome:
    """:func:`kubetune.sqlcheck.compare` in a worker of ``pool`` (default :func:`shared_pool`)."""
    with SandboxedSuite(pool or shared_pool(), context, gold, databases=databases, rows=rows, timeout_s=timeout_s,
                        seed=seed) as suite:
        return suite.check(pred)


if __name__ == "__main__":  # a worker: python -m kubetune.sqlsandbox SOCKET_FD MEMORY_LIMIT_BYTES
    _serve(Connection(int(sys.argv[1])), int(sys.argv[2]))
