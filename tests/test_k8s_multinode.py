"""A fine-tune on several nodes renders a TrainJob (Kubeflow Trainer v2) or a PyTorchJob (Training Operator v1):
each render validates against the CRD's schema (tests/schemas, written from the SDKs' models: see
from_sdk_models.py) and its pods against Kubernetes' own schema and Pod Security "restricted"; a claim that is not
ReadWriteMany is refused. The driver creates them and reads their conditions as it does a Job's."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest

from k8s.checks import pss_restricted, validate
from k8s.fakeapi import FakeCluster
from kubetune.config import recipe_from_dict
from kubetune.errors import RecipeError
from kubetune.k8s import multinode, render
from kubetune.k8s.api import connect
from kubetune.k8s.driver import Driver, StageFailedError
from kubetune.k8s.state import job_state

SCHEMAS = Path(__file__).parent / "schemas"
SCHEMA_OF = {"TrainJob": SCHEMAS / "kubeflow-trainjob-v1alpha1.json",
             "PyTorchJob": SCHEMAS / "kubeflow-pytorchjob-v1.json"}
RECIPE = {
    "run": {"name": "big"}, "model": {"name_or_path": "bigscience/bloom-7b1"},
    "finetune": {"batch_size": 8, "grad_accum": 2},
    "resources": {"finetune": {"gpus": 4, "nodes": 2, "gpu_type": "NVIDIA-H100-80GB-HBM3", "cpu": "32",
                               "memory": "256Gi"}},
    "kubernetes": {"namespace": "ml", "pvc": {"access_modes": ["ReadWriteMany"], "storage_class": "cephfs"},
                   "queue": "team-gpus", "image_pull_secrets": ["regcred"],
                   "node_selector": {"node-role.kubernetes.io/gpu": ""},
                   "hf_token_secret": {"name": "hf-token"}},
}


def recipe(kind: str, **kubernetes):
    data = copy.deepcopy(RECIPE)
    data["resources"]["finetune"]["multi_node"] = kind
    data["kubernetes"].update(kubernetes)
    return recipe_from_dict(data)


def schema_problems(obj: dict) -> list[str]:
    schema = json.loads(SCHEMA_OF[obj["kind"]].read_text())
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in jsonschema.Draft202012Validator(schema).iter_errors(obj)]


def pods_of(obj: dict) -> list[dict]:
    """Each distinct pod the object makes, as a Pod that kubernetes-validate and the PSS checks read: the
    PyTorchJob's replica templates; for a TrainJob, its trainer settings applied to its runtime patch."""
    if obj["kind"] == "PyTorchJob":
        return [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p-{role.lower()}"},
                 "spec": spec["template"]["spec"]} for role, spec in obj["spec"]["pytorchReplicaSpecs"].items()]
    trainer = obj["spec"]["trainer"]
    (patch,) = obj["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = copy.deepcopy(node["template"]["spec"]["template"]["spec"])
    (container,) = pod["containers"]
    container.update(image=trainer["image"], command=trainer["command"], env=trainer["env"],
                     resources=trainer["resourcesPerNode"])
    return [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": pod}]


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
def test_render_is_valid_against_the_crd_and_every_pod_is_restricted(kind):
    obj = render.stage_job(recipe(kind), "finetune", "ml")
    assert obj["kind"] == multinode.KIND_OF[kind]
    assert schema_problems(obj) == []
    for pod in pods_of(obj):
        assert validate(pod) == []
        assert pss_restricted(pod) == []


def test_the_schemas_catch_a_misspelt_field():
    """The vendored schemas are closed: a field the CRD does not have fails (so the test above can fail)."""
    train_job = render.stage_job(recipe("trainjob"), "finetune", "ml")
    train_job["spec"]["trainer"]["numNode"] = 2
    assert any("numNode" in p for p in schema_problems(train_job))
    pytorch_job = render.stage_job(recipe("pytorchjob"), "finetune", "ml")
    pytorch_job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["imag"] = "x"
    assert any("imag" in p for p in schema_problems(pytorch_job))


def test_trainjob_runs_the_stage_on_every_node_with_one_process_per_gpu():
    obj = render.stage_job(recipe("trainjob"), "finetune", "ml")
    trainer = obj["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
    # a TrainJob's container has no workingDir: the command enters the claim, where relative paths start
    assert trainer["command"] == ["sh", "-c", 'cd "$0" && exec kubetune "$@"', "/workspace",
                                  "stage", "finetune", "--recipe", render.RECIPE_PATH]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    assert obj["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                         "name": "torch-distributed"}
    assert obj["spec"]["suspend"] is True and obj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-gpus"
    assert obj["metadata"]["annotations"][render.ANN_FINGERPRINT] == recipe("trainjob").job_fingerprint("finetune")


def test_pytorchjob_has_a_master_and_the_other_nodes_as_workers():
    obj = render.stage_job(recipe("pytorchjob"), "finetune", "ml")
    replicas = obj["spec"]["pytorchReplicaSpecs"]
    assert {role: spec["replicas"] for role, spec in replicas.items()} == {"Master": 1, "Worker": 1}
    assert obj["spec"]["nprocPerNode"] == "4"
    assert all(spec["restartPolicy"] == "ExitCode" for spec in replicas.values())
    container = replicas["Master"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch" and container["args"][:2] == ["stage", "finetune"]
    assert obj["spec"]["runPolicy"]["suspend"] is True


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
def test_a_claim_that_is_not_read_write_many_is_refused(kind):
    with pytest.raises(RecipeError) as info:
        render.render(recipe(kind, pvc={"access_modes": ["ReadWriteOnce"]}))
    assert info.value.exit_code == 3
    assert str(info.value).startswith("recipe: kubernetes.pvc.access_modes: resources.finetune.nodes is 2")


def test_trainjob_refuses_pod_settings_it_cannot_carry():
    with pytest.raises(RecipeError) as info:
        render.stage_job(recipe("trainjob", runtime_class_name="nvidia"), "finetune", "ml")
    assert "kubernetes.runtime_class_name: a TrainJob cannot set it" in str(info.value)

    assert render.stage_job(recipe("pytorchjob", runtime_class_name="nvidia"), "finetune", "ml")[
        "spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["runtimeClassName"] == "nvidia"


def test_the_driver_may_manage_the_multi_node_kind():
    rules = render.driver_rbac(recipe("pytorchjob"), "ml")[1]["rules"]
    assert {"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"],
            "verbs": ["create", "get", "list", "delete"]} in rules
    single = recipe_from_dict({"model": {"name_or_path": "m"}})
    assert render.driver_rbac(single, "ml")[1]["rules"] == render.DRIVER_RULES


@pytest.mark.parametrize("obj, state", [
    ({"kind": "TrainJob", "spec": {"suspend": True}}, "queued"),
    ({"kind": "TrainJob", "spec": {}, "status": {"conditions": [{"type": "Created", "status": "True"}]}},
     "running"),
    ({"kind": "TrainJob", "status": {"conditions": [{"type": "Complete", "status": "True"}]}}, "done"),
    ({"kind": "TrainJob", "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "JobSetFailed",
                                                      "message": "node-0 failed"}]}}, "failed"),
    ({"kind": "PyTorchJob", "spec": {"runPolicy": {"suspend": True}}}, "queued"),
    ({"kind": "PyTorchJob", "status": {"conditions": [{"type": "Running", "status": "True"}]}}, "running"),
    ({"kind": "PyTorchJob", "status": {"conditions": [{"type": "Running", "status": "False"},
                                                      {"type": "Succeeded", "status": "True"}]}}, "done"),
    ({"kind": "PyTorchJob", "status": {"conditions": [{"type": "Failed", "status": "True"}]}}, "failed"),
])
def test_conditions_read_as_job_states(obj, state):
    assert job_state(obj)[0] == state


# ---- the driver against a fake API server (kmock): created → running → succeeded / failed ------------------------
# What each operator writes when its job ends (the fake has no controllers; the test plays them).
FINISHED = {
    "TrainJob": ({"type": "Complete", "status": "True", "reason": "JobSetCompleted"},
                 {"type": "Failed", "status": "True", "reason": "JobSetFailed", "message": "node-1 exited with 137"}),
    "PyTorchJob": ({"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded"},
                   {"type": "Failed", "status": "True", "reason": "PyTorchJobFailed",
                    "message": "Worker-0 exited with code 4"}),
}
RUNNING = {"TrainJob": {"type": "Created", "status": "True"}, "PyTorchJob": {"type": "Running", "status": "True"}}


@pytest.fixture
def fake():
    with FakeCluster("ml") as fc:
        yield fc


def driven_recipe(kind: str):
    data = copy.deepcopy(RECIPE)
    data["kubernetes"].pop("queue")  # Kueue's suspension is read elsewhere (test_conditions_read_as_job_states)
    data["stages"] = ["finetune", "merge"]
    # on the claim already: no fetch stage before the fine-tune
    data["model"] = {"name_or_path": "/workspace/models/bloom-7b1"}
    data["data"] = {"source": "builtin:text2sql"}
    data["resources"]["finetune"]["multi_node"] = kind
    return recipe_from_dict(data)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
@pytest.mark.parametrize("ok", [True, False], ids=["succeeded", "failed"])
def test_driver_walks_the_multi_node_finetune_to_its_end(fake, tmp_path, kind, ok):
    cluster = connect(kubeconfig=str(fake.kubeconfig(tmp_path / "kubeconfig", namespace="ml")))
    recipe, said = driven_recipe(kind), []
    kube_kind = multinode.KIND_OF[kind]
    driver = Driver(cluster, recipe, echo=said.append)

    assert driver.step().action == "created"
    (created,) = fake.objects(kube_kind).values()
    assert created["metadata"]["name"] == "big-finetune" and fake.objects("Job") == {}
    assert schema_problems({k: v for k, v in created.items() if k != "status"}) == []

    fake.patch(kube_kind, "big-finetune", {"status": {"conditions": [RUNNING[kube_kind]]}})
    assert driver.step().action == "waiting"  # merge waits: no second GPU request while the fine-tune runs
    assert fake.objects("Job") == {}

    done, failed = FINISHED[kube_kind]
    fake.patch(kube_kind, "big-finetune", {"status": {"conditions": [RUNNING[kube_kind] | {"status": "False"},
                                                                      done if ok else failed]}})
    if ok:
        step = Driver(cluster, recipe, echo=said.append).step()  # a restarted driver finds it done
        assert (step.stage, step.action) == ("merge", "created")
        assert set(fake.objects("Job")) == {"big-merge"}
        assert said[:3] == [f"finetune: {kube_kind} ml/big-finetune created", "finetune: running",
                            "finetune: succeeded"]
    else:
        with pytest.raises(StageFailedError, match=f"stage 'finetune' failed \\({failed['reason']}: "):
            driver.step()
        assert fake.objects("Job") == {}


@pytest.mark.timeout(60)
def test_cancel_deletes_the_multi_node_finetune_too(fake, tmp_path):
    """A TrainJob made by `submit --wait` has no owner to be collected with: cancel deletes it by name."""
    from kubetune.k8s import launcher

    cluster = connect(kubeconfig=str(fake.kubeconfig(tmp_path / "kubeconfig", namespace="ml")))
    recipe, said = driven_recipe("trainjob"), []
    cluster.create(render.recipe_configmap(recipe, "ml"))
    cluster.create(render.stage_job(recipe, "finetune", "ml"))
    assert set(fake.objects("TrainJob")) == {"big-finetune"}
    launcher.cancel(cluster, "big", said.append)
    assert fake.objects("TrainJob") == {}
    assert "deleted TrainJob big-finetune and its pods" in said


@pytest.mark.timeout(60)
def test_status_shows_the_multi_node_finetune(fake, tmp_path):
    from kubetune.k8s import launcher

    cluster = connect(kubeconfig=str(fake.kubeconfig(tmp_path / "kubeconfig", namespace="ml")))
    recipe = driven_recipe("pytorchjob")
    cluster.create(render.recipe_configmap(recipe, "ml"))
    cluster.create(render.stage_job(recipe, "finetune", "ml"))
    fake.patch("PyTorchJob", "big-finetune", {"status": {"conditions": [RUNNING["PyTorchJob"]],
                                                         "startTime": "2026-12-06T10:00:00Z"}})
    fake.put("Pod", {"metadata": {"name": "big-finetune-master-0", "labels": render.labels(recipe, "stage", "finetune"),
                                  "creationTimestamp": "2026-12-06T10:00:01Z"},
                     "spec": {"nodeName": "gpu-node-7"}, "status": {"phase": "Running"}})
    rows = {r.stage: r for r in launcher.status_rows(cluster, "big")}
    assert rows["finetune"].phase == "Running" and rows["finetune"].pod == "big-finetune-master-0"
    assert rows["finetune"].gpu == "2 nodes × 4× nvidia.com/gpu NVIDIA-H100-80GB-HBM3"
    assert rows["merge"].phase == "not started"


def test_the_chart_refuses_what_validate_and_render_refuse():
    """`helm install` stops before the driver exists, with kubetune's line, instead of a driver failing with 3."""
    from k8s import tools

    chart = Path(__file__).parent.parent / "charts" / "kubetune"

    def template(*sets: str):
        args = [arg for s in sets for arg in ("--set", s)]
        return tools.run("helm", "template", "ft", str(chart), "--namespace", "ml", "-f",
                         str(chart / "ci" / "minimal-values.yaml"), *args, check=False)

    merge = template("recipe.resources.merge.gpus=4")
    assert merge.returncode != 0 and "recipe.resources.merge.gpus: merge runs on one GPU" in merge.stderr
    assert template("recipe.resources.merge.gpus=4", "recipe.stages={finetune}").returncode == 0  # no merge stage
    nodes = template("recipe.resources.finetune.nodes=2")
    assert nodes.returncode != 0 and "it must be ReadWriteMany" in nodes.stderr
    assert template("recipe.resources.finetune.nodes=2", "recipe.kubernetes.pvc.access_modes={ReadWriteMany}"
                    ).returncode == 0
