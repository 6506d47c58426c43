"""`kubetune stage-in`: local model or data folders copied onto the run's claim, through the API alone.

What `kubectl cp` does, with no kubectl: a helper Job (render.stage_in_job) mounts the claim where the stages do;
once its pod runs, each folder goes to it as a tar stream over pods/exec and is unpacked next to its destination,
then renamed into place, so a stage never sees half a folder. A destination that exists is never overwritten.
The helper Job is deleted at the end, whatever happened. Nothing in the recipe is changed: the command says which
path to put in it.
"""

from __future__ import annotations

import shlex
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from posixpath import join, normpath

from kubetune.config import Recipe
from kubetune.errors import ClusterError, RecipeError
from kubetune.k8s import render
from kubetune.k8s.api import AlreadyExistsError, Cluster, NotFoundError
from kubetune.k8s.state import newest, pod_view
from kubetune.sources import on_claim

Echo = Callable[[str], None]
EXISTS_EXIT = 17  # the unpack script's code for "the destination is already on the claim"
PAYLOAD = "payload"


def destination(path: str, to: str | None, mount_path: str) -> str:
    """Where PATH goes on the claim, relative to it: --to, else PATH itself when it is a relative path inside."""
    target = to if to is not None else path
    where = on_claim(target, mount_path)
    if where is None or where == "." or Path(target).is_absolute() and to is None:
        what = f"--to {to}" if to is not None else f"{path} is not a path inside the claim"
        raise RecipeError("stage-in", [f"{what}: name where it goes on the claim with --to (relative to "
                                       f"{mount_path}, e.g. --to inputs/{Path(path).name})"])
    return where


def _unpack_script(size: int) -> str:
    """Receive exactly ``size`` bytes of tar on stdin (no end-of-input signal is needed, so it works on v4 and v5
    of the exec protocol), unpack beside the destination, then rename into place."""
    return (f'set -e; dest="$1"; [ ! -e "$dest" ] || {{ echo "$dest is already on the claim" >&2; '
            f'exit {EXISTS_EXIT}; }}; mkdir -p "$(dirname "$dest")"; tmp="$dest.stage-in-$$"; mkdir "$tmp"; '
            f'head -c {size} | tar -x -f - -C "$tmp"; mv "$tmp/{PAYLOAD}" "$dest"; rmdir "$tmp"')


def _wait_for_pod(cluster: Cluster, job: str, echo: Echo, timeout_s: float, sleep: Callable[[float], None]) -> str:
    said, end = "", time.monotonic() + timeout_s
    while time.monotonic() < end:
        pod = newest(cluster.list("Pod", f"batch.kubernetes.io/job-name={job}"))
        view = pod_view(pod) if pod else None
        if view and view.phase == "Running":
            return view.name
        if view and view.phase in ("Succeeded", "Failed"):
            raise ClusterError(f"the stage-in helper pod {view.name} ended ({view.reason or view.phase})")
        note = f"waiting for the helper pod ({view.reason or view.phase})" if view else "waiting for the helper pod"
        if note != said:
            echo(note)
            said = note
        sleep(1.0)
    raise ClusterError(f"the stage-in helper pod of Job {job} did not start within {timeout_s:.0f} s "
                       f"({said}); `kubetune status` and the namespace's events say why")


def stage_in(cluster: Cluster, recipe: Recipe, paths: list[str], to: str | None, echo: Echo,
             create_claim: bool = False, timeout_s: float = 600, sleep: Callable[[float], None] = time.sleep) -> None:
    if to is not None and len(paths) != 1:
        raise RecipeError("stage-in", ["--to names one destination: give one PATH with it"])
    mount = recipe.kubernetes.pvc.mount_path
    for path in paths:
        if not Path(path).exists():
            raise RecipeError("stage-in", [f"{path}: no such file or folder here"])
    targets = [(path, destination(path, to, mount)) for path in paths]  # every problem before any object
    if create_claim and (claim := render.claim(recipe, cluster.namespace)) is not None:
        try:
            cluster.create(claim)
            echo(f"created PersistentVolumeClaim {cluster.namespace}/{claim['metadata']['name']}")
        except AlreadyExistsError:
            pass
    job = render.stage_in_job(recipe, cluster.namespace)
    name = job["metadata"]["name"]
    cluster.create(job)
    echo(f"created Job {cluster.namespace}/{name} (mounts claim {render.claim_name(recipe)} at {mount})")
    try:
        pod = _wait_for_pod(cluster, name, echo, timeout_s, sleep)
        for path, where in targets:
            with tempfile.TemporaryFile() as tar_file:
                with tarfile.open(fileobj=tar_file, mode="w") as tar:
                    tar.add(path, arcname=PAYLOAD)
                size = tar_file.tell()
                tar_file.seek(0)
                absolute = normpath(join(mount, where))
                code, errors = cluster.exec(pod, ["sh", "-c", _unpack_script(size), "sh", absolute], stdin=tar_file)
            if code == EXISTS_EXIT:
                raise ClusterError(f"{where} is already on the claim; it is never overwritten: choose another --to")
            if code != 0:
                raise ClusterError(f"copying {path} to {where} on the claim failed (exit {code}): "
                                   f"{errors.strip().splitlines()[-1] if errors.strip() else 'no message'}")
            echo(f"copied {path} ({size / 2**20:.1f} MiB as tar) to {absolute}; in the recipe: {shlex.quote(where)}")
    finally:
        try:
            cluster.delete("Job", name)
        except NotFoundError:
            pass
