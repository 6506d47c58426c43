"""SQL scoring: normalization for exact match, parse checks, and test-suite execution match."""

from __future__ import annotations

import random
import time

import pytest

from kubetune.sqlcheck import (QuerySuite, compare, exact_match, execution_match, gold_literals, normalize_sql,
                               parse_error, parses)
from kubetune.text2sql import generate

EMP = "CREATE TABLE employees (name VARCHAR, city VARCHAR, salary INTEGER, age INTEGER)"
JOIN = ("CREATE TABLE employees (name VARCHAR, department_id INTEGER); "
        "CREATE TABLE departments (department_id INTEGER, city VARCHAR, budget REAL)")


# ---- normalization ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a, b", [
    ("SELECT name FROM t WHERE x = 'a'", "select  name\nfrom T where X='a';"),
    ("SELECT name FROM t WHERE x = 'a'", 'SELECT name FROM t WHERE x = "a"'),
    ("SELECT a FROM t WHERE b != 3", "SELECT a FROM t WHERE b<>3 ;;"),
    ("SELECT COUNT(*) FROM t", "SELECT COUNT( * ) FROM t -- how many"),
    ("SELECT T1.a FROM t AS T1", "SELECT t1 . a FROM t as t1"),
    ("SELECT a FROM t WHERE b = 'it''s'", 'SELECT a FROM t WHERE b = "it\'s"'),
    ("SELECT a FROM t WHERE b = 1", "SELECT a FROM t WHERE b == 1"),
    ("SELECT [a] FROM `t`", "SELECT a FROM t"),
])
def test_equivalent_texts_normalize_the_same(a, b):
    assert normalize_sql(a) == normalize_sql(b)
    assert exact_match(a, b)


@pytest.mark.parametrize("a, b", [
    ("SELECT name FROM t WHERE x = 'Boston'", "SELECT name FROM t WHERE x = 'boston'"),  # literal case counts
    ("SELECT name FROM t WHERE x = 'a b'", "SELECT name FROM t WHERE x = 'a  b'"),  # spaces inside literals too
    ("SELECT a FROM t WHERE b > 3", "SELECT a FROM t WHERE b >= 3"),
    ("SELECT a FROM t", "SELECT a FROM t ORDER BY a"),
    ("SELECT a FROM t", ""),
])
def test_different_queries_do_not_match_exactly(a, b):
    assert not exact_match(a, b)


def test_normal_form_is_readable():
    assert normalize_sql('select  name from t where x<>"a";') == "SELECT NAME FROM T WHERE X != 'a'"


# ---- parses ------------------------------------------------------------------------------------------------------
def test_valid_queries_parse():
    assert parses(EMP, "SELECT name FROM employees WHERE city = 'Oslo'")
    assert parses(EMP, "select name from employees where salary > 5;")
    assert parses(JOIN, "SELECT T1.name FROM employees AS T1 JOIN departments AS T2 "
                        "ON T1.department_id = T2.department_id WHERE T2.city = 'Oslo'")
    assert parses(EMP, "WITH rich AS (SELECT name FROM employees WHERE salary > 9) SELECT COUNT(*) FROM rich")


@pytest.mark.parametrize("sql, reason", [
    ("SELECT nme FROM employees", "no such column"),
    ("SELECT name FROM staff", "no such table"),
    ("SELEC name FROM employees", "not a SELECT"),
    ("SELECT name FROM employees WHERE", "incomplete input"),
    ("SELECT name FROM employees WHERE city = = 1", "syntax error"),
    ("", "empty"),
    ("DROP TABLE employees", "not a SELECT"),
    ("DELETE FROM employees", "not a SELECT"),
    ("SELECT 1; DROP TABLE employees", "more than one statement"),
    ("SELECT name FROM employees; SELECT age FROM employees", "more than one statement"),
    ("WITH x AS (SELECT 1) INSERT INTO employees (name) SELECT * FROM x", "not authorized"),
    ("PRAGMA table_info(employees)", "not a SELECT"),
    ("ATTACH DATABASE 'x.db' AS x", "not a SELECT"),
])
def test_invalid_or_unsafe_queries_do_not_parse(sql, reason):
    assert not parses(EMP, sql)
    assert reason in parse_error(EMP, sql)


def test_a_broken_context_is_reported_not_raised():
    assert "context" in parse_error("CREATE TABLE t (a VARCHAR", "SELECT a FROM t")
    assert "no CREATE TABLE" in parse_error("not sql at all", "SELECT 1")


def test_only_create_statements_of_a_context_run(tmp_path):
    target = tmp_path / "x.db"
    context = f"CREATE TABLE t (a VARCHAR); ATTACH DATABASE '{target}' AS x"
    assert parses(context, "SELECT a FROM t")
    assert not target.exists()


# ---- execution match ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("context, gold, pred", [
    (EMP, "SELECT name FROM employees WHERE city = 'Oslo'", 'select name from employees where city = "Oslo";'),
    (EMP, "SELECT name FROM employees WHERE city = 'Oslo' AND salary > 5",
     "SELECT e.name FROM employees AS e WHERE e.salary > 5 AND e.city = 'Oslo'"),
    (EMP, "SELECT name FROM employees WHERE salary >= 5", "SELECT name FROM employees WHERE salary > 4"),
    (EMP, "SELECT COUNT(*) FROM employees WHERE age < 30", "SELECT COUNT(name) FROM employees WHERE NOT age >= 30"),
    (EMP, "SELECT city, COUNT(*) FROM employees GROUP BY city", "SELECT COUNT(*), city FROM employees GROUP BY 2"),
    (EMP, "SELECT name FROM employees WHERE city = 'Oslo' OR city = 'Lima'",
     "SELECT name FROM employees WHERE city IN ('Lima', 'Oslo')"),
    (EMP, "SELECT name FROM employees ORDER BY salary DESC LIMIT 1",
     "SELECT name FROM employees WHERE salary = (SELECT MAX(salary) FROM employees)"),
    (EMP, "SELECT name FROM employees", "SELECT name FROM employees ORDER BY age"),  # gold order is not defined
    (JOIN, "SELECT T1.name FROM employees AS T1 JOIN departments AS T2 ON T1.department_id = T2.department_id "
           "WHERE T2.city = 'Oslo'",
     "SELECT employees.name FROM departments, employees WHERE departments.department_id = employees.department_id "
     "AND departments.city = 'Oslo'"),
])
def test_equivalent_queries_match(context, gold, pred):
    outcome = compare(context, gold, pred)
    assert outcome.match and outcome.parsed and outcome.executed, outcome


@pytest.mark.parametrize("context, gold, pred", [
    (EMP, "SELECT name FROM employees WHERE city = 'Oslo'", "SELECT name FROM employees WHERE city = 'Lima'"),
    (EMP, "SELECT name FROM employees WHERE city = 'Oslo'", "SELECT name FROM employees"),
    (EMP, "SELECT name FROM employees WHERE salary > 50", "SELECT name FROM employees WHERE salary >= 50"),
    (EMP, "SELECT name FROM employees WHERE salary < 50", "SELECT name FROM employees WHERE salary < 53"),
    (EMP, "SELECT name FROM employees WHERE city = 'Oslo' AND age > 30",
     "SELECT name FROM employees WHERE city = 'Oslo' OR age > 30"),
    (EMP, "SELECT MAX(salary) FROM employees WHERE city = 'Oslo'", "SELECT MAX(salary) FROM employees"),
    (EMP, "SELECT MIN(salary) FROM employees WHERE city = 'Oslo'", "SELECT MIN(salary) FROM employees"),
    (EMP, "SELECT SUM(salary) FROM employees WHERE city = 'Oslo'",
     "SELECT AVG(salary) FROM employees WHERE city = 'Oslo'"),
    (EMP, "SELECT COUNT(*) FROM employees WHERE city = 'Oslo'",
     "SELECT COUNT(DISTINCT name) FROM employees WHERE city = 'Oslo'"),
    (EMP, "SELECT DISTINCT city FROM employees WHERE age > 40", "SELECT DISTINCT city FROM employees WHERE age >= 40"),
    (EMP, "SELECT name, city FROM employees", "SELECT name FROM employees"),
    (JOIN, "SELECT T1.name FROM employees AS T1 JOIN departments AS T2 ON T1.department_id = T2.department_id "
           "WHERE T2.city = 'Oslo'",
     "SELECT T1.name FROM employees AS T1 JOIN departments AS T2 WHERE T2.city = 'Oslo'"),  # no join condition
])
def test_different_queries_do_not_match(context, gold, pred):
    outcome = compare(context, gold, pred)
    assert outcome.executed and not outcome.match, outcome


def test_order_matters_only_when_the_gold_orders():
    desc = "SELECT name FROM employees ORDER BY salary DESC"
    asc = "SELECT name FROM employees ORDER BY salary"
    assert not execution_match(EMP, desc, asc)
    assert not execution_match(EMP, desc, "SELECT name FROM employees")
    assert not execution_match(EMP, desc + " LIMIT 3", asc + " LIMIT 3")
    assert execution_match(EMP, "SELECT name FROM employees", asc)


def test_bad_predictions_are_misses_with_a_reason_not_exceptions():
    gold = "SELECT name FROM employees"
    for pred, parsed in [("SELECT nope FROM employees", False), ("DROP TABLE employees", False),
                         ("garbage ' unterminated", False), ("SELECT abs(-9223372036854775808) FROM employees", True)]:
        outcome = compare(EMP, gold, pred)
        assert not outcome and outcome.parsed == parsed and outcome.error, (pred, outcome)


def test_a_gold_that_does_not_run_matches_nothing():
    outcome = compare(EMP, "SELECT missing FROM employees", "SELECT missing FROM employees")
    assert not outcome.match and outcome.error.startswith("gold:")


@pytest.mark.parametrize("pred", [
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c",
    "SELECT COUNT(*) FROM employees a, employees b, employees c, employees d, employees e, employees f, employees g",
])
def test_runaway_queries_stop_at_the_timeout(pred):
    started = time.monotonic()
    outcome = compare(EMP, "SELECT COUNT(*) FROM employees", pred, timeout_s=0.2)
    assert time.monotonic() - started < 3  # three databases, 0.2 s each at most, plus building them
    assert not outcome.match and not outcome.executed and "stopped after" in outcome.error
    assert "0.2 s" in outcome.error  # the step budget of a 0.2 s timeout, or the timeout itself


def test_seeded_literals_make_filters_select_rows():
    gold = "SELECT name FROM employees WHERE city = 'Reykjavik' AND salary > 7000"
    with QuerySuite(EMP, gold) as suite:
        assert all(rows for _, rows in suite.gold_results)  # not trivially empty on any database


def test_literals_are_tied_to_their_columns():
    tied, loose, ordered = gold_literals(
        "SELECT a FROM t WHERE b = 'x' AND 5 < c AND d IN ('p', 'q') AND e BETWEEN 1 AND 9 AND f LIKE '%ab%' "
        "AND g NOT IN (3) ORDER BY h DESC LIMIT 4", {"a", "b", "c", "d", "e", "f", "g", "h"})
    assert {c: [(lit.value, lit.op) for lit in lits] for c, lits in tied.items()} == {
        "b": [("x", "=")], "c": [(5, ">")], "d": [("p", "="), ("q", "=")], "e": [(1, ">="), (9, "<=")],
        "f": [("ab", "=")], "g": [(3, "!=")]}
    assert loose == [] and ordered == {"h"}


def test_databases_are_deterministic():
    gold = "SELECT name, salary FROM employees WHERE age > 30"
    with QuerySuite(EMP, gold, seed=1) as a, QuerySuite(EMP, gold, seed=1) as b, QuerySuite(EMP, gold, seed=2) as c:
        assert a.gold_results == b.gold_results
        assert a.gold_results != c.gold_results


def test_generated_data_gold_matches_itself_and_perturbations_mostly_do_not():
    rows = generate(150, seed=4)
    rng = random.Random(0)
    caught = total = 0
    for row in rows:
        with QuerySuite(row["context"], row["answer"]) as suite:
            assert suite.check(row["answer"]).match, row
            changed = row["answer"]
            for old, new in ((" > ", " >= "), (" < ", " <= "), ("MAX(", "MIN("), ("AVG(", "SUM("), (" DESC", ""),
                             (" AND ", " OR "), (" OR ", " AND ")):
                if old in changed and rng.random() < 0.7:
                    changed = changed.replace(old, new, 1)
                    break
            else:
                changed = changed.replace("'", "'x", 1) if "'" in changed else changed + " LIMIT 0"
            total += 1
            caught += not suite.check(changed).match
    assert caught / total >= 0.97, (caught, total)


def test_literals_beyond_64_bit_integers_still_score():
    gold = "SELECT name FROM employees WHERE salary = 99999999999999999999999"
    assert execution_match(EMP, gold, gold)
    assert not execution_match(EMP, gold, "SELECT name FROM employees")
