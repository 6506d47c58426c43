"""The cluster commands through click's CliRunner, against the fake API server: flags, their KUBETUNE_* env
forms, output, and one-line errors with their exit codes."""

from __future__ import annotations

import threading

import pytest
import yaml
from click.testing import CliRunner

from k8s.fakeapi import FakeCluster
from kubetune.cli import cli
from kubetune.errors import ClusterError, ImageError

pytestmark = pytest.mark.timeout(60)
RECIPE = """
run: {name: cli1}
model: {name_or_path: .cache/models/base}  # on the claim: no fetch stage
stages: [finetune, merge]
kubernetes: {image: registry.example.com/ml/kubetune:0.1.0}
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return str(path)


@pytest.fixture
def fake(tmp_path):
    with FakeCluster("ml") as fc:
        fc.kubeconfig_path = str(fc.kubeconfig(tmp_path / "kubeconfig", namespace="ml"))
        yield fc


def invoke(args, env=None):
    return CliRunner().invoke(cli, args, env=env, catch_exceptions=False)


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def test_render_all_one_stage_and_env_forms(recipe):
    everything = docs(invoke(["render", recipe]).output)
    assert [o["kind"] for o in everything].count("Job") == 3  # driver + 2 stages
    one = docs(invoke(["render", recipe, "--stage", "merge"]).output)
    assert [(o["kind"], o["metadata"]["name"]) for o in one] == [
        ("PersistentVolumeClaim", "cli1-data"), ("ConfigMap", "cli1-recipe"), ("Job", "cli1-merge")]
    base = docs(invoke(["render", recipe, "--no-stage-jobs"]).output)
    assert {o["metadata"]["labels"]["app.kubernetes.io/component"] for o in base} == {"storage", "recipe", "driver"}
    for env in ({"KUBETUNE_NAMESPACE": "team"}, {"KUBETUNE_RENDER_NAMESPACE": "team"}):
        assert {o["metadata"]["namespace"] for o in docs(invoke(["render", recipe], env).output)} == {"team"}
    renamed = docs(invoke(["render", recipe, "--set", "run.name=other"]).output)
    assert renamed[0]["metadata"]["name"] == "other-data"
    assert {o["metadata"]["namespace"] for o in docs(invoke(["render", recipe, "-n", "x"]).output)} == {"x"}


def test_submit_client_dry_run_contacts_nothing(recipe, tmp_path):
    env = {"KUBECONFIG": str(tmp_path / "absent")}
    detach = docs(invoke(["submit", recipe, "--dry-run", "client"], env).output)
    assert ("Job", "cli1-driver") in {(o["kind"], o["metadata"]["name"]) for o in detach}
    wait = docs(invoke(["submit", recipe, "--dry-run", "client", "--wait"], env).output)
    assert "Role" not in {o["kind"] for o in wait}  # a laptop-driven run needs no in-cluster driver


def test_submit_detach_with_env_vars(fake, recipe):
    env = {"KUBECONFIG": fake.kubeconfig_path, "KUBETUNE_SUBMIT_STAGE": "merge"}
    result = invoke(["submit", recipe], env)
    assert result.exit_code == 0, result.output
    assert set(fake.objects("Job")) == {"cli1-merge"}
    assert "kubetune logs cli1 --stage merge -f -n ml" in result.output


def test_namespace_flag_and_env_reach_the_api(fake, recipe):
    invoke(["submit", recipe, "--stage", "finetune", "--kubeconfig", fake.kubeconfig_path, "-n", "other"])
    invoke(["submit", recipe, "--stage", "finetune", "--kubeconfig", fake.kubeconfig_path],
           {"KUBETUNE_NAMESPACE": "third"})
    paths = [r.url.path for r in fake.requests("post", "/jobs")]
    assert paths == ["/apis/batch/v1/namespaces/other/jobs", "/apis/batch/v1/namespaces/third/jobs"]


def _controller(fake, stop: threading.Event):
    """Plays the Job controller: every stage Job without a status succeeds a moment after it appears."""
    while not stop.wait(0.05):
        for name, job in fake.objects("Job").items():
            if "status" not in job and "kubetune.io/stage" in job["metadata"]["labels"]:
                fake.finish_job(name)


def test_submit_wait_drives_from_here(fake, recipe):
    stop = threading.Event()
    thread = threading.Thread(target=_controller, args=(fake, stop), daemon=True)
    thread.start()
    try:
        result = invoke(["submit", recipe, "--wait", "--poll", "0.05", "--kubeconfig", fake.kubeconfig_path])
    finally:
        stop.set()
        thread.join()
    assert result.exit_code == 0, result.output
    assert "run cli1: all 2 stage(s) succeeded" in result.output
    assert "cli1-driver" not in fake.objects("Job") and not fake.objects("Role")


def test_drive_reads_the_recipe_from_the_cluster_and_stops_on_failure(fake, recipe):
    kc = ["--kubeconfig", fake.kubeconfig_path]
    invoke(["submit", recipe, *kc])  # detach: ConfigMap + driver Job; here the CLI plays the driver pod
    stop = threading.Event()

    def fail_merge():
        while not stop.wait(0.05):
            jobs = fake.objects("Job")
            if "cli1-finetune" in jobs and "status" not in jobs["cli1-finetune"]:
                fake.finish_job("cli1-finetune")
            if "cli1-merge" in jobs and "status" not in jobs["cli1-merge"]:
                fake.finish_job("cli1-merge", ok=False, reason="PodFailurePolicy", message="exit code 7")

    thread = threading.Thread(target=fail_merge, daemon=True)
    thread.start()
    try:
        result = CliRunner().invoke(cli, ["drive", "cli1", "--poll", "0.05", *kc])
    finally:
        stop.set()
        thread.join()
    assert result.exit_code == 11, result.output  # PipelineError, permanent: the driver Job's podFailurePolicy fails it
    assert "finetune: succeeded" in result.output
    assert "error: stage 'merge' failed (PodFailurePolicy: exit code 7)" in result.output


def test_status_logs_list_cancel(fake, recipe):
    kc = ["--kubeconfig", fake.kubeconfig_path]
    invoke(["submit", recipe, "--stage", "finetune", *kc])
    job = fake.objects("Job")["cli1-finetune"]
    fake.add_pod(job, "cli1-finetune-x1", phase="Running", log="loading\nstep 1/10\n")
    fake.start_job("cli1-finetune")

    status = invoke(["status", "cli1", *kc]).output.splitlines()
    assert status[0].split()[:3] == ["STAGE", "PHASE", "POD"]
    assert status[1].split()[:4] == ["finetune", "Running", "cli1-finetune-x1", "gpu-node-1"]
    assert status[2].split()[:2] == ["merge", "not"]
    assert invoke(["status", *kc]).output.splitlines()[0].split()[0] == "STAGE"  # the only run

    assert invoke(["logs", "cli1", "--stage", "finetune", *kc]).output == "loading\nstep 1/10\n"
    assert invoke(["list", *kc]).output.splitlines()[1].split() == ["cli1", "0", "finetune", "running"]
    out = invoke(["cancel", "cli1", *kc]).output
    assert "deleted Job cli1-finetune and its pods" in out
    assert invoke(["list", *kc]).output.strip() == "no kubetune runs in namespace ml"


def test_api_errors_are_one_line_with_the_cluster_exit_code(fake, recipe, tmp_path):
    fake.kube.deny.add(("create", "configmaps"))
    result = CliRunner().invoke(cli, ["submit", recipe, "--kubeconfig", fake.kubeconfig_path])
    assert result.exit_code == ClusterError.exit_code
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: forbidden: cannot create configmaps/cli1-recipe in namespace \"ml\"")
    assert "Traceback" not in result.output

    missing = CliRunner().invoke(cli, ["status", "nope", "--kubeconfig", fake.kubeconfig_path])
    assert missing.exit_code == ClusterError.exit_code and "no run 'nope' in namespace ml" in missing.output

    nowhere = CliRunner().invoke(cli, ["list"], env={"KUBECONFIG": str(tmp_path / "absent"),
                                                     "KUBERNETES_SERVICE_HOST": ""})
    assert nowhere.exit_code == ClusterError.exit_code
    assert "no Kubernetes configuration" in nowhere.output


def test_submit_refuses_the_unpublished_default_image_before_contacting_the_cluster(fake, tmp_path):
    path = tmp_path / "default-image.yaml"
    path.write_text(RECIPE.replace("kubernetes: {image: registry.example.com/ml/kubetune:0.1.0}\n", ""))
    result = CliRunner().invoke(cli, ["submit", str(path), "--kubeconfig", fake.kubeconfig_path])
    assert result.exit_code == ImageError.exit_code == 15
    [line] = result.output.strip().splitlines()
    assert "kubernetes.image: ghcr.io/kubetune/kubetune:0.1.0 has not been published" in line
    assert "make images IMAGE=REGISTRY/kubetune:TAG && podman push REGISTRY/kubetune:TAG" in line
    assert fake.requests() == []  # nothing created, nothing even read
    # render and --dry-run client print it: a template to edit
    assert "image: ghcr.io/kubetune/kubetune:0.1.0" in invoke(["render", str(path)]).output
    assert "image: ghcr.io/kubetune/kubetune:0.1.0" in invoke(["submit", str(path), "--dry-run", "client"]).output
    # an image of one's own, given on the command line, goes through
    own = invoke(["submit", str(path), "--stage", "finetune", "--kubeconfig", fake.kubeconfig_path,
                  "--set", "kubernetes.image=registry.example.com/ml/kubetune:0.1.0"])
    assert own.exit_code == 0
    assert fake.objects("Job")["cli1-finetune"]["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "registry.example.com/ml/kubetune:0.1.0"


@pytest.mark.parametrize("image, unpublished", [
    ("ghcr.io/kubetune/kubetune:0.1.0", True),
    ("ghcr.io/kubetune/kubetune", True),  # :latest, never pushed either
    ("ghcr.io/kubetune/kubetune:0.1.0@sha256:" + "a" * 64, False),  # pinned by digest: taken on trust
    ("ghcr.io/someone/kubetune:0.1.0", False),
    ("registry.example.com:5000/kubetune/kubetune:0.1.0", False),
    ("localhost/kubetune:cpu-test", False),
])
def test_which_references_to_kubetunes_image_are_unpublished(image, unpublished):
    from kubetune.k8s.image import is_unpublished

    assert is_unpublished(image) is unpublished
