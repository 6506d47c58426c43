"""``kubetune report``: one markdown + HTML report (and a PNG chart) from the stage reports of one or more runs.

    report = build_report([Path("artifacts/bloom-1b1-lora"), Path("artifacts/bloom-7b1-qlora")])
    write_report(report, Path("report"))        # report.md, report.html, memory.png, estimate-<run>.json

Everything comes from ``<run>/<stage>/report.json`` (read through :class:`kubetune.artifacts.RunLayout`) and
``<run>/evaluate/metrics.json`` (and ``<run>/sets/<set>/evaluate/metrics.json`` for named evaluation sets); the
estimate is recomputed from the recipe each stage report carries (or the
``--recipe`` given for runs made before reports carried it). Several runs side by side make the "GPU buying
guide": the same stages on other models, precisions or cards.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.artifacts import RunLayout
from kubetune.config import STAGE_NAMES
from kubetune.stage_report import human_duration, peak_of, report_of

log = logging.getLogger(__name__)

GIB = 2**30
CHART_FILE = "memory.png"


# ---- reading -------------------------------------------------------------------------------------------------------
@dataclass
class RunData:
    name: str
    path: Path
    reports: dict[str, dict]
    """stage → its report.json, for the stages that finished."""
    evaluation: dict | None = None
    """The held-out split's metrics.json."""
    set_evaluations: dict[str, dict] = field(default_factory=dict)
    """Named evaluation set → its metrics.json (evaluate.sets)."""
    recipe: dict | None = None
    """The recipe as the stage reports recorded it (or as --recipe gave it)."""
    estimate: dict | None = None
    """``Estimate.to_dict()`` for this run's recipe, when one could be computed."""
    estimate_error: str | None = None

    @property
    def model(self) -> str:
        return next((r.get("model") for r in self.reports.values() if r.get("model")), "?")


def read_run(run_dir: Path) -> RunData:
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir.parent, run_dir.name)
    reports = {stage: report for stage in STAGE_NAMES if (report := layout.read_report(stage)) is not None}
    sets = sorted(p.parent.parent.name for p in run_dir.glob("sets/*/evaluate/_SUCCESS"))
    set_evaluations = {s: e for s in sets if (e := _read_metrics(layout.stage_dir("evaluate", s))) is not None}
    recipe = next((r["recipe"] for r in reports.values() if isinstance(r.get("recipe"), dict)), None)
    return RunData(name=run_dir.name, path=run_dir, reports=reports, evaluation=_read_metrics(
        layout.stage_dir("evaluate")), set_evaluations=set_evaluations, recipe=recipe)


def _read_metrics(evaluate_dir: Path) -> dict | None:
    path = evaluate_dir / "metrics.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("%s: unreadable (%s)", path, exc)
        return None


def attach_estimates(runs: list[RunData], recipes: dict[str, Any] | None = None, model_config=None) -> None:
    """Compute each run's estimate from its recipe; a failure (no config offline, say) is noted, not raised."""
    from kubetune.config import recipe_from_dict
    from kubetune.errors import KubetuneError
    from kubetune.estimate import estimate_recipe

    for run in runs:
        recipe = (recipes or {}).get(run.name)
        if recipe is None and run.recipe is not None:
            try:
                recipe = recipe_from_dict(dict(run.recipe), f"{run.path} (recipe in report.json)")
            except KubetuneError as exc:
                run.estimate_error = str(exc)
                continue
        if recipe is None:
            continue
        run.recipe = recipe.model_dump(mode="json")
        try:
            run.estimate = estimate_recipe(recipe, model_config=model_config, suggest=False).to_dict()
        except KubetuneError as exc:
            run.estimate_error = str(exc).splitlines()[0]


# ---- figures -----------------------------------------------------------------------------------------------------
def gpu_peak(report: dict) -> int | None:
    """What the process held on the GPU (:attr:`kubetune.stage_report.PeakMemory.gpu_bytes`)."""
    return peak_of(report).gpu_bytes


def gpu_allocated(report: dict) -> int | None:
    return peak_of(report).torch_allocated_bytes or None


def host_rss(report: dict) -> int | None:
    return peak_of(report).host_rss_bytes or None


def gib(n: int | float | None) -> str:
    """Bytes for people: GiB with two decimals, or MiB/KiB for the small figures of tiny test models."""
    if n is None:
        return "—"
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def count(n: int | float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def by_dtype(parameters: dict | None, trainable: bool = False) -> str:
    """'bfloat16 1.07B, nf4 6.04B (trainable 31.5M)' from count_parameters()' output (or one per model).

    Trainable counts only mean something for the fine-tune: a model loaded for inference leaves requires_grad on.
    """
    if not parameters:
        return "—"
    if "by_dtype" not in parameters:  # infer: one entry per model
        return "; ".join(f"{m}: {by_dtype(p)}" for m, p in parameters.items() if isinstance(p, dict))
    text = ", ".join(f"{k} {count(v)}" for k, v in parameters["by_dtype"].items())
    if trainable and parameters.get("trainable"):
        text += f" (trainable {count(parameters['trainable'])})"
    return text


def footprint(report: dict) -> str:
    value = report.get("memory_footprint_bytes")
    if isinstance(value, dict):  # infer: one per model
        return "; ".join(f"{m}: {gib(v)}" for m, v in value.items())
    return gib(value) if isinstance(value, (int, float)) else "—"


# ---- the report as tables ------------------------------------------------------------------------------------------
@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    runs: list[RunData]
    tables: list[Table]
    chart_title: str
    chart_png: bytes | None
    notes: list[str]
    created: str


def stage_tables(runs: list[RunData]) -> list[Table]:
    tables = []
    for stage in STAGE_NAMES:
        rows = []
        for run in runs:
            r = run.reports.get(stage)
            if r is None:
                continue
            model = report_of(stage, r)
            rows.append([run.name, human_duration(model.duration_s), gib(gpu_peak(r)), gib(gpu_allocated(r)),
                         gib(host_rss(r)), footprint(r), by_dtype(r.get("parameters"), model.counts_trainable),
                         model.throughput_text()])
        if rows:
            tables.append(Table(stage, ["run", "time", "peak GPU (process)", "peak GPU (torch allocated)",
                                        "peak host RSS", "footprint", "parameters by dtype", "throughput"], rows))
    return tables


def evaluation_table(runs: list[RunData]) -> Table | None:
    """One row per run, evaluation set (the held-out split first) and model; a failed gate is marked."""
    from kubetune.config import HELDOUT_SET

    rows = []
    for run in runs:
        for eval_set, evaluation in {HELDOUT_SET: run.evaluation, **run.set_evaluations}.items():
            models = (evaluation or {}).get("models") or {}
            base = models.get("base", {}).get("execution_accuracy")
            failed = [g["gate"] for g in (evaluation or {}).get("gates") or [] if not g.get("passed")]
            for name, m in models.items():
                ex = m.get("execution_accuracy")
                delta = "" if name == "base" or base is None or ex is None else f"{ex - base:+.1f}"
                rows.append([run.name, eval_set, name, _pct(ex), delta, _pct(m.get("exact_match")),
                             _pct(m.get("parse_rate")), str(m.get("examples", "—")),
                             ", ".join(failed) if name == next(iter(models)) else ""])
    if not rows:
        return None
    return Table("evaluation", ["run", "set", "model", "execution accuracy", "Δ vs base (points)", "exact match",
                                "SQL parses", "examples", "failed gates"], rows,
                 ["execution accuracy: the predicted SQL returns the same result as the gold SQL on generated "
                  "SQLite databases (test-suite accuracy)",
                  f"set: {HELDOUT_SET} is the held-out split of data.source; the others are evaluate.sets"])


def _pct(v) -> str:
    return f"{v:.1f}%" if isinstance(v, (int, float)) else "—"


def estimate_table(runs: list[RunData]) -> Table | None:
    rows = []
    notes = []
    for run in runs:
        if run.estimate_error:
            notes.append(f"{run.name}: no estimate ({run.estimate_error})")
        if not run.estimate:
            continue
        for s in run.estimate["stages"]:
            r = run.reports.get(s["stage"])
            if r is None:
                continue
            measured, allocated = gpu_peak(r), gpu_allocated(r)
            rows.append([run.name, s["stage"], gib(s["total_bytes"]), gib(measured), _ratio(s["total_bytes"], measured),
                         gib(s["allocated_bytes"]), gib(allocated), _ratio(s["allocated_bytes"], allocated)])
    if not rows:
        return None if not notes else Table("estimate vs measured", [], [], notes)
    if any(row[3] == "—" for row in rows):
        notes.append("— : no GPU figure in the stage report (a CPU run); the estimate is what a GPU would need")
    return Table("estimate vs measured", ["run", "stage", "estimated (nvidia-smi)", "measured (process)",
                                          "estimate / measured", "estimated (torch allocated)",
                                          "measured (torch allocated)", "estimate / measured"], rows, notes)


def _ratio(estimate, measured) -> str:
    return f"{estimate / measured:.2f}" if measured else "—"


# ---- the chart -----------------------------------------------------------------------------------------------------
def chart(runs: list[RunData]) -> tuple[str, bytes | None]:
    """Grouped bars, one group per stage and one colour per run: peak GPU memory, or host RSS when no stage has a
    GPU figure (CPU runs). Estimates, where known, are black ticks over the bars. Returns (title, PNG bytes)."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    stages = [s for s in STAGE_NAMES if any(s in run.reports for run in runs)]
    if not stages:
        return "no stage reports", None
    use_gpu = any(gpu_peak(run.reports[s]) for run in runs for s in stages if s in run.reports)
    value = gpu_peak if use_gpu else host_rss
    title = ("Peak GPU memory per stage (process, as nvidia-smi shows it)" if use_gpu else
             "Peak host RSS per stage (CPU runs: no GPU figures were recorded)")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(stages) * max(1, len(runs)) ** 0.5 + 3), 4.2), dpi=120)
    width = 0.8 / max(1, len(runs))
    labelled = False  # one legend entry for all estimate ticks
    for i, run in enumerate(runs):
        est = ({s["stage"]: s["total_bytes"] / GIB for s in run.estimate["stages"]}
               if use_gpu and run.estimate else {})
        xs, ys, tops = [], [], []
        ex, ey = [], []
        for j, stage in enumerate(stages):
            v = value(run.reports[stage]) if stage in run.reports else None
            if not v:
                continue
            x = j - 0.4 + width * (i + 0.5)
            xs.append(x)
            ys.append(v / GIB)
            tops.append(max(v / GIB, est.get(stage, 0)))
            if stage in est:
                ex.append(x)
                ey.append(est[stage])
        ax.bar(xs, ys, width=width * 0.92, label=run.name)
        for x, y, top in zip(xs, ys, tops):  # the value above the bar or above its estimate tick
            ax.annotate(f"{y:.2f}" if y < 10 else f"{y:.1f}", (x, top), ha="center", va="bottom", fontsize=7,
                        xytext=(0, 3), textcoords="offset points")
        if ex:
            ax.scatter(ex, ey, marker="_", s=300 * width, color="black", zorder=3,
                       label=None if labelled else "estimate")
            labelled = True
    ax.set_xticks(range(len(stages)), stages)
    ax.set_ylabel("GiB")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return title, buf.getvalue()


# ---- assembling and writing ------------------------------------------------------------------------------------
def build_report(run_dirs: list[Path], recipes: dict[str, Any] | None = None, model_config=None,
                 estimates: bool = True) -> Report:
    runs = [read_run(Path(p)) for p in run_dirs]
    notes = [f"{run.path}: no finished stage reports" for run in runs if not run.reports]
    if estimates:
        attach_estimates(runs, recipes, model_config)
    tables = stage_tables(runs)
    for extra in (evaluation_table(runs), estimate_table(runs)):
        if extra is not None:
            tables.append(extra)
    title, png = chart(runs)
    return Report(runs=runs, tables=tables, chart_title=title, chart_png=png, notes=notes,
                  created=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(report: Report) -> str:
    lines = ["# kubetune report", "", f"Created {report.created}.", ""]
    lines += ["| run | model | stages | folder |", "|---|---|---|---|"]
    for run in report.runs:
        lines.append(f"| {_md_cell(run.name)} | {_md_cell(run.model)} | {', '.join(run.reports) or '—'} | "
                     f"{_md_cell(str(run.path))} |")
    lines.append("")
    for note in report.notes:
        lines.append(f"> {note}")
    if report.chart_png:
        lines += ["", f"![{report.chart_title}]({CHART_FILE})", ""]
    for table in report.tables:
        lines += [f"## {table.title}", ""]
        if table.columns:
            lines.append("| " + " | ".join(map(_md_cell, table.columns)) + " |")
            lines.append("|" + "---|" * len(table.columns))
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in table.rows]
            lines.append("")
        lines += [f"- {note}" for note in table.notes]
        if table.notes:
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:left}th{background:#f3f3f3}td:nth-child(n+2){font-variant-numeric:tabular-nums}img{max-width:100%}
.note{color:#555;font-size:.9em}"""


def to_html(report: Report) -> str:
    e = html.escape
    out = ["<!doctype html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">", "<title>kubetune report</title>",
           f"<style>{_CSS}</style></head><body>", "<h1>kubetune report</h1>", f"<p>Created {e(report.created)}.</p>",
           "<table><tr><th>run</th><th>model</th><th>stages</th><th>folder</th></tr>"]
    for run in report.runs:
        out.append(f"<tr><td>{e(run.name)}</td><td>{e(run.model)}</td><td>{e(', '.join(run.reports) or '—')}</td>"
                   f"<td>{e(str(run.path))}</td></tr>")
    out.append("</table>")
    out += [f"<p class=\"note\">{e(n)}</p>" for n in report.notes]
    if report.chart_png:  # embedded, so the HTML file stands alone
        data = base64.b64encode(report.chart_png).decode()
        out.append(f"<figure><img alt=\"{e(report.chart_title)}\" src=\"data:image/png;base64,{data}\">"
                   f"<figcaption class=\"note\">{e(report.chart_title)}</figcaption></figure>")
    for table in report.tables:
        out.append(f"<h2>{e(table.title)}</h2>")
        if table.columns:
            out.append("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in table.columns) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in table.rows]
            out.append("</table>")
        out += [f"<p class=\"note\">{e(n)}</p>" for n in table.notes]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(report: Report, out_dir: Path) -> list[Path]:
    from kubetune.artifacts import write_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if report.chart_png:
        (out_dir / CHART_FILE).write_bytes(report.chart_png)
        written.append(out_dir / CHART_FILE)
    for name, text in (("report.md", to_markdown(report)), ("report.html", to_html(report))):
        write_atomic(out_dir / name, text)
        written.append(out_dir / name)
    for run in report.runs:  # the estimate behind the comparison, kept beside it
        if run.estimate:
            path = out_dir / f"estimate-{run.name}.json"
            write_atomic(path, json.dumps(run.estimate, indent=2) + "\n")
            written.append(path)
    return written
