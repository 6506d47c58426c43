"""`kubetune render`: golden files of the shipped recipes, schema validity for Kubernetes 1.29–1.33, Pod Security
"restricted" / OpenShift restricted-v2, and the contract details (exit codes, secrets, GPUs, Kueue).

Regenerate the golden files after an intended change: KUBETUNE_UPDATE_GOLDEN=1 pytest tests/test_k8s_render.py
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest
import yaml

from k8s.checks import all_problems, openshift_restricted_v2, pss_restricted, rbac_problems, validate
from kubetune.config import load_recipe, recipe_from_dict
from kubetune.errors import PERMANENT_EXIT_CODES, RecipeError
from kubetune.k8s import gojson, render

ROOT = Path(__file__).parent.parent
GOLDEN = Path(__file__).parent / "golden" / "render"
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))

FULL = {  # every kubernetes option at once, plus values that JSON and Go format differently
    "run": {"name": "full-options", "artifacts_root": "/data/artifacts"},
    "model": {"name_or_path": "org/model", "revision": "abc123"},
    "prompt": {"template": "<s> Q & A: {context} -> {question}\n"},
    "finetune": {"learning_rate": 1.0e-5, "epochs": 2.0, "warmup_ratio": 0.1},
    "resources": {"finetune": {"gpus": 2, "gpu_type": "NVIDIA-H100-80GB-HBM3", "cpu": "16", "memory": "128Gi"}},
    "kubernetes": {
        "image": "registry.example.com/ml/kubetune:0.1.0", "image_pull_policy": "Always",
        "image_pull_secrets": ["regcred"], "namespace": "ml",
        "pvc": {"claim_name": "shared-artifacts", "size": "1Ti", "storage_class": "cephfs",
                "access_modes": ["ReadWriteMany"], "mount_path": "/data"},
        "gpu_resource": "nvidia.com/gpu", "node_selector": {"node-role.kubernetes.io/gpu": ""},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 1, "preference": {"matchExpressions": [
                {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["zone-a"]}]}}]}},
        "hf_token_secret": {"name": "hf-token", "key": "token"}, "queue": "team-gpus",
        "backoff_limit": 0, "active_deadline_s": 172800, "ttl_after_finished_s": 3600,
        "termination_grace_s": 600, "shm_size": "32Gi",
        # the platform knobs (issue 18): each must land where documented and pass kubernetes-validate --strict
        "gpu_tolerations": [{"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}],
        "priority_class_name": "ml-batch", "runtime_class_name": "nvidia",
        "pod_labels": {"team": "nlp", "sidecar.istio.io/inject": "false"},
        "pod_annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
        "env": [{"name": "HF_ENDPOINT", "value": "https://hf-mirror.example.com"},
                {"name": "HTTPS_PROXY", "valueFrom": {"secretKeyRef": {"name": "proxy", "key": "url"}}},
                {"name": "REQUESTS_CA_BUNDLE", "value": "/etc/corp-ca/ca.crt"}],
        "env_from": [{"configMapRef": {"name": "hub-settings"}}],
        "extra_volumes": [{"name": "corp-ca", "configMap": {"name": "corp-ca-bundle"}}],
        "extra_volume_mounts": [{"name": "corp-ca", "mountPath": "/etc/corp-ca", "readOnly": True}],
        "fs_group": 2000, "fs_group_change_policy": "Always"},
}


def full_recipe():
    return recipe_from_dict(copy.deepcopy(FULL))


def cases():
    return [(p.stem, lambda p=p: load_recipe(p)) for p in JOBS] + [("full-options", full_recipe)]


@pytest.mark.parametrize("name,make", cases(), ids=[c[0] for c in cases()])
def test_render_matches_golden(name, make):
    # Fingerprints change with any stage setting's default; they are checked where they are used (the driver
    # tests), so the golden files do not churn with every new recipe field.
    text = re.sub(r"(kubetune.io/fingerprint: )[0-9a-f]{16}", r"\1<fingerprint>", render.to_yaml(render.render(make())))
    path = GOLDEN / f"{name}.yaml"
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run KUBETUNE_UPDATE_GOLDEN=1 pytest {__file__}"
    assert text == path.read_text(), f"render of {name} changed; if intended, regenerate (see module docstring)"


@pytest.mark.parametrize("name,make", cases(), ids=[c[0] for c in cases()])
def test_every_object_is_valid_and_restricted(name, make):
    objects = render.render(make())
    assert all_problems(objects) == []
    kinds = [o["kind"] for o in objects]
    assert kinds.count("Job") == 1 + len(make().stages)


def test_golden_files_have_no_orphans():
    expected = {f"{n}.yaml" for n, _ in cases()}
    assert {p.name for p in GOLDEN.glob("*.yaml")} <= expected


def test_the_checks_catch_what_they_claim_to():
    job = render.stage_job(full_recipe(), "finetune", "ml")
    assert validate(job) == []
    typo = copy.deepcopy(job)
    typo["spec"]["template"]["spec"]["restartPolcy"] = "Never"
    assert len(validate(typo)) == 5  # one per Kubernetes version
    bad = copy.deepcopy(job)
    pod = bad["spec"]["template"]["spec"]
    pod["containers"][0]["securityContext"] = {"privileged": True, "runAsUser": 0}
    pod["securityContext"] = {"fsGroup": 1000}
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    found = " | ".join(openshift_restricted_v2(bad))
    for expected in ("privileged", "allowPrivilegeEscalation must be false", "runAsNonRoot must be true",
                     "runAsUser must not be 0", "seccompProfile", "drop ALL", "hostPath", "fsGroup is fixed",
                     "securityContext.runAsUser is fixed"):
        assert expected in found
    assert pss_restricted(job) == []
    role = {"kind": "Role", "metadata": {"name": "r"},
            "rules": [{"apiGroups": [""], "resources": ["secrets", "pods"], "verbs": ["*"]}]}
    assert rbac_problems(role) == ["r: wildcard in verbs", "r: access to secrets"]


def test_stage_job_contract():
    recipe = full_recipe()
    job = render.stage_job(recipe, "finetune", "ml")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["stage", "finetune", "--recipe", "/etc/kubetune/recipe.yaml"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["nodeSelector"] == {"node-role.kubernetes.io/gpu": "", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] == 172800
    fail, ignore = spec["podFailurePolicy"]["rules"]
    assert fail["onExitCodes"]["values"] == list(PERMANENT_EXIT_CODES) and fail["action"] == "FailJob"
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}
    assert env["HF_HOME"]["value"] == "/data/.cache/huggingface"
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/data", "/etc/kubetune", "/dev/shm", "/etc/corp-ca"}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}} in pod["volumes"]
    assert spec["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-gpus"
    for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "kubetune.io/run", "kubetune.io/stage"):
        assert key in job["metadata"]["labels"] and key in job["spec"]["template"]["metadata"]["labels"]


def test_platform_knobs_land_on_the_pods_they_are_for():
    recipe = full_recipe()
    gpu = render.stage_job(recipe, "finetune", "ml")["spec"]["template"]
    cpu = render.stage_job(recipe, "evaluate", "ml")["spec"]["template"]  # evaluate requests no GPU
    driver = render.driver_job(recipe, "ml")["spec"]["template"]
    for template in (gpu, cpu, driver):  # every pod: labels, annotations, priority, fsGroup
        assert template["metadata"]["labels"]["team"] == "nlp"
        assert template["metadata"]["labels"]["kubetune.io/run"] == "full-options"
        assert template["metadata"]["annotations"] == {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}
        assert template["spec"]["priorityClassName"] == "ml-batch"
        assert template["spec"]["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {
            "type": "RuntimeDefault"}, "fsGroup": 2000, "fsGroupChangePolicy": "Always"}
    # GPU pods only: the runtime class and the GPU taint's toleration
    assert gpu["spec"]["runtimeClassName"] == "nvidia" and "runtimeClassName" not in cpu["spec"]
    recipe_toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    gpu_toleration = {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}
    assert gpu["spec"]["tolerations"] == [recipe_toleration, gpu_toleration]
    assert cpu["spec"]["tolerations"] == [recipe_toleration]
    # stage containers only: env (after kubetune's own, so that it wins), envFrom, extra volumes
    for template in (gpu, cpu):
        [container] = template["spec"]["containers"]
        assert [e["name"] for e in container["env"]][-3:] == ["HF_ENDPOINT", "HTTPS_PROXY", "REQUESTS_CA_BUNDLE"]
        assert container["envFrom"] == [{"configMapRef": {"name": "hub-settings"}}]
        assert {"name": "corp-ca", "mountPath": "/etc/corp-ca", "readOnly": True} in container["volumeMounts"]
        assert {"name": "corp-ca", "configMap": {"name": "corp-ca-bundle"}} in template["spec"]["volumes"]
    [driver_container] = driver["spec"]["containers"]
    assert "HF_ENDPOINT" not in {e["name"] for e in driver_container["env"]} and "envFrom" not in driver_container
    assert "runtimeClassName" not in driver["spec"] and "tolerations" not in driver["spec"]


def test_default_pods_get_an_fs_group_that_makes_the_claim_writable():
    recipe = recipe_from_dict({"model": {"name_or_path": "m"}})
    for job in render.render(recipe):
        if job["kind"] == "Job":
            context = job["spec"]["template"]["spec"]["securityContext"]
            assert context["fsGroup"] == 1001 and context["fsGroupChangePolicy"] == "OnRootMismatch"
    openshift = recipe_from_dict({"model": {"name_or_path": "m"}, "kubernetes": {"fs_group": None}})
    job = render.stage_job(openshift, "finetune", "ml")
    assert "fsGroup" not in job["spec"]["template"]["spec"]["securityContext"]
    assert openshift_restricted_v2(job) == [] and openshift_restricted_v2(render.stage_job(recipe, "merge", "ml"))


@pytest.mark.parametrize("kubernetes,problem", [
    ({"pod_labels": {"kubetune.io/stage": "x"}}, "kubetune sets the app.kubernetes.io/ and kubetune.io/ labels"),
    ({"pod_labels": {"team": "not a label"}}, "kubernetes.pod_labels.team: String should match pattern"),
    ({"extra_volumes": [{"name": "data", "emptyDir": {}}]}, "'data' is kubetune's own volume"),
    ({"extra_volume_mounts": [{"name": "ca", "mountPath": "/ca"}]}, "'ca' is not one of extra_volumes"),
    ({"fs_group": 0}, "kubernetes.fs_group: Input should be greater than or equal to 1"),
])
def test_platform_knobs_that_cannot_work_are_refused(kubernetes, problem):
    with pytest.raises(RecipeError, match=re.escape(problem)):
        recipe_from_dict({"model": {"name_or_path": "m"}, "kubernetes": kubernetes})


def test_cpu_stage_requests_no_gpu_and_defaults_have_no_queue():
    recipe = recipe_from_dict({"model": {"name_or_path": "m"}})
    job = render.stage_job(recipe, "evaluate", "default")
    resources = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources == {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}
    assert "suspend" not in job["spec"] and "nodeSelector" not in job["spec"]["template"]["spec"]


def test_recipe_travels_whole_and_no_secret_is_inlined():
    recipe = full_recipe()
    objects = render.render(recipe)
    cm = next(o for o in objects if o["kind"] == "ConfigMap")
    assert yaml.safe_load(cm["data"]["recipe.yaml"]) == render.recipe_document(recipe)
    assert recipe_from_dict(yaml.safe_load(cm["data"]["recipe.yaml"])) == recipe
    assert "Secret" not in {o["kind"] for o in objects}
    for job in (o for o in objects if o["kind"] == "Job"):  # the recipe reaches pods only as the mounted file
        assert all(e["name"] != "RECIPE" for e in job["spec"]["template"]["spec"]["containers"][0]["env"])


def test_driver_role_is_minimal_and_driver_reads_claim_only_when_shareable():
    recipe = full_recipe()
    role = next(o for o in render.render(recipe) if o["kind"] == "Role")
    # no pods, no watch, no patch: tests/test_k8s_rbac.py records what the driver calls
    assert role["rules"] == [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "delete"]}]
    rwx = render.driver_job(recipe, "ml")["spec"]["template"]["spec"]
    assert "--read-markers" in rwx["containers"][0]["args"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "shared-artifacts", "readOnly": True}} in rwx["volumes"]
    rwo = render.driver_job(recipe_from_dict({"model": {"name_or_path": "m"}}), "ml")["spec"]["template"]["spec"]
    assert "--read-markers" not in rwo["containers"][0]["args"]
    assert [v["name"] for v in rwo["volumes"]] == ["recipe"]  # a ReadWriteOnce claim would pin it to one node


def test_artifacts_outside_the_claim_are_refused():
    recipe = recipe_from_dict({"model": {"name_or_path": "m"}, "run": {"artifacts_root": "/tmp/out"}})
    with pytest.raises(RecipeError, match="outside kubernetes.pvc.mount_path"):
        render.render(recipe)


def test_go_json_numbers_and_escapes():
    assert [gojson.go_number(v) for v in (1, 1.0, 2e-4, 1e-5, 1e-7, 1e21, 1e20, -0.5)] == [
        "1", "1", "0.0002", "0.00001", "1e-7", "1e+21", "100000000000000000000", "-0.5"]
    assert gojson.dumps({"b": [], "a": "x<y&z>\n"}) == '{\n  "a": "x\\u003cy\\u0026z\\u003e\\n",\n  "b": []\n}'


def test_only_the_api_module_imports_kubernetes():
    """The launcher and the driver work through the Cluster interface, so they also run against any server."""
    import ast

    for path in (ROOT / "src" / "kubetune" / "k8s").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "kubernetes" or n.startswith("kubernetes.") for n in names):
                assert path.name == "api.py", f"{path.name} imports kubernetes; go through kubetune.k8s.api"
