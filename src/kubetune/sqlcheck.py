"""Scoring generated SQL against a gold query, with the standard library's sqlite3 only.

Three measures, from strictest to most meaningful:

* **exact match** — the two queries are the same text after :func:`normalize_sql` (case, spacing, quote style,
  ``<>``/``!=``). Cheap, but calls ``SELECT a AS x ...`` wrong when it is right.
* **parses** — the prediction is one read-only SELECT that SQLite can prepare against the context's tables, so an
  unknown column or table counts as a failure (``EXPLAIN`` compiles without running).
* **execution match** — test-suite accuracy (Zhong, Yu & Klein, EMNLP 2020): fill a few small databases with
  rows generated from the context's schema, seeding the literals the gold query mentions (so that
  ``WHERE name = 'x'`` selects something), run both queries and compare the results as multisets (as lists when
  the gold query has a top-level ORDER BY), allowing the columns to come in another order. Every database must
  agree. More databases catch more wrong queries and cost more time.

A prediction that fails in any way is simply not a match; nothing here raises for bad SQL. Every database is a
:mod:`kubetune.sqlbounds` connection: runaway statements (a recursive CTE, a cross join of cross joins, in a
query or in a context's ``CREATE TABLE … AS``) stop after a step budget or ``timeout_s``, values, statements and
results are capped, and random() and 'now' are fixed, so a score does not change from run to run. What SQLite
cannot bound (one long C call, Python work, memory) is bounded by running all this in a worker process:
:mod:`kubetune.sqlsandbox`. This module runs SQL in the calling process: use it directly only for SQL you trust.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import sqlite3
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from kubetune.sqlbounds import MAX_RESULT_BYTES, MAX_SQL_CHARS, BoundedConnection, Deadline, connect

# ---- tokens ------------------------------------------------------------------------------------------------
_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))
  | (?P<str>'[^']*+(?:''[^']*+)*+(?:'|\Z))
  | (?P<dq>"[^"]*+(?:""[^"]*+)*+(?:"|\Z))
  | (?P<bq>`[^`]*+(?:``[^`]*+)*+(?:`|\Z))
  | (?P<br>\[[^\]]*+(?:\]|\Z))
  | (?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[^\W\d]\w*)
  | (?P<op><=|>=|<>|!=|==|\|\||<<|>>|[-+*/%<>=(),.;&|~])
  | (?P<other>\S)
""", re.X | re.S)
# The quoted tokens are written as "unrolled loops" with possessive repeats: (?:[^']|'')* kept a backtracking
# frame per character (~190 bytes of memory per character of a literal); [^']*+ keeps none.


@dataclass(frozen=True)
class Token:
    kind: str  # str, dq, bq, br, num, ident, op, other (whitespace and comments are dropped)
    text: str
    end: int  # offset just past the token in the source

    @property
    def upper(self) -> str:
        return self.text.upper()

    @property
    def value(self) -> str:
        """The content of a quoted token (quotes removed, doubled quotes undone); the text otherwise."""
        if self.kind in ("str", "dq", "bq"):
            q = self.text[0]
            body = self.text[1:-1] if len(self.text) > 1 and self.text.endswith(q) else self.text[1:]
            return body.replace(q * 2, q)
        if self.kind == "br":
            return self.text[1:-1] if self.text.endswith("]") else self.text[1:]
        return self.text


def tokenize(sql: str) -> list[Token]:
    return [Token(m.lastgroup, m.group(), m.end()) for m in _TOKEN.finditer(sql)
            if m.lastgroup not in ("ws", "comment")]


def _strip_semicolons(tokens: list[Token]) -> list[Token]:
    end = len(tokens)
    while end and tokens[end - 1].text == ";":
        end -= 1
    return tokens[:end]


# ---- exact match ---------------------------------------------------------------------------------------------
_OP_ALIASES = {"<>": "!=", "==": "="}


def normalize_sql(sql: str) -> str:
    """A canonical text for exact match: keywords and identifiers upper case, string literals (single or double
    quoted) as single-quoted with their case kept, one space between tokens, no comments or trailing ``;``.

    ``select  name from t where x<>"a";`` → ``SELECT NAME FROM T WHERE X != 'a'``.
    """
    out = []
    for tok in _strip_semicolons(tokenize(sql.strip())):
        if tok.kind in ("str", "dq"):
            out.append("'" + tok.value.replace("'", "''") + "'")
        elif tok.kind in ("ident", "bq", "br"):
            out.append(tok.value.upper())
        elif tok.kind == "op":
            out.append(_OP_ALIASES.get(tok.text, tok.text))
        else:
            out.append(tok.text)
    return " ".join(out)


def exact_match(gold: str, pred: str) -> bool:
    if max(len(gold), len(pred)) > MAX_SQL_CHARS:  # a token object per word of megabytes of text: not for that
        return gold.strip() == pred.strip()
    return normalize_sql(gold) == normalize_sql(pred)


# ---- one read-only statement ----------------------------------------------------------------------------------
# What a SELECT may do while it is prepared; anything else (a write, a PRAGMA, ATTACH) is refused by SQLite.
_READ_ONLY_ACTIONS = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                                sqlite3.SQLITE_RECURSIVE})


def _authorize(action: int, arg1, arg2, db_name, source) -> int:
    return sqlite3.SQLITE_OK if action in _READ_ONLY_ACTIONS else sqlite3.SQLITE_DENY


def single_select(sql: str) -> tuple[str | None, str | None]:
    """(the statement without trailing semicolons, None) or (None, why it is not one SELECT)."""
    if len(sql) > MAX_SQL_CHARS:
        return None, f"query longer than {MAX_SQL_CHARS} characters"
    tokens = _strip_semicolons(tokenize(sql))
    if not tokens:
        return None, "empty query"
    if any(t.text == ";" for t in tokens):
        return None, "more than one statement"
    if tokens[0].upper not in ("SELECT", "WITH"):
        return None, f"not a SELECT statement (starts with {tokens[0].text!r})"
    return sql[:tokens[-1].end].strip(), None


class ContextError(ValueError):
    """The context's CREATE TABLE statements do not build a database."""


def _schema_db(context: str, timeout_s: float = 2.0) -> sqlite3.Connection:
    """An in-memory database with the context's tables (only its CREATE statements are run: a context is data).
    ``timeout_s`` bounds them all together (``CREATE TABLE t AS <recursive query>`` is a CREATE statement)."""
    conn = connect()
    statement: list[Token] = []
    start = 0
    problem = None
    with Deadline(conn, timeout_s) as deadline:
        for tok in [*tokenize(context), Token("op", ";", len(context))]:
            if tok.text != ";":
                statement.append(tok)
                continue
            if statement and statement[0].upper == "CREATE":
                text = context[start:statement[-1].end].strip()
                try:
                    conn.execute(text)
                except (sqlite3.Error, OverflowError, MemoryError) as exc:
                    why = deadline.why or _why(exc)
                    problem = f"context: {why} in {text[:80]!r}"
                    break
            statement, start = [], tok.end
    if problem:
        conn.close()
        raise ContextError(problem)
    tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
    if not tables:
        conn.close()
        raise ContextError("context: no CREATE TABLE statement")
    return conn


def _prepare_error(conn: sqlite3.Connection, sql: str) -> str | None:
    """Why ``sql`` is not one read-only SELECT that compiles on ``conn`` (None if it is)."""
    statement, problem = single_select(sql)
    if problem:
        return problem
    conn.set_authorizer(_authorize)
    try:
        conn.execute("EXPLAIN " + statement).fetchall()
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError, MemoryError) as exc:
        return _why(exc)
    finally:
        conn.set_authorizer(None)
    return None


def parse_error(context: str, sql: str) -> str | None:
    """None if ``sql`` is a single SELECT that SQLite compiles against ``context``'s tables, else the reason."""
    try:
        conn = _schema_db(context)
    except ContextError as exc:
        return str(exc)
    try:
        return _prepare_error(conn, sql)
    finally:
        conn.close()


def parses(context: str, sql: str) -> bool:
    return parse_error(context, sql) is None


# ---- literals of the gold query -------------------------------------------------------------------------------
_COMPARISONS = {"=", "==", "!=", "<>", "<", ">", "<=", ">=", "LIKE", "GLOB", "IS"}
_FLIPPED = {"<": ">", ">": "<", "<=": ">=", ">=": "<="}  # 5 < col is col > 5


@dataclass(frozen=True)
class Literal:
    value: object  # str, int or float
    op: str  # how the gold compares its column with it: =, !=, <, >, <=, >=


def _literal(tokens: list[Token], i: int, columns: set[str]) -> tuple[object, int] | None:
    """The literal starting at ``tokens[i]`` (a number, possibly negative, or a quoted string) and its length."""
    if i < 0 or i >= len(tokens):
        return None
    tok = tokens[i]
    if tok.text == "-" and i + 1 < len(tokens) and tokens[i + 1].kind == "num":
        value = _number(tokens[i + 1].text)
        return (-value, 2) if value is not None else None
    if tok.kind == "num":
        value = _number(tok.text)
        return (value, 1) if value is not None else None
    # SQLite reads "x" as a column when there is one, else as a string: follow it
    if tok.kind == "str" or (tok.kind == "dq" and tok.value.lower() not in columns):
        return tok.value, 1
    return None


def _number(text: str) -> int | float | None:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return None


def _column_at(tokens: list[Token], i: int, columns: set[str]) -> str | None:
    """The column named by ``tokens[i]`` (the ``name`` of ``T1.name``), if it is one of ``columns``."""
    if 0 <= i < len(tokens) and tokens[i].kind in ("ident", "dq", "bq", "br") \
            and tokens[i].value.lower() in columns:
        return tokens[i].value.lower()
    return None


def gold_literals(sql: str, columns: set[str]) -> tuple[dict[str, list[Literal]], list[object], set[str]]:
    """(literals compared with each column, literals not tied to a column, columns the gold orders by).

    Handles ``col <op> lit``, ``lit <op> col``, ``col [NOT] IN (lit, ...)``, ``col [NOT] BETWEEN lit AND lit``
    and ``col [NOT] LIKE 'pat'`` (wildcards filled in, so that the value matches); a LIMIT/OFFSET count is not
    data.
    """
    tokens = tokenize(sql)
    tied: dict[str, list[Literal]] = {}
    used: set[int] = set()
    ordered: set[str] = set()

    def tie(column: str | None, at: int, op: str) -> int:
        """Tie the literal at ``at`` (if there is one) to ``column``; returns the tokens it spans (0: none)."""
        lit = _literal(tokens, at, columns)
        if lit is None or column is None:
            return 0
        value = lit[0]
        if op == "LIKE" and isinstance(value, str):
            value = value.replace("%", "").replace("_", "x")
        elif op == "GLOB" and isinstance(value, str):
            value = re.sub(r"[*?\[\]]", "", value)
        op = {"==": "=", "<>": "!=", "IS": "=", "LIKE": "=", "GLOB": "="}.get(op, op)
        tied.setdefault(column, []).append(Literal(value, op))
        used.update(range(at, at + lit[1]))
        return lit[1]

    def negated(i: int) -> bool:
        return i > 0 and tokens[i - 1].upper == "NOT"

    for i, tok in enumerate(tokens):
        word = tok.upper
        if word in ("LIMIT", "OFFSET"):
            used.add(i + 1)
        elif word == "BY" and i and tokens[i - 1].upper == "ORDER":
            for j in range(i + 1, len(tokens)):
                if tokens[j].upper in ("LIMIT", "OFFSET") or tokens[j].text in (")", ";"):
                    break
                if (col := _column_at(tokens, j, columns)) is not None:
                    ordered.add(col)
        elif tok.text in _COMPARISONS or word in _COMPARISONS:
            op = "!=" if negated(i) else word
            if not tie(_column_at(tokens, i - 2 if negated(i) else i - 1, columns), i + 1, op):
                right = _column_at(tokens, i + 1, columns)  # literal on the left: 5 < col
                back = 2 if i >= 2 and tokens[i - 2].text == "-" else 1
                tie(right, i - back, _FLIPPED.get(op, op))
        elif word == "IN" and i + 1 < len(tokens) and tokens[i + 1].text == "(":
            col, j = _column_at(tokens, i - 2 if negated(i) else i - 1, columns), i + 2
            while col and j < len(tokens) and tokens[j].text != ")":
                j += tie(col, j, "!=" if negated(i) else "=") or 1
        elif word == "BETWEEN":
            col = _column_at(tokens, i - 2 if negated(i) else i - 1, columns)
            width = tie(col, i + 1, "!=" if negated(i) else ">=")
            if width and i + 1 + width < len(tokens) and tokens[i + 1 + width].upper == "AND":
                tie(col, i + 2 + width, "!=" if negated(i) else "<=")
    loose, i = [], 0
    while i < len(tokens):
        lit = None if i in used or i + 1 in used and tokens[i].text == "-" else _literal(tokens, i, columns)
        if lit is not None:
            loose.append(lit[0])
        i += lit[1] if lit else 1
    return tied, loose, ordered


# ---- test-suite databases ------------------------------------------------------------------------------------
NEAR_RATE = 0.3  # share of a compared number's rows drawn just around it (after the seeded ones)
_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
          "lima", "mike", "november", "oscar", "papa")


def _affinity(declared: str) -> str:
    """SQLite's column affinity rules (section 3.1 of "Datatypes In SQLite")."""
    t = (declared or "").upper()
    if "INT" in t:
        return "integer"
    if any(k in t for k in ("CHAR", "CLOB", "TEXT")) or not t or "BLOB" in t:
        return "text"
    if any(k in t for k in ("REAL", "FLOA", "DOUB")):
        return "real"
    return "numeric"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _step(v: int | float) -> int | float:
    return 1 if isinstance(v, int) else 0.5


def _neighbours(lits: list[Literal]) -> list[object]:
    """Each literal, and for numbers the values either side, so that > vs >= and < vs <= give different rows."""
    out: list[object] = []
    for lit in lits:
        out.append(lit.value)
        if _is_number(lit.value):
            out += [lit.value - _step(lit.value), lit.value + _step(lit.value)]
    return out


def _satisfying(lit: Literal) -> object:
    """A value that meets the gold's condition on its column (the literal itself for =, <=, >=)."""
    v = lit.value
    if lit.op in (">", "!="):
        return v + _step(v) if _is_number(v) else f"{v}z"  # "abcz" sorts after "abc"
    if lit.op == "<":
        return v - _step(v) if _is_number(v) else v[:-1]
    return v


def _violating(lit: Literal) -> object:
    """A value that fails the gold's condition on its column."""
    v = lit.value
    if lit.op == "!=":
        return v
    if _is_number(v):
        return v + 7 * _step(v) if lit.op in ("=", "<", "<=") else v - 7 * _step(v)
    return f"{v}q" if lit.op in ("=", "<", "<=") else v[:-1]


def _witnesses(tied: dict[str, list[Literal]]) -> list[tuple[dict[str, object], bool]]:
    """The first rows of a table, as (values of the columns that the gold compares, is the row an outlier).

    Row 0 meets every condition of the gold at once. Then, for each condition that excludes its literal
    (<, >, !=), a row that meets the others and sits on that literal: it tells > from >=. Then a row that
    meets every condition with the next literal (IN lists, ORs), so that two rows qualify and SUM differs from
    AVG, and last a row that fails every condition. Outlier rows get extreme values in the other numeric
    columns and words of their own in the other text columns, so that MAX/MIN and DISTINCT over the wrong rows
    show.
    """
    first = {c: _satisfying(lits[0]) for c, lits in tied.items()}
    failing = {c: _violating(lits[0]) for c, lits in tied.items()}
    out = [(first, False)]
    for c, lits in tied.items():
        if lits[0].op in ("<", ">", "!="):  # on the boundary, the others met (AND) and failed (OR)
            out.append(({**first, c: lits[0].value}, True))
            if len(tied) > 1:
                out.append(({**failing, c: lits[0].value}, True))
    out.append(({c: _satisfying(lits[1 % len(lits)]) for c, lits in tied.items()}, False))
    out.append((failing, True))
    return out


def _fill(conn: sqlite3.Connection, gold: str, rng: random.Random, rows: int, seed_rate: float,
          outliers_high: bool) -> None:
    """Insert ``rows`` generated rows into every table of ``conn``.

    The first rows are witnesses (see :func:`_witnesses`; their outliers are high numbers if ``outliers_high``,
    else low ones). Columns compared with a literal in the gold query
    then draw that literal (or its numeric neighbours) with probability ``seed_rate``, and numbers near it with
    probability NEAR_RATE; the rest is random over a range around the literals. A column name shared by several
    tables is a join key: they all draw from one small pool so that joins match. Columns the gold orders by get
    distinct values, so that LIMIT after ORDER BY does not depend on how SQLite breaks ties.
    """
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                         "AND name NOT LIKE 'sqlite_%'")]
    schema = {t: [(r[1], _affinity(r[2])) for r in conn.execute(f"PRAGMA table_info({_quote(t)})")] for t in tables}
    names = Counter(c.lower() for cols in schema.values() for c in {c for c, _ in cols})
    tied, loose, ordered = gold_literals(gold, set(names))
    loose_text = [v for v in loose if isinstance(v, str)]
    loose_num = [v for v in loose if not isinstance(v, str)]
    keys: dict[str, list[object]] = {}

    for table, cols in schema.items():
        if not cols:
            continue
        witnesses = _witnesses({c.lower(): tied[c.lower()] for c, _ in cols
                                if c.lower() in tied and names[c.lower()] == 1})[:rows]
        columns = []
        for name, affinity in cols:
            key = name.lower()
            lits = tied.get(key, [])
            seeded = _neighbours(lits)
            if names[key] > 1:  # join key: one small pool for every table that has it
                if key not in keys:
                    extra = loose_text + rng.sample(_WORDS, 3) if affinity == "text" else rng.sample(range(1, 9), 3)
                    keys[key] = [lit.value for lit in lits] + extra
                columns.append([rng.choice(keys[key]) for _ in range(rows)])
                continue
            numbers = [v for v in seeded + loose_num if _is_number(v) and math.isfinite(v)]
            low = int(min(numbers, default=0)) - 20
            high = int(max(numbers, default=100)) + 20
            near = [lit.value for lit in lits if _is_number(lit.value)]
            text_pool = rng.sample(_WORDS, 4) + [str(rng.randint(low, high)) for _ in range(2)]
            extra = loose_text if affinity == "text" else loose_num
            values = []
            for _ in range(rows):
                r = rng.random()
                if seeded and r < seed_rate:
                    values.append(rng.choice(seeded))
                elif extra and r < seed_rate * 1.3:
                    values.append(rng.choice(extra))
                elif affinity == "text":
                    values.append(rng.choice(text_pool))
                elif near and r < seed_rate + NEAR_RATE:
                    # just around a compared number: tells "> 7" from "> 10" where a wide range rarely would
                    v = rng.choice(near)
                    values.append(v + rng.randint(-6, 6) if affinity == "integer" and isinstance(v, int)
                                  else round(v + rng.uniform(-6, 6), 2))
                elif affinity == "integer":
                    values.append(rng.randint(low, high))
                else:
                    values.append(round(rng.uniform(low, high), 2))
            for w, (fixed, outlier) in enumerate(witnesses):
                if key in fixed:
                    values[w] = fixed[key]
                elif outlier and affinity == "text":
                    values[w] = f"{rng.choice(_WORDS)} {w}"
                elif outlier:
                    values[w] = high + rng.randint(1, 50) if outliers_high else low - rng.randint(1, 50)
            if key in ordered:
                values = _distinct(values, affinity, rng, low, high)
            columns.append(values)
        placeholders = ", ".join("?" for _ in cols)
        conn.executemany(f"INSERT INTO {_quote(table)} ({', '.join(_quote(c) for c, _ in cols)}) "
                         f"VALUES ({placeholders})", [tuple(map(_storable, row)) for row in zip(*columns)])


def _storable(value: object) -> object:
    # SQLite integers are 64-bit; a larger literal (or its neighbour) is stored as REAL, as SQLite itself would
    return float(value) if isinstance(value, int) and not -2**63 <= value < 2**63 else value


DISTINCT_TRIES = 100  # redraws for a value already taken; past 1e16 a REAL range may hold a single float


def _distinct(values: list[object], affinity: str, rng: random.Random, low: int, high: int) -> list[object]:
    seen: set[object] = set()
    out = []
    for v in values:
        for _ in range(DISTINCT_TRIES):
            if v not in seen:
                break
            v = f"{v}{rng.choice(_WORDS)}" if isinstance(v, str) else (
                rng.randint(low, high + len(values) * 10) if affinity == "integer" else
                round(rng.uniform(low, high + len(values)), 3))
        seen.add(v)
        out.append(v)
    return out


def _ordered(sql: str) -> bool:
    """True when the query's result order is defined: an ORDER BY outside any parentheses."""
    depth = 0
    tokens = tokenize(sql)
    for i, tok in enumerate(tokens):
        if tok.text == "(":
            depth += 1
        elif tok.text == ")":
            depth -= 1
        elif depth == 0 and tok.upper == "ORDER" and i + 1 < len(tokens) and tokens[i + 1].upper == "BY":
            return True
    return False


def _canonical(value: object) -> object:
    # AVG over the same rows summed in another order differs in the last bits; 6 decimals absorb that
    return round(value, 6) if isinstance(value, float) else value


class QueryTimeout(Exception):
    pass


# What running a query may raise (ValueError: too many rows or bytes, a literal SQLite cannot bind; MemoryError:
# SQLite or Python out of memory, which in a sandbox worker is its memory limit)
_QUERY_ERRORS = (sqlite3.Error, sqlite3.Warning, QueryTimeout, ValueError, OverflowError, MemoryError)


def _why(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return "out of memory"
    return str(exc) or type(exc).__name__


def _execute(conn: sqlite3.Connection, sql: str, timeout_s: float, max_rows: int,
             names: list[str] | None = None) -> tuple[int, list[tuple]]:
    """(number of columns, rows); raises sqlite3.Error, QueryTimeout, or ValueError when there are too many rows.
    ``names``, if given, receives the column names (for showing a result, :meth:`QuerySuite.table`)."""
    conn.set_authorizer(_authorize)
    if isinstance(conn, BoundedConnection):
        conn.restart_random()
    try:
        with Deadline(conn, timeout_s) as deadline:
            try:
                cur = conn.execute(sql)
                width = len(cur.description or ())
                if names is not None:
                    names.extend(d[0] for d in cur.description or ())
                rows: list[tuple] = []
                size = 0
                while chunk := cur.fetchmany(1000):
                    rows.extend(tuple(_canonical(v) for v in row) for row in chunk)
                    size += sum(_value_bytes(v) for row in chunk for v in row)
                    if len(rows) > max_rows:
                        raise ValueError(f"more than {max_rows} rows")
                    if size > MAX_RESULT_BYTES:
                        raise ValueError(f"result larger than {MAX_RESULT_BYTES // 2**20} MiB")
                return width, rows
            except sqlite3.OperationalError:
                if deadline.expired:
                    raise QueryTimeout(deadline.why) from None
                raise
    finally:
        conn.set_authorizer(None)


def _value_bytes(value: object) -> int:
    return len(value) if isinstance(value, str | bytes) else 8


@dataclass
class Outcome:
    parsed: bool  # one SELECT that compiles against the context
    executed: bool  # ran on every database without error or timeout
    match: bool  # same results as the gold on every database
    error: str | None = None  # why not, when it is not a match for a reason other than different results

    def __bool__(self) -> bool:
        return self.match


class QuerySuite:
    """The test-suite databases of one (context, gold) pair: build once, check several predictions.

    ``databases`` databases of ``rows`` rows per table; the seeding rate of gold literals differs per database
    (dense, medium, sparse) so that both "filter selects rows" and "filter selects few rows" are tried.
    """

    SEED_RATES = (0.5, 0.3, 0.15)

    def __init__(self, context: str, gold: str, *, databases: int = 3, rows: int = 12, timeout_s: float = 2.0,
                 seed: int = 0, max_rows: int = 100_000):
        if databases < 1 or rows < 1:
            raise ValueError("databases and rows must be >= 1")
        self.timeout_s = timeout_s
        self.max_rows = max_rows
        self.ordered = _ordered(gold)
        self.gold_error: str | None = None
        self.gold_results: list[tuple[int, list[tuple]]] = []
        self._dbs: list[sqlite3.Connection] = []
        try:
            for d in range(databases):
                conn = _schema_db(context, timeout_s)
                self._dbs.append(conn)
                # A str seed is hashed with SHA-512 by random.seed: the same databases on every run and machine
                rng = random.Random(f"{seed}|{d}|{context}|{gold}")
                with Deadline(conn, timeout_s) as deadline:  # the context's triggers run as rows go in
                    try:
                        _fill(conn, gold, rng, rows, self.SEED_RATES[d % len(self.SEED_RATES)],
                              outliers_high=d % 2 == 0)
                    except sqlite3.OperationalError as exc:
                        raise QueryTimeout(deadline.why) if deadline.expired else exc
        except ContextError as exc:
            self.gold_error = str(exc)
            return
        # OverflowError: a literal beyond SQLite's 64-bit integers
        except (sqlite3.Error, OverflowError, MemoryError, QueryTimeout) as exc:
            self.gold_error = f"context: cannot fill the tables ({_why(exc)})"
            return
        problem = _prepare_error(self._dbs[0], gold)
        if problem:
            self.gold_error = f"gold: {problem}"
            return
        statement = single_select(gold)[0]
        try:
            self.gold_results = [_execute(c, statement, timeout_s, max_rows) for c in self._dbs]
        except _QUERY_ERRORS as exc:
            self.gold_error = f"gold: {_why(exc)}"

    def check(self, pred: str, on_parsed: Callable[[], None] | None = None) -> Outcome:
        """``pred`` judged against the gold; ``on_parsed`` is called once it is known to compile, before it runs
        (a sandbox that kills a runaway query still knows that it parsed)."""
        if self.gold_error:
            parsed = bool(self._dbs) and _prepare_error(self._dbs[0], pred) is None
            return Outcome(parsed=parsed, executed=False, match=False, error=self.gold_error)
        problem = _prepare_error(self._dbs[0], pred)
        if problem:
            return Outcome(parsed=False, executed=False, match=False, error=problem)
        if on_parsed is not None:
            on_parsed()
        statement = single_select(pred)[0]
        results = []
        for conn in self._dbs:
            try:
                results.append(_execute(conn, statement, self.timeout_s, self.max_rows))
            except _QUERY_ERRORS as exc:
                return Outcome(parsed=True, executed=False, match=False, error=_why(exc))
        return Outcome(parsed=True, executed=True, match=self._same(results))

    def table(self, sql: str, database: int = 0) -> tuple[list[str], list[tuple]]:
        """Column names and rows of ``sql`` on one of the suite's databases, to show what a query returns (not to
        score it: that is :meth:`check`). Works without a gold query. Raises ValueError saying why when ``sql``
        is not one read-only SELECT that runs there within ``timeout_s``."""
        if not self._dbs:
            raise ValueError(self.gold_error or "no database")
        conn = self._dbs[database]
        problem = _prepare_error(conn, sql)
        if problem:
            raise ValueError(problem)
        names: list[str] = []
        try:
            _, rows = _execute(conn, single_select(sql)[0], self.timeout_s, self.max_rows, names)
        except _QUERY_ERRORS as exc:
            raise ValueError(_why(exc)) from None
        return names, rows

    def _same(self, results: list[tuple[int, list[tuple]]]) -> bool:
        width = self.gold_results[0][0]
        if any(w != width for w, _ in results):
            return False
        if any(len(gold) != len(pred) for (_, gold), (_, pred) in zip(self.gold_results, results)):
            return False  # before trying column orders: each would build and compare the rows
        # The columns may come in another order (SELECT b, a for SELECT a, b); 6 columns = 720 orders at most
        orders = itertools.permutations(range(width)) if width <= 6 else [tuple(range(width))]
        for order in orders:
            if all(self._equal(gold, [tuple(row[i] for i in order) for row in pred])
                   for (_, gold), (_, pred) in zip(self.gold_results, results)):
                return True
        return False

    def _equal(self, gold: list[tuple], pred: list[tuple]) -> bool:
        if self.ordered:
            return gold == pred
        return len(gold) == len(pred) and Counter(gold) == Counter(pred)

    def close(self) -> None:
        for conn in self._dbs:
            conn.close()
        self._dbs = []

    def __enter__(self) -> "QuerySuite":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def compare(context: str, gold: str, pred: str, *, databases: int = 3, rows: int = 12, timeout_s: float = 2.0,
            seed: int = 0) -> Outcome:
    """Test-suite comparison of ``pred`` with ``gold`` (see the module docstring); never raises for bad SQL."""
    with QuerySuite(context, gold, databases=databases, rows=rows, timeout_s=timeout_s, seed=seed) as suite:
        return suite.check(pred)


def execution_match(context: str, gold: str, pred: str, *, databases: int = 3, rows: int = 12,
                    timeout_s: float = 2.0, seed: int = 0) -> bool:
    return compare(context, gold, pred, databases=databases, rows=rows, timeout_s=timeout_s, seed=seed).match
