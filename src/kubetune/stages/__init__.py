"""Stage entrypoint: run one stage of a recipe with its artifact contract and its report.

A stage is a plain function ``run(ctx: StageContext) -> dict`` in the module the registry names for it
(:mod:`kubetune.registry`; ``kubetune.stages.<name>`` for kubetune's own). It writes its
output into ``ctx.out`` (a temporary folder) and returns the stage-specific part of its report (metrics,
throughput, parameters). This module does the rest: skip if already done, lock, measure, rename into place,
write ``report.json`` and ``_SUCCESS``. No click and no kubernetes here; the pod and the local runner both
come through :func:`run_stage`.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.artifacts import RunLayout
from kubetune import registry
from kubetune.config import HELDOUT_SET, Recipe
from kubetune.distributed import node_rank, world
from kubetune.errors import ArtifactError, GateError, KubetuneError, storage_error
from kubetune.stage_report import report_model

log = logging.getLogger("kubetune")

# A progress callback: (stage, completed, total or None, description). The runner draws bars with it; the
# metrics exporter can publish it.
ProgressFn = Callable[[str, float, float | None, str], None]


def _no_progress(stage: str, completed: float, total: float | None, description: str) -> None:
    pass


@dataclass
class StageContext:
    recipe: Recipe
    layout: RunLayout
    stage: str
    out: Path
    """Temporary output folder; renamed to the stage's artifact folder when ``run`` returns."""
    progress: ProgressFn = _no_progress
    extras: dict[str, Any] = field(default_factory=dict)
    eval_set: str = HELDOUT_SET
    """Infer and evaluate: the evaluation set this run of the stage scores (see :func:`eval_rows`)."""

    def input(self, stage: str) -> Path:
        return self.layout.require(stage, self.eval_set if registry.spec(stage).per_eval_set else HELDOUT_SET)

    @property
    def work(self) -> Path:
        """Scratch that survives a restart of this stage (e.g. fine-tune checkpoints)."""
        path = self.layout.work_dir(self.stage)
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass
class StageResult:
    stage: str
    status: str  # "done" (ran now) or "skipped" (already done with the same fingerprint)
    path: Path
    report: dict[str, Any]
    eval_set: str = HELDOUT_SET
    sets: dict[str, "StageResult"] = field(default_factory=dict)
    """Infer and evaluate: the result of each evaluation set, the held-out split first."""


def stage_module(stage: str):
    """The registry's module of ``stage``: ``run(ctx) -> dict`` and, optionally, ``check(recipe, report)``, which
    runs after the artifact is committed (and again when a finished stage is skipped) and may raise, e.g. an
    evaluation gate: the results are kept, and the pipeline still fails. KeyError for a name no stage has."""
    return importlib.import_module(registry.spec(stage).module)


def _checked(recipe: Recipe, result: StageResult) -> StageResult:
    check = getattr(stage_module(result.stage), "check", None)
    if check is not None:
        check(recipe, result.report, result.eval_set)
    return result


def run_stage(recipe: Recipe, stage: str, progress: ProgressFn = _no_progress) -> StageResult:
    """Run ``stage`` unless its artifact already exists with this recipe's fingerprint.

    Infer and evaluate run once per evaluation set (the held-out split, then each of ``evaluate.sets``), each
    set with its own folder and fingerprint, so a set added to a finished run is the only work done. The result
    is the held-out split's, with every set's in ``sets``; it is "skipped" when no set had anything to do.

    Safe to start twice: the second process either sees ``_SUCCESS`` and skips, or finds the lock held and
    stops with a retryable error. A finished artifact from a *different* recipe is never overwritten.
    """
    results, failed_gates = {}, []
    for eval_set in recipe.stage_sets(stage):
        try:
            results[eval_set] = _run_unit(recipe, stage, eval_set, progress)
        except GateError as exc:  # the set's results are committed; the other sets are still scored
            failed_gates.append(str(exc))
    if failed_gates:
        raise GateError("; ".join(failed_gates))
    first = results[HELDOUT_SET]
    status = "done" if any(r.status == "done" for r in results.values()) else "skipped"
    return StageResult(stage, status, first.path, first.report, sets=results)


def _stage_function(recipe: Recipe, stage: str) -> Callable[[StageContext], dict[str, Any]]:
    """The stage's ``run``; a fine-tune on several processes is started through torchrun (stages/spread.py),
    unless this process already is one of them."""
    if stage == "finetune" and recipe.resources.finetune.processes > 1 and not world().distributed:
        from kubetune.stages import spread

        return lambda ctx: spread.run_processes(ctx, max(recipe.resources.finetune.gpus, 1))
    return stage_module(stage).run


def _train_on_other_node(recipe: Recipe, layout: RunLayout, where: Path) -> StageResult:
    """Node 1, 2… of a multi-node fine-tune: train as its ranks and end; node 0 holds the lock and commits (its
    rank 0 writes everything), so this pod takes no lock and writes nothing into the artifact layout."""
    import tempfile

    from kubetune.stages import spread

    with tempfile.TemporaryDirectory(prefix="kubetune-finetune-") as scratch:  # no rank > 0 writes into it
        ctx = StageContext(recipe=recipe, layout=layout, stage="finetune", out=Path(scratch))
        spread.run_processes(ctx, max(recipe.resources.finetune.gpus, 1))
    return StageResult("finetune", "done", where, {"node_rank": node_rank()})


def _run_unit(recipe: Recipe, stage: str, eval_set: str, progress: ProgressFn) -> StageResult:
    from kubetune.measure import Stopwatch, library_versions, track_peak_memory
    from kubetune.metrics.exporter import StageMonitor

    layout = RunLayout.from_recipe(recipe)
    fingerprint = recipe.fingerprint(stage, eval_set)
    state = layout.state(stage, fingerprint, eval_set)
    where = layout.stage_dir(stage, eval_set)
    if state != "done" and stage == "finetune" and node_rank() != 0:
        return _train_on_other_node(recipe, layout, where)
    if state == "done":
        return _checked(recipe, StageResult(stage, "skipped", where, layout.read_report(stage, eval_set) or {},
                                            eval_set))
    if state == "stale":
        raise ArtifactError(
            f"{where}: finished by a different recipe (fingerprint "
            f"{layout.marker(stage, eval_set).get('fingerprint')} ≠ {fingerprint}); it is never overwritten: "
            "choose another run.name, or move that folder away")
    for up in recipe.upstream(stage):
        up_set = eval_set if registry.spec(up).per_eval_set else HELDOUT_SET
        if layout.state(up, recipe.fingerprint(up, up_set), up_set) != "done":
            what = "has not finished" if layout.marker(up, up_set) is None else "was made by a different recipe"
            raise ArtifactError(f"{layout.stage_dir(up, up_set)}: stage '{up}' (needed by '{stage}') {what}")

    with layout.lock(stage, eval_set):
        if layout.state(stage, fingerprint, eval_set) == "done":  # another process finished while we waited
            return _checked(recipe, StageResult(stage, "skipped", where, layout.read_report(stage, eval_set) or {},
                                                eval_set))
        with StageMonitor(recipe, stage) as monitor:  # /metrics and Pushgateway, per recipe.metrics
            out = layout.new_temp_dir(stage, eval_set)
            ctx = StageContext(recipe=recipe, layout=layout, stage=stage, out=out,
                               progress=monitor.progress(progress), eval_set=eval_set)
            if monitor.state is not None:
                ctx.extras["metrics"] = monitor.state  # the fine-tune's Trainer callback feeds it
            started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            watch = Stopwatch()
            try:
                with track_peak_memory() as peak:
                    extras = _stage_function(recipe, stage)(ctx) or {}
            except BaseException as exc:
                # Judged before the cleanup below frees space: torch.save gives no reason, the volume does.
                storage = None if isinstance(exc, KubetuneError) else storage_error(exc, volume=layout.run_dir)
                # This attempt's partial output is worthless; finished artifacts and .work/ (checkpoints) stay.
                shutil.rmtree(out, ignore_errors=True)
                if storage is not None:
                    raise storage from exc
                raise
            report = report_model(stage).model_validate({
                **extras,
                "stage": stage,
                "run": recipe.run.name,
                "model": recipe.model.name_or_path,
                "fingerprint": fingerprint,
                "recipe_hash": recipe.recipe_hash(),
                "started_at": started,
                "duration_s": round(watch.seconds, 3),
                "peak_memory": peak,
                "versions": library_versions(),
                "recipe": recipe.model_dump(mode="json"),  # the whole recipe: reports, estimates need no other file
                **({"eval_set": eval_set} if registry.spec(stage).per_eval_set else {}),
            }).model_dump(exclude=None if registry.spec(stage).per_eval_set else {"eval_set"})
            path = layout.commit(stage, out, fingerprint, report, eval_set)
            log.info("stage %s done in %.1f s -> %s", stage, report["duration_s"], path)
            # a failed gate fails the stage
            result = _checked(recipe, StageResult(stage, "done", path, report, eval_set))
            monitor.finish("done", report["peak_memory"])
            return result
