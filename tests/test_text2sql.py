"""The builtin Text-to-SQL generator: every answer runs, rows are deterministic, every shape and many tables appear."""

from __future__ import annotations

import re
import sqlite3
from collections import Counter

import pytest

from kubetune.sqlcheck import parses
from kubetune.text2sql import SHAPES, TABLES, generate, generate_with_shapes


def _run(row: dict) -> list:
    conn = sqlite3.connect(":memory:")
    for statement in row["context"].split("; "):
        conn.execute(statement)
    return conn.execute(row["answer"]).fetchall()


@pytest.mark.parametrize("seed", [0, 42])
def test_every_answer_executes_on_its_own_context(seed):
    rows = generate(2000, seed)
    assert len(rows) == 2000
    failures = []
    for row in rows:
        try:
            _run(row)
        except sqlite3.Error as exc:
            failures.append((row, str(exc)))
    assert not failures, failures[:3]
    # and the checker agrees: a single SELECT that compiles against the context
    assert all(parses(r["context"], r["answer"]) for r in rows[:300])


def test_rows_have_exactly_the_three_columns_and_are_deterministic():
    a, b = generate(300, seed=7), generate(300, seed=7)
    assert a == b
    assert all(set(r) == {"context", "question", "answer"} for r in a)
    assert generate(300, seed=8) != a
    assert generate(100, seed=7) == a[:100]  # a prefix: asking for more rows does not reshuffle the first ones
    assert generate(0, seed=1) == []


def test_every_shape_appears_in_a_small_sample():
    counts = Counter(shape for shape, _ in generate_with_shapes(500, seed=3))
    assert set(counts) == set(SHAPES)
    assert min(counts.values()) >= 15


def test_questions_are_unique_and_phrased_several_ways():
    pairs = generate_with_shapes(1500, seed=11)
    questions = [r["question"] for _, r in pairs]
    assert len(set(questions)) == len(questions)
    for shape in SHAPES:
        # the opening words of a question show its phrasing; each shape has at least two
        openings = {" ".join(r["question"].split()[:2]) for s, r in pairs if s == shape}
        assert len(openings) >= 2, shape


def test_schemas_span_many_domains_and_types():
    assert len(TABLES) >= 12
    for table in TABLES:
        assert 4 <= len(table.all_columns) <= 8, table.name
    rows = generate(2000, seed=5)
    tables = Counter(m for r in rows for m in re.findall(r"CREATE TABLE (\w+)", r["context"]))
    assert len(tables) >= 12
    types = set(re.findall(r"\w+ (VARCHAR|INTEGER|REAL)\b", " ".join(r["context"] for r in rows)))
    assert types == {"VARCHAR", "INTEGER", "REAL"}


def test_sql_style_matches_sql_create_context():
    rows = generate(1000, seed=2)
    for r in rows:
        answer, context = r["answer"], r["context"]
        assert answer.startswith("SELECT ") and not answer.endswith(";")
        assert '"' not in answer  # strings in single quotes
        assert re.fullmatch(r"CREATE TABLE \w+ \([^()]+\)(; CREATE TABLE \w+ \([^()]+\))?", context), context
        # the context names only the columns the query uses
        declared = set(re.findall(r"(\w+) (?:VARCHAR|INTEGER|REAL)", context))
        used = set(re.findall(r"\b[a-z_][a-z0-9_]*\b", re.sub(r"'[^']*'", "", answer))) - {"T1", "T2"}
        tables = set(re.findall(r"CREATE TABLE (\w+)", context))
        assert declared <= used, (declared - used, r)
        assert used - tables <= declared, (used - tables - declared, r)
        # literals in the SQL appear verbatim in the question: the mapping is learnable by copying
        for literal in re.findall(r"'((?:[^']|'')*)'", answer):
            assert literal.replace("''", "'") in r["question"], r


def test_answers_are_short_and_use_every_construct():
    rows = generate(2000, seed=9)
    lengths = sorted(len(r["answer"].split()) for r in rows)
    assert lengths[len(lengths) // 2] <= 12 and lengths[-1] <= 30  # words; ~1.5 tokens each on average
    text = "\n".join(r["answer"] for r in rows)
    for construct in (" AND ", " OR ", " < ", " > ", " >= ", " <= ", " != ", "COUNT(*)", "SUM(", "AVG(", "MIN(",
                      "MAX(", "ORDER BY", " DESC", "LIMIT", "GROUP BY", "DISTINCT", " JOIN ", " = "):
        assert construct in text, construct
