"""bench/results_md.py: RESULTS.md is made from the results JSON files alone (a temporary copy, no GPU)."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "bench" / "results"
# oldest to newest run (the newest file's rows win in RESULTS.md)
GPU_FILES = sorted(REAL.glob("gpu-*.json"), key=lambda p: json.loads(p.read_text())["environment"]["date"])
pytestmark = pytest.mark.skipif(not GPU_FILES, reason="no bench/results/gpu-*.json")


@pytest.fixture(scope="module")
def results_md():
    sys.path.insert(0, str(ROOT / "bench"))  # the script imports bench_report and harness as siblings
    try:
        spec = importlib.util.spec_from_file_location("results_md", ROOT / "bench" / "results_md.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


@pytest.fixture
def results(tmp_path) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    for path in GPU_FILES:
        shutil.copy(path, folder)
    return folder


def first_measured(path: Path) -> dict | None:
    data = json.loads(path.read_text())
    return next((r for r in data["runs"] if (r.get("summary") or {}).get("steps_measured")), None)


def test_cli_writes_tables_from_the_json_and_says_quality_not_measured(results, tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "results_md.py"), "--results", str(results),
                           "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    # the newest file with a measured fine-tune (a newer one may hold only GPTQ cases)
    newest = next(p for p in reversed(GPU_FILES) if first_measured(p))
    run = first_measured(newest)
    row = next(line for line in text.splitlines() if line.startswith(f"| {run['case']} | "))
    assert f"{run['summary']['tokens_per_s']:,.0f}" in row and f"{run['summary']['step_ms_median']:.1f}" in row
    assert f"`{newest.name}`" in row
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert [h.split(":")[0].split(" (")[0] for h in headings] == [
        "## The original's table, redone", "## GPTQ", "## Levers", "## Where a fine-tune step's time goes",
        "## Estimator error", "## Quality", "## Chart",
        "## Targets"]
    assert "Quality: not measured" in text
    assert "| quality: fine-tuned | execution accuracy ≥ 75% | not measured | not measured |" in text
    assert "32.96 samples/s" in text  # the original's figures, labelled
    data = json.loads(GPU_FILES[-1].read_text())
    assert data["environment"]["command"] in text
    pngs = list(results.glob("memory-per-stage-*.png"))
    assert pngs and pngs[0].read_bytes()[:4] == b"\x89PNG"
    assert f"](results/{pngs[0].name})" in text  # relative to the markdown file


def _cases(path: Path) -> set[str]:
    return {r["case"] for r in json.loads(path.read_text())["runs"]}


def test_newest_file_wins_and_ratios_use_the_same_file(results_md, results, tmp_path):
    # a file with bloom-1b1's baseline and ours, and a case (ours-bs64-gc) that no newer file has
    source = next(p for p in GPU_FILES if {"bloom-1b1/baseline", "bloom-1b1/ours", "bloom-1b1/ours-bs64-gc"}
                  <= _cases(p) and not any("bloom-1b1/ours-bs64-gc" in _cases(q) for q in GPU_FILES if q != p))
    data = json.loads(source.read_text())
    newer = copy.deepcopy(data)
    newer["environment"]["date"] = "2099-01-01T00:00:00+00:00"
    newer["command"] = "run(command='newer device call')"
    ours = next(r for r in newer["runs"] if r["case"] == "bloom-1b1/ours")
    base = next(r for r in newer["runs"] if r["case"] == "bloom-1b1/baseline")
    ours["summary"]["tokens_per_s"] = 123456.0
    newer["runs"] = [ours, base]
    (results / "gpu-h200-2099-01-01.json").write_text(json.dumps(newer))
    out = tmp_path / "R.md"
    results_md.main(["--results", str(results), "--out", str(out)])
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| bloom-1b1/ours | 123,456 |"))
    assert "`gpu-h200-2099-01-01.json`" in row
    assert f"| {123456.0 / base['summary']['tokens_per_s']:.2f} |" in row
    assert "run(command='newer device call')" in text
    # a case only in the older file keeps its own file
    assert any(line.startswith("| bloom-1b1/ours-bs64-gc | ") and f"`{source.name}`" in line
               for line in text.splitlines())


def evaluate(**models) -> dict:
    """An evaluate stage report: {model: (execution accuracy, exact match, parse rate)} at 200 rows."""
    return {"duration_s": 12.5, "peak_memory": {"torch_allocated_bytes": None},
            "metrics": {name: {"examples": 200, "execution_accuracy": acc, "exact_match": exact, "parse_rate": parse}
                        for name, (acc, exact, parse) in models.items()},
            "gates": [{"gate": "quantized_max_drop", "passed": True}]}


def test_quality_json_gets_its_table_and_targets(results_md, results, tmp_path):
    # bench/quality.py's shape: run 1 scores base, merged and its quantized model; run 2 only its quantized model
    quality = {
        "environment": {"date": "2026-11-29T10:00:00+00:00", "card": "NVIDIA H200", "versions": {},
                        "command": "bench/quality.py --out /root/out", "device_command": "run(command='q')"},
        "data": {"source": "wikisql_train.jsonl", "train_rows": 3800, "heldout_rows": 200},
        "recipe": {},
        "runs": {
            "gptq8": {"status": {"finetune": "done"},
                      "reports": {"finetune": {"duration_s": 301.0, "peak_memory": {"torch_allocated_bytes": 2**31}},
                                  "evaluate": evaluate(base=(12.5, 3.0, 70.0), merged=(81.5, 60.0, 99.0),
                                                       quantized=(81.25, 59.5, 99.0))}},
            "gptq4": {"reports": {"evaluate": evaluate(quantized=(78.5, 55.0, 98.5))},
                      "gates": [{"gate": "quantized_min_execution_accuracy", "passed": False}]},
            "broken": {"error": {"stage": "quantize", "message": "out of memory"}},  # tolerated: no reports
        },
    }
    (results / "quality-h200-2026-11-29.json").write_text(json.dumps(quality))
    out = tmp_path / "R.md"
    results_md.main(["--results", str(results), "--out", str(out)])
    text = out.read_text()
    assert "Quality: not measured" not in text
    assert "| gptq8 | merged | 81.50 | 60.00 | 99.00 | 200 | – | – |" in text
    assert "| gptq8 | quantized | 81.25 | 59.50 | 99.00 | 200 | -0.25 | -0.50 |" in text
    assert "| gptq4 | quantized | 78.50 | 55.00 | 98.50 | 200 | -3.00 | -5.00 |" in text
    assert "| gptq8 | base | 12.50 |" in text
    assert "run(command='q')" in text and "finetune 301 s, peak 2.00 GiB" in text
    assert "quantized_min_execution_accuracy FAIL" in text and "error in quantize: out of memory" in text
    assert "| quality: fine-tuned (gptq8 merged) | execution accuracy ≥ 75% | 81.50% | met |" in text
    assert "| quality: GPTQ-8 | within 0.5 point of the fine-tuned | +0.25 points lost | met |" in text
    assert "| quality: GPTQ-4 | within 2 points of the fine-tuned | +3.00 points lost | missed |" in text


def test_committed_results_md_is_what_the_json_files_make(results_md, tmp_path):
    """Every row of bench/RESULTS.md traces to a JSON file: regenerating it from bench/results changes nothing
    (after a new run or a change to results_md.py: `make bench-results`)."""
    folder = tmp_path / "results"
    shutil.copytree(REAL, folder)
    text = results_md.generate(folder, tmp_path / "RESULTS.md")
    assert text == (ROOT / "bench" / "RESULTS.md").read_text(), "bench/RESULTS.md is stale: run make bench-results"


def test_readme_figures_are_what_the_json_files_make(results_md, tmp_path):
    """README.md's bench figures are generated from the rows RESULTS.md shows, each naming its file: none typed
    by hand (the hand-copied "443 s", "5.8×" and "1.3-1.7×" had drifted from every JSON file)."""
    folder = tmp_path / "results"
    shutil.copytree(REAL, folder)
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    results_md.generate(folder, tmp_path / "RESULTS.md", readme)
    assert readme.read_text() == (ROOT / "README.md").read_text(), "README.md's bench figures are stale: run " \
        "make bench-results"
    block = readme.read_text().split(results_md.README_BEGIN)[1].split(results_md.README_END)[0]
    items = [item for item in block.split("\n  - ") if item.strip()]
    assert len(items) >= 4 and all(".json`" in item or item.startswith("†") for item in items)
    # the shipped recipe's ratio is the one the Targets table states
    results = (ROOT / "bench" / "RESULTS.md").read_text()
    target = next(line for line in results.splitlines() if line.startswith("| bloom-1b1 fine-tune")
                  and "tokens/s" in line).split(" | ")[2].split(" ")[0]
    assert f"shipped recipe {target} the tokens/s" in block


def test_readme_block_is_replaced_not_appended(results_md, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{results_md.README_BEGIN}\n  - old figure 443 s\n{results_md.README_END}\nrest\n")
    text = results_md.update_readme(readme, [results_md.README_BEGIN, "  - new", results_md.README_END])
    assert text == f"intro\n{results_md.README_BEGIN}\n  - new\n{results_md.README_END}\nrest\n"


def test_a_pinned_run_shows_its_settings_hash_env_and_commit(results_md, results, tmp_path):
    """A harness record since 2026-12-06 carries its settings' hash, environment variables, data and the commit:
    RESULTS.md shows them beside the case, so two runs of "<model>/ours" can be told apart."""
    data = json.loads(GPU_FILES[-1].read_text())
    pinned = copy.deepcopy(data)
    pinned["environment"].update(date="2099-02-01T00:00:00+00:00", git_commit="f" * 40)
    run = copy.deepcopy(next(r for r in json.loads(GPU_FILES[0].read_text())["runs"]
                             if r["case"] == "bloom-1b1/baseline"))
    run.update(case="bloom-1b1/gptq8-torch-loop", env={"GPTQMODEL_DISABLE_GPTQ_CUDA": "1"}, data="wrapped",
               settings_sha256="0123456789abcdef" * 4)
    pinned["runs"] = [run]
    (results / "gpu-h200-2099-02-01.json").write_text(json.dumps(pinned))
    text = results_md.generate(results, tmp_path / "R.md")
    row = next(line for line in text.splitlines() if line.startswith("| bloom-1b1/gptq8-torch-loop | ")
               and "gpu-h200-2099-02-01.json" in line and "`0123456789ab`" in line)
    assert 'GPTQMODEL_DISABLE_GPTQ_CUDA="1"' in row and "wrapped rows" in row
    assert f"commit {'f' * 40}" in text


def test_gptq_targets_follow_the_block_update_that_ran(results_md, results, tmp_path):
    """`<model>/gptq8` runs GPTQModel's kernel where nvcc is, kubetune's CUDA graphs where it is not: a newer run
    without nvcc is the image's target row, and the kernel's row keeps the newest kernel run."""
    source = next(p for p in reversed(GPU_FILES) if any(
        r["case"] == "bloom-1b1/gptq8" and "error" not in r for r in json.loads(p.read_text())["runs"]))
    data = json.loads(source.read_text())
    newer = copy.deepcopy(data)
    newer["environment"]["date"] = "2099-03-01T00:00:00+00:00"
    run = next(r for r in newer["runs"] if r["case"] == "bloom-1b1/gptq8")
    run["reports"]["quantize"].update(block_update="cuda-graphs", seconds=12.5)
    newer["runs"] = [run]
    (results / "gpu-h200-2099-03-01.json").write_text(json.dumps(newer))
    text = results_md.generate(results, tmp_path / "R.md")
    image = next(line for line in text.splitlines() if line.startswith("| GPTQ bloom-1b1, kubetune's image"))
    kernel = next(line for line in text.splitlines() if line.startswith("| GPTQ bloom-1b1, with nvcc"))
    assert "(`bloom-1b1/gptq8`)" in image and "12.5 s" in image
    kernel_seconds = next(r for r in data["runs"] if r["case"] == "bloom-1b1/gptq8")["reports"]["quantize"]["seconds"]
    assert f"{kernel_seconds:.1f} s" in kernel
