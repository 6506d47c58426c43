"""bench/results/<name>.{json,md} from a harness results.json: adds the estimator's prediction for every stage
that ran (``kubetune.estimate`` on the recipe recorded in the stage report, with the model's config from
``bench/configs``), the ratios to the baseline of the same model, and a markdown table.

    .venv/bin/python bench/harness.py report /path/to/results.json --name gpu-h100-2026-11-28 --command '...'
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GIB = 2**30


def estimates(run: dict) -> dict:
    """{stage: {allocated_bytes, total_bytes}} from the estimator, or {"error": ...}."""
    from harness import CONFIGS, MODELS

    try:
        from kubetune.config import recipe_from_dict
        from kubetune.estimate import estimate_recipe
    except ImportError as exc:
        return {"error": f"estimator not importable: {exc}"}
    recipe_dict = next((r["recipe"] for r in run["reports"].values() if "recipe" in r), None)
    if recipe_dict is None:
        return {"error": "no recipe in the reports"}
    try:
        recipe = recipe_from_dict(recipe_dict, run["case"])
        with as_measured(run):
            est = estimate_recipe(recipe, model_config=str(CONFIGS / MODELS[run["model"]]), suggest=False)
    except Exception as exc:  # noqa: BLE001 - a failed estimate is reported, not fatal
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {s.stage: {"allocated_bytes": s.allocated_bytes, "total_bytes": s.total_bytes} for s in est.stages}


def upcast_measured(run: dict) -> bool | None:
    """Whether the fine-tune of this run turned a k-bit base's 16-bit rest into fp32 (peft's preparation, which
    kubetune ran under bf16 too before 2026-11-28's change), read from the parameters' bytes by dtype after the
    load and after the preparation; None when the run did not record them."""
    load, prepared = run.get("after_load"), run.get("after_prepare")
    if not load or not prepared:
        return None
    grew = prepared["by_dtype_bytes"].get("float32", 0) - load["by_dtype_bytes"].get("float32", 0)
    return grew > 0


# Harness patches that run code kubetune does not run and the estimator does not follow: those runs get no estimate.
NOT_ESTIMATED = {"trl_flattened_packing": "not estimated: TRL's flattened packing, which kubetune does not run "
                                          "(stages/packing.py)",
                 "full_logits_loss": "not estimated: the loss over every position's logits, which kubetune does not "
                                     "run (TRL's chunked loss is on)"}


def not_estimated(run: dict) -> str | None:
    return next((NOT_ESTIMATED[p] for p in run.get("patches", []) if p in NOT_ESTIMATED), None)


def as_measured(run: dict) -> contextlib.ExitStack:
    """Estimate the code and data that ran, where they differ from what the estimator follows now:

    - runs measured before kubetune stopped upcasting a k-bit base's rest under bf16 are estimated with the upcast;
    - runs patched with ``calibration_2048`` (harness.py) calibrated on rows joined into sequences of exactly
      ``calibration.max_length`` tokens, which a recipe cannot say: they are estimated with that length."""
    from unittest import mock

    stack = contextlib.ExitStack()
    measured = upcast_measured(run)
    if measured is not None:
        stack.enter_context(mock.patch("kubetune.estimate.finetune.kbit_upcast", lambda est, ft: measured))
    if "calibration_2048" in run.get("patches", []):
        stack.enter_context(mock.patch(
            "kubetune.estimate.quantize.calibration_length",
            lambda est, recipe: (recipe.quantize.calibration.max_length,
                                 "rows joined to max_length (harness patch calibration_2048)")))
    return stack


def estimator_version() -> dict:
    """The estimator changes while it is developed: record which source made the predictions."""
    import datetime
    import hashlib

    files = sorted((ROOT / "src" / "kubetune" / "estimate").glob("*.py"))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
    return {"source_sha256_16": digest, "computed_at": datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="seconds")}


def gib(n) -> str:
    return "–" if n is None else f"{n / GIB:.2f}"


def num(value, fmt: str, scale: float = 1.0) -> str:
    """A table cell: ``value`` × scale formatted, "–" when it was not measured (None, or no number)."""
    if not isinstance(value, (int, float)):
        return "–"
    return format(int(value) if fmt == "d" else value * scale, fmt)


def error_pct(predicted, measured) -> float | None:
    """(estimate − measured) / measured in percent, or None when either is missing."""
    return None if predicted is None or not measured else 100 * (predicted - measured) / measured


def pct_error(predicted, measured) -> str:
    error = error_pct(predicted, measured)
    return "–" if error is None else f"{error:+.0f}%"


def est_cells(est: dict, pm: dict) -> str:
    """'estimated allocated (error) | estimated NVML (error)' table cells."""
    alloc, total = est.get("allocated_bytes"), est.get("total_bytes")
    return (f"{gib(alloc)} ({pct_error(alloc, pm.get('torch_allocated_bytes'))}) "
            f"| {gib(total)} ({pct_error(total, pm.get('nvml_process_bytes'))})")


def write_report(results_path: Path, name: str, command: str) -> int:
    data = json.loads(results_path.read_text())
    env = data.get("environment", {})
    for run in data["runs"]:
        if "reports" in run and not data.get("tiny") and not not_estimated(run):
            run["estimate"] = estimates(run)
    RESULTS.mkdir(parents=True, exist_ok=True)
    data["command"] = command
    data["estimator"] = estimator_version()
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")

    card = env.get("card", "CPU")
    lines = [f"# {name}", "",
             f"Card: **{card}** ({env.get('nvidia_smi') or 'no nvidia-smi'}); date {env.get('date')}; "
             f"CUDA {env.get('cuda')}; Python {env.get('python')}.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items()) + ".", "",
             f"Command (device): `{command}`" if command else "", "",
             f"Harness command: `{env.get('command')}`", "",
             f"Commit {env.get('git_commit') or 'not recorded'}; source sha256 {env.get('source_sha256') or '–'}; "
             f"{(env.get('lock') or {}).get('file', 'lock')} sha256 {(env.get('lock') or {}).get('sha256') or '–'}; "
             f"{len(env.get('all_versions') or {})} installed distributions recorded (`environment.all_versions`).",
             "",
             "Random-weight models built from `bench/configs/` (published config.json shapes); data "
             "`builtin:text2sql`; each case one `run_stage` per stage in its own process. Fine-tune figures: median "
             "of the measured optimizer steps (CUDA events) after warm-up; tokens/s = real tokens / summed step "
             "time; MFU over 989 TFLOP/s dense bf16. Peak memory: the stage's own report (torch allocator peak; NVML "
             "process peak, CUDA context included). Estimate: `kubetune estimate` (allocated / nvidia-smi total) of "
             "the recorded recipe; error = (estimate − measured) / measured. Estimator source "
             f"{data['estimator']['source_sha256_16']} (sha256 of src/kubetune/estimate/*.py), computed "
             f"{data['estimator']['computed_at']}.", "",
             "## Fine-tune", "",
             "| case | tokens/s | step ms (median) | tokens/step | padding | MFU 4NT | MFU +attn | peak alloc GiB "
             "| NVML GiB | est. alloc GiB (err) | est. NVML GiB (err) | after load GiB | stage wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_model: dict[str, dict] = {}
    for run in data["runs"]:
        if "error" in run:
            lines.append(f"| {run['case']} | not run / failed: {run['error']} |" + " |" * 11)
            continue
        s = run.get("summary") or {}
        ft = run["reports"].get("finetune")
        if not ft or not s.get("steps_measured") or run["case"].endswith(("gptq8",)):
            continue
        pm = ft["peak_memory"]
        est = run.get("estimate", {}).get("finetune", {})
        lines.append(
            f"| {run['case']} | {s['tokens_per_s']:,.0f} | {s['step_ms_median']:.1f} "
            f"| {s['tokens_per_step_mean']:.0f} "
            f"| {100 * s['padding_fraction']:.0f}% | {100 * s['mfu_4nt']:.1f}% | {100 * s['mfu_4nt_attention']:.1f}% "
            f"| {gib(pm.get('torch_allocated_bytes'))} | {gib(pm.get('nvml_process_bytes'))} "
            f"| {est_cells(est, pm)} | {gib((run.get('after_load') or {}).get('allocated_bytes'))} "
            f"| {ft['duration_s']:.0f} |")
        by_model.setdefault(run["model"], {})[run["case"].split("/", 1)[1]] = (s, pm)

    lines += ["", "## Ratios to the original recipe (same card, same command)", ""]
    if not any("baseline" in cases for cases in by_model.values()):
        lines.append("No baseline case ran in this run; RESULTS.md sets it against the baseline of another run (†).")
    else:
        lines += ["| case | tokens/s × | peak alloc × | NVML × |", "|---|---|---|---|"]
    for model, cases in by_model.items():
        base = cases.get("baseline")
        if base is None:
            continue
        for variant, (s, pm) in cases.items():
            if variant == "baseline":
                continue
            b_s, b_pm = base
            ratio = lambda a, b: f"{a / b:.2f}" if a and b else "–"  # noqa: E731
            lines.append(f"| {model}/{variant} | {ratio(s['tokens_per_s'], b_s['tokens_per_s'])} "
                         f"| {ratio(pm.get('torch_allocated_bytes'), b_pm.get('torch_allocated_bytes'))} "
                         f"| {ratio(pm.get('nvml_process_bytes'), b_pm.get('nvml_process_bytes'))} |")

    lines += ["", "## Every stage", "",
              "| case | stage | wall s | peak alloc GiB | NVML GiB | est. alloc GiB (err) | est. NVML GiB (err) "
              "| notes |",
              "|---|---|---|---|---|---|---|---|"]
    for run in data["runs"]:
        for stage, rep in (run.get("reports") or {}).items():
            pm = rep["peak_memory"]
            est = run.get("estimate", {}).get(stage, {})
            note = not_estimated(run) or ""
            if stage == "quantize":
                note = (f"GPTQ {rep.get('bits')}-bit g{rep.get('group_size')}, {rep.get('calibration_samples')} "
                        f"samples: quantize() {rep.get('seconds')} s")
            lines.append(
                f"| {run['case']} | {stage} | {rep['duration_s']:.1f} | {gib(pm.get('torch_allocated_bytes'))} "
                f"| {gib(pm.get('nvml_process_bytes'))} | {est_cells(est, pm)} | {note} |")

    lines += ["", "## Memory right after the base loads (bytes by dtype; largest 16/32-bit tensors)", ""]
    for run in data["runs"]:
        for key in ("after_load", "after_prepare"):
            info = run.get(key)
            if not info:
                continue
            dt = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in info["by_dtype_bytes"].items())
            big = "; ".join(f"{t['name']} {t['dtype']} {t['shape']} {t['bytes'] / GIB:.2f} GiB"
                            for t in info["largest_16_32_bit"][:3])
            lines.append(f"- {run['case']} {key}: allocated {gib(info.get('allocated_bytes'))} GiB; {dt}. "
                         f"Largest: {big}")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / name}.json and .md")
    return 0
