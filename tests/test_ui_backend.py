"""The compare UI's backend without a browser: settings, finding a run and its models, the model pool, answers
(the same as the infer stage's), SQL judged as the evaluate stage judges it, and the HTML views."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest

from kubetune.config import recipe_from_dict
from kubetune.errors import ArtifactError
from kubetune.sqlcheck import QuerySuite, compare
from kubetune.ui import views
from kubetune.ui.backend import (Comparison, Execution, ModelPool, ask, eval_examples, find_run_dir, judge,
                                 open_run)
from kubetune.ui.memory import GpuMemory, Nvml, gpu_memory, process_rss_bytes, trim_heap
from kubetune.ui.settings import DEFAULT_PORT, parse_auth, resolve_bind
from tiny import tiny_recipe_dict

UI_RUN_STAGES = ["finetune", "merge", "infer", "evaluate"]


def tiny_ui_run(tmp_path_factory, model_dir: Path) -> Path:
    """A finished tiny run (fine-tune, merge, infer and evaluate of base and merged), made once per session and
    shared by the UI tests (about 25 s on 2 cores); returns its artifacts root. The run is named "tiny"."""
    from kubetune.stages import run_stage

    root = tmp_path_factory.getbasetemp() / "ui-run" / "artifacts"
    recipe = recipe_from_dict(tiny_recipe_dict(model_dir, root, stages=UI_RUN_STAGES,
                                               infer={"models": ["base", "merged"]}))
    for stage in UI_RUN_STAGES:
        run_stage(recipe, stage)  # skipped when an earlier test already made it
    return root


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, tiny_model_dir) -> Path:
    return tiny_ui_run(tmp_path_factory, tiny_model_dir)


# ---- settings -------------------------------------------------------------------------------------------------
def test_bind_defaults_to_localhost_and_follows_cloudera_ml():
    assert resolve_bind(None, None, {}) == resolve_bind(None, None, {"CDSW_APP_PORT": ""})
    default = resolve_bind(None, None, {})
    assert (default.host, default.port, default.source) == ("127.0.0.1", DEFAULT_PORT, "default")
    cml = resolve_bind(None, None, {"CDSW_APP_PORT": "8100", "CDSW_READONLY_PORT": "8200"})
    assert (cml.host, cml.port, cml.source) == ("127.0.0.1", 8100, "CDSW_APP_PORT")
    readonly = resolve_bind(None, None, {"CDSW_READONLY_PORT": "8200"})
    assert (readonly.port, readonly.source) == (8200, "CDSW_READONLY_PORT")
    flags = resolve_bind("0.0.0.0", 9000, {"CDSW_APP_PORT": "8100"})
    assert (flags.host, flags.port, flags.source) == ("0.0.0.0", 9000, "--port")
    with pytest.raises(ValueError, match="CDSW_APP_PORT='x' is not a port"):
        resolve_bind(None, None, {"CDSW_APP_PORT": "x"})


def test_auth_is_user_colon_password():
    assert parse_auth(None) is None and parse_auth("") is None
    assert parse_auth("ana:s3:cret") == ("ana", "s3:cret")
    for bad in ("ana", "ana:", ":pw"):
        with pytest.raises(ValueError, match="USER:PASSWORD"):
            parse_auth(bad)


# ---- SQL ------------------------------------------------------------------------------------------------------
CONTEXT = "CREATE TABLE city (name VARCHAR, population INTEGER, country VARCHAR)"
GOLD = "SELECT name FROM city WHERE population > 1000"


def test_suite_table_shows_columns_and_rows_without_a_gold():
    with QuerySuite(CONTEXT, "", databases=1) as suite:
        columns, rows = suite.table("SELECT name, population FROM city")
        assert columns == ["name", "population"] and len(rows) == 12  # the suite's generated rows
        with pytest.raises(ValueError, match="no such column"):
            suite.table("SELECT nope FROM city")
        with pytest.raises(ValueError, match="not a SELECT"):
            suite.table("DELETE FROM city")
    with QuerySuite("not a schema", "") as broken:
        with pytest.raises(ValueError, match="no CREATE TABLE"):
            broken.table("SELECT 1")


def test_judge_agrees_with_the_evaluate_stage_and_shows_results():
    recipe = recipe_from_dict({"model": {"name_or_path": "x"}})
    predictions = {"right": "select NAME from city where 1000 < population", "wrong": "SELECT name FROM city",
                   "broken": "SELECT nope FROM city"}
    gold_exec, got = judge(recipe, CONTEXT, GOLD, predictions)
    assert gold_exec.error is None and gold_exec.columns == ["name"] and gold_exec.total_rows > 0
    for name, sql in predictions.items():  # the same verdict as evaluate's scoring with the recipe's settings
        expected = compare(CONTEXT, GOLD, sql, databases=recipe.evaluate.databases,
                           timeout_s=recipe.evaluate.timeout_s, seed=recipe.data.seed).match
        assert got[name].passed is expected, name
    assert [got[n].passed for n in predictions] == [True, False, False]
    assert got["right"].rows == gold_exec.rows and got["wrong"].total_rows == 12
    assert "no such column: nope" in got["broken"].error
    no_gold_exec, no_gold = judge(recipe, CONTEXT, "  ", {"right": predictions["right"]})
    assert no_gold_exec is None and no_gold["right"].passed is None and no_gold["right"].error is None
    bad_gold_exec, bad_gold = judge(recipe, CONTEXT, "SELECT missing FROM city", {"right": predictions["right"]})
    assert "missing" in bad_gold_exec.error and bad_gold["right"].passed is None


# ---- views ----------------------------------------------------------------------------------------------------
def test_comparison_html_escapes_model_output_and_marks_verdicts():
    from kubetune.ui.backend import Answer

    evil = "<script>alert(1)</script>"
    result = Comparison(CONTEXT, "q?", GOLD, Execution(["name"], [("a<b",)], 1), [
        Answer("base", "base: m", evil, 4, 0.5, Execution(error=f"near {evil}", passed=False)),
        Answer("merged", "merged: bf16", GOLD, 8, 2.0, Execution(["name"], [("x",)] * 20, 25, passed=True)),
        Answer("adapter", "adapter: r", GOLD, 0, 0.0, Execution(["name"], [], 0)),
    ])
    page = views.comparison_html(result)
    assert "<script>" not in page and "&lt;script&gt;" in page and "a&lt;b" in page
    assert 'data-model="base" data-verdict="fail"' in page and 'data-model="merged" data-verdict="pass"' in page
    assert 'data-model="adapter" data-verdict="none"' in page and 'data-model="gold"' in page
    assert "0.50 s · 4 new tokens · 8.0 tokens/s" in page and "4.0 tokens/s" in page
    assert "… 5 more rows" in page and "25 rows" in page


def test_memory_html_no_gpu_and_gpus():
    assert 'data-gpu="none"' in views.memory_html(None, [], {}, 1 << 30) and "no GPU" in views.memory_html(
        None, [], {}, 0)
    page = views.memory_html([GpuMemory(0, "NVIDIA H100", 40 << 30, 80 << 30, 10 << 30),
                              GpuMemory(1, "NVIDIA H100", 1 << 30, 80 << 30, None)], [], {}, 3 << 30)
    assert "40.0 GiB / 80.0 GiB (50%)" in page and "10.0 GiB" in page and "—" in page
    assert "RSS): 3.0 GiB" in page and "no model loaded" in page


# ---- memory ---------------------------------------------------------------------------------------------------
class FakeNvml:
    """pynvml's functions for two GPUs; this process uses 3 GiB of GPU 1."""

    class _Mem:
        def __init__(self, used, total):
            self.used, self.total = used, total

    class _Proc:
        def __init__(self, pid, used):
            self.pid, self.usedGpuMemory = pid, used

    def __init__(self, pid: int, fail_init: bool = False):
        self.pid, self.fail_init = pid, fail_init

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, h):
        return self._Mem((5 + h) << 30, 80 << 30)

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [self._Proc(12345, 7 << 30)] + ([self._Proc(self.pid, 3 << 30)] if h == 1 else [])


def test_gpu_memory_from_nvml_and_none_without_it():
    import os

    gpus = gpu_memory(Nvml(FakeNvml(os.getpid())))
    assert gpus == [GpuMemory(0, "NVIDIA H100 80GB HBM3", 5 << 30, 80 << 30, None),
                    GpuMemory(1, "NVIDIA H100 80GB HBM3", 6 << 30, 80 << 30, 3 << 30)]
    assert gpu_memory(Nvml(FakeNvml(os.getpid(), fail_init=True))) is None
    assert process_rss_bytes() > 10 << 20 and trim_heap() is True  # Linux with glibc: the CI machines


# ---- a real run -----------------------------------------------------------------------------------------------
def test_open_run_finds_the_finished_models(run_root: Path, tmp_path: Path):
    info = open_run("tiny", run_root)
    assert info.models == ("base", "adapter", "merged") and info.name == "tiny"  # no quantize stage ran
    assert info.labels["adapter"] == "adapter: LoRA r=4" and info.labels["merged"] == "merged: float32"
    assert open_run(None, run_root).layout.run_dir == info.layout.run_dir  # the last run that finished a stage
    assert open_run(str(run_root / "tiny")).models == info.models
    assert find_run_dir("tiny", run_root) == (run_root / "tiny").absolute()
    with pytest.raises(ArtifactError, match="neither a folder nor a run"):
        open_run("nope", run_root)
    with pytest.raises(ArtifactError, match="no run with a finished stage"):
        open_run(None, tmp_path)
    recipe_file = tmp_path / "r.yaml"  # a recipe whose run has not started: the base model alone
    recipe_file.write_text(json.dumps(tiny_recipe_dict(Path(info.recipe.model.name_or_path), tmp_path / "a")))
    assert open_run(str(recipe_file)).models == ("base",)


def test_examples_are_the_evaluation_split(run_root: Path):
    info = open_run("tiny", run_root)
    examples = eval_examples(info)
    predictions = [json.loads(line) for line in (run_root / "tiny/infer/predictions-base.jsonl").open()]
    assert [(e.id, e.question, e.gold) for e in examples] == [(p["id"], p["question"], p["gold"])
                                                              for p in predictions]
    assert examples[0].title.startswith("#0: ")
    assert eval_examples(info, limit=3) == examples[:3]


def test_pool_frees_what_is_unselected_and_answers_like_the_infer_stage(run_root: Path):
    info = open_run("tiny", run_root)
    pool = ModelPool(info)
    with pytest.raises(ValueError, match="pick at least one model"):
        ask(pool, CONTEXT, "how many?")
    with pytest.raises(ArtifactError, match="has no model quantized"):
        pool.select(["quantized"])
    assert pool.select(["merged", "base"]) == ["base", "merged"]  # pipeline order, whatever the click order
    base = pool.loaded()[0].model
    base_ref = weakref.ref(base)
    assert sum(p.numel() for p in base.parameters()) > 0

    example = eval_examples(info)[1]
    result = ask(pool, example.context, example.question, example.gold)
    infer_dir = run_root / "tiny" / "infer"
    outcomes_dir = run_root / "tiny" / "evaluate"
    for answer in result.answers:
        row = [json.loads(x) for x in (infer_dir / f"predictions-{answer.model}.jsonl").open()][1]
        outcome = [json.loads(x) for x in (outcomes_dir / f"outcomes-{answer.model}.jsonl").open()][1]
        assert answer.sql == row["prediction"] and answer.new_tokens == row["new_tokens"]
        assert answer.execution.passed is outcome["execution_match"]  # the evaluate stage's verdict
        assert answer.seconds > 0 and answer.tokens_per_s > 0
    assert [a.model for a in result.answers] == ["base", "merged"]
    assert result.gold_execution is not None and result.gold_execution.error is None

    assert pool.select(["merged"]) == ["merged"]
    # released, even though this test still holds the module: its weights are empty tensors now
    assert sum(p.numel() for p in base.parameters()) == 0
    del base
    gc.collect()
    assert base_ref() is None  # and nothing else in the pool keeps it
    pool.close()
    assert pool.names() == [] and pool.loaded() == []
