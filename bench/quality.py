"""Real-model quality: a recipe fine-tuned once, quantized with GPTQ at 8 and at 4 bits, every model scored.

    python bench/quality.py --data PATH/wikisql_train.jsonl --out DIR [--set key=value ...] [--bits 8,4]

Run 1 (``<run>-gptq8``) is the recipe (``--recipe``, default ``jobs/gemma3-270m-text2sql.yaml``) through kubetune's
own runner (:func:`kubetune.runner.run_pipeline`, what ``kubetune run`` calls), one stage at a time: finetune,
merge, quantize, infer (base, merged, quantized), evaluate. Each later run (``<run>-gptq4``) starts from hard links
of run 1's finished ``finetune/`` and ``merge/`` folders: their fingerprints do not depend on ``quantize``, so the
runner skips both, and only quantize, infer (quantized alone) and evaluate run. Its gate is the recipe's
``quantized_max_drop`` turned into ``quantized_min_execution_accuracy`` = run 1's merged accuracy minus that drop.

DIR gets ``quality.json`` (rewritten after every stage, so a run cut short still leaves what it did)::

    {"environment": {date, card, versions, command, device_command, ...},
     "data": {source, train_rows, heldout_rows, ...}, "recipe": <run 1's resolved recipe>,
     "runs": {"gptq8": {"run_dir", "status": {stage: done|skipped|failed}, "reports": {stage: report.json},
                        "gates": [...], "gate_error", "error"}, "gptq4": {...}},
     "targets": [{"target", "value", "limit", "passed"}]}

and the evaluator's per-example outcomes, ``<run key>-outcomes-<model>.jsonl`` (at most 5 files, ≤ 16 MB each).
Exit status: 0 when every stage ran and every gate passed; 8 when only gates failed; else the failed stage's
exit code (docs/exit-codes.md), 1 for an unexpected error. Artifacts go to ``--work`` (default
/tmp/kubetune-quality): a second call with the same settings skips what the first one finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]  # kubetune without installing it; bench/harness.py

from harness import environment as harness_environment  # noqa: E402

from kubetune.artifacts import RunLayout, write_atomic  # noqa: E402
from kubetune.config import Recipe, load_recipe  # noqa: E402
from kubetune.errors import GateError, KubetuneError  # noqa: E402

QUALITY_FILE = "quality.json"
MAX_COPIED = 5          # outcome files; with quality.json and gpu_quality.sh's two logs ≤ 8 files come back
MAX_COPY_BYTES = 16 * 2**20
REUSED_STAGES = ("finetune", "merge")
# The quality issue's targets: the fine-tuned (merged) model's execution accuracy, and the points each GPTQ
# model may lose against it.
TARGET_MIN_ACCURACY = 75.0
TARGET_MAX_DROP = {8: 0.5, 4: 2.0}

log = logging.getLogger("kubetune.quality")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the Text-to-SQL .jsonl (data.source)")
    p.add_argument("--out", required=True, help="folder for quality.json and the outcome files")
    p.add_argument("--recipe", default=str(ROOT / "jobs" / "gemma3-270m-text2sql.yaml"))
    p.add_argument("--work", default="/tmp/kubetune-quality", help="run.artifacts_root of every run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="recipe override, as `kubetune run --set` (repeatable)")
    p.add_argument("--bits", default="8,4", help="GPTQ bits of each run, in order (the first one fine-tunes)")
    args = p.parse_args(argv)
    try:
        args.bits = [int(b) for b in args.bits.split(",") if b.strip()]
    except ValueError:
        p.error(f"--bits {args.bits}: expected numbers such as 8,4")
    if not args.bits or any(b not in (4, 8) for b in args.bits) or len(set(args.bits)) != len(args.bits):
        p.error(f"--bits {args.bits}: each of 8 and 4 at most once")
    return args


def environment() -> dict:
    env = harness_environment()
    env.setdefault("card", "cpu")
    env["device_command"] = os.environ.get("KUBETUNE_DEVICE_COMMAND")
    return env


def data_summary(recipe: Recipe) -> dict:
    from kubetune.data import load_splits

    splits = load_splits(recipe.data)
    return {"source": recipe.data.source, "train_rows": len(splits.train), "heldout_rows": len(splits.eval),
            "eval_size": recipe.data.eval_size, "seed": recipe.data.seed}


def link_tree(src: Path, dst: Path) -> None:
    """``dst`` as a copy of the finished stage folder ``src``, hard-linked where the file system allows."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    tmp = dst.with_name(f".{dst.name}.linking")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=link)
    os.replace(tmp, dst)


def reuse_stages(first: Recipe, recipe: Recipe) -> None:
    """Give ``recipe``'s run run 1's finished finetune and merge, so that the runner skips them."""
    src, dst = RunLayout.from_recipe(first), RunLayout.from_recipe(recipe)
    for stage in REUSED_STAGES:
        if stage not in recipe.stages or dst.marker(stage) is not None:
            continue  # an earlier call already did it (a stale one is the runner's to refuse)
        if src.state(stage, first.fingerprint(stage)) != "done":
            raise KubetuneError(f"{src.stage_dir(stage)}: run 1's {stage} has not finished; nothing to reuse")
        dst.run_dir.mkdir(parents=True, exist_ok=True)
        link_tree(src.stage_dir(stage), dst.stage_dir(stage))


def read_metrics(layout: RunLayout, recipe: Recipe) -> dict:
    """The evaluate stage's metrics.json, if this recipe made it (not an older recipe's left in the same run)."""
    from kubetune.errors import ArtifactError
    from kubetune.stages.evaluate import load_metrics

    if layout.state("evaluate", recipe.fingerprint("evaluate")) != "done":
        return {}
    try:
        return load_metrics(layout.stage_dir("evaluate"))
    except ArtifactError:
        return {}


class Quality:
    """The runs, and quality.json rewritten after each stage."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.doc: dict = {"environment": environment(), "data": {"source": args.data}, "recipe": None, "runs": {}}
        self.exit_code = 0
        self.gate_failed = False

    def save(self) -> None:
        write_atomic(self.out / QUALITY_FILE, json.dumps(self.doc, indent=2, default=str) + "\n")

    def fail(self, what: str, exc: BaseException) -> int:
        code = exc.exit_code if isinstance(exc, KubetuneError) else 1
        print(f"quality: {what} failed (exit {code}): {exc}", file=sys.stderr, flush=True)
        if not isinstance(exc, KubetuneError):
            traceback.print_exc()
        self.exit_code = self.exit_code or code
        return code

    def recipe_for(self, bits: int, first: Recipe | None) -> Recipe:
        base = [f"data.source={Path(self.args.data).absolute()}",
                f"run.artifacts_root={Path(self.args.work).absolute()}", *self.args.overrides]
        name = load_recipe(self.args.recipe, base).run.name
        extra = [f"quantize.bits={bits}", f"run.name={name}-gptq{bits}"]
        if first is not None:
            extra.append("infer.models=[quantized]")
            merged = read_metrics(RunLayout.from_recipe(first), first).get("models", {}).get("merged", {})
            drop = first.evaluate.gates.get("quantized_max_drop")
            if "execution_accuracy" in merged and drop is not None:
                floor = max(0.0, round(merged["execution_accuracy"] - drop, 2))
                extra.append(f"evaluate.gates={{quantized_min_execution_accuracy: {floor}}}")
            else:
                extra.append("evaluate.gates={}")
        return load_recipe(self.args.recipe, base + extra)

    def run(self, key: str, recipe: Recipe) -> bool:
        """All of ``recipe``'s stages through the runner; False when a stage failed (gates are not failures)."""
        from rich.console import Console

        from kubetune.runner import run_pipeline

        layout = RunLayout.from_recipe(recipe)
        entry = self.doc["runs"][key] = {"run_dir": str(layout.run_dir), "status": {}, "reports": {}}
        console = Console(width=140)
        ok = True
        for stage in recipe.stages:
            try:
                entry["status"][stage] = run_pipeline(recipe, [stage], console=console)[0].status
            except GateError as exc:  # the evaluate artifact is committed before its gates are checked
                entry["status"][stage], entry["gate_error"] = "done", str(exc)
                self.gate_failed = True
                print(f"quality: {key}: {exc}", file=sys.stderr, flush=True)
            except BaseException as exc:  # noqa: BLE001 - recorded, then the run stops
                entry["status"][stage] = "failed"
                entry["error"] = {"stage": stage, "type": type(exc).__name__, "message": str(exc),
                                  "exit_code": self.fail(f"{key}: stage {stage}", exc)}
                ok = False
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):  # a kill (SIGTERM: exit 143): stop here
                    self.save()
                    raise
            if (report := layout.read_report(stage)) is not None and layout.marker(stage) is not None:
                entry["reports"][stage] = report
            if stage == "evaluate" and (gates := read_metrics(layout, recipe).get("gates")) is not None:
                entry["gates"] = gates
            self.save()
            if not ok:
                break
        return ok

    def main(self) -> int:
        first: Recipe | None = None
        try:
            first = self.recipe_for(self.args.bits[0], None)
            self.doc["recipe"] = first.model_dump(mode="json")
            self.doc["data"] = data_summary(first)
        except BaseException as exc:  # noqa: BLE001
            self.doc["error"] = str(exc)
            self.save()
            return self.fail("reading the recipe and data", exc)
        self.save()
        for i, bits in enumerate(self.args.bits):
            key = f"gptq{bits}"
            try:
                recipe = first if i == 0 else self.recipe_for(bits, first)
                if i > 0:
                    reuse_stages(first, recipe)
            except BaseException as exc:  # noqa: BLE001
                self.doc["runs"][key] = {"error": {"stage": None, "message": str(exc),
                                                   "exit_code": self.fail(f"{key}: setting up", exc)}}
                self.save()
                continue
            self.run(key, recipe)
            if i == 0 and not all(RunLayout.from_recipe(first).state(s, first.fingerprint(s)) == "done"
                                  for s in REUSED_STAGES):
                break  # nothing to reuse: the other runs cannot start
        self.doc["targets"] = self.targets()
        self.doc["copied"] = self.copy_outcomes()
        self.save()
        print(self.summary(), flush=True)
        if self.exit_code == 0 and self.gate_failed:
            self.exit_code = GateError.exit_code
        return self.exit_code

    # ---- results -------------------------------------------------------------------------------------------
    def accuracy(self) -> dict[str, dict]:
        """Rows of the summary: model label → that model's evaluate metrics (run 1's base and merged, each run's
        quantized model)."""
        rows: dict[str, dict] = {}
        for key, entry in self.doc["runs"].items():
            models = ((entry.get("reports", {}).get("evaluate") or {}).get("metrics")) or {}
            for model, metrics in models.items():
                label = key if model == "quantized" else model
                rows.setdefault(label, metrics)
        return rows

    def targets(self) -> list[dict]:
        rows = self.accuracy()
        merged = rows.get("merged", {}).get("execution_accuracy")
        out = [{"target": "merged execution accuracy", "value": merged, "limit": TARGET_MIN_ACCURACY,
                "passed": None if merged is None else merged >= TARGET_MIN_ACCURACY}]
        for bits in self.args.bits:
            acc = rows.get(f"gptq{bits}", {}).get("execution_accuracy")
            drop = None if acc is None or merged is None else round(merged - acc, 2)
            out.append({"target": f"gptq{bits} points lost vs merged", "value": drop, "limit": TARGET_MAX_DROP[bits],
                        "passed": None if drop is None else drop <= TARGET_MAX_DROP[bits]})
        return out

    def copy_outcomes(self) -> list[str]:
        copied = []
        for key, entry in self.doc["runs"].items():
            folder = Path(entry.get("run_dir", "")) / "evaluate"
            for path in sorted(folder.glob("outcomes-*.jsonl")) if entry.get("reports", {}).get("evaluate") else []:
                if len(copied) >= MAX_COPIED:
                    log.warning("%s: not copied (at most %d outcome files)", path, MAX_COPIED)
                elif path.stat().st_size > MAX_COPY_BYTES:
                    log.warning("%s: not copied (%d bytes > %d)", path, path.stat().st_size, MAX_COPY_BYTES)
                else:
                    name = f"{key}-{path.name}"
                    shutil.copyfile(path, self.out / name)
                    copied.append(name)
        return copied

    def summary(self) -> str:
        rows = self.accuracy()
        merged = rows.get("merged", {}).get("execution_accuracy")
        base = rows.get("base", {}).get("execution_accuracy")
        lines = [f"{'model':<8} {'exec acc':>9} {'exact':>8} {'parses':>8} {'examples':>9} {'Δ vs merged':>12} "
                 f"{'Δ vs base':>10}"]
        for label, m in rows.items():
            acc = m.get("execution_accuracy", 0.0)
            d_merged = "" if merged is None or label in ("merged", "base") else f"{acc - merged:+.2f}"
            d_base = "" if base is None or label == "base" else f"{acc - base:+.2f}"
            lines.append(f"{label:<8} {acc:>8.2f}% {m.get('exact_match', 0):>7.2f}% {m.get('parse_rate', 0):>7.2f}% "
                         f"{m.get('examples', ''):>9} {d_merged:>12} {d_base:>10}")
        for t in self.doc.get("targets", []):
            verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["passed"]]
            lines.append(f"target {t['target']}: {verdict} ({t['value']} vs {t['limit']})")
        for key, entry in self.doc["runs"].items():
            status = ", ".join(f"{s} {v}" for s, v in entry.get("status", {}).items())
            lines.append(f"run {key}: {status or 'not run'}")
            for g in entry.get("gates", []):
                lines.append(f"  gate {g['gate']}: {'PASS' if g['passed'] else 'FAIL'} — {g['detail']}")
            if entry.get("error"):
                lines.append(f"  error in {entry['error'].get('stage')}: {entry['error'].get('message')}")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return Quality(parse_args(argv)).main()


if __name__ == "__main__":
    sys.exit(main())
