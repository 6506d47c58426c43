"""The estimate as rich tables: one per stage with its breakdown, one of fits per card, and the suggestions."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from kubetune.gpus import GPUS
from kubetune.terminal import literal, printable

GIB = 2**30


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def stage_table(stage, target=None) -> Table:
    from kubetune.estimate.components import CUDA_CONTEXT_BYTES

    # lora_params is for --json; the table shows it in the LoRA rows already
    settings = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in stage.settings.items() if k != "lora_params")
    title = Text.assemble(f"{stage.stage}  ", (printable(settings), "dim"))  # settings hold recipe strings
    table = Table(title=title, title_justify="left", show_footer=True)
    table.add_column("component", footer="peak (nvidia-smi)")
    table.add_column("GiB", justify="right", footer=gib(stage.total_bytes))
    footer = (f"allocated {gib(stage.allocated_bytes)} + {stage.slack:.0%} allocator slack + "
              f"{gib(CUDA_CONTEXT_BYTES)} CUDA context")
    if target is not None:
        footer += f"; {target.name} has {gib(target.memory_bytes)}"
    table.add_column("how", footer=footer, style="dim")
    for c in stage.components:
        table.add_row(literal(c.name), gib(c.bytes), literal(c.note))
    return table


def fits_table(estimate) -> Table:
    table = Table(title=f"fits (with {estimate.headroom:.0%} headroom)? share of each card's memory",
                  title_justify="left")
    table.add_column("stage")
    table.add_column("peak GiB", justify="right")
    for g in GPUS:
        table.add_column(f"{g.name}\n{g.memory_bytes / GIB:.0f} GiB", justify="center")
    for s in estimate.stages:
        cells = []
        for g in GPUS:
            ok = s.fits(g.memory_bytes, estimate.headroom)
            share = s.total_bytes / g.memory_bytes
            mark = f"{'✓' if ok else '✗'} {share:.0%}"
            wanted = estimate.target.get(s.stage) == g
            style = ("bold " if wanted else "") + ("green" if ok else "red")
            cells.append(Text(mark + (" ◀" if wanted else ""), style=style))
        table.add_row(s.stage, gib(s.total_bytes), *cells)
    return table


def suggestions_table(estimate) -> Table | None:
    if not estimate.suggestions:
        return None
    table = Table(title="what would fit", title_justify="left")
    for col in ("stage", "card", "change", "peak GiB", "--set"):
        table.add_column(col)
    for stage, items in estimate.suggestions.items():
        for sg in items:
            table.add_row(stage, estimate.suggestions_for[stage], sg.change + ("" if sg.fits else " (still too big)"),
                          gib(sg.total_bytes), " ".join(f"--set {o}" for o in sg.overrides))
    return table


def render(estimate) -> Group:
    head = Text.assemble(("estimate ", "bold"), f"{printable(estimate.model)}  ",
                         (f"{estimate.architecture}, {estimate.params / 1e9:.2f}B parameters, "
                          f"{estimate.seconds:.1f} s", "dim"))
    parts = [head]
    for s in estimate.stages:
        parts.append(stage_table(s, estimate.target.get(s.stage)))
        for note in s.notes:
            parts.append(literal(f"  {note}", style="dim"))
    parts.append(fits_table(estimate))
    sug = suggestions_table(estimate)
    if sug is not None:
        parts.append(sug)
    for note in estimate.notes:
        parts.append(literal(note, style="yellow"))
    return Group(*parts)
