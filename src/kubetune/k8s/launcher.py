"""What the laptop commands do, over the :class:`~kubetune.k8s.api.Cluster` interface: submit, status, logs,
cancel, list. Output goes through ``echo`` so the CLI prints it and the tests read it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kubetune.config import POD_STAGES, Recipe, recipe_from_dict
from kubetune.errors import ClusterError, RecipeError
from kubetune.k8s import render
from kubetune.k8s.api import AlreadyExistsError, Cluster, NotFoundError
from kubetune.k8s.driver import start_ttl
from kubetune.sources import pod_stages
from kubetune.k8s.state import (PodView, human_bytes, human_seconds, job_state, newest, newest_pod_of,
                                pod_view, waiting_reason, duration as elapsed)

Echo = Callable[[str], None]
DRIVER_SELECTOR = "app.kubernetes.io/component=driver"


# ---- submit ------------------------------------------------------------------------------------------------
def _clear_failed(cluster: Cluster, run: str, echo: Echo, names: set[str] | None = None) -> None:
    """A failed Job would stop the driver at once: resubmitting means trying those stages again."""
    for job in cluster.list("Job", render.selector(run)):
        name = job["metadata"]["name"]
        if (names is None or name in names) and job_state(job)[0] == "failed":
            cluster.delete("Job", name)
            echo(f"deleted failed Job {name} (it is retried)")


def _ensure_recipe(cluster: Cluster, recipe: Recipe, obj: dict[str, Any]) -> str:
    existing = cluster.get("ConfigMap", obj["metadata"]["name"])
    have = ((existing or {}).get("metadata", {}).get("annotations") or {}).get(render.ANN_RECIPE_SHA)
    if have == render.recipe_sha256(recipe):
        return "unchanged"
    raise ClusterError(f"run '{recipe.run.name}' exists in namespace {cluster.namespace} with a different recipe; "
                       f"`kubetune cancel {recipe.run.name}` first (artifacts stay), or choose another run.name")


def apply(cluster: Cluster, objects: list[dict[str, Any]], recipe: Recipe, echo: Echo,
          dry_run: bool = False) -> None:
    """Create each object; ones that exist are kept (the claim, RBAC) or checked (the recipe)."""
    for obj in objects:
        what = f"{obj['kind']} {cluster.namespace}/{obj['metadata']['name']}"
        try:
            cluster.create(obj, dry_run=dry_run)
            echo(f"created {what}" + (" (server dry run)" if dry_run else ""))
        except AlreadyExistsError:
            if obj["kind"] == "ConfigMap":
                echo(f"{_ensure_recipe(cluster, recipe, obj)} {what}")
            elif obj["kind"] == "Job":
                echo(f"exists {what} (left running)")
            else:
                echo(f"exists {what}")


def submit(cluster: Cluster, recipe: Recipe, stage: str | None, mode: str, echo: Echo,
           dry_run: bool = False, poll_s: float | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
    """``mode``: detach (in-cluster driver, return), wait (drive from here), follow (in-cluster driver, stream logs)."""
    from kubetune.k8s.driver import Driver

    ns, run = cluster.namespace, recipe.run.name
    in_cluster = mode in ("detach", "follow") and stage is None
    objects = render.base_objects(recipe, ns, driver=in_cluster)
    if stage:  # no driver: detached, the Job carries the TTL; watched from here, its TTL starts when it ends
        objects.append(render.stage_job(recipe, stage, ns, driven=mode != "detach"))
    if not dry_run:
        _clear_failed(cluster, run, echo, {render.Names(run).job(stage)} if stage else None)
        if in_cluster:
            driver = cluster.get("Job", render.Names(run).driver)
            if driver is not None and job_state(driver)[0] in ("done", "failed"):
                cluster.delete("Job", driver["metadata"]["name"])  # a finished driver is started afresh
                echo(f"deleted finished Job {driver['metadata']['name']} (a new driver takes over)")
    apply(cluster, objects, recipe, echo, dry_run=dry_run)
    if dry_run:
        return
    if mode == "wait":
        if stage:
            try:
                wait_job(cluster, render.Names(run).job(stage), echo, poll_s or recipe.kubernetes.driver.poll_s,
                         sleep)
            finally:
                start_ttl(cluster, recipe, [render.Names(run).job(stage)])
        else:
            Driver(cluster, recipe, echo=echo).run(poll_s, sleep)
    elif mode == "follow":
        try:
            follow(cluster, recipe, [stage] if stage else pod_stages(recipe), echo, poll_s, sleep)
        finally:
            if stage:
                start_ttl(cluster, recipe, [render.Names(run).job(stage)])
    else:
        echo(f"submitted run {run} to namespace {ns}. Follow it with:")
        echo(f"  kubetune status {run} -n {ns}")
        echo(f"  kubetune logs {run} --stage {stage or pod_stages(recipe)[0]} -f -n {ns}")


def wait_job(cluster: Cluster, name: str, echo: Echo, poll_s: float, sleep: Callable[[float], None]) -> None:
    while True:
        job = cluster.get("Job", name)
        if job is None:
            raise ClusterError(f"Job {cluster.namespace}/{name} disappeared (deleted by someone?)")
        state, reason = job_state(job)
        if state == "done":
            echo(f"Job {name} succeeded")
            return
        if state == "failed":
            from kubetune.k8s.driver import StageFailedError

            raise StageFailedError(f"Job {name} failed ({reason})")
        sleep(poll_s)


def follow(cluster: Cluster, recipe: Recipe, stages: list[str], echo: Echo, poll_s: float | None,
           sleep: Callable[[float], None]) -> None:
    """Stream each stage's pods' logs in turn (a retried pod too) while the in-cluster driver runs them;
    Ctrl-C leaves the run going."""
    from kubetune.k8s.driver import StageFailedError

    poll = poll_s if poll_s is not None else recipe.kubernetes.driver.poll_s
    for stage in stages:
        name = render.Names(recipe.run.name).job(stage)
        echo(f"── {stage} ──")
        shown: set[str] = set()
        while True:
            job = cluster.get("Job", name)
            pod = newest(cluster.list("Pod", render.selector(recipe.run.name, stage)))
            view = pod_view(pod) if pod else None
            if view and view.name not in shown and view.phase != "Pending":
                shown.add(view.name)
                for line in cluster.pod_log(view.name, follow=view.phase == "Running"):
                    echo(line)
                continue
            state, reason = job_state(job) if job else ("absent", "")
            if state == "done":
                echo(f"{stage}: succeeded")
                break
            if state == "failed":
                raise StageFailedError(f"stage '{stage}' failed ({reason}); the pipeline stops")
            sleep(poll)


# ---- logs --------------------------------------------------------------------------------------------------
def stream_logs(cluster: Cluster, selector: str, follow: bool, poll_s: float, sleep: Callable[[float], None],
                echo: Echo, job_name: str | None = None) -> Iterator[str]:
    """Lines of the newest pod matching ``selector``; with ``follow``, wait for it to start, then stream."""
    said = ""
    while True:
        pod = newest(cluster.list("Pod", selector))
        if pod is not None:
            view = pod_view(pod)
            if view.phase != "Pending":
                yield from cluster.pod_log(view.name, follow=follow and view.phase == "Running")
                return
            note = f"waiting for pod {view.name} ({view.reason or 'Pending'})"
        else:
            job = cluster.get("Job", job_name) if job_name else None
            if job is not None and job_state(job)[0] == "done":
                return  # done long ago (its pod is gone): nothing to show
            note = "waiting for the stage to start (no pod yet)"
        if not follow:
            raise ClusterError(f"no log yet: {note}; add -f to wait for it")
        if note != said:
            echo(note)
            said = note
        sleep(poll_s)


# ---- status ------------------------------------------------------------------------------------------------
@dataclass
class StageRow:
    stage: str
    phase: str
    pod: str = "—"
    node: str = "—"
    gpu: str = "—"
    start: str = "—"
    duration: str = "—"
    peak_vram: str = "—"
    reason: str = ""


def _gpu(job: dict[str, Any]) -> str:
    spec = job["spec"]["template"]["spec"]
    limits = (spec["containers"][0].get("resources") or {}).get("limits") or {}
    gpus = [f"{v}× {k}" for k, v in limits.items() if "gpu" in k]
    product = [v for k, v in (spec.get("nodeSelector") or {}).items() if k.endswith("gpu.product")]
    return " ".join(gpus + product) or "none"


def _multi_node_gpu(recipe: Recipe) -> str:
    res = recipe.resources.finetune
    return f"{res.nodes} nodes × {res.gpus}× {recipe.kubernetes.gpu_resource}" + (f" {res.gpu_type}" if res.gpu_type
                                                                                   else "")


def run_recipe(cluster: Cluster, run: str) -> Recipe | None:
    """The run's recipe, read back from its ConfigMap (None if it is gone or cannot be read)."""
    import yaml

    try:
        cm = cluster.get("ConfigMap", render.Names(run).recipe)
    except ClusterError:
        return None
    if not cm:
        return None
    try:
        return recipe_from_dict(yaml.safe_load(cm["data"][render.RECIPE_FILE]), f"ConfigMap {run}-recipe")
    except (RecipeError, KeyError, yaml.YAMLError):
        return None


def status_rows(cluster: Cluster, run: str) -> list[StageRow]:
    jobs = cluster.list("Job", render.selector(run))
    pods = cluster.list("Pod", render.selector(run))
    recipe = run_recipe(cluster, run)
    if recipe is not None and render.stage_kind(recipe, "finetune") != "Job":  # a fine-tune across nodes
        kind = render.stage_kind(recipe, "finetune")
        jobs += [{"kind": kind, **obj} for obj in cluster.list(kind, render.selector(run))]
    if not jobs and recipe is None:
        raise NotFoundError(f"no run '{run}' in namespace {cluster.namespace} (see `kubetune list`)")
    events = cluster.list("Event", "") if jobs else []  # Events carry no run label: one list for every stage
    by_stage = {(j["metadata"].get("labels") or {}).get(render.LABEL_STAGE): j for j in jobs}
    stages = pod_stages(recipe) if recipe else [s for s in POD_STAGES if s in by_stage]
    rows = []
    driver = next((j for j in jobs if j["metadata"]["name"] == render.Names(run).driver), None)
    if driver is not None:
        stages = [render.DRIVER] + stages
        by_stage[render.DRIVER] = driver
    for stage in stages:
        job = by_stage.get(stage)
        if job is None:
            rows.append(StageRow(stage, "not started"))
            continue
        state, reason = job_state(job)
        multi_node = job.get("kind") in ("TrainJob", "PyTorchJob")
        # its pods belong to the operator's Jobs (or none): the stage's newest pod says what is happening
        pod = newest([p for p in pods if (p["metadata"].get("labels") or {}).get(render.LABEL_STAGE) == stage]
                     ) if multi_node else newest_pod_of(job, pods)
        view: PodView | None = pod_view(pod) if pod else None
        phase = {"done": "Succeeded", "failed": "Failed", "queued": "Queued"}.get(state) or (
            view.phase if view else "Pending")
        if view and state == "running" and view.reason:
            reason = view.reason  # ImagePullBackOff, Unschedulable: the reason a stage does not start
        elif state == "running" and (view is None or view.phase == "Pending"):
            # no pod (quota, admission) or one that does not start (volume, image, scheduling): the Events say why
            job_pods = [p["metadata"]["name"] for p in pods if (p["metadata"].get("labels") or {}).get(
                "batch.kubernetes.io/job-name") == job["metadata"]["name"]]
            reason = waiting_reason(events, job["metadata"]["name"], job_pods)
        st = job.get("status") or {}
        summary = view.summary if view else {}
        rows.append(StageRow(
            stage=stage, phase=phase, pod=view.name if view else "—", node=view.node if view else "—",
            gpu=_multi_node_gpu(recipe) if multi_node else _gpu(job) if stage != render.DRIVER else "none",
            start=st.get("startTime") or "—",
            duration=human_seconds(elapsed(st.get("startTime"), st.get("completionTime"))),
            peak_vram=human_bytes(summary.get("peak_vram_bytes")) if summary else "—",
            # A failed Job's own reason ("…failed with exit code 5 matching FailJob rule…") says that, not why:
            # the pod's last line does ("error: model.name_or_path: folder … not found").
            reason=(view.reason if view and state == "failed" and view.reason else reason)))
    return rows


def format_rows(rows: list[StageRow]) -> list[str]:
    header = ("STAGE", "PHASE", "POD", "NODE", "GPU", "START", "DURATION", "PEAK VRAM")
    table = [header] + [(r.stage, r.phase, r.pod, r.node, r.gpu, r.start, r.duration, r.peak_vram) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines += [f"  {r.stage}: {r.reason}" for r in rows if r.reason]
    return lines


# ---- list and cancel ---------------------------------------------------------------------------------------
def list_runs(cluster: Cluster) -> list[str]:
    jobs = cluster.list("Job", render.LABEL_RUN)
    runs: dict[str, list[dict]] = {}
    for job in jobs:
        runs.setdefault(job["metadata"]["labels"][render.LABEL_RUN], []).append(job)
    lines = [("RUN", "STAGES DONE", "NOW", "STATE")]
    for run, run_jobs in sorted(runs.items()):
        stage_jobs = [j for j in run_jobs if render.LABEL_STAGE in j["metadata"]["labels"]]
        states = {j["metadata"]["labels"][render.LABEL_STAGE]: job_state(j)[0] for j in stage_jobs}
        done = sum(1 for s in states.values() if s == "done")
        failed = [s for s, v in states.items() if v == "failed"]
        active = [s for s, v in states.items() if v in ("running", "queued")]
        state = "failed" if failed else "running" if active else "idle"
        driver = next((j for j in run_jobs if not render.LABEL_STAGE in j["metadata"]["labels"]), None)
        if driver is not None and not failed and job_state(driver)[0] == "done":
            state = "succeeded"
        elif driver is not None and job_state(driver)[0] == "running" and not failed:
            state = "running"
        lines.append((run, str(done), ",".join(failed or active) or "—", state))
    widths = [max(len(r[i]) for r in lines) for i in range(4)]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines] if runs else []


def cancel(cluster: Cluster, run: str, echo: Echo) -> int:
    """Stop a run: the driver first (so it starts nothing new), then its stage Jobs with their pods, then the
    recipe and the driver's RBAC. The claim and its artifacts stay. A stage Job that the garbage collector took
    with the driver's Job (its owner) meanwhile counts as deleted."""
    jobs = cluster.list("Job", render.selector(run))
    jobs.sort(key=lambda j: render.LABEL_STAGE in (j["metadata"].get("labels") or {}))  # driver first
    recipe = run_recipe(cluster, run)  # read before its ConfigMap goes: a multi-node fine-tune is no Job
    multi_node = render.stage_kind(recipe, "finetune") if recipe is not None else "Job"
    if multi_node != "Job":
        jobs += [{"kind": multi_node, **obj} for obj in cluster.list(multi_node, render.selector(run))]
    removed = 0
    for job in jobs:
        kind = job.get("kind") or "Job"
        try:
            cluster.delete(kind, job["metadata"]["name"])
        except NotFoundError:
            pass
        echo(f"deleted {kind} {job['metadata']['name']} and its pods")
        removed += 1
    names = render.Names(run)
    for kind, name in (("ConfigMap", names.recipe), ("RoleBinding", names.driver), ("Role", names.driver),
                       ("ServiceAccount", names.driver)):
        try:
            cluster.delete(kind, name)
        except NotFoundError:
            continue
        echo(f"deleted {kind} {name}")
        removed += 1
    if not removed:
        raise NotFoundError(f"no run '{run}' in namespace {cluster.namespace} (see `kubetune list`)")
    echo(f"run {run} cancelled; its artifacts stay on the claim")
    return removed
