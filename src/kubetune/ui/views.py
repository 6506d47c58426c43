"""HTML for the compare UI: pure functions of the backend's results, so they are tested without a browser.

Every text that comes from a model, a data set or a user is escaped: a generated answer is untrusted input.
Cards carry ``data-model`` and ``data-verdict`` (pass | fail | none) so that tests and scripts read the page
without scraping prose.
"""

from __future__ import annotations

from html import escape

from kubetune.ui.backend import Comparison, Execution, Loaded
from kubetune.ui.memory import GpuMemory

CSS = """
.kt-grid {display: grid; grid-template-columns: repeat(auto-fit, minmax(260px, 1fr)); gap: 12px;}
.kt-card {border: 1px solid #d0d7de; border-radius: 8px; padding: 10px; background: #fff; color: #1f2328;}
.kt-card h4 {margin: 0 0 4px 0; font-size: 15px;}
.kt-stats {font-size: 12px; color: #57606a; margin-bottom: 6px;}
.kt-sql {background: #f6f8fa; padding: 6px; border-radius: 4px; white-space: pre-wrap; word-break: break-word;
         font-size: 13px; margin: 4px 0;}
.kt-badge {display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;}
.kt-pass {background: #dafbe1; color: #116329;} .kt-fail {background: #ffebe9; color: #a40e26;}
.kt-none {background: #eaeef2; color: #57606a;}
.kt-table {border-collapse: collapse; font-size: 12px; margin-top: 4px;}
.kt-table th, .kt-table td {border: 1px solid #d0d7de; padding: 2px 6px; text-align: left;}
.kt-error {color: #a40e26; font-size: 12px;}
.kt-mem td, .kt-mem th {padding: 2px 8px; text-align: left; font-size: 13px;}
"""


def human_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _table(execution: Execution) -> str:
    if execution.error:
        return f'<div class="kt-error">did not run: {escape(execution.error)}</div>'
    head = "".join(f"<th>{escape(str(c))}</th>" for c in execution.columns)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in row) + "</tr>" for row in execution.rows)
    more = execution.total_rows - len(execution.rows)
    note = f'<div class="kt-stats">… {more} more row{"s" if more != 1 else ""}</div>' if more > 0 else ""
    count = f'<div class="kt-stats">{execution.total_rows} row{"s" if execution.total_rows != 1 else ""}</div>'
    return f'{count}<table class="kt-table"><tr>{head}</tr>{body}</table>{note}'


def _badge(passed: bool | None) -> tuple[str, str]:
    if passed is None:
        return "none", '<span class="kt-badge kt-none">no gold to compare</span>'
    if passed:
        return "pass", '<span class="kt-badge kt-pass">PASS: same result as the gold</span>'
    return "fail", '<span class="kt-badge kt-fail">FAIL: differs from the gold</span>'


def comparison_html(result: Comparison) -> str:
    cards = []
    if result.gold_execution is not None:
        cards.append(f'<div class="kt-card" data-model="gold"><h4>gold answer</h4>'
                     f'<div class="kt-stats">executed on a test-suite database built from the schema</div>'
                     f'<pre class="kt-sql">{escape(result.gold)}</pre>{_table(result.gold_execution)}</div>')
    for a in result.answers:
        verdict, badge = _badge(a.execution.passed)
        stats = (f"{a.seconds:.2f} s · {a.new_tokens} new tokens · {a.tokens_per_s:.1f} tokens/s")
        cards.append(f'<div class="kt-card" data-model="{escape(a.model)}" data-verdict="{verdict}">'
                     f'<h4>{escape(a.label)}</h4><div class="kt-stats">{stats}</div>{badge}'
                     f'<pre class="kt-sql">{escape(a.sql) or "(empty answer)"}</pre>{_table(a.execution)}</div>')
    return f'<div class="kt-grid" id="kt-answers">{"".join(cards)}</div>'


def message_html(text: str, error: bool = False) -> str:
    return f'<div class="{"kt-error" if error else "kt-stats"}">{escape(text)}</div>'


def memory_html(gpus: list[GpuMemory] | None, loaded: list[Loaded], labels: dict[str, str], rss_bytes: int) -> str:
    if gpus is None:
        gpu_part = '<p data-gpu="none"><b>no GPU</b> (NVML not available): models run on the CPU</p>'
    elif not gpus:
        gpu_part = '<p data-gpu="none"><b>no GPU</b> visible to NVML</p>'
    else:
        rows = "".join(
            f'<tr data-gpu="{g.index}"><td>GPU {g.index}</td><td>{escape(g.name)}</td>'
            f"<td>{human_bytes(g.used_bytes)} / {human_bytes(g.total_bytes)} "
            f"({100 * g.used_bytes / g.total_bytes if g.total_bytes else 0:.0f}%)</td>"
            f"<td>{human_bytes(g.process_bytes) if g.process_bytes is not None else '—'}</td></tr>" for g in gpus)
        gpu_part = ('<table class="kt-mem"><tr><th>GPU</th><th>name</th><th>used / total</th>'
                    f"<th>this process</th></tr>{rows}</table>")
    if loaded:
        models = "".join(f'<tr data-loaded="{escape(m.name)}"><td>{escape(labels.get(m.name, m.name))}</td>'
                         f"<td>{human_bytes(m.footprint_bytes)}</td><td>loaded in {m.load_seconds:.1f} s</td></tr>"
                         for m in loaded)
        model_part = f'<table class="kt-mem"><tr><th>loaded model</th><th>weights</th><th></th></tr>{models}</table>'
    else:
        model_part = "<p>no model loaded</p>"
    return (f'<div id="kt-memory">{gpu_part}{model_part}'
            f'<p class="kt-stats">process resident memory (RSS): {human_bytes(rss_bytes)}</p></div>')
