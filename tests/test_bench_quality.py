"""bench/quality.py: the recipes of its two runs, the reuse of run 1's fine-tune and merge, and what it reports
(no model: the real run is the CPU smoke in bench/README.md and the GPU call)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest

from kubetune.artifacts import RunLayout

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    return SimpleNamespace(**runpy.run_path(str(ROOT / "bench" / "quality.py"), run_name="bench_quality"))


def make(quality, tmp_path, *extra):
    args = quality.parse_args(["--data", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "out"),
                               "--work", str(tmp_path / "work"), *extra])
    return quality.Quality(args)


def finish(layout: RunLayout, recipe, stage: str, report: dict | None = None) -> None:
    """A finished stage folder as the runner leaves it (report.json, then _SUCCESS with the fingerprint)."""
    tmp = layout.new_temp_dir(stage)
    (tmp / "weights.bin").write_bytes(b"x" * 10)
    layout.commit(stage, tmp, recipe.fingerprint(stage), report or {"stage": stage})


@pytest.mark.parametrize("bits", ["8,8", "3", "", "8,x"])
def test_bits_must_be_8_and_4_at_most_once(quality, bits):
    with pytest.raises(SystemExit):
        quality.parse_args(["--data", "d", "--out", "o", "--bits", bits])


def test_second_run_reuses_finetune_and_merge_and_infers_the_quantized_model_only(quality, tmp_path):
    q = make(quality, tmp_path)
    first = q.recipe_for(8, None)
    assert (first.run.name, first.quantize.bits) == ("gemma3-270m-text2sql-gptq8", 8)
    assert first.infer.models == ["base", "merged", "quantized"]
    assert first.data.source == str(tmp_path / "rows.jsonl")
    assert first.run.artifacts_root == str(tmp_path / "work")

    second = q.recipe_for(4, first)
    assert (second.run.name, second.quantize.bits, second.infer.models) == ("gemma3-270m-text2sql-gptq4", 4,
                                                                              ["quantized"])
    assert second.evaluate.gates == {}  # run 1 has no scores yet: no floor to derive
    for stage in ("finetune", "merge"):
        assert second.fingerprint(stage) == first.fingerprint(stage)
    assert second.fingerprint("quantize") != first.fingerprint("quantize")

    one = RunLayout.from_recipe(first)
    for stage in ("finetune", "merge"):
        finish(one, first, stage)
    finish(one, first, "evaluate", {"metrics": {"merged": {"execution_accuracy": 80.5}}})
    (one.stage_dir("evaluate") / "metrics.json").write_text(
        json.dumps({"models": {"merged": {"execution_accuracy": 80.5}}, "gates": []}))
    second = q.recipe_for(4, first)
    assert second.evaluate.gates == {"quantized_min_execution_accuracy": 78.5}  # the recipe's 2-point drop

    quality.reuse_stages(first, second)
    two = RunLayout.from_recipe(second)
    for stage in ("finetune", "merge"):
        assert two.state(stage, second.fingerprint(stage)) == "done"  # so the runner skips it
        assert (two.stage_dir(stage) / "weights.bin").read_bytes() == b"x" * 10
    quality.reuse_stages(first, second)  # a second call leaves them alone


def test_targets_summary_and_copied_outcomes(quality, tmp_path):
    q = make(quality, tmp_path)
    run_dir = tmp_path / "work" / "r-gptq8"
    (run_dir / "evaluate").mkdir(parents=True)
    for model in ("base", "merged", "quantized"):
        (run_dir / "evaluate" / f"outcomes-{model}.jsonl").write_text('{"id": 0}\n')

    def metrics(acc):
        return {"execution_accuracy": acc, "exact_match": acc, "parse_rate": 100.0, "examples": 1000}

    q.doc["runs"] = {
        "gptq8": {"run_dir": str(run_dir), "status": {"evaluate": "done"},
                  "reports": {"evaluate": {"metrics": {"base": metrics(2.0), "merged": metrics(80.0),
                                                       "quantized": metrics(79.7)}}}},
        "gptq4": {"run_dir": str(tmp_path / "missing"), "status": {"quantize": "failed"}, "reports": {},
                  "error": {"stage": "quantize", "message": "boom"}},
    }
    targets = {t["target"]: (t["value"], t["passed"]) for t in q.targets()}
    assert targets == {"merged execution accuracy": (80.0, True), "gptq8 points lost vs merged": (0.3, True),
                       "gptq4 points lost vs merged": (None, None)}
    q.doc["targets"] = q.targets()
    text = q.summary()
    assert "gptq8       79.70%" in text and "-0.30" in text and "+77.70" in text
    assert "error in quantize: boom" in text
    assert q.copy_outcomes() == [f"gptq8-outcomes-{m}.jsonl" for m in ("base", "merged", "quantized")]
    assert (q.out / "gptq8-outcomes-merged.jsonl").read_text() == '{"id": 0}\n'
