"""The user's path, executed: `kubetune submit` → the driver Job's pod → each stage Job's pod, every one a fresh
process run as the pod spec says (tests/k8s/podrunner.py plays the Job controller and the kubelet on the fake
API server). The artifacts must be what `kubetune run` makes of the same recipe in one local process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hubfake import FakeHub
from k8s.executor import HostExecutor, PodmanExecutor
from k8s.fakeapi import FakeCluster
from k8s.podrunner import PodRunner, apply_fs_group
from tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
KUBETUNE = Path(sys.executable).parent / "kubetune"
RECIPE = ROOT / "jobs" / "tiny-test.yaml"
RUN = "tiny-test"
STAGES = ("finetune", "merge", "quantize", "infer", "evaluate")

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"),
                                 reason="the pod runner needs root, unshare and setpriv (CI has them)")]


def executor():
    """Host processes by default; the pods in the CPU image through podman when KUBETUNE_POD_EXECUTOR=podman
    (`make test-image` builds the image first and sets it)."""
    if os.environ.get("KUBETUNE_POD_EXECUTOR") == "podman":
        from containers import podman_problem

        problem = podman_problem()
        assert problem is None, f"KUBETUNE_POD_EXECUTOR=podman, but {problem}"
        return PodmanExecutor()
    return HostExecutor()


def runner_for(fake, tmp_path: Path, claim: Path) -> PodRunner:
    chosen = executor()
    print(f"pod runner: the pods run as {chosen.kind}")  # which one ran, in the test's output
    return PodRunner(fake, tmp_path / "node", claims={f"{RUN}-data": claim}, executor=chosen)


def cli(*args, kubeconfig: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), COLUMNS="200")
    proc = subprocess.run([str(KUBETUNE), *map(str, args)], capture_output=True, text=True, env=env, timeout=120)
    if check and proc.returncode:
        raise AssertionError(f"kubetune {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def wait_for(what, predicate, runner: PodRunner, timeout_s: float = 420):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; pod runner errors: {runner.errors}")


def job_condition(fake: FakeCluster, name: str) -> str | None:
    job = fake.objects("Job").get(name)
    for cond in ((job or {}).get("status") or {}).get("conditions") or []:
        if cond.get("status") == "True":
            return cond["type"]
    return None


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-llama")


def fresh_claim(tmp_path: Path, tiny_model: Path) -> Path:
    """The claim as a user leaves it before submitting: the model copied to where the recipe names it."""
    claim = tmp_path / "claim"
    shutil.copytree(tiny_model, claim / ".cache" / "models" / "tiny-llama")
    for path in [claim, *claim.rglob("*")]:  # a fresh volume's files belong to root, not to the pod's user
        os.chown(path, 0, 0)
    claim.chmod(0o755)
    return claim


def submit(fake: FakeCluster, tmp_path: Path, *overrides: str) -> Path:
    kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig", namespace="ml")
    sets = [a for o in ("kubernetes.driver.poll_s=0.5", *overrides) for a in ("--set", o)]
    cli("submit", RECIPE, *sets, kubeconfig=kubeconfig)
    return kubeconfig


def test_submit_runs_every_stage_pod_and_matches_kubetune_run(tmp_path, tiny_model):
    claim = fresh_claim(tmp_path, tiny_model)
    with FakeCluster("ml") as fake, runner_for(fake, tmp_path, claim) as runner:
        kubeconfig = submit(fake, tmp_path)
        wait_for("the driver Job to finish", lambda: job_condition(fake, f"{RUN}-driver"), runner)
        assert job_condition(fake, f"{RUN}-driver") == "Complete", cli("logs", RUN, "--stage", "driver",
                                                                        kubeconfig=kubeconfig, check=False).stdout
        for stage in STAGES:
            assert job_condition(fake, f"{RUN}-{stage}") == "Complete", stage
        status = cli("status", RUN, kubeconfig=kubeconfig).stdout
        for stage in ("driver", *STAGES):
            assert any(line.split()[:2] == [stage, "Succeeded"] for line in status.splitlines()), status
        logs = cli("logs", RUN, "--stage", "finetune", kubeconfig=kubeconfig).stdout
        assert f"finetune: done in" in logs and "/workspace/artifacts/tiny-test/finetune" in logs
        driver_log = cli("logs", RUN, "--stage", "driver", kubeconfig=kubeconfig).stdout
        assert f"run {RUN}: all {len(STAGES)} stage(s) succeeded" in driver_log
        pod_owner = {p.stat().st_uid for p in (claim / "artifacts" / RUN).rglob("*")}
        assert pod_owner == {1001}  # written by the image's user, not by root

    # The same recipe, one local process, as `kubetune run` on a laptop.
    local = tmp_path / "local"
    shutil.copytree(tiny_model, local / ".cache" / "models" / "tiny-llama")
    subprocess.run([str(KUBETUNE), "run", str(RECIPE)], cwd=local, check=True, capture_output=True, timeout=300)
    pods_out, local_out = claim / "artifacts" / RUN, local / "artifacts" / RUN
    from safetensors.torch import load_file

    a = load_file(pods_out / "finetune" / "adapter_model.safetensors")
    b = load_file(local_out / "finetune" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert json.loads((pods_out / "evaluate" / "metrics.json").read_text()) == \
        json.loads((local_out / "evaluate" / "metrics.json").read_text())


def test_a_hub_model_is_fetched_first_and_the_gpu_stages_run_offline(tmp_path, tiny_model):
    """The DAG of a recipe that names a hub model: the fetch Job (no GPU) downloads it onto the claim; every later
    stage runs with HF_HUB_OFFLINE=1 and reads the claim's cache. The hub closes as soon as fetch is done: a stage
    that still asked it anything would be answered 503 and be seen in its request log."""
    claim = tmp_path / "claim"  # empty: the model is not copied there by hand
    with FakeHub({"model": {"kubetune-test/tiny-llama": tiny_model}}) as hub, FakeCluster("ml") as fake, \
            PodRunner(fake, tmp_path / "node", claims={f"{RUN}-data": claim}) as runner:
        kubeconfig = submit(fake, tmp_path, "model.name_or_path=kubetune-test/tiny-llama",
                            f"kubernetes.env=[{{name: HF_ENDPOINT, value: '{hub.url}'}}]")
        wait_for("the fetch Job to finish", lambda: job_condition(fake, f"{RUN}-fetch"), runner)
        hub.closed = True
        fetched = len(hub.requests)
        assert job_condition(fake, f"{RUN}-fetch") == "Complete", cli("logs", RUN, "--stage", "fetch",
                                                                       kubeconfig=kubeconfig, check=False).stdout
        assert f"{RUN}-finetune" not in fake.objects("Job") or fake.objects("Job")[f"{RUN}-finetune"][
            "metadata"]["creationTimestamp"] >= fake.objects("Job")[f"{RUN}-fetch"]["metadata"]["creationTimestamp"]
        wait_for("the driver Job to finish", lambda: job_condition(fake, f"{RUN}-driver"), runner)
        status = cli("status", RUN, kubeconfig=kubeconfig).stdout
        for stage in ("driver", "fetch", *STAGES):
            assert any(line.split()[:2] == [stage, "Succeeded"] for line in status.splitlines()), status
        assert status.splitlines()[2].split()[0] == "fetch"  # first after the driver
        assert hub.requests[fetched:] == []  # nothing asked the hub after the fetch
        commit = hub.repos["model", "kubetune-test/tiny-llama"].commit
        report = json.loads((claim / "artifacts" / RUN / "fetch" / "report.json").read_text())
        assert report["sources"]["model"]["commit"] == commit
        assert (claim / ".cache" / "huggingface" / "hub" / "models--kubetune-test--tiny-llama" / "snapshots" /
                commit / "config.json").exists()
        assert (claim / "artifacts" / RUN / "evaluate" / "metrics.json").exists()


def test_a_pod_deleted_mid_finetune_is_replaced_and_resumes_from_its_checkpoint(tmp_path, tiny_model):
    claim = fresh_claim(tmp_path, tiny_model)
    with FakeCluster("ml") as fake, runner_for(fake, tmp_path, claim) as runner:
        kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig", namespace="ml")
        # one stage Job of its own (`submit --stage`), slowed so that a checkpoint exists before the delete
        cli("submit", RECIPE, "--stage", "finetune", "--set", "finetune.max_steps=40", "--set",
            "finetune.save_steps=4", kubeconfig=kubeconfig)
        checkpoints = claim / "artifacts" / RUN / ".work" / "finetune"
        wait_for("a sealed checkpoint", lambda: any(checkpoints.glob("checkpoints/checkpoint-*/kubetune-checkpoint.json")),
                 runner)
        first = next(iter(fake.objects("Pod")))
        fake.delete("Pod", first)  # `kubectl delete pod`: SIGTERM, checkpoint, exit 143
        wait_for("the Job to finish", lambda: job_condition(fake, f"{RUN}-finetune"), runner)
        job = fake.objects("Job")[f"{RUN}-finetune"]
        assert job_condition(fake, f"{RUN}-finetune") == "Complete"
        assert job["status"]["failed"] == 1  # the deleted attempt counted; the second succeeded
        second = [p for p in fake.objects("Pod") if p != first]
        log = cli("logs", RUN, "--stage", "finetune", kubeconfig=kubeconfig).stdout
        assert len(second) == 1 and "resum" in log.lower(), log
        report = json.loads((claim / "artifacts" / RUN / "finetune" / "report.json").read_text())
        assert report["metrics"]["resumed_from_step"] > 0


def test_a_permanent_error_fails_the_job_without_retries(tmp_path, tiny_model):
    claim = fresh_claim(tmp_path, tiny_model)
    with FakeCluster("ml") as fake, runner_for(fake, tmp_path, claim) as runner:
        kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig", namespace="ml")
        cli("submit", RECIPE, "--stage", "finetune", "--set", "model.name_or_path=.cache/models/not-there",
            kubeconfig=kubeconfig)
        wait_for("the Job to fail", lambda: job_condition(fake, f"{RUN}-finetune"), runner)
        job = fake.objects("Job")[f"{RUN}-finetune"]
        assert job_condition(fake, f"{RUN}-finetune") == "Failed"
        assert job["status"]["conditions"][0]["reason"] == "PodFailurePolicy"
        assert len(fake.objects("Pod")) == 1 and job["status"]["failed"] == 1  # exit 5: no second attempt
        status = cli("status", RUN, kubeconfig=kubeconfig).stdout
        assert "exit code 5" in status and "model.name_or_path" in status, status


@pytest.mark.parametrize("fs_group", [None, 1001])
def test_a_root_owned_claim_is_writable_only_with_an_fs_group(tmp_path, tiny_model, fs_group):
    """Block storage (EBS, PD, Azure Disk, Ceph RBD) gives a fresh claim whose root is root:root 0755: the image's
    user 1001 cannot write there unless the pod's fsGroup makes the kubelet hand the volume to that group."""
    claim = fresh_claim(tmp_path, tiny_model)
    with FakeCluster("ml") as fake, runner_for(fake, tmp_path, claim) as runner:
        kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig", namespace="ml")
        rendered = cli("render", RECIPE, "--stage", "finetune", kubeconfig=kubeconfig).stdout
        import yaml

        objects = [o for o in yaml.safe_load_all(rendered) if o]
        for obj in objects:
            if obj["kind"] == "Job":
                security = obj["spec"]["template"]["spec"]["securityContext"]
                security.pop("fsGroup", None)
                security.pop("fsGroupChangePolicy", None)
                if fs_group is not None:
                    security.update(fsGroup=fs_group, fsGroupChangePolicy="OnRootMismatch")
            fake.put(obj["kind"], obj)
        wait_for("the Job to end", lambda: job_condition(fake, f"{RUN}-finetune"), runner)
        state = job_condition(fake, f"{RUN}-finetune")
        status = cli("status", RUN, kubeconfig=kubeconfig).stdout
        if fs_group is None:
            assert state == "Failed" and "exit code 13" in status, status
        else:
            assert state == "Complete", status
            assert (claim / "artifacts" / RUN / "finetune" / "_SUCCESS").exists()


def test_fs_group_on_root_mismatch_leaves_a_matching_volume_alone(tmp_path):
    volume = tmp_path / "v"
    (volume / "sub").mkdir(parents=True)
    (volume / "sub" / "f").write_text("x")
    apply_fs_group(volume, 1001, "OnRootMismatch")
    assert volume.stat().st_gid == 1001 and volume.stat().st_mode & 0o2070 == 0o2070
    assert (volume / "sub" / "f").stat().st_gid == 1001
    os.chown(volume / "sub" / "f", 0, 0)
    apply_fs_group(volume, 1001, "OnRootMismatch")  # the root matches: no walk, as the kubelet does
    assert (volume / "sub" / "f").stat().st_gid == 0


def test_a_deleted_driver_pod_ends_on_sigterm_as_pid_1(tmp_path, tiny_model):
    """A container's entrypoint is PID 1 of its namespace, where a signal with the default action is dropped:
    without its own handler the driver (and merge, quantize, infer, evaluate) would sit out the grace period and
    be SIGKILLed (137). It must end on SIGTERM itself (143)."""
    claim = fresh_claim(tmp_path, tiny_model)
    with FakeCluster("ml") as fake, runner_for(fake, tmp_path, claim) as runner:
        submit(fake, tmp_path, "kubernetes.driver.poll_s=30")  # the driver sleeps between passes: SIGTERM lands there
        wait_for("the driver's first pass", lambda: f"{RUN}-finetune" in fake.objects("Job"), runner)
        driver_pod = next(p for p in fake.objects("Pod") if p.startswith(f"{RUN}-driver"))
        fake.delete("Pod", driver_pod)
        wait_for("the driver pod to end", lambda: runner.runs[driver_pod].finished, runner, timeout_s=60)
        assert runner.runs[driver_pod].process.poll() == 143
