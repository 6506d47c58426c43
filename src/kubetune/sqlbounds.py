"""SQLite connections that bound what SQLite can bound and give the same result on every run.

* **size**: one string or blob at most MAX_VALUE_BYTES, one statement MAX_SQL_CHARS (a query's result,
  MAX_RESULT_BYTES, is counted by :mod:`kubetune.sqlcheck` as it fetches); no attached databases; sorts and
  temporary tables in memory, never on the volume.
* **time**: :class:`Deadline` stops a statement after ``timeout_s`` × STEPS_PER_S VM instructions (the same step
  on every run) or ``timeout_s`` of wall clock, whichever comes first.
* **chance and the clock**: random() and randomblob() restart from RANDOM_SEED at each statement; the date
  functions read ``'now'`` as FIXED_NOW.

What SQLite cannot bound (one long C call, Python work, memory) is bounded by :mod:`kubetune.sqlsandbox`.
"""

from __future__ import annotations

import random
import sqlite3
import time

MAX_VALUE_BYTES = 100_000  # one string or blob (SQLite's default is 1e9: hex(zeroblob(...)) took GBs); small
# values also keep the C work of one function call, which no step count sees, small
MAX_SQL_CHARS = 100_000  # one statement, of a query or of a context; a longer query is a miss, not an error
MAX_RESULT_BYTES = 16 * 2**20  # the values of one query's result (kubetune.sqlcheck counts them as it fetches)
FIXED_NOW = "2000-01-01 00:00:00"  # what 'now' means to the date functions: the same on every run
RANDOM_SEED = 0  # random() and randomblob() restart from it at each statement
_DATE_FUNCTIONS = {"date": 0, "time": 0, "datetime": 0, "julianday": 0, "unixepoch": 0, "strftime": 1}
_CURRENT = {"current_date": "date", "current_time": "time", "current_timestamp": "datetime"}
_plain_dates: sqlite3.Connection | None = None  # a connection without the overrides, to run the real functions


class BoundedConnection(sqlite3.Connection):
    """A database whose results do not depend on the clock or on chance, and whose values are capped in size.

    random() and randomblob() draw from a generator that restarts at :meth:`restart_random` (called before each
    statement); the date functions read ``'now'`` (or no time value) as FIXED_NOW. SQLite lets an application
    redefine its built-in functions per connection, so these are Python functions that call SQLite's own on
    a plain connection with the time value fixed.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
        self.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_CHARS + 100)  # + "EXPLAIN " and the like
        self.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        self.execute("PRAGMA temp_store = MEMORY")  # sorts spill into memory (capped), not onto the volume
        self._rng = random.Random(RANDOM_SEED)
        self.create_function("random", 0, lambda: self._rng.getrandbits(64) - 2**63)
        self.create_function("randomblob", 1, self._randomblob)
        for name, at in _DATE_FUNCTIONS.items():
            self.create_function(name, -1, lambda *args, name=name, at=at: _fixed_date(name, at, args))
        for name, function in _CURRENT.items():
            self.create_function(name, 0, lambda function=function: _fixed_date(function, 0, ()))

    def restart_random(self) -> None:
        self._rng.seed(RANDOM_SEED)

    def _randomblob(self, n) -> bytes:
        n = max(int(n or 0), 1) if isinstance(n, int | float) else 1  # SQLite: N < 1 gives one byte
        if n > MAX_VALUE_BYTES:
            raise ValueError("string or blob too big")
        return self._rng.randbytes(n)


def _fixed_date(name: str, at: int, args: tuple) -> object:
    """SQLite's date function ``name`` with ``'now'`` (or a missing time value, argument ``at``) as FIXED_NOW."""
    global _plain_dates
    args = list(args)
    if len(args) <= at:
        args.append(FIXED_NOW)
    elif isinstance(args[at], str) and args[at].strip().lower() == "now":
        args[at] = FIXED_NOW
    if _plain_dates is None:
        _plain_dates = sqlite3.connect(":memory:", check_same_thread=False)
    return _plain_dates.execute(f"SELECT {name}({', '.join('?' * len(args))})", args).fetchone()[0]


def connect() -> sqlite3.Connection:
    """An empty in-memory database with the caps and the fixed clock and chance of :class:`BoundedConnection`."""
    return sqlite3.connect(":memory:", factory=BoundedConnection)


STEPS_PER_S = 10_000_000  # SQLite VM instructions a statement may run per second of timeout_s (one core here
# runs 40-55 million a second: the step budget stops a runaway statement first, at the same step on every run and
# machine, and the wall clock only where a machine is 4-5 times slower or busy)


class Deadline:
    """Stops SQLite statements of ``conn`` (returns "interrupted") once they have run ``timeout_s`` × STEPS_PER_S
    VM instructions, or ``timeout_s`` has passed, while entered. ``why`` says which."""

    def __init__(self, conn: sqlite3.Connection, timeout_s: float):
        self.conn, self.timeout_s = conn, timeout_s
        self.why: str | None = None

    @property
    def expired(self) -> bool:
        return self.why is not None

    def __enter__(self) -> "Deadline":
        deadline = time.monotonic() + self.timeout_s
        budget = max(int(self.timeout_s * STEPS_PER_S / 1000), 1)
        calls = 0

        def progress() -> int:
            nonlocal calls
            calls += 1
            if calls > budget:
                self.why = f"stopped after {budget / 1000:g}M SQLite steps ({self.timeout_s:g} s budget)"
            elif time.monotonic() > deadline:
                self.why = f"stopped after {self.timeout_s:g} s"
            return 1 if self.why else 0  # non-zero aborts the statement with "interrupted"

        self.conn.set_progress_handler(progress, 1000)  # every 1000 VM instructions: ~µs of overhead each
        return self

    def __exit__(self, *exc) -> None:
        self.conn.set_progress_handler(None, 0)
