"""Fuzzing the sandboxed scorer (issue 17, class 1) with hypothesis: generated schemas, gold queries and
predictions, ordinary and hostile (huge strings, runaway recursion, cross joins, chance, the clock, garbage).

For every example: the evaluation ends within its deadlines plus a margin, the worker's memory stays under its
limit, nothing raises, and a second evaluation gives the same outcome. Derandomized (the same examples on every
run, in CI too); about 20 s on 2 cores.
"""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune.sqlsandbox import SandboxedSuite, SandboxPool

TIMEOUT_S = 0.2  # per statement; the sandbox's hard deadlines derive from it
GRACE_S = 0.5
DATABASES = 2
MEMORY_LIMIT = 256 << 20
MARGIN_S = 5.0  # starting replacement workers and the parent's own work, on a loaded 2-core machine
BUILD_S = 2 * DATABASES * TIMEOUT_S + GRACE_S
CHECK_S = DATABASES * TIMEOUT_S + GRACE_S

COLUMNS = ("a", "b", "name", "city", "n")
TYPES = ("INTEGER", "REAL", "VARCHAR", "TEXT", "BLOB", "", "NUMERIC", "DATE")
RECURSIVE = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c"

column = st.sampled_from(COLUMNS)
number = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=False), st.sampled_from([1e300, -1e308, 0.5]))
text_literal = st.text(max_size=20).map(lambda s: "'" + s.replace("'", "''") + "'")
literal = st.one_of(number.map(repr), text_literal, st.just("NULL"))
hostile_value = st.sampled_from([
    "zeroblob(1e9)", "hex(zeroblob(4e8))", "replace(hex(zeroblob(2e8)), 0, 11)", "randomblob(2e6)",
    "random()", "randomblob(8)", "date('now')", "datetime()", "current_timestamp", "julianday('now')",
    "printf('%.*c', 2000000000, 'x')", "length(printf('%.*c', 900000, 'y'))", "abs(-9223372036854775808)",
    "(SELECT count(*) FROM (" + RECURSIVE + "))", "(SELECT max(x) FROM (" + RECURSIVE + " LIMIT 1000))",
    "substr(quote(zeroblob(500000)), 1, 5)", "char(" + ", ".join(["65"] * 100) + ")", "1/0", "'x' LIKE '%%%'",
])
value = st.one_of(column, literal, hostile_value)
condition = st.builds(lambda c, op, v: f"{c} {op} {v}", column,
                      st.sampled_from(["=", "!=", "<", ">=", "LIKE", "IS", "GLOB"]), value)


@st.composite
def query(draw) -> str:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=60))  # anything at all
    table = draw(st.sampled_from(["t", "u", "t AS x, t AS y, t AS z, u", "nope"]))
    select = ", ".join(draw(st.lists(value, min_size=1, max_size=3)))
    sql = f"SELECT {select} FROM {table}"
    if draw(st.booleans()):
        sql += " WHERE " + " AND ".join(draw(st.lists(condition, min_size=1, max_size=2)))
    if draw(st.booleans()):
        sql += f" ORDER BY {draw(value)}"
    if draw(st.booleans()):
        sql += f" LIMIT {draw(st.integers(-1, 10**6))}"
    if draw(st.integers(0, 5)) == 0:
        sql = f"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) {sql}"
    return sql


@st.composite
def context(draw) -> str:
    statements = []
    for table in draw(st.lists(st.sampled_from(["t", "u"]), min_size=1, max_size=2, unique=True)):
        cols = draw(st.lists(column, min_size=1, max_size=4, unique=True))
        statements.append(f"CREATE TABLE {table} ({', '.join(f'{c} {draw(st.sampled_from(TYPES))}' for c in cols)})")
    extras = st.sampled_from([
        f"CREATE TABLE big AS {RECURSIVE}", "CREATE VIEW v AS SELECT * FROM t", "CREATE INDEX i ON t (a)",
        "CREATE TABLE d (a DEFAULT (random()), b DEFAULT CURRENT_TIMESTAMP)", "DROP TABLE t", "not sql at all",
        f"CREATE TABLE w AS SELECT hex(zeroblob(4e8)) AS h", "CREATE TABLE t (a"])
    statements += draw(st.lists(extras, max_size=2))
    return "; ".join(draw(st.permutations(statements)))


def evaluate(pool: SandboxPool, ctx: str, gold: str, predictions: list[str]) -> list:
    with SandboxedSuite(pool, ctx, gold, databases=DATABASES, timeout_s=TIMEOUT_S, grace_s=GRACE_S) as suite:
        return [suite.gold_error, *(suite.check(p) for p in predictions)]


POOL = SandboxPool(1, memory_limit_bytes=MEMORY_LIMIT)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ctx=context(), gold=query(), predictions=st.lists(query(), min_size=1, max_size=3))
def test_every_evaluation_is_bounded_and_repeatable(ctx, gold, predictions):
    started = time.monotonic()
    first = evaluate(POOL, ctx, gold, predictions)
    elapsed = time.monotonic() - started
    # every request may be killed at its deadline, and the suite rebuilt after each kill
    bound = BUILD_S + len(predictions) * (CHECK_S + BUILD_S) + MARGIN_S
    assert elapsed < bound, (elapsed, bound)
    assert POOL.peak_rss_bytes < MEMORY_LIMIT
    assert evaluate(POOL, ctx, gold, predictions) == first
