"""kubetune's CPU image, built from this checkout (images/Dockerfile, FLAVOUR=cpu) and run as the cluster runs
its pods (tests/containers.py: podman + runc, read-only root, no capabilities, no network, memory limit): the
CLI starts, a recipe validates, and the tiny recipe's stages run one container each, as the rendered Jobs say,
on a claim owned by root and given to the pod's group as the kubelet does with an fsGroup (group-owned,
setgid), as UID 1001 and as an arbitrary UID in group 0 (OpenShift). `make test-image` runs this file; it is
not in `make test` (a cold build takes minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from containers import ROOT, build_image, image_labels, podman_problem, run_in_image

pytestmark = pytest.mark.image

IMAGE_USER = "1001:0"  # the image's USER; Kubernetes runs it unless the pod sets runAsUser
OPENSHIFT_UID = 1000680000  # restricted-v2: a UID from the namespace's range, group 0, fsGroup from the range
TINY_RECIPE = ROOT / "jobs" / "tiny-test.yaml"


@pytest.fixture(scope="module")
def image() -> str:
    message = podman_problem()
    if message:
        if os.environ.get("KUBETUNE_REQUIRE_SERVERS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return build_image("cpu", _recipe().kubernetes.image)  # the tiny recipe names the image CI builds


def _recipe(*overrides: str):
    from kubetune.config import load_recipe

    return load_recipe(TINY_RECIPE, list(overrides))


def _claim(tmp_path: Path, recipe) -> Path:
    """A fresh volume as a user leaves it before submitting: root's, 0755, the model where the recipe names it
    (relative to the pod's working directory, the claim's mount path)."""
    claim = tmp_path / "claim"
    target = claim / recipe.model.name_or_path
    subprocess.run([sys.executable, str(ROOT / "tests" / "tiny.py"), str(target)], check=True, capture_output=True,
                   timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    for path in [claim, *claim.rglob("*")]:
        os.chown(path, 0, 0)
        path.chmod(0o755 if path.is_dir() else 0o644)
    return claim


def _recipe_volume(tmp_path: Path, recipe) -> Path:
    """The recipe ConfigMap's volume: the text `submit` puts in it, read-only."""
    from kubetune.k8s.render import RECIPE_FILE, recipe_text

    folder = tmp_path / "recipe"
    folder.mkdir(exist_ok=True)
    (folder / RECIPE_FILE).write_text(recipe_text(recipe))
    folder.chmod(0o755)
    return folder


def _run_stage_pod(image: str, recipe, stage: str, claim: Path, recipe_dir: Path, user: str,
                   assigned_fs_group: int | None = None) -> subprocess.CompletedProcess:
    """One stage Job's pod as the kubelet starts it: the rendered args, env, workingDir, volume mounts, memory
    limit and /dev/shm size; the pod's fsGroup (or the one OpenShift's SCC assigns when the pod sets none)
    applied to the claim and added to the container's groups; the container as USER ("UID:GID")."""
    from k8s.podrunner import apply_fs_group
    from kubetune.k8s.render import stage_job

    pod = stage_job(recipe, stage, "test")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    security = pod.get("securityContext", {})
    fs_group = security.get("fsGroup", assigned_fs_group)
    if fs_group is not None:
        apply_fs_group(claim, fs_group, security.get("fsGroupChangePolicy", "Always"))
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts, shm_size = [], None
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            mounts.append((recipe_dir, mount["mountPath"], True))
        elif "persistentVolumeClaim" in volume:
            mounts.append((claim, mount["mountPath"], mount.get("readOnly", False)))
        elif mount["mountPath"] == "/dev/shm":
            shm_size = volume["emptyDir"]["sizeLimit"]
        else:
            raise AssertionError(f"volume {mount['name']}: the test does not know how to mount it")
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env.update(GPTQMODEL_CPU_WORKERS="2", GPTQMODEL_DISABLE_PACK_EXT="1", HF_HUB_OFFLINE="1")  # CPU-only host
    return run_in_image(image, container["args"], env=env, mounts=mounts, user=user,
                        group_add=[fs_group] if fs_group is not None else [], workdir=container["workingDir"],
                        memory=container["resources"]["limits"]["memory"], shm_size=shm_size, timeout=900)


def _explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("user", [IMAGE_USER, f"{OPENSHIFT_UID}:0"])
def test_help_starts_as_any_uid_in_group_0(image, user):
    result = run_in_image(image, ["--help"], user=user, memory="1Gi", timeout=120)
    assert result.returncode == 0, _explain(result)
    assert "Usage: kubetune" in result.stdout and "stage" in result.stdout


def test_labels_name_the_commit_and_flavour(image):
    labels = image_labels(image)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert labels["org.opencontainers.image.revision"].removesuffix("-dirty") == head
    assert labels["io.kubetune.flavour"] == "cpu"
    version = subprocess.run([sys.executable, "-c", "import kubetune; print(kubetune.__version__)"], capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}).stdout.strip()
    assert labels["org.opencontainers.image.version"] == version
    recorded = run_in_image(image, ["/etc/kubetune-image.json"], command=["cat"], timeout=120)
    assert json.loads(recorded.stdout) == {"version": version, "flavour": "cpu",
                                           "revision": labels["org.opencontainers.image.revision"],
                                           "created": labels["org.opencontainers.image.created"]}


def test_build_mounts_are_not_in_the_image(image):
    """The CA bundle (a build secret) and the torch wheel folder (a build context) reach the build only: no
    file, not even an empty mount point, is left in the image, and no torch wheel."""
    script = ("test ! -e /run/secrets/build-ca && test ! -e /run/torch-wheels "
              "&& ! find / -xdev -name 'torch-*.whl' 2>/dev/null | grep .")
    result = run_in_image(image, ["-c", script], command=["sh"], read_only=False, timeout=120)
    assert result.returncode == 0, _explain(result)


def test_validate_reads_the_mounted_recipe(image, tmp_path):
    from kubetune.k8s.render import RECIPE_PATH

    recipe_dir = _recipe_volume(tmp_path, _recipe())
    result = run_in_image(image, ["validate", RECIPE_PATH], mounts=[(recipe_dir, str(Path(RECIPE_PATH).parent), True)],
                          user=f"{OPENSHIFT_UID}:0", memory="1Gi", timeout=120)
    assert result.returncode == 0, _explain(result)


def test_memory_limit_is_enforced(image):
    result = run_in_image(image, ["-c", "b = bytearray(400 << 20); print(len(b))"], command=["python"],
                          memory="128Mi", timeout=120)
    assert result.returncode == 137, _explain(result)  # the OOM killer, as a pod over its limit


def test_claim_without_fs_group_is_refused_with_exit_13(image, tmp_path):
    """A root-owned 0755 volume (block storage) and no fsGroup: the first write fails, the stage says so."""
    recipe = _recipe("kubernetes.fs_group=null")
    claim = _claim(tmp_path, recipe)
    result = _run_stage_pod(image, recipe, "finetune", claim, _recipe_volume(tmp_path, recipe), IMAGE_USER)
    assert result.returncode == 13, _explain(result)
    assert "permission denied" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("user, overrides, assigned_fs_group", [
    (IMAGE_USER, [], None),  # plain Kubernetes: the image's user, the recipe's fsGroup (1001)
    (f"{OPENSHIFT_UID}:0", ["kubernetes.fs_group=null"], OPENSHIFT_UID),  # restricted-v2 assigns both
], ids=["image-user", "openshift-uid"])
def test_tiny_pipeline_runs_one_container_per_stage(image, tmp_path, user, overrides, assigned_fs_group):
    from kubetune.artifacts import SUCCESS_MARKER
    from kubetune.stages.evaluate import METRICS_FILE

    recipe = _recipe(*overrides)
    claim = _claim(tmp_path, recipe)
    recipe_dir = _recipe_volume(tmp_path, recipe)
    for stage in recipe.stages:
        result = _run_stage_pod(image, recipe, stage, claim, recipe_dir, user, assigned_fs_group)
        assert result.returncode == 0, f"{stage}: {_explain(result)}"

    uid, fs_group = int(user.split(":")[0]), recipe.kubernetes.fs_group or assigned_fs_group
    run_dir = claim / recipe.run.artifacts_root / recipe.run.name
    for stage in recipe.stages:
        assert (run_dir / stage / SUCCESS_MARKER).is_file(), stage
        assert (run_dir / stage).stat().st_uid == uid, stage  # written by the pod's user, not root
    # the setgid claim: everything the pods wrote belongs to the pod's group
    assert {p.stat().st_gid for p in run_dir.rglob("*")} == {fs_group}
    metrics = json.loads((run_dir / "evaluate" / METRICS_FILE).read_text())
    assert set(metrics["models"]) >= {"base", "adapter"}
