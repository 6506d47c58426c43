"""Every Kubernetes object of a run, rendered from the recipe. The only module that knows their shape.

The recipe travels whole, in a ConfigMap mounted into every pod; no recipe field is mapped to a flag. The
objects (PVC, recipe ConfigMap, driver ServiceAccount/Role/RoleBinding, driver Job, one Job per stage) are
plain dicts, so the launcher, the driver, the golden tests and the Helm chart's equality test share them.
The chart (charts/kubetune) renders the same non-stage objects with the same rules; tests/test_k8s_chart.py
holds the two equal.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from posixpath import isabs, normpath
from typing import Any

from kubetune import __version__
from kubetune.config import FETCH_STAGE, Recipe
from kubetune.errors import PERMANENT_EXIT_CODES, RecipeError
from kubetune.k8s import gojson
from kubetune.metrics.exporter import IN_POD_ENV
from kubetune.sources import local_paths, on_claim, pod_stages

RECIPE_DIR = "/etc/kubetune"
RECIPE_FILE = "recipe.yaml"  # JSON text: valid YAML, and byte-equal to the chart's toPrettyJson
RECIPE_PATH = f"{RECIPE_DIR}/{RECIPE_FILE}"
DRIVER = "driver"
DRIVER_BACKOFF_LIMIT = 10  # a restarted driver picks up where it stopped, so retrying it is always safe
STAGE_CONTAINER = "stage"
LABEL_RUN = "kubetune.io/run"
LABEL_STAGE = "kubetune.io/stage"
ANN_FINGERPRINT = "kubetune.io/fingerprint"
ANN_RECIPE_SHA = "kubetune.io/recipe-sha256"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# What the in-cluster driver does, and nothing more: no wildcard, no secrets, no configmaps, no pods
# (tests/test_k8s_rbac.py records its calls against the fake API server). It reads its own Job (get), lists the
# run's Jobs and creates stage Jobs; "delete" it never sends, but it creates Jobs with ownerReferences, and
# OwnerReferencesPermissionEnforcement (on in OpenShift) admits that only from a user who may delete them.
DRIVER_RULES = [
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "delete"]},
]
DRIVER_ADMISSION_VERBS = {("batch", "jobs", "delete")}  # granted for admission, never called
# resources.finetune.multi_node → what a driver of a multi-node fine-tune also needs (kubetune.k8s.multinode)
MULTI_NODE_RULES = {
    "trainjob": [{"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"],
                  "verbs": ["create", "get", "list", "delete"]}],
    "pytorchjob": [{"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"],
                    "verbs": ["create", "get", "list", "delete"]}],
}
# What a person running `submit`, `status`, `logs`, `cancel` needs in the namespace (docs/kubernetes.md).
USER_RULES = [
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "get", "delete"]},
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["create"]},  # cancel keeps the claim
    {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["create", "delete"]},
    {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"],
     "verbs": ["create", "delete"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "delete", "patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},  # status: why a stage is not running
]
# What `kubetune stage-in` needs besides USER_RULES: exec into its helper pod. The WebSocket upgrade is a GET,
# which API servers have authorized as "get" and newer ones as "create"; both are granted.
STAGE_IN_RULES = [{"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create", "get"]}]


@dataclass(frozen=True)
class Names:
    """Object names, all derived from run.name (a DNS label of at most 40 characters, so ≤ 63 with suffixes)."""

    run: str

    @property
    def recipe(self) -> str:
        return f"{self.run}-recipe"

    @property
    def driver(self) -> str:
        return f"{self.run}-{DRIVER}"

    def job(self, stage: str) -> str:
        return f"{self.run}-{stage}"


def claim_name(recipe: Recipe) -> str:
    return recipe.kubernetes.pvc.claim_name or f"{recipe.run.name}-data"


def namespace_of(recipe: Recipe, explicit: str | None = None) -> str:
    return explicit or recipe.kubernetes.namespace or "default"


def recipe_document(recipe: Recipe) -> dict[str, Any]:
    """The recipe as its author wrote it (after --set): only the keys they set, so defaults stay the code's."""
    return recipe.model_dump(exclude_unset=True)


def recipe_text(recipe: Recipe) -> str:
    return gojson.dumps(recipe_document(recipe))


def recipe_sha256(recipe: Recipe) -> str:
    return hashlib.sha256(recipe_text(recipe).encode()).hexdigest()


def labels(recipe: Recipe, component: str, stage: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": recipe.run.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "kubetune",
        "app.kubernetes.io/version": __version__,
        "app.kubernetes.io/managed-by": "kubetune",
        LABEL_RUN: recipe.run.name,
    }
    if stage:
        out[LABEL_STAGE] = stage
    return out


def selector(run: str, stage: str | None = None) -> str:
    """Label selector of a run's objects (or of one stage's Job and pods)."""
    return f"{LABEL_RUN}={run}" + (f",{LABEL_STAGE}={stage}" if stage else "")


def _meta(recipe: Recipe, name: str, namespace: str, component: str, stage: str | None = None,
          annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels(recipe, component, stage)}
    if annotations:
        meta["annotations"] = annotations
    return meta


# ---- security ---------------------------------------------------------------------------------------------
# Pod Security "restricted" and OpenShift restricted-v2: non-root, but no runAsUser, because OpenShift assigns it
# from the namespace's range and refuses pods that pick their own. fsGroup comes from kubernetes.fs_group (null
# on OpenShift, for the same reason).
POD_SECURITY = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
                      "seccompProfile": {"type": "RuntimeDefault"}}


def pod_security(recipe: Recipe) -> dict[str, Any]:
    k = recipe.kubernetes
    context: dict[str, Any] = dict(POD_SECURITY)
    if k.fs_group is not None:
        context["fsGroup"] = k.fs_group
    context["fsGroupChangePolicy"] = k.fs_group_change_policy  # also where OpenShift assigns the fsGroup
    return context


def _pod_common(recipe: Recipe, gpus: int = 0) -> dict[str, Any]:
    k = recipe.kubernetes
    spec: dict[str, Any] = {"restartPolicy": "Never", "securityContext": pod_security(recipe),
                            "enableServiceLinks": False}
    if k.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in k.image_pull_secrets]
    if k.priority_class_name:
        spec["priorityClassName"] = k.priority_class_name
    if gpus and k.runtime_class_name:
        spec["runtimeClassName"] = k.runtime_class_name
    return spec


def _pod_metadata(recipe: Recipe, component: str, stage: str | None = None) -> dict[str, Any]:
    k = recipe.kubernetes
    meta: dict[str, Any] = {"labels": {**k.pod_labels, **labels(recipe, component, stage)}}
    if k.pod_annotations:
        meta["annotations"] = dict(k.pod_annotations)
    return meta


def _failure_policy(container: str) -> dict[str, Any]:
    """Permanent exit codes (a bad recipe, a failed gate…) fail the Job at once; evictions and preemptions
    do not count against backoffLimit; anything else (OOM kill, node loss, API hiccup) is retried."""
    return {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": container, "operator": "In",
                                              "values": list(PERMANENT_EXIT_CODES)}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def _artifacts_check(recipe: Recipe) -> None:
    root, mount = recipe.run.artifacts_root, recipe.kubernetes.pvc.mount_path
    if isabs(root) and not (normpath(root) + "/").startswith(normpath(mount).rstrip("/") + "/"):
        raise RecipeError("recipe", [f"run.artifacts_root: {root} is outside kubernetes.pvc.mount_path ({mount}); "
                                     "artifacts written there would vanish with the pod"])


def claim_paths_check(recipe: Recipe) -> None:
    """The model and data folders a recipe reads must be on the claim, where every pod reads them (relative paths
    start at kubernetes.pvc.mount_path, the pods' working directory). One outside it would fail the first stage
    after the image pull and the queue: refuse it before anything is created, naming what puts it there."""
    mount = recipe.kubernetes.pvc.mount_path
    problems = []
    for field, path in local_paths(recipe).items():
        if on_claim(path, mount) is None:
            name = path.rstrip("/").rsplit("/", 1)[-1] or "input"
            problems.append(f"{field}: {path} is not on the claim (mounted at {mount}), so no pod can read it; copy "
                            f"it there with `kubetune stage-in {path} --to inputs/{name} --run {recipe.run.name} "
                            f"--recipe RECIPE` and set {field}=inputs/{name}, or name a hub id (the fetch stage "
                            "downloads it)")
    if problems:
        raise RecipeError("recipe", problems)


# ---- objects ----------------------------------------------------------------------------------------------
def recipe_configmap(recipe: Recipe, namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta(recipe, Names(recipe.run.name).recipe, namespace, "recipe",
                              annotations={ANN_RECIPE_SHA: recipe_sha256(recipe)}),
            "data": {RECIPE_FILE: recipe_text(recipe)}}


def claim(recipe: Recipe, namespace: str) -> dict[str, Any] | None:
    pvc = recipe.kubernetes.pvc
    if not pvc.create:
        return None
    spec: dict[str, Any] = {"accessModes": list(pvc.access_modes), "resources": {"requests": {"storage": pvc.size}}}
    if pvc.storage_class:
        spec["storageClassName"] = pvc.storage_class
    # resource-policy keep: `helm uninstall` leaves the artifacts; everything else ignores the annotation.
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": _meta(recipe, claim_name(recipe), namespace, "storage",
                              annotations={"helm.sh/resource-policy": "keep"}),
            "spec": spec}


def driver_rbac(recipe: Recipe, namespace: str) -> list[dict[str, Any]]:
    name = Names(recipe.run.name).driver
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(recipe, name, namespace, DRIVER),
          "automountServiceAccountToken": False}  # mounted only into the driver pod, which asks for it
    rules = [dict(r) for r in DRIVER_RULES] + [dict(r) for r in multi_node_rules(recipe)]
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": _meta(recipe, name, namespace, DRIVER), "rules": rules}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": _meta(recipe, name, namespace, DRIVER),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
               "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]}
    return [sa, role, binding]


def multi_node_rules(recipe: Recipe) -> list[dict[str, Any]]:
    """What the driver (and the person submitting) also needs for a multi-node fine-tune: its TrainJob or
    PyTorchJob, with the verbs DRIVER_RULES grants on Jobs. The chart's rbac.yaml is generated from it
    (chartgen.MULTI_NODE)."""
    res = recipe.resources.finetune
    return [dict(r) for r in MULTI_NODE_RULES[res.multi_node]] if res.nodes > 1 else []


def _volumes(recipe: Recipe, shm: bool, claim_read_only: bool | None) -> tuple[list, list]:
    k = recipe.kubernetes
    mounts: list[dict[str, Any]] = [{"name": "recipe", "mountPath": RECIPE_DIR, "readOnly": True}]
    volumes: list[dict[str, Any]] = [{"name": "recipe", "configMap": {"name": Names(recipe.run.name).recipe}}]
    if claim_read_only is not None:
        mounts.append({"name": "data", "mountPath": k.pvc.mount_path, **({"readOnly": True} if claim_read_only else {})})
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": claim_name(recipe),
                                                                   **({"readOnly": True} if claim_read_only else {})}})
    if shm:
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k.shm_size}})
        mounts += [dict(m) for m in k.extra_volume_mounts]
        volumes += [dict(v) for v in k.extra_volumes]
    return mounts, volumes


def _cache_env(mount: str) -> list[dict[str, Any]]:
    """Every cache on the claim: a model is downloaded once per claim, not once per pod."""
    cache = f"{mount.rstrip('/')}/.cache"
    return [{"name": "HF_HOME", "value": f"{cache}/huggingface"},
            {"name": "XDG_CACHE_HOME", "value": cache},
            {"name": "TORCH_HOME", "value": f"{cache}/torch"},
            {"name": "TRITON_CACHE_DIR", "value": f"{cache}/triton"},
            # finetune.compile: inductor's FX-graph and AOTAutograd caches (its default is the pod's /tmp), so a
            # restarted fine-tune reads its compiled step back instead of compiling it again (stages/compiled.py)
            {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{cache}/torchinductor"},
            # GPTQModel JIT-compiles its CUDA GPTQ block update at first use when the image has nvcc (29 s on the
            # bench's H200 machine); its default folder is under $HOME, not XDG_CACHE_HOME
            {"name": "GPTQMODEL_TORCH_EXTENSIONS_DIR", "value": f"{cache}/gptqmodel-extensions"},
            {"name": "PYTHONUNBUFFERED", "value": "1"}]  # logs reach `kubetune logs` as they are written


# The stages after fetch read the hub's files from the claim's cache only: no GPU waits on the network, and a
# branch that moved on the hub meanwhile cannot change what the run trains on.
OFFLINE_ENV = [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "HF_DATASETS_OFFLINE", "value": "1"}]


def placement(recipe: Recipe, res) -> dict[str, Any]:
    """Where a pod with resources ``res`` may run: nodeSelector (with the GPU product label for res.gpu_type),
    tolerations (the GPU ones only for a pod that asks for GPUs) and affinity; empty fields left out."""
    k = recipe.kubernetes
    out: dict[str, Any] = {}
    node_selector = dict(k.node_selector)
    if res.gpu_type:
        node_selector[k.gpu_product_label] = res.gpu_type
    if node_selector:
        out["nodeSelector"] = node_selector
    tolerations = [dict(t) for t in k.tolerations] + ([dict(t) for t in k.gpu_tolerations] if res.gpus else [])
    if tolerations:
        out["tolerations"] = tolerations
    if k.affinity:
        out["affinity"] = dict(k.affinity)
    return out


def stage_kind(recipe: Recipe, stage: str) -> str:
    """The kind of object that runs ``stage``: a Job, or for a fine-tune on several nodes a TrainJob or PyTorchJob
    (kubetune.k8s.multinode)."""
    res = recipe.resources.finetune
    if stage == "finetune" and res.nodes > 1:
        from kubetune.k8s.multinode import KIND_OF

        return KIND_OF[res.multi_node]
    return "Job"


def stage_job(recipe: Recipe, stage: str, namespace: str, owner: dict[str, Any] | None = None,
              driven: bool = True) -> dict[str, Any]:
    """One stage's Job (a TrainJob or PyTorchJob for a fine-tune on several nodes: stage_kind). ``driven``: made
    by a driver, which keeps the run's TTL for the end of the run (a stage Job deleted meanwhile would be made
    again, forever where the driver cannot read the markers); ``owner``: the in-cluster driver's Job, whose
    deletion (TTL, `helm uninstall`, `kubetune cancel`) takes this one with it."""
    stages = pod_stages(recipe)
    if stage not in stages:
        raise RecipeError("--stage", [f"{stage}: not a stage of this recipe ({', '.join(stages)})"])
    _artifacts_check(recipe)
    if stage_kind(recipe, stage) != "Job":
        from kubetune.k8s.multinode import training_job

        return training_job(recipe, namespace, owner)
    pod = stage_pod(recipe, stage)
    k = recipe.kubernetes
    spec: dict[str, Any] = {"backoffLimit": k.backoff_limit, "podFailurePolicy": _failure_policy(STAGE_CONTAINER),
                            "template": {"metadata": _pod_metadata(recipe, "stage", stage), "spec": pod}}
    if k.active_deadline_s is not None:
        spec["activeDeadlineSeconds"] = k.active_deadline_s
    if k.ttl_after_finished_s is not None and not driven:
        spec["ttlSecondsAfterFinished"] = k.ttl_after_finished_s
    meta = stage_meta(recipe, stage, namespace, owner)
    if k.queue:  # Kueue admits a suspended Job when its quota allows, then unsuspends it
        meta["labels"][KUEUE_QUEUE_LABEL] = k.queue
        spec["suspend"] = True
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


def stage_meta(recipe: Recipe, stage: str, namespace: str, owner: dict[str, Any] | None) -> dict[str, Any]:
    """Name, labels, fingerprint annotations and (in the cluster) the driver's ownerReference of a stage's object."""
    meta = _meta(recipe, Names(recipe.run.name).job(stage), namespace, "stage", stage,
                 annotations={ANN_FINGERPRINT: recipe.job_fingerprint(stage), ANN_RECIPE_SHA: recipe_sha256(recipe)})
    if owner is not None:
        # Not a controller reference: Kueue treats a Job whose controller is another Kueue-managed Job as part of
        # that Job's workload and would never admit it. Nor blockOwnerDeletion (it needs jobs/finalizers rights).
        meta["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": owner["metadata"]["name"],
                                    "uid": owner["metadata"]["uid"]}]
    return meta


def stage_pod(recipe: Recipe, stage: str) -> dict[str, Any]:
    """The pod spec that runs ``stage`` (one container, STAGE_CONTAINER), restricted like every pod of the run."""
    k, res = recipe.kubernetes, getattr(recipe.resources, stage)
    requests: dict[str, str] = {"cpu": res.cpu, "memory": res.memory}
    limits: dict[str, str] = {"memory": res.memory}  # no CPU limit: throttling a data loader only slows the GPU
    if res.gpus:
        requests[k.gpu_resource] = limits[k.gpu_resource] = str(res.gpus)
    env = _cache_env(k.pvc.mount_path) + [{"name": IN_POD_ENV, "value": "1"}]  # /metrics on all interfaces
    if stage != FETCH_STAGE and FETCH_STAGE in pod_stages(recipe):
        env += [dict(e) for e in OFFLINE_ENV]
    if k.hf_token_secret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": k.hf_token_secret.name,
                                                                       "key": k.hf_token_secret.key}}})
    env += [dict(e) for e in k.env]  # last: a variable set twice takes its last value
    mounts, volumes = _volumes(recipe, shm=True, claim_read_only=False)
    container = {"name": STAGE_CONTAINER, "image": k.image, "imagePullPolicy": k.image_pull_policy,
                 "args": ["stage", stage, "--recipe", RECIPE_PATH], "workingDir": k.pvc.mount_path,
                 "env": env, "resources": {"requests": requests, "limits": limits},
                 "securityContext": dict(CONTAINER_SECURITY), "volumeMounts": mounts,
                 # the stage writes a report summary there; on a crash the log tail is kept instead
                 "terminationMessagePolicy": "FallbackToLogsOnError"}
    if k.env_from:
        container["envFrom"] = [dict(e) for e in k.env_from]
    if recipe.metrics.enabled:  # /metrics while the stage runs; the PodMonitor finds it by this port's name
        container["ports"] = [{"name": "metrics", "containerPort": recipe.metrics.port, "protocol": "TCP"}]
    pod = _pod_common(recipe, res.gpus)
    pod.update({"automountServiceAccountToken": False, "terminationGracePeriodSeconds": k.termination_grace_s,
                "containers": [container], "volumes": volumes})
    pod.update(placement(recipe, res))
    return pod


def driver_reads_claim(recipe: Recipe) -> bool:
    """Only a ReadWriteMany claim can be mounted by the driver while a stage pod on another node has it."""
    return "ReadWriteMany" in recipe.kubernetes.pvc.access_modes


def driver_job(recipe: Recipe, namespace: str) -> dict[str, Any]:
    _artifacts_check(recipe)
    k = recipe.kubernetes
    reads_claim = driver_reads_claim(recipe)
    mounts, volumes = _volumes(recipe, shm=False, claim_read_only=True if reads_claim else None)
    args = ["drive", recipe.run.name, "--recipe", RECIPE_PATH] + (["--read-markers"] if reads_claim else [])
    container = {"name": DRIVER, "image": k.image, "imagePullPolicy": k.image_pull_policy, "args": args,
                 "workingDir": k.pvc.mount_path if reads_claim else "/tmp",
                 "env": [{"name": "KUBETUNE_NAMESPACE",
                          "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                         {"name": "PYTHONUNBUFFERED", "value": "1"}],
                 "resources": {"requests": {"cpu": k.driver.cpu, "memory": k.driver.memory},
                               "limits": {"memory": k.driver.memory}},
                 "securityContext": dict(CONTAINER_SECURITY), "volumeMounts": mounts}
    pod = _pod_common(recipe)
    pod.update({"serviceAccountName": Names(recipe.run.name).driver, "automountServiceAccountToken": True,
                "containers": [container], "volumes": volumes})
    spec: dict[str, Any] = {"backoffLimit": DRIVER_BACKOFF_LIMIT, "podFailurePolicy": _failure_policy(DRIVER),
                            "template": {"metadata": _pod_metadata(recipe, DRIVER), "spec": pod}}
    if k.ttl_after_finished_s is not None:  # the run's TTL: its stage Jobs are owned by this one and go with it
        spec["ttlSecondsAfterFinished"] = k.ttl_after_finished_s
    meta = _meta(recipe, Names(recipe.run.name).driver, namespace, DRIVER,
                 annotations={ANN_RECIPE_SHA: recipe_sha256(recipe)})
    if k.queue:  # where Kueue manages unlabelled Jobs too, an unlabelled driver would stay suspended
        meta["labels"][KUEUE_QUEUE_LABEL] = k.queue
        spec["suspend"] = True
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


STAGE_IN = "stage-in"
STAGE_IN_WAIT_S = 1800  # the helper waits this long at most for `kubetune stage-in` to copy into it


def stage_in_job(recipe: Recipe, namespace: str) -> dict[str, Any]:
    """The short-lived helper of `kubetune stage-in`: a pod that mounts the claim where the stages do and only
    waits, so that folders can be copied onto the claim through pods/exec (what `kubectl cp` does). No run label:
    it is no stage of the run, and the driver, `list` and `status` never see it."""
    k = recipe.kubernetes
    mounts, volumes = _volumes(recipe, shm=False, claim_read_only=False)
    mounts, volumes = mounts[1:], volumes[1:]  # the claim alone: no recipe ConfigMap (none may exist yet)
    container = {"name": STAGE_IN, "image": k.image, "imagePullPolicy": k.image_pull_policy,
                 "command": ["sleep", str(STAGE_IN_WAIT_S)], "workingDir": k.pvc.mount_path,
                 "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "256Mi"}},
                 "securityContext": dict(CONTAINER_SECURITY), "volumeMounts": mounts}
    pod = _pod_common(recipe)
    pod.update({"automountServiceAccountToken": False, "terminationGracePeriodSeconds": 1,
                "containers": [container], "volumes": volumes})
    template_meta = _pod_metadata(recipe, STAGE_IN)
    template_meta["labels"].pop(LABEL_RUN)
    meta = _meta(recipe, f"{recipe.run.name}-{STAGE_IN}", namespace, STAGE_IN)
    meta["labels"].pop(LABEL_RUN)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
            "spec": {"backoffLimit": 0, "activeDeadlineSeconds": STAGE_IN_WAIT_S, "ttlSecondsAfterFinished": 60,
                     "template": {"metadata": template_meta, "spec": pod}}}


def base_objects(recipe: Recipe, namespace: str, driver: bool = True) -> list[dict[str, Any]]:
    """What `submit` creates and the Helm chart renders: claim, recipe, and (for a pipeline) the driver."""
    objs = [o for o in (claim(recipe, namespace), recipe_configmap(recipe, namespace)) if o]
    if driver:
        objs += driver_rbac(recipe, namespace) + [driver_job(recipe, namespace)]
    return objs


def render(recipe: Recipe, namespace: str | None = None, stage: str | None = None) -> list[dict[str, Any]]:
    """Every object of the run (``stage``: only what running that one stage needs), in creation order."""
    ns = namespace_of(recipe, namespace)
    if stage:
        return base_objects(recipe, ns, driver=False) + [stage_job(recipe, stage, ns, driven=False)]
    return base_objects(recipe, ns) + [stage_job(recipe, s, ns) for s in pod_stages(recipe)]


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """Multi-document YAML, multi-line strings (the recipe) as readable literal blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    return "---\n".join(yaml.dump(o, Dumper=Dumper, sort_keys=False, width=120) for o in objects)
