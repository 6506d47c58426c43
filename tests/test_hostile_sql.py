"""Hostile SQL (issue 17, class 1): predictions, contexts and gold queries that would hang, exhaust memory or score
by chance are bounded in time and memory, and score the same on every run.

Each case runs in a forked child that the test kills at a bound (a hang fails the test instead of hanging it);
the bounds are generous ("it ends"), the deadlines of kubetune.sqlsandbox are seconds below them.
"""

from __future__ import annotations

import json
import multiprocessing
import time
import tracemalloc

import psutil
import pytest

from kubetune.artifacts import RunLayout
from kubetune.stages import run_stage

TIMEOUT_S = 1.0  # evaluate.timeout_s of these recipes: three databases make a 5 s hard deadline per query
BOUND_S = 25  # what each case must end within; the old code took 45 s to forever on each
EMP = "CREATE TABLE employees (name VARCHAR, city VARCHAR, salary INTEGER)"
GOLD = "SELECT name FROM employees WHERE city = 'Oslo'"
RECURSIVE = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c"
BIG = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 60000) "


def _child(conn, fn, args):
    conn.send(fn(*args))


def within(seconds: float, fn, *args):
    """``fn(*args)`` run in a forked child; fails the test if it has not returned after ``seconds``."""
    context = multiprocessing.get_context("fork")
    ours, theirs = context.Pipe()
    child = context.Process(target=_child, args=(theirs, fn, args), daemon=True)
    child.start()
    ended = ours.poll(seconds)
    result = ours.recv() if ended else None
    child.kill()
    child.join()
    assert ended, f"did not end within {seconds} s"
    return result


def evaluate(recipe, rows: list[tuple[str, str, str]]) -> list[dict]:
    """Outcomes of the evaluate stage over ``rows`` of (context, gold, prediction), as the base model's."""
    layout = RunLayout.from_recipe(recipe)
    tmp = layout.new_temp_dir("infer")
    with open(tmp / "predictions-base.jsonl", "w", encoding="utf-8") as fh:
        for i, (context, gold, prediction) in enumerate(rows):
            fh.write(json.dumps({"id": i, "context": context, "question": "q", "gold": gold,
                                 "prediction": prediction}) + "\n")
    layout.commit("infer", tmp, recipe.fingerprint("infer"), {"stage": "infer"})
    result = run_stage(recipe, "evaluate")
    return [json.loads(line) for line in (result.path / "outcomes-base.jsonl").read_text().splitlines()]


@pytest.fixture
def hostile(tiny_recipe):
    """evaluate(rows) in a child bounded by BOUND_S; the last row is an ordinary one that must still score."""
    recipe = tiny_recipe(stages=["infer", "evaluate"], infer={"models": ["base"]},
                         evaluate={"timeout_s": TIMEOUT_S})

    def run(*rows):
        outcomes = within(BOUND_S, evaluate, recipe, [*rows, (EMP, GOLD, GOLD)])
        assert outcomes[-1]["execution_match"], outcomes[-1]
        return outcomes[:-1]

    return run


def test_a_prediction_that_builds_a_huge_string_is_a_quick_miss(hostile):
    # hex() makes 480 MB, replace() 960 MB, within SQLite's default 1e9 limit (15 s and GBs per database)
    [outcome] = hostile((EMP, GOLD, "SELECT length(replace(hex(zeroblob(2.4e8)),0,11))"))
    assert not outcome["execution_match"] and outcome["parsed"]
    assert outcome["error"] == "string or blob too big"


def test_a_context_that_creates_a_table_from_a_recursive_query_is_stopped(hostile):
    [outcome] = hostile((f"{EMP}; CREATE TABLE big AS {RECURSIVE}", GOLD, GOLD))
    assert not outcome["execution_match"]
    assert outcome["error"].startswith("context: stopped after 10M SQLite steps (1 s budget) in 'CREATE TABLE big AS")


def test_a_gold_whose_databases_never_finished_building_now_scores(hostile):
    # ORDER BY wants distinct values; around 1e300 a REAL range holds one float, and the redraws never ended
    gold = "SELECT a FROM t WHERE a > 1e300 ORDER BY a"
    [same, other] = hostile(("CREATE TABLE t (a REAL)", gold, gold), ("CREATE TABLE t (a REAL)", gold, "SELECT 1"))
    assert same["execution_match"] and not other["execution_match"] and other["error"] is None


def _sql_workers() -> list[psutil.Process]:
    return [child for child in psutil.Process().children()
            if "kubetune.sqlsandbox" in " ".join(child.cmdline())]


def _stop_a_worker_then_build() -> tuple[str | None, bool, int, bool]:
    from kubetune.sqlsandbox import SandboxedSuite, SandboxPool

    with SandboxPool(1) as pool:
        with SandboxedSuite(pool, EMP, GOLD) as suite:  # starts the pool's one worker
            assert suite.check(GOLD).match
        [stuck] = _sql_workers()
        stuck.suspend()
        with SandboxedSuite(pool, EMP, GOLD, timeout_s=0.01, grace_s=0.1) as suite:
            error = suite.check(GOLD).error
        killed = not stuck.is_running()
        with SandboxedSuite(pool, EMP, GOLD) as suite:
            return error, killed, pool.replaced, suite.check(GOLD).match


def test_a_worker_that_stops_answering_while_building_is_killed_at_the_hard_deadline_and_replaced():
    # Python work inside a build (filling tables, comparing results) has no SQLite progress check; how long it
    # takes depends on the machine, so the test stops the worker instead (SIGSTOP): the one thing that stands
    # between it and a hung evaluation is the parent's deadline of 2 x 3 databases x 0.01 s + 0.1 s grace.
    error, killed, replaced, next_suite_scores = within(BOUND_S, _stop_a_worker_then_build)
    assert error == "context: test-suite databases not built: stopped after 0.16 s (hard limit)"
    assert killed and replaced == 1
    assert next_suite_scores


def test_a_comparison_that_outlasts_the_hard_deadline_is_killed(hostile):
    # 60,000 rows of 6 columns on each database, no column order matching: 720 orders tried, each a full compare
    gold, pred = BIG + "SELECT x, x, x, x, x, x + 1 FROM c", BIG + "SELECT x, x, x, x, x, x + 2 FROM c"
    [outcome, after] = hostile((EMP, gold, pred), (EMP, GOLD, GOLD))  # the next row gets a new worker
    assert outcome["parsed"] and not outcome["execution_match"]
    assert outcome["error"] == "stopped after 5 s (hard limit)"
    assert after["execution_match"]


def test_random_in_a_prediction_scores_the_same_every_run():
    from kubetune.sqlcheck import compare

    # one database: a random() > 0 filter kept or dropped the row half the time
    outcomes = {compare(EMP, "SELECT 1", "SELECT 1 WHERE random() > 0", databases=1).match for _ in range(20)}
    assert len(outcomes) == 1


def test_the_clock_is_fixed_for_the_date_functions():
    from kubetune.sqlbounds import FIXED_NOW
    from kubetune.sqlcheck import compare

    for now in ("date('now')", "date()", "current_date", "date('NOW')"):
        assert compare(EMP, f"SELECT '{FIXED_NOW[:10]}'", f"SELECT {now}").match, now
    assert compare(EMP, "SELECT date('2024-02-29', '+1 year')", "SELECT '2025-03-01'").match  # real date arithmetic


def test_the_tokenizer_keeps_no_memory_per_character_of_a_literal():
    from kubetune.sqlcheck import tokenize

    text = "SELECT '" + "x" * 1_000_000 + "' FROM t"
    tracemalloc.start()
    try:
        tokens = tokenize(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tokens[1].kind == "str"
    assert peak / 1_000_000 < 10, f"{peak / 1_000_000:.0f} bytes per character"  # the text itself: 1


def test_out_of_memory_in_the_worker_is_an_error_of_the_query():
    from kubetune.sqlsandbox import SandboxedSuite, SandboxPool

    limit = 256 << 20
    # 4,000 distinct values of 90 kB to count: 360 MB, past SQLite's share of the limit (64 MiB)
    hog = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 4000) "
           "SELECT count(DISTINCT x || zeroblob(90000)) FROM c")
    with SandboxPool(1, memory_limit_bytes=limit) as pool, SandboxedSuite(pool, EMP, GOLD) as suite:
        outcome = suite.check(hog)
        assert not outcome.match and outcome.parsed and "out of memory" in outcome.error
        assert suite.check(GOLD).match  # the worker goes on
        assert pool.peak_rss_bytes < limit


def test_one_users_hostile_question_does_not_hold_up_another_users(tmp_path_factory, tiny_model_dir):
    """Two users of one `kubetune ui` over HTTP: A's gold query is one C call of ~10 s (no step count sees it), so
    building A's databases runs to its hard deadline (14 s); B, asking after A, gets the answer while A's is still
    being judged (one queue slot made B wait)."""
    from gradio_client import Client

    from test_ui_backend import tiny_ui_run
    from test_ui_browser import free_port
    from kubetune.ui.app import launch
    from kubetune.ui.backend import ModelPool, open_run
    from kubetune.ui.settings import Bind

    info = open_run("tiny", tiny_ui_run(tmp_path_factory, tiny_model_dir))
    pool = ModelPool(info)
    pool.select(["base"])
    port = free_port()
    app = launch(pool, [], Bind("127.0.0.1", port, "test"), block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        slow = client.submit(EMP, "Who?", "SELECT length(printf('%.*c', 2000000000, 'x'))", api_name="/ask")
        time.sleep(0.5)  # A is being judged
        fast = client.submit(EMP, "Who lives in Oslo?", GOLD, api_name="/ask")
        html, _ = fast.result(timeout=BOUND_S)
        assert "kt-card" in html
        assert not slow.done(), "B waited for A"
        html, _ = slow.result(timeout=BOUND_S)
        assert "stopped after 14 s (hard limit)" in html
    finally:
        app.close()
        pool.close()


def test_a_query_killed_among_a_rows_predictions_costs_only_itself():
    from kubetune.sqlsandbox import SandboxedSuite, SandboxPool

    gold, pred = BIG + "SELECT x, x, x, x, x, x + 1 FROM c", BIG + "SELECT x, x, x, x, x, x + 2 FROM c"
    with SandboxPool(1) as pool, SandboxedSuite(pool, EMP, gold, timeout_s=TIMEOUT_S, grace_s=0.5) as suite:
        before, killed, after = suite.check_many([gold, pred, gold])
        assert before.match and after.match  # after: in a new worker, on the same databases rebuilt
        assert killed.parsed and not killed.match and killed.error == "stopped after 3.5 s (hard limit)"
        assert pool.replaced == 1


def test_oversized_text_is_refused_before_it_reaches_a_worker():
    from kubetune.sqlsandbox import MAX_CONTEXT_CHARS, SandboxedSuite, SandboxPool

    with SandboxPool(1) as pool:
        with SandboxedSuite(pool, EMP, GOLD) as suite:
            [long, fine] = suite.check_many([GOLD + " " * 50_000_000 + "AND 1", GOLD])
            assert long.error == "query longer than 100000 characters" and fine.match
        with SandboxedSuite(pool, EMP + ";" * MAX_CONTEXT_CHARS, GOLD) as suite:
            assert suite.gold_error == "context: longer than 1,000,000 characters"
            assert not suite.check(GOLD).match
