"""Fuzzing the sandboxed scorer (issue 17, class 1) with hypothesis: generated schemas, gold queries and
predictions, ordinary and hostile (huge strings, runaway recursion, cross joins, chance, the clock, garbage).

For every example: the evaluation ends within its deadlines plus a margin, the worker's memory stays under its
limit, nothing raises, and a second evaluation gives the same outcome, unless one of the two was stopped by a wall
clock (see _by_clock). Derandomized (the same examples on every run, in CI too); 20-40 s on 2 cores.
"""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kubetune.sqlcheck import Outcome
from kubetune.sqlsandbox import SandboxedSuite, SandboxPool

pytestmark = pytest.mark.timeout(600)  # CI's bound for the whole fuzz run (it takes 20-60 s)

TIMEOUT_S = 0.5  # per statement: a step budget of 5M (~0.1 s here), then the clock; the hard deadlines follow
GRACE_S = 0.5
DATABASES = 2
MEMORY_LIMIT = 256 << 20
MARGIN_S = 5.0  # starting replacement workers and the parent's own work, on a loaded 2-core machine
BUILD_S = 2 * DATABASES * TIMEOUT_S + GRACE_S
CHECK_S = DATABASES * TIMEOUT_S + GRACE_S

COLUMNS = ("a", "b", "name")  # every table has them (with drawn affinities), so most queries compile
TYPES = ("INTEGER", "REAL", "VARCHAR", "TEXT", "BLOB", "", "NUMERIC", "DATE")
RECURSIVE = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c"

column = st.sampled_from(COLUMNS + ("nope",))
number = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=False), st.sampled_from([1e300, -1e308, 0.5]))
text_literal = st.text(max_size=20).map(lambda s: "'" + s.replace("'", "''") + "'")
literal = st.one_of(number.map(repr), text_literal, st.just("NULL"))
hostile_value = st.sampled_from([
    "zeroblob(1e9)", "hex(zeroblob(4e8))", "replace(hex(zeroblob(2e8)), 0, 11)", "randomblob(2e6)",
    "random()", "randomblob(8)", "date('now')", "datetime()", "current_timestamp", "julianday('now')",
    "printf('%.*c', 2000000000, 'x')", "length(printf('%.*c', 90000, 'y'))", "abs(-9223372036854775808)",
    "(SELECT count(*) FROM (" + RECURSIVE + "))", "(SELECT max(x) FROM (" + RECURSIVE + " LIMIT 1000))",
    "substr(quote(zeroblob(50000)), 1, 5)", "char(" + ", ".join(["65"] * 100) + ")", "1/0", "'x' LIKE '%%%'",
])
value = st.one_of(column, literal, hostile_value, hostile_value)
BIG = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 20000) SELECT x, x, x, x, x, x + {} FROM c"
heavy = st.sampled_from([
    BIG.format(2),  # against the gold BIG.format(1): 720 column orders to compare, past the hard deadline
    # 4,000 distinct values of 90 kB to count: past SQLite's share of the memory limit
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 4000) "
    "SELECT count(DISTINCT x || zeroblob(90000)) FROM c",
    "SELECT count(*) FROM t AS a, t AS b, t AS c, t AS d, t AS e, t AS f, t AS g",
])
condition = st.builds(lambda c, op, v: f"{c} {op} {v}", column,
                      st.sampled_from(["=", "!=", "<", ">=", "LIKE", "IS", "GLOB"]), value)


@st.composite
def query(draw) -> str:
    if draw(st.integers(0, 19)) == 0:
        return draw(st.text(max_size=60))  # anything at all
    table = draw(st.sampled_from(["t", "t", "u", "t AS x, t AS y, t AS z, u", "nope"]))
    select = ", ".join(draw(st.lists(value, min_size=1, max_size=3)))
    sql = f"SELECT {select} FROM {table}"
    if draw(st.booleans()):
        sql += " WHERE " + " AND ".join(draw(st.lists(condition, min_size=1, max_size=2)))
    if draw(st.booleans()):
        sql += f" ORDER BY {draw(st.one_of(column, hostile_value))}"
    if draw(st.booleans()):
        sql += f" LIMIT {draw(st.integers(-1, 10**6))}"
    if draw(st.integers(0, 5)) == 0:
        sql = f"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) {sql}"
    return sql


@st.composite
def gold(draw) -> str:
    """Mostly what gold queries are (a filter on a column), sometimes anything a query can be."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.one_of(query(), st.just(BIG.format(1))))
    where = f" WHERE {draw(st.sampled_from(COLUMNS))} {draw(st.sampled_from(['=', '>', '<=', '!=']))} {draw(literal)}"
    return f"SELECT {draw(st.sampled_from(COLUMNS))} FROM t" + (where if draw(st.booleans()) else "")


@st.composite
def context(draw) -> str:
    statements = []
    for table in ("t", "u")[:draw(st.integers(1, 2))]:
        cols = [*COLUMNS, *draw(st.lists(st.sampled_from(["city", "n", "x y", "\"q\""]), max_size=2, unique=True))]
        statements.append(f"CREATE TABLE {table} ({', '.join(f'{c} {draw(st.sampled_from(TYPES))}' for c in cols)})")
    extras = st.sampled_from([
        f"CREATE TABLE big AS {RECURSIVE}", "CREATE VIEW v AS SELECT * FROM t", "CREATE INDEX i ON t (a)",
        "CREATE TABLE d (a DEFAULT (random()), b DEFAULT CURRENT_TIMESTAMP)", "DROP TABLE t", "not sql at all",
        "CREATE TABLE w AS SELECT hex(zeroblob(4e8)) AS h", "CREATE TABLE t (a"])
    if draw(st.integers(0, 3)) == 0:
        statements += draw(st.lists(extras, max_size=2, unique=True))
    return "; ".join(statements)


@st.composite
def predictions(draw, gold_query: str) -> list[str]:
    """Model answers: drawn queries, the gold itself, and the gold with a hostile condition added."""
    joiner = "AND" if "WHERE" in gold_query else "WHERE"
    return draw(st.lists(st.one_of(query(), st.just(gold_query), heavy,
                                   hostile_value.map(lambda v: f"{gold_query} {joiner} {v} IS NOT NULL")),
                         min_size=1, max_size=3))


def evaluate(pool: SandboxPool, ctx: str, gold: str, predictions: list[str]) -> list:
    with SandboxedSuite(pool, ctx, gold, databases=DATABASES, timeout_s=TIMEOUT_S, grace_s=GRACE_S) as suite:
        return [suite.gold_error, *(suite.check(p) for p in predictions)]


POOL = SandboxPool(1, memory_limit_bytes=MEMORY_LIMIT)


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ctx=context(), gold_query=gold(), data=st.data())
def test_every_evaluation_is_bounded_and_repeatable(ctx, gold_query, data):
    preds = data.draw(predictions(gold_query))
    started = time.monotonic()
    first = evaluate(POOL, ctx, gold_query, preds)
    elapsed = time.monotonic() - started
    # every request may be killed at its deadline, and the suite rebuilt after each kill
    bound = BUILD_S + len(preds) * (CHECK_S + BUILD_S) + MARGIN_S
    assert elapsed < bound, (elapsed, bound)
    assert POOL.peak_rss_bytes < MEMORY_LIMIT
    second = evaluate(POOL, ctx, gold_query, preds)
    for one, two in zip(first, second):  # the gold's error, then each prediction's outcome
        if not (_by_clock(one) or _by_clock(two)):
            assert one == two
    for one, two in zip(first[1:], second[1:]):  # --hypothesis-show-statistics: how each ended, how often
        event(f"match={one.match} error={(one.error or '')[:30]}" + (" (differs)" if one != two else ""))


def _by_clock(result) -> bool:
    """Stopped by a wall clock, not by a count: the one thing that may differ between two runs on a busy machine
    (a statement that spends its whole timeout inside one of SQLite's C functions, which no step count sees)."""
    error = (result.error if isinstance(result, Outcome) else result) or ""
    return re.search(r"stopped after [\d.]+ s\b", error) is not None  # not "after 10M SQLite steps"
