"""kubetune report: fake stage reports written through the artifact layout, read back into markdown, HTML and a PNG."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kubetune.artifacts import RunLayout
from kubetune.cli import cli
from kubetune.config import recipe_from_dict
from kubetune.report import build_report, gib, to_html, to_markdown, write_report

GIB = 2**30


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A config-only model folder (the estimate needs no weights)."""
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("cfg") / "llama-small"
    LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False).save_pretrained(path)
    return path


def recipe_dict(root: Path, name: str, model: Path) -> dict:
    return {"run": {"name": name, "artifacts_root": str(root)}, "model": {"name_or_path": str(model)},
            "finetune": {"batch_size": 4, "max_length": 128, "base_precision": "4bit"}}


def make_run(root: Path, name: str, model: Path, gpu: bool, embed_recipe: bool = True,
             evaluation: dict | None = None) -> Path:
    """Stage reports shaped like run_stage's, committed with RunLayout.commit (report.json, then _SUCCESS)."""
    recipe = recipe_from_dict(recipe_dict(root, name, model))
    layout = RunLayout(root, name)
    for i, stage in enumerate(("finetune", "merge", "quantize", "infer", "evaluate")):
        peak = {"host_rss_bytes": (2 + i) * GIB, "torch_allocated_bytes": None, "torch_reserved_bytes": None,
                "nvml_process_bytes": None}
        if gpu and stage != "evaluate":
            peak.update(torch_allocated_bytes=int((3 + i) * GIB), torch_reserved_bytes=int((3.2 + i) * GIB),
                        nvml_process_bytes=int((3.9 + i) * GIB))
        report = {"stage": stage, "run": name, "model": str(model), "duration_s": 10.0 * (i + 1),
                  "peak_memory": peak}
        if embed_recipe:
            report["recipe"] = recipe.model_dump(mode="json")
        if stage == "finetune":
            report.update(parameters={"by_dtype": {"nf4": 2_000_000, "float32": 600_000}, "total": 2_600_000,
                                      "trainable": 50_000},
                          throughput={"train_tokens_per_s": 1234.5, "samples_per_s": 9.87},
                          memory_footprint_bytes=3 * 2**20)
        if stage == "infer":
            report.update(throughput={"base": {"tokens_per_s": 41.0}, "quantized": {"tokens_per_s": 57.5}},
                          memory_footprint_bytes={"base": 5 * 2**20, "quantized": 2 * 2**20})
        tmp = layout.new_temp_dir(stage)
        if stage == "evaluate" and evaluation is not None:
            (tmp / "metrics.json").write_text(json.dumps(evaluation))
        layout.commit(stage, tmp, fingerprint="f" * 16, report=report)
    return layout.run_dir


EVAL = {"models": {"base": {"execution_accuracy": 12.5, "exact_match": 5.0, "parse_rate": 90.0, "examples": 40},
                   "merged": {"execution_accuracy": 47.5, "exact_match": 30.0, "parse_rate": 100.0, "examples": 40},
                   "quantized": {"execution_accuracy": 45.0, "exact_match": 27.5, "parse_rate": 97.5,
                                 "examples": 40}}}


def png_ok(data: bytes) -> tuple[int, int]:
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.verify()  # a truncated or corrupt PNG raises
    image = Image.open(io.BytesIO(data)).convert("RGB")
    assert image.format is None or image.format == "PNG"
    assert len(set(image.getdata())) > 10  # bars, text and axes, not a blank canvas
    return image.size


def test_cpu_run_report_tables_chart_and_evaluation(tmp_path, model_dir):
    run = make_run(tmp_path / "artifacts", "cpu-run", model_dir, gpu=False, evaluation=EVAL)
    report = build_report([run], estimates=False)
    md = to_markdown(report)
    assert "Peak host RSS per stage (CPU runs: no GPU figures were recorded)" in md
    for stage in ("## finetune", "## merge", "## quantize", "## infer", "## evaluation"):
        assert stage in md
    assert "| cpu-run | 10.0 s | — | — | 2.00 GiB | 3.00 MiB | float32 600.00k, nf4 2.00M (trainable 50.00k) | " \
           "1234 tokens/s, 9.87 rows/s |" in md
    assert "base: 41.0 tokens/s; quantized: 57.5 tokens/s" in md
    # Δ vs base is computed from the two accuracies, in points
    assert "| cpu-run | heldout | merged | 47.5% | +35.0 | 30.0% | 100.0% | 40 |  |" in md
    assert "| cpu-run | heldout | quantized | 45.0% | +32.5 |" in md
    assert "estimate vs measured" not in md
    width, height = png_ok(report.chart_png)
    assert width >= 600 and height >= 300


def test_gpu_runs_side_by_side_with_estimates(tmp_path, model_dir):
    a = make_run(tmp_path / "artifacts", "run-a", model_dir, gpu=True, evaluation=EVAL)
    b = make_run(tmp_path / "artifacts", "run-b", model_dir, gpu=True)
    report = build_report([a, b])
    assert report.chart_title.startswith("Peak GPU memory per stage")
    md = to_markdown(report)
    assert "| run-a | 10.0 s | 3.90 GiB | 3.00 GiB | 2.00 GiB |" in md and "| run-b | 10.0 s | 3.90 GiB |" in md
    est = {s["stage"]: s for s in report.runs[0].estimate["stages"]}
    row = (f"| run-a | finetune | {gib(est['finetune']['total_bytes'])} | 3.90 GiB | "
           f"{est['finetune']['total_bytes'] / int(3.9 * GIB):.2f} |")
    assert row in md
    assert set(est) == {"finetune", "merge", "quantize", "infer"}
    written = write_report(report, tmp_path / "out")
    names = {p.name for p in written}
    assert names == {"memory.png", "report.md", "report.html", "estimate-run-a.json", "estimate-run-b.json"}
    assert json.loads((tmp_path / "out" / "estimate-run-a.json").read_text())["stages"][0]["stage"] == "finetune"
    png_ok((tmp_path / "out" / "memory.png").read_bytes())
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("<table>") == 1 + 5 + 1 + 1  # runs, five stages, evaluation, estimate vs measured
    assert "data:image/png;base64," in page and "run-b" in page


def test_html_escapes_what_it_shows(tmp_path, model_dir):
    run = make_run(tmp_path / "artifacts", "x", model_dir, gpu=False,
                   evaluation={"models": {"<script>alert(1)</script>": {"execution_accuracy": 1.0}}})
    page = to_html(build_report([run], estimates=False))
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page


def test_report_command_recipe_option_and_unavailable_estimate(tmp_path, model_dir, monkeypatch):
    root = tmp_path / "artifacts"
    old = make_run(root, "old-run", model_dir, gpu=True, embed_recipe=False)
    recipe_file = tmp_path / "old.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe_dict(root, "old-run", model_dir)))
    runner = CliRunner()
    result = runner.invoke(cli, ["report", str(old), "--recipe", str(recipe_file)])
    assert result.exit_code == 0, result.output
    md = (old / "report" / "report.md").read_text()
    assert "| old-run | finetune |" in md.split("## estimate vs measured")[1]

    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump(recipe_dict(root, "another", model_dir)))
    other = make_run(root, "second", model_dir, gpu=False)
    bad = runner.invoke(cli, ["report", str(old), str(other), "--recipe", str(wrong)])
    assert bad.exit_code == 3 and "is none of the runs given" in bad.output

    # A hub model with no network and no cache: the report is still written, and says why there is no estimate.
    hub = make_run(root, "hub-run", tmp_path / "nowhere", gpu=True, embed_recipe=False)
    hub_recipe = tmp_path / "hub.yaml"
    hub_recipe.write_text(yaml.safe_dump({**recipe_dict(root, "hub-run", model_dir),
                                          "model": {"name_or_path": "nobody/not-a-model-xyz"}}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["report", str(hub), str(other), "--recipe", str(hub_recipe)])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "report" / "report.md").read_text()  # several runs: ./report
    assert "hub-run: no estimate (model.name_or_path: cannot read the config of 'nobody/not-a-model-xyz'" in md
