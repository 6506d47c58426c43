"""Stage entrypoint: run one stage of a recipe with its artifact contract and its report.

A stage is a plain function ``run(ctx: StageContext) -> dict`` in ``kubetune.stages.<name>``. It writes its
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
from kubetune.config import STAGE_NAMES, Recipe
from kubetune.errors import ArtifactError, KubetuneError, storage_error

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

    def input(self, stage: str) -> Path:
        return self.layout.require(stage)

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


def stage_module(stage: str):
    """``kubetune.stages.<stage>``: ``run(ctx) -> dict`` and, optionally, ``check(recipe, report)``, which runs
    after the artifact is committed (and again when a finished stage is skipped) and may raise, e.g. an
    evaluation gate: the results are kept, and the pipeline still fails."""
    if stage not in STAGE_NAMES:
        raise KeyError(stage)
    return importlib.import_module(f"kubetune.stages.{stage}")


def _checked(recipe: Recipe, result: StageResult) -> StageResult:
    check = getattr(stage_module(result.stage), "check", None)
    if check is not None:
        check(recipe, result.report)
    return result


def run_stage(recipe: Recipe, stage: str, progress: ProgressFn = _no_progress) -> StageResult:
    """Run ``stage`` unless its artifact already exists with this recipe's fingerprint.

    Safe to start twice: the second process either sees ``_SUCCESS`` and skips, or finds the lock held and
    stops with a retryable error. A finished artifact from a *different* recipe is never overwritten.
    """
    from kubetune.measure import Stopwatch, library_versions, track_peak_memory
    from kubetune.metrics.exporter import StageMonitor

    layout = RunLayout.from_recipe(recipe)
    fingerprint = recipe.fingerprint(stage)
    state = layout.state(stage, fingerprint)
    if state == "done":
        return _checked(recipe, StageResult(stage, "skipped", layout.stage_dir(stage), layout.read_report(stage) or {}))
    if state == "stale":
        raise ArtifactError(
            f"{layout.stage_dir(stage)}: finished by a different recipe (fingerprint "
            f"{layout.marker(stage).get('fingerprint')} ≠ {fingerprint}); it is never overwritten: choose another "
            "run.name, or move that folder away")
    for up in recipe.upstream(stage):
        if layout.state(up, recipe.fingerprint(up)) != "done":
            what = "has not finished" if layout.marker(up) is None else "was made by a different recipe"
            raise ArtifactError(f"{layout.stage_dir(up)}: stage '{up}' (needed by '{stage}') {what}")

    with layout.lock(stage):
        if layout.state(stage, fingerprint) == "done":  # another process finished while we waited
            return _checked(recipe, StageResult(stage, "skipped", layout.stage_dir(stage),
                                                layout.read_report(stage) or {}))
        with StageMonitor(recipe, stage) as monitor:  # /metrics and Pushgateway, per recipe.metrics
            out = layout.new_temp_dir(stage)
            ctx = StageContext(recipe=recipe, layout=layout, stage=stage, out=out,
                               progress=monitor.progress(progress))
            if monitor.state is not None:
                ctx.extras["metrics"] = monitor.state  # the fine-tune's Trainer callback feeds it
            started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            watch = Stopwatch()
            try:
                with track_peak_memory() as peak:
                    extras = stage_module(stage).run(ctx) or {}
            except BaseException as exc:
                # Judged before the cleanup below frees space: torch.save gives no reason, the volume does.
                storage = None if isinstance(exc, KubetuneError) else storage_error(exc, volume=layout.run_dir)
                # This attempt's partial output is worthless; finished artifacts and .work/ (checkpoints) stay.
                shutil.rmtree(out, ignore_errors=True)
                if storage is not None:
                    raise storage from exc
                raise
            report = {
                "stage": stage,
                "run": recipe.run.name,
                "model": recipe.model.name_or_path,
                "fingerprint": fingerprint,
                "recipe_hash": recipe.recipe_hash(),
                "started_at": started,
                "duration_s": round(watch.seconds, 3),
                "peak_memory": peak.as_dict(),
                "versions": library_versions(),
                "recipe": recipe.model_dump(mode="json"),  # the whole recipe: reports, estimates need no other file
                **extras,
            }
            path = layout.commit(stage, out, fingerprint, report)
            log.info("stage %s done in %.1f s -> %s", stage, report["duration_s"], path)
            result = _checked(recipe, StageResult(stage, "done", path, report))  # a failed gate fails the stage
            monitor.finish("done", report["peak_memory"])
            return result
