"""``kubetune estimate``: peak GPU memory of each stage of a recipe, from the model's config alone.

    estimate = estimate_recipe(recipe)                   # builds the model on the meta device, traces, adds up
    estimate.stages[0].total_bytes                       # fine-tune peak as nvidia-smi would show it
    estimate.fits(find_gpu("A100-40GB"))                 # {stage: bool}
    estimate.suggestions["finetune"]                     # changes that would make it fit the target card

No weights are read and nothing is allocated: the model is built on torch's meta device, and the activations come
from tracing its own forward there (see :mod:`kubetune.estimate.trace`). docs/estimator.md gives the formulas.
torch and transformers are imported inside the functions, so importing this package is cheap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from kubetune import registry
from kubetune.errors import WontFitError
from kubetune.gpus import GPUS, Gpu, find_gpu

GPU_STAGES = registry.gpu_stages()
"""Stages that use a GPU (those the registry gives a memory estimate); evaluate runs SQL on the CPU."""


@dataclass
class Suggestion:
    change: str
    """What to change, in words."""
    overrides: list[str]
    """The same as ``--set`` arguments."""
    total_bytes: int
    fits: bool


@dataclass
class Estimate:
    model: str
    architecture: str
    params: int
    stages: list  # list[StageEstimate]
    headroom: float
    target: dict[str, Gpu] = field(default_factory=dict)
    """The card each stage was asked to fit (``--gpu`` or ``resources.<stage>.gpu_type``)."""
    suggestions: dict[str, list[Suggestion]] = field(default_factory=dict)
    suggestions_for: dict[str, str] = field(default_factory=dict)
    """The card each stage's suggestions aim at."""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def stage(self, name: str):
        return next(s for s in self.stages if s.stage == name)

    def fits(self, gpu: Gpu) -> dict[str, bool]:
        return {s.stage: s.fits(gpu.memory_bytes, self.headroom) for s in self.stages}

    def failures(self) -> list[tuple[str, Gpu]]:
        """(stage, card) for every stage that does not fit the card it was asked to fit."""
        return [(s.stage, self.target[s.stage]) for s in self.stages
                if s.stage in self.target and not s.fits(self.target[s.stage].memory_bytes, self.headroom)]

    def to_dict(self) -> dict[str, Any]:
        from kubetune.estimate.components import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES

        return {
            "model": self.model, "architecture": self.architecture, "params": self.params,
            "headroom": self.headroom, "cuda_context_bytes": CUDA_CONTEXT_BYTES, "allocator_slack": ALLOCATOR_SLACK,
            "seconds": round(self.seconds, 3), "notes": self.notes,
            "stages": [{
                "stage": s.stage, "allocated_bytes": s.allocated_bytes, "total_bytes": s.total_bytes,
                "allocator_slack": s.slack,
                "settings": s.settings, "notes": s.notes,
                "components": [{"name": c.name, "bytes": c.bytes, "note": c.note} for c in s.components],
                "fits": {g.name: s.fits(g.memory_bytes, self.headroom) for g in GPUS},
                "target": self.target[s.stage].name if s.stage in self.target else None,
            } for s in self.stages],
            "suggestions": {stage: {"gpu": self.suggestions_for.get(stage),
                                    "options": [sg.__dict__ for sg in items]}
                            for stage, items in self.suggestions.items()},
        }


def requested_gpus(recipe, gpu: Gpu | None) -> tuple[dict[str, Gpu], list[str]]:
    """The card each GPU stage must fit: ``gpu`` for all of them, else each stage's ``resources.gpu_type``."""
    notes = []
    wanted: dict[str, Gpu] = {}
    for stage in GPU_STAGES:
        if stage not in recipe.stages:
            continue
        if gpu is not None:
            wanted[stage] = gpu
            continue
        label = getattr(recipe.resources, stage).gpu_type
        if label:
            found = find_gpu(label)
            if found is None:
                notes.append(f"resources.{stage}.gpu_type {label!r} is not a card kubetune knows; not checked")
            else:
                wanted[stage] = found
    return wanted, notes


def estimate_recipe(recipe, model_config=None, gpu: Gpu | None = None, headroom: float | None = None,
                    suggest: bool = True) -> Estimate:
    """Estimate every GPU stage of ``recipe``; with ``suggest``, find changes that make failing stages fit."""
    from kubetune.estimate.modelshape import load_config, raw_config
    from kubetune.estimate.components import DEFAULT_HEADROOM
    from kubetune.estimate.estimator import Estimator

    started = time.perf_counter()
    headroom = DEFAULT_HEADROOM if headroom is None else headroom
    raw = raw_config(recipe.model, model_config)
    bf16 = gpu.bf16 if gpu else True
    if raw is not None:  # a config.json on disk: the disk cache can answer without torch and transformers
        est = Estimator(recipe, raw_config=raw[0], config_source=raw[1], bf16=bf16)
    else:
        est = Estimator(recipe, load_config(recipe.model, model_config), bf16=bf16)
    if "finetune" in recipe.stages and recipe.finetune.packing and est.packs_apart is False:
        from kubetune.modelio import packing_refused

        raise packing_refused(recipe.model.name_or_path, est.shape.architecture, est.shape.attn_implementation)
    stages = [est.estimate(stage) for stage in GPU_STAGES if stage in recipe.stages]
    target, notes = requested_gpus(recipe, gpu)
    result = Estimate(model=recipe.model.name_or_path, architecture=est.shape.architecture,
                      params=est.shape.total_params, stages=stages, headroom=headroom, target=target, notes=notes)
    for s in stages:
        if getattr(recipe.resources, s.stage).gpus == 0:
            s.notes.append(f"resources.{s.stage}.gpus is 0: this recipe runs it on the CPU; the figure is what a "
                           "GPU would need")
    if suggest:
        from kubetune.estimate.suggest import suggestions_for

        for s in stages:
            card = target.get(s.stage) or _smallest_failing(s, headroom)
            if card is None or s.fits(card.memory_bytes, headroom):
                continue
            items = suggestions_for(est, s.stage, card.memory_bytes, headroom)
            if items:
                result.suggestions[s.stage] = items
                result.suggestions_for[s.stage] = card.name
    est.save()
    result.seconds = time.perf_counter() - started
    return result


def _smallest_failing(stage_estimate, headroom: float) -> Gpu | None:
    failing = [g for g in GPUS if not stage_estimate.fits(g.memory_bytes, headroom)]
    return min(failing, key=lambda g: g.memory_bytes) if failing else None


__all__ = ["Estimate", "Suggestion", "WontFitError", "estimate_recipe", "requested_gpus", "GPU_STAGES"]
