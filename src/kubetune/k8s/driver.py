"""The pipeline driver: create each stage's Job when the one before it has succeeded, one at a time.

No GPU waits on another stage: a stage's Job (and so its GPU request) exists only once its inputs are done.
The driver keeps no state of its own. Each pass reads the run's Jobs (and, where the claim is mounted, the
``_SUCCESS`` markers) and does the one next thing, so it can be killed and restarted at any moment: in the
cluster as a Job of its own (`submit --detach`, the Helm chart), or from a laptop (`submit --wait`).

The run's TTL (``kubernetes.ttl_after_finished_s``) starts when the run ends, never per stage: a stage Job
deleted while the run goes on would be made again, and where the driver cannot read the ``_SUCCESS`` markers
(a ReadWriteOnce claim) that would repeat for ever. In the cluster the stage Jobs carry an ownerReference to the
driver's Job, which has the TTL: when it goes (TTL, `helm uninstall`, `kubetune cancel`), the garbage collector
takes the stage Jobs and their pods with it. A driver without a Job of its own (`submit --wait`) sets the TTL on
the stage Jobs when the run ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from kubetune.artifacts import RunLayout
from kubetune.config import Recipe
from kubetune.errors import ArtifactError, PipelineError
from kubetune.k8s import render
from kubetune.k8s.api import AlreadyExistsError, Cluster, NotFoundError
from kubetune.k8s.state import job_state
from kubetune.sources import pod_stages


class StageFailedError(PipelineError):
    """A stage Job failed, so the stages after it have no input: the pipeline stops (permanent)."""


@dataclass(frozen=True)
class Step:
    """What one pass found: the stage being waited on (None when all are done) and what it did."""

    stage: str | None
    action: str  # "created", "waiting", "queued", "finished"


class Driver:
    def __init__(self, cluster: Cluster, recipe: Recipe, stages: list[str] | None = None,
                 layout: RunLayout | None = None, echo: Callable[[str], None] = print,
                 owner: dict | None = None):
        self.cluster, self.recipe, self.echo = cluster, recipe, echo
        self.stages = stages or pod_stages(recipe)
        self.layout = layout  # set only where the claim is mounted at the recipe's paths
        self.owner = owner  # the driver's own Job, in the cluster: the stage Jobs' owner
        self._said: dict[str, str] = {}

    def _say(self, stage: str, what: str) -> None:
        if self._said.get(stage) != what:  # a restarted loop repeats nothing it already said
            self._said[stage] = what
            self.echo(f"{stage}: {what}")

    def _jobs(self) -> dict[str, dict]:
        """Each stage's object: a Job, or a multi-node fine-tune's TrainJob or PyTorchJob (render.stage_kind)."""
        jobs = {}
        kinds = dict.fromkeys(["Job", *(render.stage_kind(self.recipe, s) for s in self.stages)])
        for kind in kinds:
            for job in self.cluster.list(kind, render.selector(self.recipe.run.name)):
                stage = (job["metadata"].get("labels") or {}).get(render.LABEL_STAGE)
                if stage:
                    jobs[stage] = {"kind": kind, **job}  # list items carry no kind of their own
        return jobs

    def step(self) -> Step:
        """One reconciliation pass."""
        jobs = self._jobs()
        for stage in self.stages:
            fingerprint = self.recipe.job_fingerprint(stage)  # infer/evaluate: every evaluation set's
            job = jobs.get(stage)
            if job is None:
                marker = self.layout.recipe_state(self.recipe, stage) if self.layout else "missing"
                if marker == "done":
                    self._say(stage, "already done (its _SUCCESS marker is on the claim)")
                    continue
                if marker == "stale":
                    raise ArtifactError(f"{self.layout.stage_dir(stage)}: finished by a different recipe; it is "
                                        "never overwritten: choose another run.name")
                return self._create(stage)
            name = job["metadata"]["name"]
            made_for = (job["metadata"].get("annotations") or {}).get(render.ANN_FINGERPRINT)
            if made_for != fingerprint:
                raise ArtifactError(f"Job {name} was made for a different recipe (stage fingerprint {made_for} ≠ "
                                    f"{fingerprint}): `kubetune cancel {self.recipe.run.name}` removes the old "
                                    "Jobs (artifacts stay), or choose another run.name")
            state, reason = job_state(job)
            if state == "done":
                self._say(stage, "succeeded")
                continue
            if state == "failed":
                self._say(stage, f"failed ({reason})")
                raise StageFailedError(
                    f"stage '{stage}' failed ({reason or 'Job failed'}); the pipeline stops. See `kubetune logs "
                    f"{self.recipe.run.name} --stage {stage}`, fix the cause and submit again (finished stages "
                    "are kept)")
            self._say(stage, "queued (suspended until Kueue admits it)" if state == "queued" else "running")
            return Step(stage, state if state == "queued" else "waiting")
        return Step(None, "finished")

    def _create(self, stage: str) -> Step:
        job = render.stage_job(self.recipe, stage, self.cluster.namespace, owner=self.owner)
        try:
            self.cluster.create(job)
        except AlreadyExistsError:  # another driver (or an earlier life of this one) was quicker
            return Step(stage, "waiting")
        self._say(stage, f"{job['kind']} {self.cluster.namespace}/{job['metadata']['name']} created")
        return Step(stage, "created")

    def run(self, poll_s: float | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        """Pass after pass until every stage has succeeded; raises StageFailedError when one fails."""
        poll = poll_s if poll_s is not None else self.recipe.kubernetes.driver.poll_s
        while True:
            try:
                result = self.step()
            except StageFailedError:
                self._start_ttl()
                raise
            if result.stage is None:
                self.echo(f"run {self.recipe.run.name}: all {len(self.stages)} stage(s) succeeded")
                self._start_ttl()
                return
            if result.action != "created":  # a new Job was just made: look again at once, it may be done
                sleep(poll)

    def _start_ttl(self) -> None:
        """The run has ended: its stage Jobs may now expire (an owned Job expires with its owner instead)."""
        if self.owner is None:  # Jobs only: a TrainJob has no TTL field, a PyTorchJob's is set when rendered
            start_ttl(self.cluster, self.recipe, [job["metadata"]["name"] for job in self._jobs().values()
                                                  if job["kind"] == "Job"])


def start_ttl(cluster: Cluster, recipe: Recipe, job_names: list[str]) -> None:
    """Give Jobs that were created without one the recipe's TTL, now that whoever watched them is done."""
    ttl = recipe.kubernetes.ttl_after_finished_s
    if ttl is None:
        return
    for name in job_names:
        try:
            cluster.patch("Job", name, {"spec": {"ttlSecondsAfterFinished": ttl}})
        except NotFoundError:  # deleted meanwhile (kubetune cancel): nothing left to expire
            continue
