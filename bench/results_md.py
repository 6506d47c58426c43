"""bench/RESULTS.md (and a memory chart under bench/results/) from the JSON files in bench/results/ only.

    make bench-results            # = .venv/bin/python bench/results_md.py --readme README.md
    .venv/bin/python bench/results_md.py --results bench/results --out bench/RESULTS.md

Inputs: ``gpu-*.json`` (a harness ``results.json`` with the estimator's predictions, written by
``harness.py report``: see bench_report.py) and ``quality-*.json`` (bench/quality.py). Every figure in the
output comes from one of them; the only numbers typed here are the original notebook's published figures
(``ORIGINAL_A100``, labelled as such) and the issue's targets (``TARGETS``). When the same case was measured in
several files, the newest (``environment.date``) wins, and each row names its file. Ratios compare with the
reference case of the same file; where that file lacks it, with the newest one on the same card, marked †.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import textwrap
from pathlib import Path

from bench_report import GIB, error_pct, est_cells, estimator_version, gib, num  # bench/bench_report.py
from harness import MODELS  # bench/harness.py (stdlib imports only at module level)
from packed_md import readme_lines as packed_readme_lines  # bench/packed_md.py: issue 22's packed.json files
from packed_md import section as packed_section

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("finetune", "merge", "quantize")

# kubetune's case per model that the targets and the chart use: the shipped recipe (jobs/*.yaml) as measured
# ("<model>/ours", newest run), or, where the shipped settings were chosen from a lever case before being
# shipped, that case. falcon-7b packs 2 rows of 512 per step (packing 8 × 2 peaked at 23 GiB, batch 64 at 35.6).
DEFAULT_CASE = {"bloom-1b1": "bloom-1b1/ours", "bloom-7b1": "bloom-7b1/ours",
                "falcon-7b": "falcon-7b/ours", "codegen2-1b": "codegen2-1b/ours-grouped-bs64-gc"}
# GPTQ as kubetune's image runs it (no nvcc: GPTQModel's torch loop replayed as CUDA graphs, stages/gptq_block.py);
# and as it runs where GPTQModel can build its CUDA kernel (the bench machine has nvcc; the build cached).
DEFAULT_GPTQ_CASE = {"bloom-1b1": "bloom-1b1/gptq8-graphed", "bloom-7b1": "bloom-7b1/gptq8-graphed"}
COMPILED_GPTQ_CASE = {"bloom-1b1": "bloom-1b1/gptq8", "bloom-7b1": "bloom-7b1/gptq8"}

# The original notebook's published figures (A100 40GB, from the issue): context, not our measurements.
ORIGINAL_A100 = [
    ("bloom-1b1", "LoRA, fp32", "~12 min", "32.96 samples/s", "~21 GB", "283 s"),
    ("bloom-7b1", "QLoRA, 4-bit base", "~83 min", "–", "~17 GB", "2073 s"),
    ("falcon-7b", "LoRA, 8-bit base", "~65 min", "–", "~16 GB", "1312 s"),
    ("bloom-7b1, falcon-7b", "no quantization", "OOM", "–", "–", "–"),
]

# The targets. Fine-tune: model -> (tokens/s × baseline at least, peak × baseline at most, MFU at least).
TARGETS = {"bloom-1b1": (10.0, 1.0, 0.45), "bloom-7b1": (3.0, 0.6, None), "falcon-7b": (3.0, 0.5, None)}
GPTQ_TARGET_S = {"bloom-1b1": 20.0, "bloom-7b1": 60.0}
GPTQ_MIN_SAMPLES = 128
ESTIMATE_MAX_ERROR_PCT = 10.0
QUALITY_MIN_ACCURACY, QUALITY_MAX_DROP = 75.0, {"gptq8": 0.5, "gptq4": 2.0}
NOT_MEASURED = "not measured"


# ---- reading -------------------------------------------------------------------------------------------------
class Row:
    """One measured case of one results file."""

    def __init__(self, source: dict, run: dict):
        self.source, self.run = source, run
        self.case, self.model = run["case"], run.get("model") or run["case"].split("/")[0]
        self.variant = self.case.split("/", 1)[-1]
        self.reports = run.get("reports") or {}

    @property
    def summary(self) -> dict:
        s = self.run.get("summary") or {}
        return s if s.get("steps_measured") else {}

    def peak(self, stage: str, key: str = "torch_allocated_bytes"):
        return ((self.reports.get(stage) or {}).get("peak_memory") or {}).get(key)

    @property
    def recipe(self) -> dict:
        return next((r["recipe"] for r in self.reports.values() if "recipe" in r), {})


def _date(env: dict) -> datetime.datetime:
    try:
        when = datetime.datetime.fromisoformat(env.get("date") or "")
    except ValueError:
        return datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)
    return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)


def load_sources(folder: Path, pattern: str) -> list[dict]:
    """The JSON files matching pattern, oldest first, each with its name and environment."""
    sources = []
    for path in sorted(folder.glob(pattern)):
        data = json.loads(path.read_text())
        env = data.get("environment") or {}
        sources.append({"name": path.name, "env": env, "data": data, "card": env.get("card") or "CPU"})
    return sorted(sources, key=lambda s: (_date(s["env"]), s["name"]))


class Results:
    def __init__(self, sources: list[dict]):
        self.sources = sources
        self.chosen: dict[tuple[str, str], Row] = {}  # (card, case) -> newest measured row
        self.failed: dict[str, list[str]] = {}  # case -> "file: error" where it did not run
        for src in sources:  # oldest first: a newer measurement replaces an older one
            src["runs"] = {r["case"]: r for r in src["data"].get("runs", []) if "case" in r}
            for case, run in src["runs"].items():
                if "error" in run:
                    self.failed.setdefault(case, []).append(f"{src['name']}: {run['error']}")
                else:
                    self.chosen[(src["card"], case)] = Row(src, run)
        self.rows = sorted(self.chosen.values(), key=lambda r: (model_order(r.model), r.source["card"],
                                                                variant_order(r.variant), r.case))

    def models(self) -> list[str]:
        return sorted({r.model for r in self.rows}, key=model_order)

    def of_model(self, model: str) -> list[Row]:
        return [r for r in self.rows if r.model == model]

    def get(self, case: str, card: str | None = None) -> Row | None:
        cards = [card] if card else [s["card"] for s in reversed(self.sources)]
        return next((self.chosen[(c, case)] for c in cards if (c, case) in self.chosen), None)

    def reference(self, row: Row, case: str) -> tuple[Row | None, str]:
        """case's row from row's own file (marker ''), else the newest on the same card (marker '†')."""
        run = row.source["runs"].get(case)
        if run is not None and "error" not in run:
            return Row(row.source, run), ""
        other = self.get(case, row.source["card"])
        return other, ("†" if other is not None else "")


def variant_order(variant: str) -> int:
    """baseline, ours, ours-*, other baselines, the rest."""
    return next(i for i, ok in enumerate((variant == "baseline", variant == "ours", variant.startswith("ours"),
                                          variant.startswith("baseline"), True)) if ok)


def model_order(model: str) -> tuple[int, str]:
    return (list(MODELS).index(model) if model in MODELS else len(MODELS), model)


# ---- formatting ----------------------------------------------------------------------------------------------
def esc(text) -> str:
    return str(text).replace("|", "\\|")


def code(items) -> str:
    """`a` `b` for a list, `key=value` for a dict; – when empty."""
    if isinstance(items, dict):
        items = [f"{k}={json.dumps(v)}" for k, v in items.items()]
    return " ".join(f"`{esc(i)}`" for i in items or []) or "–"


def ratio(a, b, marker: str = "") -> str:
    return f"{a / b:.2f}{marker}" if a and b else "–"


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def quantize_setting(row: Row, key: str):
    """A calibration setting: the case's `set` override, else the recipe recorded in the finetune report."""
    for item in row.run.get("set") or []:
        name, _, value = item.partition("=")
        if name == f"quantize.calibration.{key}":
            return value
    return ((row.recipe.get("quantize") or {}).get("calibration") or {}).get(key)


# ---- sections ------------------------------------------------------------------------------------------------
def header(res: Results, quality: list[dict]) -> list[str]:
    lines = ["# Benchmark results", "",
             "Generated by `bench/results_md.py` from the JSON files in `bench/results/` (nothing here is typed by "
             "hand except the original notebook's published figures and the issue's targets, both labelled). "
             "Regenerate with `make bench-results`. Models: random weights in the published configs' shapes "
             "(`bench/configs/`), data `builtin:text2sql`, each case one `run_stage` per stage in its own process "
             "(`bench/harness.py`, `bench/README.md`). When a case was measured in several files, the newest "
             "(`environment.date`) is shown; the `source` column names its file. † = the ratio's reference case "
             "comes from another file of the same card.", "", "Sources:", ""]
    for src in res.sources + quality:
        env = src["env"]
        device = src["data"].get("command") or env.get("device_command")
        est = (src["data"].get("estimator") or {}).get("source_sha256_16")
        lines.append(f"- `{src['name']}`: {src['card']}, {env.get('date')}; harness command "
                     f"`{env.get('command')}`" + (f"; device command `{device}`" if device else "")
                     + (f"; commit {env['git_commit']}" if env.get("git_commit") else "")
                     + (f"; estimator source {est}" if est else ""))
    never = {case: why for case, why in res.failed.items() if res.get(case) is None}
    if never:
        lines += ["", "Recorded but never measured: " + "; ".join(f"{c} ({', '.join(w)})" for c, w in never.items())]
    return lines + [""]


def original_table(res: Results) -> list[str]:
    lines = ["## The original's table, redone", "",
             "Fine-tune per model: the original notebook's recipe (`<model>/baseline`) and kubetune's "
             "(`<model>/ours*`), same card and command (`<model>/baseline-*`: the original's recipe with one "
             "change, see Levers). tokens/s: real tokens / summed step time after warm-up; step "
             "ms: median; MFU: 4·N·T over 989 TFLOP/s; peak: torch allocator and NVML per-process peaks from the "
             "stage report; × = ratio to the same model's baseline.", ""]
    rows = []
    for row in res.rows:
        s = row.summary
        if not s or not (row.variant.startswith("baseline") or row.variant.startswith("ours")):
            continue
        base, mark = res.reference(row, f"{row.model}/baseline")
        b_s = base.summary if base else {}
        rows.append([row.case, num(s.get("tokens_per_s"), ",.0f"), num(s.get("step_ms_median"), ".1f"),
                     num(s.get("mfu_4nt"), ".1f", 100) + "%", gib(row.peak("finetune")),
                     gib(row.peak("finetune", "nvml_process_bytes")),
                     num(row.reports["finetune"].get("duration_s"), ".0f"),
                     ratio(s.get("tokens_per_s"), b_s.get("tokens_per_s"), mark),
                     ratio(row.peak("finetune"), base.peak("finetune") if base else None, mark),
                     f"`{row.source['name']}`"])
    lines += table(["case", "tokens/s", "step ms", "MFU 4NT", "peak alloc GiB", "NVML GiB", "stage wall s",
                    "tokens/s ×", "peak ×", "source"], rows) if rows else ["No fine-tune measured yet."]
    lines += ["", "**The original's published figures (A100 40GB, from the issue; not our measurements, other "
              "card, real weights, full epoch):**", ""]
    lines += table(["model", "technique", "fine-tune time", "throughput", "peak memory", "GPTQ 8-bit"],
                   [list(r) for r in ORIGINAL_A100])
    return lines + [""]


def gptq_rows(res: Results) -> list[Row]:
    return [r for r in res.rows if "quantize" in r.reports]


def block_update_of(row: Row, q: dict) -> str:
    """What ran GPTQ's block updates (report ``block_update``, recorded since 2026-11-28 17:00); before, GPTQModel's
    compiled kernel unless the case turned it off."""
    if q.get("block_update"):
        return q["block_update"]
    return "torch-loop" if "gptq_torch_block_update" in row.run.get("patches", []) else "cuda-kernel"


def gptq_table(res: Results) -> list[str]:
    lines = ["## GPTQ", "", "Cases that ran the quantize stage (fine-tune of 2 steps → merge → GPTQ). `quantize()` "
             "s: the GPTQ call itself (report `seconds`); of which solves: GPTQModel's per-module solve times "
             "summed (`quant_log.csv`; the rest is calibration forwards and packing; recorded since 2026-11-28 "
             "15:20); stage wall s: load, quantize, save and reload. Block update: what ran GPTQ's column-by-column "
             "solve (GPTQModel's nvcc-compiled kernel, its torch loop, or kubetune's CUDA graphs of that loop: "
             "`stages/gptq_block.py`); reload kernel: the inference kernel the reload check used.", ""]
    rows = []
    for row in gptq_rows(res):
        q = row.reports["quantize"]
        rows.append([row.case, f"{q.get('bits')}-bit g{q.get('group_size')}", num(q.get("seconds"), ".1f"),
                     num((q.get("metrics") or {}).get("gptq_solve_seconds"), ".1f"), num(q.get("duration_s"), ".1f"),
                     q.get("calibration_samples", quantize_setting(row, "samples")),
                     quantize_setting(row, "max_length") or "–", gib(row.peak("quantize")),
                     gib(row.peak("quantize", "nvml_process_bytes")), block_update_of(row, q), q.get("backend", "–"),
                     num((row.reports.get("merge") or {}).get("duration_s"), ".1f"), gib(row.peak("merge")),
                     f"`{row.source['name']}`"])
    lines += table(["case", "GPTQ", "quantize() s", "of which solves s", "stage wall s", "calibration samples", "calibration length",
                    "peak alloc GiB", "NVML GiB", "block update", "reload kernel", "merge wall s", "merge peak GiB", "source"],
                   rows) if rows else ["No GPTQ case measured yet."]
    return lines + [""]


def block_update_section(results_dir: Path) -> list[str]:
    """The newest ``gptq-block-*.json`` of bench/gptq_block.py: GPTQ's block update three ways, per shape."""
    sources = load_sources(results_dir, "gptq-block-*.json")
    if not sources:
        return []
    data, name = sources[-1]["data"], sources[-1]["name"]
    ways = data["ways"]
    rows = [[r["shape"], r["rows"], *(f"{r[f'{w}_ms']:.2f}{'' if r[f'{w}_equal'] else ' (differs)'}" for w in ways),
             f"{r['torch-loop_ms'] / r['cuda-graphs_ms']:.1f}×"] for r in data["shapes"]]
    note = f" Note from the run: {data['note']}" if data.get("note") else ""
    return ["### GPTQ block update, per 128-column block", "",
            f"`bench/gptq_block.py` on {data['card']}, {data['date']} (`{name}`; device command "
            f"`{data.get('device_command', data['command'])}`): median ms per block, each way's outputs compared "
            f"with the torch loop's bit for bit (all equal unless marked). GPTQModel's kernel build: "
            f"{data.get('kernel_build_s')} s.{note}", ""] + \
        table(["shape", "rows", *(f"{w} ms" for w in ways), "loop ÷ graphs"], rows) + [""]


def levers_table(res: Results) -> list[str]:
    lines = ["## Levers", "", "Every measured case with what it changes against the shipped recipe (`set` "
             "overrides; in runs before 2026-12-06 also TRL SFTConfig overrides and code patches under "
             "measurement, since dropped from the harness); settings sha256: the hash of the case's resolved recipe, "
             "environment and data (recorded since 2026-12-06: two runs of a case ran the same settings only when "
             "it agrees); × = ratio to the model's `ours` case.", ""]
    for model in res.models():
        rows = []
        for row in res.of_model(model):
            ours, mark = res.reference(row, f"{model}/ours")
            s = row.summary
            note = ""
            if "probe_after_load" in row.run:
                after = [gib((row.run.get(k) or {}).get("allocated_bytes")) for k in
                         ("probe_after_load", "probe_after_prepare")]
                note = f"load probe: {after[0]} GiB after load, {after[1]} after prepare"
            if row.run.get("env"):
                note = "; ".join(filter(None, [note, "env " + code(row.run["env"])]))
            if row.run.get("data") == "wrapped":
                note = "; ".join(filter(None, [note, "data: the original's wrapped rows (harness.wrapped_rows)"]))
            pinned = row.run.get("settings_sha256")
            rows.append([row.case, code(row.run.get("set")), code(row.run.get("sft_overrides")),
                         code(row.run.get("patches")), f"`{pinned[:12]}`" if pinned else "–",
                         num(s.get("tokens_per_s"), ",.0f"), gib(row.peak("finetune")),
                         ratio(s.get("tokens_per_s"), ours.summary.get("tokens_per_s") if ours else None, mark),
                         ratio(row.peak("finetune"), ours.peak("finetune") if ours else None, mark),
                         note, f"`{row.source['name']}`"])
        lines += [f"### {model}", ""] + table(
            ["case", "set", "sft_overrides", "patches", "settings sha256", "tokens/s", "peak alloc GiB", "tokens/s ×",
             "peak ×", "notes", "source"], rows) + [""]
    return lines


def shares_a_process(row: Row, stage: str) -> bool:
    """Measured after another stage in the same process (harness runs before 2026-11-28 13:00): the peaks include
    what the stage before left allocated, unlike a pod, which runs one stage."""
    return stage != "finetune" and not row.run.get("stage_processes")


def estimator_errors(res: Results) -> list[tuple[Row, str, float | None, float | None]]:
    out = []
    for row in res.rows:
        for stage, rep in row.reports.items():
            if shares_a_process(row, stage):
                continue
            est = (row.run.get("estimate") or {}).get(stage) or {}
            pm = rep.get("peak_memory") or {}
            out.append((row, stage, error_pct(est.get("allocated_bytes"), pm.get("torch_allocated_bytes")),
                        error_pct(est.get("total_bytes"), pm.get("nvml_process_bytes"))))
    return out


def worst_error(res: Results):
    errs = [(abs(e), row.case, stage, kind) for row, stage, a, t in estimator_errors(res)
            for e, kind in ((a, "allocated"), (t, "NVML")) if e is not None]
    return max(errs) if errs else None


def estimator_table(res: Results) -> list[str]:
    now = estimator_version()["source_sha256_16"]
    lines = ["## Estimator error", "",
             "`kubetune estimate` on the recipe recorded in each case (stored in the JSON by `harness.py report`) vs "
             "the stage's measured peaks; error = (estimate − measured) / measured. The estimator's source when "
             f"this was generated: {now} (sha256 of src/kubetune/estimate/*.py); rerun `harness.py report` on a "
             "file whose source differs to refresh its estimates.", ""]
    rows = []
    for row, stage, _, _ in estimator_errors(res):
        est = (row.run.get("estimate") or {})
        pm = row.reports[stage].get("peak_memory") or {}
        cells = (est_cells(est.get(stage) or {}, pm) if "error" not in est else f"{esc(est['error'])} | –")
        rows.append([row.case, stage, gib(pm.get("torch_allocated_bytes")), gib(pm.get("nvml_process_bytes")),
                     cells, (row.source["data"].get("estimator") or {}).get("source_sha256_16", "–"),
                     f"`{row.source['name']}`"])
    lines += table(["case", "stage", "measured alloc GiB", "measured NVML GiB", "estimate alloc GiB (err)",
                    "estimate NVML GiB (err)", "estimator source", "source"], rows) if rows else [NOT_MEASURED]
    left = sorted({f"{row.case} {stage} (`{row.source['name']}`)" for row in res.rows for stage in row.reports
                   if shares_a_process(row, stage)})
    if left:
        lines += ["", "Left out: merge and quantize peaks measured in the fine-tune's process, before the harness "
                  "ran each stage in its own process as a pod does (they included what the stage before left "
                  "allocated; the same cases re-measured that way are above): " + "; ".join(left) + "."]
    worst = worst_error(res)
    lines += ["", f"Max |error|: {worst[0]:.0f}% ({worst[1]}, {worst[2]}, {worst[3]})." if worst
              else f"Max |error|: {NOT_MEASURED}."]
    return lines + [""]


def profile_section(res: Results) -> list[str]:
    """Cases run with one extra step under torch.profiler (harness ``"profile": True``)."""
    rows = [r for r in res.rows if r.run.get("profile")]
    if not rows:
        return []
    lines = ["## Where a fine-tune step's time goes", "",
             "One micro-batch (forward + backward) after the measured steps, under torch.profiler: its wall time "
             "(inflated by the profiler), the GPU's busy time (sum of kernel times, barely inflated) and the "
             "kernels that take it. Compare the busy time with the median step of the same case.", ""]
    for row in rows:
        prof, s = row.run["profile"], row.summary
        matmul = sum(k["ms"] for k in prof["top"] if any(m in k["name"] for m in ("gemm", "nvjet", "cutlass")))
        lines += [f"**{row.case}** (`{row.source['name']}`): median step {num(s.get('step_ms_median'), '.1f')} ms; "
                  f"profiled micro-batch {prof['wall_ms']:.1f} ms wall, GPU busy {prof['device_busy_ms']:.1f} ms "
                  f"over {prof['kernels']:,} kernels; matrix multiplies among the top 20: {matmul:.1f} ms.", ""]
        lines += table(["kernel", "ms", "calls"], [[esc(k["name"][:90]), f"{k['ms']:.1f}", k["count"]]
                                                   for k in prof["top"][:12]]) + [""]
    return lines


# ---- quality -------------------------------------------------------------------------------------------------
def quality_metrics(run: dict) -> dict:
    """{model: metrics} from a quality run's evaluate report (stage report, or metrics.json's shape)."""
    ev = (run.get("reports") or {}).get("evaluate") or {}
    metrics = ev.get("metrics") if isinstance(ev.get("metrics"), dict) else ev.get("models")
    return metrics if isinstance(metrics, dict) else {}


def shipped_quality(quality: list[dict]) -> list[dict]:
    """The quality runs of the shipped Gemma recipe's settings, oldest first: the targets and README quote those.
    jobs/gemma3-270m-text2sql.yaml neither packs nor compiles; runs of issue 22's packed, compiled path (bench/
    quality.py --set finetune.packing=true ...) are in the quality tables, not in the targets."""
    def settings(src):
        return ((src["data"].get("recipe") or {}).get("finetune") or {})
    return [src for src in quality if not settings(src).get("packing") and not settings(src).get("compile")]


def fine_tuned(runs: dict) -> tuple[str, dict]:
    """The fine-tuned model every delta is taken against: the first run's merged model (as bench/quality.py's
    targets; a later run scores only its quantized model), else adapter on base; ("", {}) when none was scored."""
    for name, run in runs.items():
        metrics = quality_metrics(run)
        for model in ("merged", "adapter"):
            if isinstance(metrics.get(model), dict):
                return f"{name} {model}", metrics[model]
    return "", {}


def quality_table(quality: list[dict]) -> list[str]:
    lines = ["## Quality", ""]
    if not quality:
        return lines + [f"Quality: {NOT_MEASURED} (no `quality-*.json` in the results folder yet).", ""]
    for src in reversed(quality):  # newest first
        data, runs = src["data"].get("data") or {}, src["data"].get("runs") or {}
        ref_name, ref = fine_tuned(runs)
        lines += [f"### `{src['name']}` ({src['card']}, {src['env'].get('date')})", "",
                  f"Data: {data.get('source', '–')}, {data.get('train_rows', '–')} training rows, "
                  f"{data.get('heldout_rows', '–')} held-out rows. Percent of the held-out rows; Δ = points vs the "
                  f"fine-tuned model ({ref_name or NOT_MEASURED}).", ""]
        rows = []
        for name, run in runs.items():
            metrics = quality_metrics(run)
            for model in ("base", "adapter", "merged", "quantized"):
                m = metrics.get(model)
                if not isinstance(m, dict):
                    continue
                delta = [num(None if m is ref or k not in ref or k not in m else m[k] - ref[k], "+.2f")
                         for k in ("execution_accuracy", "exact_match")]
                rows.append([name, model, num(m.get("execution_accuracy"), ".2f"), num(m.get("exact_match"), ".2f"),
                             num(m.get("parse_rate"), ".2f"), m.get("examples", "–"), *delta])
            reports = run.get("reports") or {}
            stages = "; ".join(f"{st} {num(rep.get('duration_s'), '.0f')} s, peak "
                               f"{gib((rep.get('peak_memory') or {}).get('torch_allocated_bytes'))} GiB"
                               for st, rep in reports.items() if isinstance(rep, dict))
            gates = "; ".join(f"{g.get('gate')} {'pass' if g.get('passed') else 'FAIL'}"
                              for g in run.get("gates") or (reports.get("evaluate") or {}).get("gates") or [])
            error = run.get("error") if isinstance(run.get("error"), dict) else {}
            lines.append(f"- {name}: {stages or 'no stage reports'}" + (f"; gates: {gates}" if gates else "")
                         + (f"; error in {error.get('stage')}: {error.get('message')}" if error else ""))
        lines += [""] + (table(["run", "model", "execution accuracy %", "exact match %", "parse rate %", "n",
                                "Δ exec", "Δ exact"], rows) if rows else ["No evaluate report in this file."])
        lines.append("")
    return lines


# ---- chart ---------------------------------------------------------------------------------------------------
def chart_series(res: Results, card: str) -> list[tuple[str, str, dict]]:
    """(label, model, {stage: row}) per model: the original's recipe, then kubetune's (default + GPTQ case)."""
    series = []
    for model in res.models():
        base = res.get(f"{model}/baseline", card)
        if base and base.summary:
            series.append((f"{model} original (baseline)", model, {"finetune": base}))
        ours = {}
        for case in (DEFAULT_GPTQ_CASE.get(model), DEFAULT_CASE.get(model)):
            row = res.get(case, card) if case else None
            for stage in STAGES:
                if row and stage in row.reports and (stage != "finetune" or row.summary):
                    ours[stage] = row
        if ours:
            series.append((f"{model} kubetune ({ours.get('finetune', next(iter(ours.values()))).variant})", model,
                           ours))
    return series


def draw_chart(res: Results, card: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = chart_series(res, card)
    stages = [s for s in STAGES if any(s in rows for _, _, rows in series)]
    if not stages:
        return False
    palette = plt.get_cmap("tab10")
    colors = {m: palette(i) for i, m in enumerate(res.models())}
    dates = sorted({r.source["env"].get("date", "")[:10] for _, _, rows in series for r in rows.values()})
    fig, ax = plt.subplots(figsize=(12, 5.5), dpi=110)
    width = 0.8 / max(len([s for s in series if stage in s[2]]) for stage in stages)
    for x, stage in enumerate(stages):
        present = [s for s in series if stage in s[2]]
        for i, (label, model, rows) in enumerate(present):
            row = rows[stage]
            pos = x + (i - (len(present) - 1) / 2) * width
            alloc, nvml = row.peak(stage), row.peak(stage, "nvml_process_bytes")
            original = "original" in label
            ax.bar(pos, (alloc or 0) / GIB, width * 0.9, color=colors[model], alpha=0.45 if original else 1.0,
                   hatch="//" if original else None, edgecolor="black", linewidth=0.6, label=label)
            if nvml:
                ax.plot(pos, nvml / GIB, marker="_", markersize=18 * width / 0.2, color="black", mew=2,
                        label="NVML process peak (CUDA context included)")
            ax.annotate(f"{(alloc or 0) / GIB:.2f}", (pos, (alloc or 0) / GIB), ha="center", va="bottom",
                        fontsize=7.5, xytext=(0, 2), textcoords="offset points")
            if not label.endswith(f"({row.variant})"):  # the stage comes from another case (GPTQ): name it
                ax.annotate(row.variant, (pos, 0), rotation=90, ha="center", va="bottom", fontsize=7.5,
                            color="white", xytext=(0, 4), textcoords="offset points")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)
    ax.set_xticks(range(len(stages)), stages)
    ax.set_ylabel("peak GPU memory, torch allocated (GiB)")
    ax.set_xlabel("stage")
    ax.set_title(f"GPU memory per stage: {card}, {', '.join(dates)}\n(random-weight models of the published "
                 "shapes; merge and quantize from the GPTQ case named in the bar)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def chart_section(res: Results, results_dir: Path, out: Path) -> list[str]:
    lines = ["## Chart: GPU memory per stage", ""]
    for card in dict.fromkeys(s["card"] for s in reversed(res.sources)):
        path = results_dir / f"memory-per-stage-{re.sub(r'[^a-z0-9]+', '-', card.lower()).strip('-')}.png"
        if draw_chart(res, card, path):
            rel = os.path.relpath(path, out.parent)
            lines += [f"![GPU memory per stage, {card}]({rel})", "",
                      f"Bars: torch allocator peak per stage; black ticks: NVML per-process peak. Fine-tune: "
                      f"baseline and `DEFAULT_CASE`; merge and quantize: `DEFAULT_GPTQ_CASE` ({card}).", ""]
    return lines if len(lines) > 2 else lines + ["No stage measured yet.", ""]


# ---- targets -------------------------------------------------------------------------------------------------
def verdict(value, ok) -> tuple[str, str]:
    """(measured, met/missed); a falsy value (no data) is "not measured" in both cells."""
    return (value, "met" if ok else "missed") if value else (NOT_MEASURED, NOT_MEASURED)


def newest_gptq(res: Results, model: str, block_update: str) -> Row | None:
    """The newest GPTQ run of the model's default calibration whose block update was ``block_update``: since the
    harness stopped hiding GPTQModel's kernel (2026-12-06), ``<model>/gptq8`` is either, depending on the machine
    (nvcc or none); older files name the image's path ``<model>/gptq8-graphed``."""
    found = None
    for src in res.sources:  # oldest first
        for case in (f"{model}/gptq8", f"{model}/gptq8-graphed"):
            run = src["runs"].get(case)
            if run and "error" not in run and "quantize" in (run.get("reports") or {}):
                row = Row(src, run)
                if block_update_of(row, row.reports["quantize"]) == block_update:
                    found = row
    return found


def targets(res: Results, quality: list[dict]) -> list[str]:
    rows = []
    for model, (min_speed, max_peak, min_mfu) in TARGETS.items():
        ours = res.get(DEFAULT_CASE.get(model, ""))
        base, mark = res.reference(ours, f"{model}/baseline") if ours else (None, "")
        speed = ours.summary.get("tokens_per_s") if ours else None
        b_speed = base.summary.get("tokens_per_s") if base else None
        peak, b_peak = (ours.peak("finetune") if ours else None), (base.peak("finetune") if base else None)
        what = f"{model} fine-tune (`{DEFAULT_CASE.get(model)}`)"
        x_speed = speed / b_speed if speed and b_speed else None
        rows.append([what, f"≥ {min_speed:g}× baseline tokens/s",
                     *verdict(x_speed and f"{x_speed:.2f}×{mark} ({speed:,.0f} vs {b_speed:,.0f})",
                              x_speed and x_speed >= min_speed)])
        x_peak = peak / b_peak if peak and b_peak else None
        rows.append([what, f"peak ≤ {max_peak:g}× baseline's",
                     *verdict(x_peak and f"{x_peak:.2f}×{mark} ({gib(peak)} vs {gib(b_peak)} GiB)",
                              x_peak and x_peak <= max_peak)])
        if min_mfu is not None:
            mfu = ours.summary.get("mfu_4nt") if ours else None
            rows.append([what, f"MFU (4NT) ≥ {100 * min_mfu:g}%",
                         *verdict(mfu and f"{100 * mfu:.1f}%", mfu and mfu >= min_mfu)])
    for model, limit in GPTQ_TARGET_S.items():
        for case, kind, where in ((DEFAULT_GPTQ_CASE.get(model, ""), "cuda-graphs", "kubetune's image, no nvcc"),
                                  (COMPILED_GPTQ_CASE.get(model, ""), "cuda-kernel", "with nvcc (GPTQModel's kernel)")):
            row = newest_gptq(res, model, kind) or res.get(case)
            case = row.case if row else case
            q = row.reports.get("quantize") if row else None
            seconds, samples = (q or {}).get("seconds"), (q or {}).get("calibration_samples")
            rows.append([f"GPTQ {model}, {where} (`{case}`)",
                         f"≤ {limit:g} s with ≥ {GPTQ_MIN_SAMPLES} calibration samples",
                         *verdict(seconds and f"{seconds:.1f} s, {samples} samples",
                                  seconds and samples is not None and seconds <= limit
                                  and samples >= GPTQ_MIN_SAMPLES)])
    worst = worst_error(res)
    rows.append(["estimator", f"within {ESTIMATE_MAX_ERROR_PCT:g}% on every stage",
                 *verdict(worst and f"max abs error {worst[0]:.0f}% ({worst[1]}, {worst[2]}, {worst[3]})",
                          worst and worst[0] <= ESTIMATE_MAX_ERROR_PCT)])
    shipped = shipped_quality(quality)
    runs = (shipped[-1]["data"].get("runs") or {}) if shipped else {}
    ref_name, ref = fine_tuned(runs)
    acc = ref.get("execution_accuracy")
    rows.append(["quality: fine-tuned" + (f" ({ref_name})" if ref_name else ""),
                 f"execution accuracy ≥ {QUALITY_MIN_ACCURACY:g}%",
                 *verdict(acc is not None and f"{acc:.2f}%", acc is not None and acc >= QUALITY_MIN_ACCURACY)])
    for run, limit in QUALITY_MAX_DROP.items():
        q = quality_metrics(runs.get(run) or {}).get("quantized") or {}
        drop = (ref["execution_accuracy"] - q["execution_accuracy"]
                if "execution_accuracy" in ref and "execution_accuracy" in q else None)
        rows.append([f"quality: {run.replace('gptq', 'GPTQ-')}",
                     f"within {limit:g} point{'s' if limit > 1 else ''} of the fine-tuned",
                     *verdict(drop is not None and f"{drop:+.2f} points lost", drop is not None and drop <= limit)])
    return ["## Targets (issue 8)", "", "From the rows above: kubetune's case per model is `DEFAULT_CASE` / "
            "`DEFAULT_GPTQ_CASE` at the top of `bench/results_md.py`; quality from the newest `quality-*.json` of the "
            "shipped settings (`shipped_quality`).",
            ""] + table(["what", "target", "measured", "verdict"], rows) + [""]


# ---- README -------------------------------------------------------------------------------------------------
README_BEGIN = "<!-- bench headlines: generated by bench/results_md.py from bench/results/, do not edit -->"
README_END = "<!-- end of bench headlines -->"


def best_case(res: Results, model: str) -> tuple[Row | None, Row | None, str]:
    """(fastest measured fine-tune of the model, its baseline, ratio marker), by tokens/s over the baseline."""
    best = (None, None, "", 0.0)
    for row in res.of_model(model):
        base, mark = res.reference(row, f"{model}/baseline")
        speed, b_speed = row.summary.get("tokens_per_s"), base.summary.get("tokens_per_s") if base else None
        if speed and b_speed and not row.variant.startswith("baseline") and speed / b_speed > best[3]:
            best = (row, base, mark, speed / b_speed)
    return best[:3]


def speed_phrase(row: Row, base: Row, mark: str) -> str:
    s, b = row.summary["tokens_per_s"], base.summary["tokens_per_s"]
    files = sorted({row.source["name"], base.source["name"]})
    return (f"{s / b:.2f}×{mark} the tokens/s at {ratio(row.peak('finetune'), base.peak('finetune'))}× the "
            f"peak (`{row.case}` {s:,.0f} vs `{base.case}` {b:,.0f} tokens/s; {', '.join(f'`{f}`' for f in files)})")


def readme_headlines(res: Results, quality: list[dict], packed: list[str] = ()) -> list[str]:
    """The figures README.md quotes, each from the rows RESULTS.md shows, with the file it comes from; ``packed``:
    issue 22's lines (packed_md.readme_lines)."""
    lines = []
    quality = shipped_quality(quality)
    if quality:
        src = quality[-1]
        runs = src["data"].get("runs") or {}
        first = quality_metrics(next(iter(runs.values()), {}))
        accuracy = {name: quality_metrics(run).get("quantized", {}).get("execution_accuracy")
                    for name, run in runs.items()}
        seconds = sum(rep.get("duration_s") or 0 for run in runs.values()
                      for stage, rep in (run.get("reports") or {}).items()
                      if (run.get("status") or {}).get(stage) == "done")
        figures = [f"base {first.get('base', {}).get('execution_accuracy', 0):.1f}%",
                   f"fine-tuned {first.get('merged', {}).get('execution_accuracy', 0):.1f}%"] + \
            [f"{name.replace('gptq', 'GPTQ-')} {acc:.1f}%" for name, acc in accuracy.items() if acc is not None]
        heldout = (src["data"].get("data") or {}).get("heldout_rows")
        lines.append(f"- Gemma 3 270M on WikiSQL ({num(heldout, ',.0f')} "
                     f"held-out questions): {', '.join(figures)} execution accuracy; the stages that ran took "
                     f"{seconds:.0f} s in all on one {src['card']} (stage reports; the GGUF import before them is "
                     f"not timed) (`{src['name']}`).")
    for model in TARGETS:
        ours = res.get(DEFAULT_CASE.get(model, ""))
        base, mark = res.reference(ours, f"{model}/baseline") if ours else (None, "")
        if not (ours and base and ours.summary and base.summary):
            continue
        line = f"- {model} fine-tune against the original notebook's recipe, same card: shipped recipe " + \
            speed_phrase(ours, base, mark)
        best, best_base, best_mark = best_case(res, model)
        if best is not None and best.case != ours.case:
            line += "; fastest case measured " + speed_phrase(best, best_base, best_mark)
        lines.append(line + ".")
    lines += list(packed)
    if any("†" in line for line in lines):
        lines.append("- †: the baseline was measured in another device call on the same card.")
    # nested under README's "GPU measurements" item, wrapped as the rest of the file
    wrapped = [textwrap.fill(line, 118, initial_indent="  ", subsequent_indent="    ", break_on_hyphens=False)
               for line in lines]
    return [README_BEGIN] + wrapped + [README_END]


def update_readme(readme: Path, headlines: list[str]) -> str:
    """README.md with its headline block replaced by ``headlines``."""
    text = readme.read_text()
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    return text[:start] + "\n".join(headlines) + text[end:]


# ---- main ----------------------------------------------------------------------------------------------------
def generate(results_dir: Path, out: Path, readme: Path | None = None) -> str:
    res = Results(load_sources(results_dir, "gpu-*.json"))
    quality = load_sources(results_dir, "quality-*.json")
    lines = (header(res, quality) + original_table(res) + gptq_table(res) + block_update_section(results_dir)
             + levers_table(res)
             + profile_section(res) + packed_section(results_dir) + estimator_table(res) + quality_table(quality) + chart_section(res, results_dir, out)
             + targets(res, quality))
    text = "\n".join(lines).rstrip() + "\n"
    out.write_text(text)
    if readme is not None:
        readme.write_text(update_readme(readme, readme_headlines(res, quality, packed_readme_lines(results_dir))))
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(ROOT / "bench" / "results"), help="folder of gpu-*.json, quality-*.json")
    p.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"), help="the markdown file to write")
    p.add_argument("--readme", help="also rewrite this file's bench headline block (make bench-results: README.md)")
    args = p.parse_args(argv)
    out = Path(args.out)
    generate(Path(args.results), out, Path(args.readme) if args.readme else None)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
