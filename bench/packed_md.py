"""RESULTS.md's issue 22 section: the packed, fixed-shape, compiled fine-tune against the original's recipe.

Reads ``bench/results/packed-*.json`` (bench/packed.py's ``packed.json``, one device call each; the harness's raw
``results.json`` of the same call sits next to it as ``*.results.json`` and is not read here). Every figure comes
from those files; the targets are bench/packed.py's ``TARGETS``, recorded in each file.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench_report import num  # bench/bench_report.py: the tables' cells

COLUMNS = ["case", "tokens/s", "step ms", "allocated GiB", "MFU (4·N·T)", "first step s (compile)",
           "frames compiled after it", "graph breaks", "× the original's recipe", "× packed-compiled"]


def sources(results_dir: Path) -> list[tuple[str, dict]]:
    """(file name, packed.json) per device call, oldest first."""
    files = [p for p in sorted(results_dir.glob("packed-*.json")) if not p.name.endswith(".results.json")]
    loaded = [(p.name, json.loads(p.read_text())) for p in files]
    return sorted(loaded, key=lambda item: ((item[1].get("environment") or {}).get("date") or "", item[0]))


def case_rows(data: dict) -> list[list[str]]:
    rows = []
    for case, fig in data["cases"].items():
        if "error" in fig:
            rows.append([f"`{case}`", fig["error"]] + [""] * (len(COLUMNS) - 2))
            continue
        cmp = data.get("compared", {}).get(case, {})
        rows.append([f"`{case}`", num(fig.get("tokens_per_s"), ",.0f"), num(fig.get("step_ms_median"), ".1f"),
                     num(fig.get("allocated_gib"), ".2f"), num(fig.get("mfu_4nt"), ".1f", 100) + "%",
                     num(fig.get("first_step_s"), ".1f"), num(fig.get("recompiles"), "d"),
                     num(fig.get("graph_breaks"), "d"),
                     num(cmp.get("speedup"), ".2f") + ("×" if (cmp.get("against") or "").endswith("/baseline")
                                                        else " (vs ours)" if cmp.get("against") else ""),
                     num(cmp.get("vs_packed_compiled"), ".2f")])
    return rows


def profile_lines(data: dict) -> list[str]:
    lines = []
    for case, fig in data["cases"].items():
        prof = fig.get("profile") or {}
        if prof.get("device") != "cuda":
            continue
        top = "; ".join(f"`{k['name'][:60]}` {k['ms']:.1f} ms × {k['calls']}" for k in prof["top"][:4])
        lines.append(f"- `{case}`, step {prof['step']}: {prof['wall_ms']:.1f} ms wall, GPU busy "
                     f"{prof['device_busy_ms']:.1f} ms ({100 * prof['busy_fraction']:.0f}%), "
                     f"{prof['kernel_launches']:,} kernels. Costliest: {top}")
    return lines


def target_lines(data: dict) -> list[str]:
    lines = []
    for case, cmp in data.get("compared", {}).items():
        for name, met in (cmp.get("targets_met") or {}).items():
            lines.append(f"- `{case}` {name}: {'met' if met else '**missed**'}")
    return lines


def real_model_rows(results_dir: Path) -> list[list[str]]:
    """The Gemma 3 270M recipe's fine-tune on real weights and data, from each bench/quality.py run: the whole
    training time, the first step (the compile, where compiled), the rate after it, and the fine-tuned accuracy."""
    rows: dict[str, list[str]] = {}  # by the fine-tune's fingerprint: a rerun that reused it adds no row
    for path in sorted(results_dir.glob("quality-*.json")):
        data = json.loads(path.read_text())
        run = next(iter(data.get("runs", {}).values()), {})
        ft = (run.get("reports") or {}).get("finetune") or {}
        if not ft:
            continue
        s = (ft.get("recipe") or {}).get("finetune") or {}
        through, steps = ft.get("throughput") or {}, (ft.get("step_times") or {})
        ms, tokens = steps.get("ms") or [], steps.get("tokens") or []
        after = sum(tokens[1:]) / (sum(ms[1:]) / 1e3) if len(ms) > 1 else None
        merged = next((t["value"] for t in data.get("targets", []) if t["target"] == "merged execution accuracy"),
                      None)
        settings = (f"{'packed' if s.get('packing') else 'unpacked'}{', compiled' if s.get('compile') else ''}, "
                    f"{s.get('batch_size')} × {s.get('max_length')}")
        prof = ft.get("profile") or {}
        key = ft.get("fingerprint") or path.name
        if key in rows and merged is None:
            continue
        rows[key] = ([f"`{path.name}`", (data.get("environment") or {}).get("card") or "–", settings,
                     num((ft.get("metrics") or {}).get("steps_run"), "d"), num(through.get("train_seconds"), ".1f"),
                     num(ms[0] / 1e3 if ms else None, ".1f"), num(through.get("train_tokens_per_s"), ",.0f"),
                     num(after, ",.0f"), num((ft.get("compile") or {}).get("frames_after_warmup"), "d"),
                     num(prof.get("busy_fraction"), ".0f", 100) + ("%" if prof else ""),
                     num(merged, ".1f") + ("%" if merged is not None else "")])
    return list(rows.values())


REAL_COLUMNS = ["file", "card", "fine-tune", "steps", "training s", "first step s", "real tokens/s (all steps)",
                "real tokens/s after step 1", "frames compiled after step 1", "GPU busy (profiled step)",
                "merged execution accuracy"]


def section(results_dir: Path) -> list[str]:
    found = sources(results_dir)
    if not found:
        return []
    out = ["## Issue 22: packed, fixed-shape, compiled fine-tuning", "",
           "Each table is one device call of `bench/packed.py` (the original's recipe and kubetune's paths in the "
           "same call, random-weight models of the published shapes, builtin Text-to-SQL rows). tokens/s: real "
           "(non-padding) tokens over the measured steps; allocated: torch's peak; MFU: 4·N·T over 989 TFLOP/s; "
           "the first step pays torch.compile; frames compiled after it must be 0. The profile is one more step "
           "under torch.profiler (`finetune.profile_step`).", ""]
    for name, data in found:
        env = data.get("environment") or {}
        out += [f"### {env.get('card') or data.get('device')}, {(env.get('date') or '')[:10]} (`results/{name}`)",
                "", f"Commit `{env.get('git_commit_as_run') or env.get('git_commit')}`, lock `{((env.get('lock') or {}).get('sha256') or '')[:12]}`, "
                f"torch {(env.get('versions') or {}).get('torch')}; {data.get('warmup')} warm-up + "
                f"{data.get('steps')} measured steps per case. Command: `{data.get('command')}`", ""]
        out += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        out += ["| " + " | ".join(row) + " |" for row in case_rows(data)]
        for title, lines in (("Profiles", profile_lines(data)), ("Targets", target_lines(data))):
            if lines:
                out += ["", f"{title}:", ""] + lines
        if data.get("notes"):
            out += ["", "Notes:", ""] + [f"- {note}" for note in data["notes"]]
        out.append("")
    real = real_model_rows(results_dir)
    if real:
        out += ["### The Gemma 3 270M recipe on real weights (bench/quality.py runs)", "",
                "The whole recipe's fine-tune (2 epochs of 8,236 WikiSQL rows, the same 1,408,482 real tokens in "
                "every run) and its held-out execution accuracy; the first step of a compiled run is its compile. "
                "Step times exist in reports since issue 16 (older runs: –).", "",
                "| " + " | ".join(REAL_COLUMNS) + " |", "|" + "---|" * len(REAL_COLUMNS)]
        out += ["| " + " | ".join(row) + " |" for row in real] + [""]
    return out


def readme_lines(results_dir: Path) -> list[str]:
    """README's issue 22 headlines: per model the newest call's compiled case against the original's recipe, and
    the newest compiled quality run against the shipped recipe's, each naming its file."""
    lines = []
    newest: dict[str, tuple[str, str, dict, dict]] = {}
    for name, data in sources(results_dir):
        for case, cmp in (data.get("compared") or {}).items():
            if case.endswith("/packed-compiled") and (cmp.get("against") or "").endswith("/baseline"):
                newest[case] = (name, (data.get("environment") or {}).get("card") or "?", data["cases"], cmp)
    for case, (name, card, cases, cmp) in newest.items():
        fig, base = cases[case], cases[cmp["against"]]
        lines.append(f"- {case.split('/')[0]} packed and compiled (issue 22) against the original notebook's recipe "
                     f"in the same call on one {card}: {fig['tokens_per_s']:,.0f} vs {base['tokens_per_s']:,.0f} "
                     f"tokens/s ({cmp['speedup']:.2f}×) at {fig['allocated_gib']:.2f} vs {base['allocated_gib']:.2f} "
                     f"GiB allocated, MFU {100 * fig['mfu_4nt']:.1f}%, {fig['recompiles']} frames compiled after a "
                     f"{fig['first_step_s']:.0f} s first step (`{name}`).")
    real = real_model_rows(results_dir)
    compiled = [r for r in real if "compiled" in r[2] and r[-1] != "–"]
    eager = [r for r in real if "compiled" not in r[2] and r[-1] != "–"]
    if compiled and eager:
        c, e = compiled[-1], eager[-1]
        lines.append(f"- Gemma 3 270M recipe packed and compiled on real weights: {c[-1]} execution accuracy "
                     f"(shipped recipe {e[-1]}); {c[7]} real tokens/s after a {c[5]} s first step (the compile) on "
                     f"one {c[1]}, so the {c[3]}-step fine-tune took {c[4]} s against the shipped recipe's {e[4]} s "
                     f"({e[3]} steps, {e[1]}) ({c[0]}, {e[0]}).")
    return lines
