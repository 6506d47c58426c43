"""The whole local lifecycle through the CLI, as a user runs it: every stage, skips, reruns, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kubetune.artifacts import SUCCESS_MARKER
from kubetune.cli import cli
from tiny import tiny_recipe_dict

STAGES = ("finetune", "merge", "quantize", "infer", "evaluate")


def run_cli(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def recipe_file(tiny_model_dir, tmp_path):
    def write(name="pipe", **sections):
        data = tiny_recipe_dict(tiny_model_dir, tmp_path / "artifacts", **sections)
        data["run"]["name"] = name
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write


def snapshot(run_dir: Path) -> dict[str, float]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.glob("*/**/*") if p.is_file()
            and not p.relative_to(run_dir).parts[0].startswith(".")}


def test_whole_pipeline_then_skip_then_partial_rerun(recipe_file, tmp_path):
    recipe = recipe_file()
    result = run_cli("run", str(recipe))
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "artifacts" / "pipe"
    for stage in STAGES:
        assert (run_dir / stage / SUCCESS_MARKER).exists(), stage
        report = json.loads((run_dir / stage / "report.json").read_text())
        assert report["stage"] == stage and report["duration_s"] > 0
        assert report["peak_memory"]["host_rss_bytes"] > 0
        assert report["recipe"]["run"]["name"] == "pipe"
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"base", "adapter", "merged", "quantized"}
    assert "execution accuracy" in result.output and "held-out questions" in result.output
    quantized = json.loads((run_dir / "quantize" / "report.json").read_text())
    merged = json.loads((run_dir / "merge" / "report.json").read_text())
    assert quantized["parameters"]["total"] == merged["parameters"]["total"]  # packed int4 counted as weights

    before = snapshot(run_dir)
    again = run_cli("run", str(recipe))
    assert again.exit_code == 0 and again.output.count("skipped") >= len(STAGES)
    assert snapshot(run_dir) == before  # nothing rewritten

    rerun = run_cli("run", str(recipe), "--set", "run.name=pipe", "--set", "infer.max_new_tokens=6")
    assert rerun.exit_code == 6, rerun.output  # infer was finished by another recipe: never overwritten
    assert "never overwritten" in rerun.output
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("sections, code, words", [
    ({"data": {"source": "MISSING"}}, 4, "data file not found"),
    ({"data": {"columns": {"answer": "sql"}}}, 4, "missing column(s) answer → 'sql'"),
    ({"model": {"name_or_path": "/nonexistent/model"}}, 5, "model.name_or_path"),
    ({"finetune": {"lora": {"r": 4, "alpah": 8}}}, 3, "finetune.lora.alpah"),
])
def test_bad_input_is_one_line_with_its_exit_code_and_loses_nothing(recipe_file, tmp_path, sections, code, words,
                                                                     tiny_model_dir):
    good = recipe_file("keep", stages=["finetune"])
    assert run_cli("run", str(good)).exit_code == 0
    kept = snapshot(tmp_path / "artifacts" / "keep")
    if "data" in sections and sections["data"].get("source") == "MISSING":
        sections = {"data": {"source": str(tmp_path / "missing.jsonl")}}
    bad = recipe_file("bad", **sections)
    result = run_cli("run", str(bad))
    assert result.exit_code == code, result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and words in error_lines[0], result.output
    assert "Traceback" not in result.output
    assert snapshot(tmp_path / "artifacts" / "keep") == kept
    assert not (tmp_path / "artifacts" / "bad" / "finetune").exists()
    assert not list((tmp_path / "artifacts").glob("bad/.tmp/*"))


def test_empty_data_set_is_a_data_error(recipe_file, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"context": "CREATE TABLE t (a INTEGER)", "question": "", "answer": ""}\n')
    result = run_cli("run", str(recipe_file("empty", data={"source": str(empty)})))
    assert result.exit_code == 4 and "no rows with a question and an answer" in result.output
