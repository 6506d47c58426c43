"""The local runner: a recipe's stages in this process, in order, with progress bars and a closing summary.

Stages already finished with the same fingerprint are skipped, so a second ``kubetune run`` only does what
changed; a fine-tune that was interrupted resumes from its checkpoint. The Kubernetes driver runs the very
same :func:`kubetune.stages.run_stage`, one pod per stage.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from kubetune.artifacts import RunLayout
from kubetune.config import HELDOUT_SET, Recipe
from kubetune.stage_report import peak_of, report_of
from kubetune.stages import StageResult, run_stage
from kubetune.terminal import literal, printable

GIB = 2**30


def run_pipeline(recipe: Recipe, stages: list[str] | None = None, console: Console | None = None,
                 samples: int = 3) -> list[StageResult]:
    console = console or Console(stderr=False)
    stages = stages or list(recipe.stages)
    results: list[StageResult] = []
    console.print(Text.assemble(("run", "bold"), f" {recipe.run.name}  ",
                                (printable(RunLayout.from_recipe(recipe).run_dir), "dim")))
    with Progress(TextColumn("{task.fields[stage]:<9}"), BarColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console, transient=False) as bars:
        tasks = {s: bars.add_task("waiting", stage=s, total=None, start=False) for s in stages}

        def progress(stage: str, completed: float, total: float | None, description: str) -> None:
            task = tasks.get(stage)
            if task is not None:
                bars.update(task, completed=completed, total=total, description=description)

        for stage in stages:
            bars.start_task(tasks[stage])
            bars.update(tasks[stage], description="running")
            try:
                result = run_stage(recipe, stage, progress=progress)
            except BaseException:
                bars.update(tasks[stage], description="[red]failed")
                raise
            finally:
                bars.stop_task(tasks[stage])
            done = bars.tasks[tasks[stage]].total or 1
            bars.update(tasks[stage], total=done, completed=done,
                        description="skipped (already done)" if result.status == "skipped" else "done")
            results.append(result)
    console.print(summary_table(results))
    if any(r.stage == "evaluate" for r in results):
        layout = RunLayout.from_recipe(recipe)
        console.print(answers_table(layout, recipe.infer.models, samples))
        for eval_set in recipe.eval_sets():
            console.print(accuracy_table(layout, eval_set))
    return results


def _peak(report: dict) -> str:
    peak = peak_of(report)
    parts = []
    if peak.gpu_bytes:
        parts.append(f"GPU {peak.gpu_bytes / GIB:.2f} GiB")
    if peak.host_rss_bytes:
        parts.append(f"RSS {peak.host_rss_bytes / GIB:.2f} GiB")
    return ", ".join(parts) or "–"


def key_metric(stage: str, report: dict) -> str:
    """The one figure a user looks for first in each stage's report (its report model's headline)."""
    return report_of(stage, report).headline()


def summary_table(results: list[StageResult]) -> Table:
    table = Table(title="stages", title_justify="left")
    for col in ("stage", "status", "time", "peak memory", "key metric"):
        table.add_column(col)
    for r in results:
        seconds = r.report.get("duration_s")
        table.add_row(r.stage, r.status, f"{seconds:.1f} s" if seconds is not None else "–", _peak(r.report),
                      key_metric(r.stage, r.report))
    return table


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _short(text: str, limit: int = 160) -> str:
    """A table cell, not a wall: a rambling base model repeats itself for dozens of lines."""
    lines = text.splitlines() or [""]
    cut = lines[0] if len(lines) == 1 else lines[0] + f" … (+{len(lines) - 1} lines)"
    return cut if len(cut) <= limit else cut[: limit - 1] + "…"


def answers_table(layout: RunLayout, models: list[str], samples: int) -> Table:
    """A few held-out questions with each model's answer, marked by whether its result matched the gold."""
    evaluate_dir = layout.stage_dir("evaluate")
    outcomes = {m: _read_jsonl(evaluate_dir / f"outcomes-{m}.jsonl") for m in models}
    table = Table(title="held-out questions (✓ = same result as the gold query in SQLite)", title_justify="left",
                  show_lines=True)
    table.add_column("question / gold")
    for m in models:
        table.add_column(m)
    first = next((rows for rows in outcomes.values() if rows), [])
    for i, row in enumerate(first[:samples]):
        cells = []
        for m in models:
            rows = outcomes[m]
            o = rows[i] if i < len(rows) else {}
            mark = "✓" if o.get("execution_match") else "✗"
            cells.append(literal(f"{mark} {_short(o.get('prediction', ''))}"))  # model text: never markup
        table.add_row(Text.assemble(printable(row.get("question", "")), "\n",
                                    (printable(row.get("gold", "")), "dim")), *cells)
    return table


def accuracy_table(layout: RunLayout, eval_set: str = HELDOUT_SET) -> Table:
    path = layout.stage_dir("evaluate", eval_set) / "metrics.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    title = "evaluation" if eval_set == HELDOUT_SET else f"evaluation on set {eval_set}"
    table = Table(title=title, title_justify="left")
    for col in ("model", "execution accuracy", "exact match", "SQL parses", "examples"):
        table.add_column(col)
    for model, m in (data.get("models") or {}).items():
        table.add_row(model, f"{m.get('execution_accuracy', 0):.1f}%", f"{m.get('exact_match', 0):.1f}%",
                      f"{m.get('parse_rate', 0):.1f}%", str(m.get("examples", "")))
    return table
