"""The stage registry: the one place a stage is declared.

Each stage is a :class:`StageSpec`: its name, the module whose ``run(ctx)`` does the work, the stages whose
artifacts it reads (the DAG), its default ``resources.<stage>``, its report model (which owns its headline
figure) and its memory estimate. The recipe's ``stages`` and ``resources`` fields, the runner, the rendered Jobs,
``kubetune report``, the UI, the estimator and bench all read this table, so adding a stage touches this file
and the stage's own module only (tests/test_registry.py adds one and watches them pick it up).

Module and model references are "module:attribute" strings resolved on first use, so that reading the registry
imports neither torch nor any stage: the CLI, the chart generator and the recipe schema import it at start-up.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

BASE_MODEL = "base"  # the model of infer.models that no stage makes: the recipe's own


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    """Where ``run(ctx) -> dict`` (and optionally ``check(recipe, report, eval_set)``) live."""
    upstream: Callable[[Any], list[str]]
    """recipe -> the stages whose artifacts this one reads, in pipeline order."""
    resources: dict[str, Any] = field(default_factory=dict)
    """Default ``resources.<stage>`` (gpus, cpu, memory); unset keys take the Resources model's defaults."""
    resources_note: str | None = None
    """The description of ``resources.<stage>`` in the recipe schema, when it needs one."""
    resources_model: str | None = None
    """The class of ``resources.<stage>`` ("module:Class", a subclass of ``kubetune.config.Resources`` with the
    stage's own settings), None for Resources itself."""
    multi_process: bool = False
    """Runs as several processes, one per GPU (torchrun; kubetune.distributed). A recipe stage without it loads its
    model onto one device, so more than one GPU is refused (``config.SINGLE_GPU_STAGES``)."""
    report: str = "kubetune.stage_report:StageReport"
    """The report model ("module:Class"): what report.json holds, and the stage's headline figure."""
    estimate: str | None = None
    """The peak GPU memory model ("module:function", called with the estimator), None for a stage with no GPU."""
    settings: str | None = None
    """A stage declared outside kubetune: its recipe section ("module:Class", a ``kubetune.config.Section``), which
    becomes the recipe field named after the stage. kubetune's own stages have theirs in kubetune.config."""
    produces: str | None = None
    """The model this stage makes for infer.models, if any."""
    in_recipe: bool = True
    """False for a stage the pipeline adds on Kubernetes by itself (fetch), which a recipe cannot list."""
    per_eval_set: bool = False
    """Runs once per evaluation set (the held-out split, then each of evaluate.sets), each in its own folder."""
    reads_data: bool = False
    """data.* is part of its fingerprint for the held-out split (it reads the training rows or their split)."""


def _producer(model: str) -> str | None:
    return next((s.name for s in _STAGES.values() if s.produces == model), None)


def _producers_of_inferred_models(recipe) -> list[str]:
    return [p for m in recipe.infer.models if (p := _producer(m))]


_DECLARED = (
    StageSpec("fetch", "kubetune.stages.fetch", lambda recipe: [],
              resources={"gpus": 0, "cpu": "1", "memory": "2Gi"},
              resources_note="The download stage on Kubernetes (first when the recipe names a hub model or data "
                             "set): CPU only.",
              in_recipe=False, reads_data=True),
    StageSpec("finetune", "kubetune.stages.finetune", lambda recipe: [],
              report="kubetune.stage_report:FinetuneReport",
              estimate="kubetune.estimate.finetune:estimate_memory",
              resources_note="The fine-tune's pods: one process per GPU (torchrun), on ``nodes`` pods.",
              resources_model="kubetune.config:FinetuneResources", multi_process=True,
              produces="adapter", reads_data=True),
    StageSpec("merge", "kubetune.stages.merge", lambda recipe: ["finetune"],
              report="kubetune.stage_report:MergeReport",
              estimate="kubetune.estimate.merge:estimate_memory",
              resources_note="The merge's pod (the merge itself runs in host memory: give it the 16-bit model's size "
                             "and more).", produces="merged"),
    StageSpec("quantize", "kubetune.stages.quantize",
              lambda recipe: ["merge"] if "merge" in recipe.stages else ["finetune"],
              report="kubetune.stage_report:QuantizeReport",
              estimate="kubetune.estimate.quantize:estimate_memory",
              resources_note="The quantize stage's pod.", produces="quantized", reads_data=True),
    StageSpec("infer", "kubetune.stages.infer",
              _producers_of_inferred_models,
              report="kubetune.stage_report:InferReport",
              estimate="kubetune.estimate.infer:estimate_memory",
              resources_note="The infer stage's pod.", per_eval_set=True, reads_data=True),
    StageSpec("evaluate", "kubetune.stages.evaluate", lambda recipe: ["infer"],
              resources={"gpus": 0, "cpu": "2", "memory": "4Gi"},
              resources_note="The evaluate stage's pod: SQLite only, no GPU by default.",
              report="kubetune.stage_report:EvaluateReport", per_eval_set=True, reads_data=True),
)
_STAGES: dict[str, StageSpec] = {spec.name: spec for spec in _DECLARED}


def spec(stage: str) -> StageSpec:
    """The stage's declaration; KeyError for a name no stage has."""
    return _STAGES[stage]


def specs() -> tuple[StageSpec, ...]:
    """Every stage's declaration, in pipeline order."""
    return tuple(_STAGES.values())


def pod_stages() -> tuple[str, ...]:
    """Every stage a pod can run, in pipeline order."""
    return tuple(_STAGES)


def recipe_stages() -> tuple[str, ...]:
    """The stages a recipe lists (``stages:``), in pipeline order."""
    return tuple(s.name for s in _STAGES.values() if s.in_recipe)


def single_gpu_stages() -> tuple[str, ...]:
    """The recipe stages that run as one process on one device (all but those declared ``multi_process``)."""
    return tuple(s.name for s in _STAGES.values() if s.in_recipe and not s.multi_process)


def gpu_stages() -> tuple[str, ...]:
    """The stages with a memory estimate (those that can use a GPU)."""
    return tuple(s.name for s in _STAGES.values() if s.estimate)


def model_producers() -> dict[str, str | None]:
    """{model name for infer.models: the stage that makes it}, "base" first (made by no stage)."""
    return {BASE_MODEL: None, **{s.produces: s.name for s in _STAGES.values() if s.produces}}


def resolve(reference: str) -> Any:
    """The object a "module:attribute.path" reference names (imported now)."""
    module, _, path = reference.partition(":")
    obj: Any = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def register(new: StageSpec, after: str | None = None) -> None:
    """Declare a stage outside this file, before the recipe schema is built (``kubetune.config`` reads the table
    once, on import), e.g. a plugin or a test. ``after``: the stage it follows in pipeline order (default: last)."""
    import sys

    if "kubetune.config" in sys.modules:
        raise RuntimeError(f"register stage '{new.name}' before kubetune.config is imported: the recipe schema "
                           "is already built")
    if new.name in _STAGES:
        raise ValueError(f"stage '{new.name}' is already declared")
    items = list(_STAGES.items())
    at = len(items) if after is None else [name for name, _ in items].index(after) + 1
    items.insert(at, (new.name, new))
    _STAGES.clear()
    _STAGES.update(items)
