"""Changes that would make a stage fit a card, each found by estimating the changed recipe again.

Fine-tune, in order of what they cost: gradient checkpointing (~30% slower, same result), a smaller micro-batch
with more accumulation (same sequences per optimizer step, slower), a 4-bit base (QLoRA: slightly different
training numerics), a shorter max_length (truncates long rows: changes what is learned). When no single change
fits, they are combined in that order. Infer: a smaller generation batch.
"""

from __future__ import annotations

import math

from kubetune.estimate import Suggestion
from kubetune.estimate.components import StageEstimate
from kubetune.estimate.estimator import Estimator

MIN_LENGTH = 64


def suggestions_for(est: Estimator, stage: str, memory_bytes: int, headroom: float) -> list[Suggestion]:
    if stage == "finetune":
        return _finetune(est, memory_bytes, headroom)
    if stage == "infer":
        return _infer(est, memory_bytes, headroom)
    return []


def _fits(e: StageEstimate, memory_bytes: int, headroom: float) -> bool:
    return e.fits(memory_bytes, headroom)


def _finetune(est: Estimator, memory: int, headroom: float) -> list[Suggestion]:
    ft = est.recipe.finetune

    def run(changes: dict):
        new = ft.model_copy(update=changes)
        return new, est.estimate("finetune", est.recipe.model_copy(update={"finetune": new}))

    def describe(changes: dict, base) -> tuple[str, list[str]]:
        words, sets = [], []
        if changes.get("gradient_checkpointing"):
            words.append("gradient checkpointing")
            sets.append("finetune.gradient_checkpointing=true")
        if "base_precision" in changes:
            words.append("4-bit nf4 base (QLoRA)")
            sets.append("finetune.base_precision=4bit")
        if "batch_size" in changes:
            per_step = changes["batch_size"] * changes["grad_accum"]
            same = per_step == base.batch_size * base.grad_accum
            words.append(f"batch {changes['batch_size']} × accumulation {changes['grad_accum']} "
                         f"({'still ' if same else ''}{per_step} sequences per step)")
            sets += [f"finetune.batch_size={changes['batch_size']}", f"finetune.grad_accum={changes['grad_accum']}"]
        if "max_length" in changes:
            words.append(f"max_length {changes['max_length']} (longer rows are truncated)")
            sets.append(f"finetune.max_length={changes['max_length']}")
        return " + ".join(words), sets

    def smallest_batch_that_fits(changes: dict):
        """Halve the micro-batch (doubling accumulation) until it fits; the largest such batch, or None."""
        b, per_step = ft.batch_size, ft.batch_size * ft.grad_accum
        while b > 1:
            b //= 2
            a = math.ceil(per_step / b)
            trial = {**changes, "batch_size": b, "grad_accum": a}
            _, e = run(trial)
            if _fits(e, memory, headroom):
                return trial, e
        return None

    def longest_length_that_fits(changes: dict):
        s = ft.max_length
        while s // 2 >= MIN_LENGTH:
            s //= 2
            trial = {**changes, "max_length": s}
            _, e = run(trial)
            if _fits(e, memory, headroom):
                return trial, e
        return None

    out: list[Suggestion] = []
    single: list[tuple[dict, StageEstimate]] = []
    if not ft.gradient_checkpointing:
        single.append(({"gradient_checkpointing": True}, run({"gradient_checkpointing": True})[1]))
    if ft.base_precision != "4bit":
        single.append(({"base_precision": "4bit"}, run({"base_precision": "4bit"})[1]))
    for found in (smallest_batch_that_fits({}), longest_length_that_fits({})):
        if found:
            single.append(found)
    for changes, e in single:
        if _fits(e, memory, headroom):
            text, sets = describe(changes, ft)
            out.append(Suggestion(text, sets, e.total_bytes, True))
    if out:
        return out
    # Nothing alone is enough: add the changes one after another, cheapest first.
    changes: dict = {}
    steps = []
    if not ft.gradient_checkpointing:
        steps.append(lambda c: ({**c, "gradient_checkpointing": True}, run({**c, "gradient_checkpointing": True})[1]))
    if ft.base_precision != "4bit":
        steps.append(lambda c: ({**c, "base_precision": "4bit"}, run({**c, "base_precision": "4bit"})[1]))
    steps.append(lambda c: smallest_batch_that_fits(c) or ({**c, "batch_size": 1, "grad_accum":
                                                             ft.batch_size * ft.grad_accum},
                                                            run({**c, "batch_size": 1,
                                                                 "grad_accum": ft.batch_size * ft.grad_accum})[1]))
    steps.append(lambda c: longest_length_that_fits(c))
    last = None
    for step in steps:
        result = step(changes)
        if result is None:
            continue
        changes, last = result
        if _fits(last, memory, headroom):
            text, sets = describe(changes, ft)
            return [Suggestion(text, sets, last.total_bytes, True)]
    if last is not None:
        text, sets = describe(changes, ft)
        return [Suggestion(text, sets, last.total_bytes, False)]
    return []


def _infer(est: Estimator, memory: int, headroom: float) -> list[Suggestion]:
    b = est.recipe.infer.batch_size
    while b > 1:
        b //= 2
        e = est.estimate("infer", est.recipe.model_copy(update={"infer": est.recipe.infer.model_copy(
            update={"batch_size": b})}))
        if _fits(e, memory, headroom):
            return [Suggestion(f"generation batch {b}", [f"infer.batch_size={b}"], e.total_bytes, True)]
    return []
