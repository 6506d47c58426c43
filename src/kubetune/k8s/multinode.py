"""A fine-tune across several nodes (``resources.finetune.nodes > 1``): a Kubeflow Trainer v2 TrainJob or a
Training Operator v1 PyTorchJob, chosen by ``resources.finetune.multi_node`` (their conditions are read by
kubetune.k8s.state.job_state, as a Job's are).

Each of its pods runs what a single-pod fine-tune runs, ``kubetune stage finetune``; that starts torchrun with one
process per GPU, and torchrun takes the node count, this node's rank and the rendezvous address from the PET_*
variables both operators set (kubetune.distributed). Node 0's stage process holds the lock and commits the
artifact; every pod mounts the claim at once, so it must be ReadWriteMany. The pods are restricted like every
other pod of the run (render.stage_pod); the TrainJob carries them as runtime patches of its runtime's ``node``
job, the PyTorchJob as its Master and Worker templates.
"""

from __future__ import annotations

import copy
from typing import Any

from kubetune.config import Recipe
from kubetune.errors import RecipeError
from kubetune.k8s import render

KIND_OF = {"trainjob": "TrainJob", "pytorchjob": "PyTorchJob"}
TRAINER_API = "trainer.kubeflow.org/v1alpha1"
TRAINING_OPERATOR_API = "kubeflow.org/v1"
# The replicated job and container of Kubeflow Trainer's torch runtimes that run the training code.
TRAINER_NODE = "node"
PYTORCH_CONTAINER = "pytorch"  # the container name the Training Operator looks for
PATCH_MANAGER = "kubetune.io/render"
STAGE = "finetune"


def training_job(recipe: Recipe, namespace: str, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fine-tune's TrainJob or PyTorchJob; refuses a claim that the nodes cannot share."""
    res = recipe.resources.finetune
    if "ReadWriteMany" not in recipe.kubernetes.pvc.access_modes:
        raise RecipeError("recipe", [
            f"kubernetes.pvc.access_modes: resources.finetune.nodes is {res.nodes}, so pods on several nodes mount "
            f"the claim at once; it must be ReadWriteMany (it is {', '.join(recipe.kubernetes.pvc.access_modes)}): "
            "use a StorageClass that offers RWX (NFS, CephFS, a cloud file service), or nodes: 1"])
    meta = render.stage_meta(recipe, STAGE, namespace, owner)
    if res.multi_node == "trainjob":
        return _train_job(recipe, meta)
    return _pytorch_job(recipe, meta)


def _train_job(recipe: Recipe, meta: dict[str, Any]) -> dict[str, Any]:
    k, res = recipe.kubernetes, recipe.resources.finetune
    unsupported = [f"kubernetes.{name}" for name, value in
                   (("runtime_class_name", k.runtime_class_name), ("priority_class_name", k.priority_class_name))
                   if value]
    problems = [f"{field}: a TrainJob cannot set it for its pods; set it in the ClusterTrainingRuntime "
                f"{res.training_runtime}, or use resources.finetune.multi_node: pytorchjob" for field in unsupported]
    if problems:
        raise RecipeError("recipe", problems)
    pod = render.stage_pod(recipe, STAGE)
    container = pod["containers"][0]
    pod_patch = {key: pod[key] for key in ("securityContext", "volumes", "tolerations", "nodeSelector", "affinity",
                                           "imagePullSecrets", "terminationGracePeriodSeconds") if key in pod}
    pod_patch["containers"] = [{"name": TRAINER_NODE, "securityContext": container["securityContext"],
                                "volumeMounts": container["volumeMounts"]}]
    node_job = {"name": TRAINER_NODE, "template": {"spec": {"template": {
        "metadata": render._pod_metadata(recipe, "stage", STAGE), "spec": pod_patch}}}}
    spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                       "name": res.training_runtime},
        # nor a working directory: the shell enters the claim's, where the other stages' relative paths start
        "trainer": {"image": k.image, "command": ["sh", "-c", 'cd "$0" && exec kubetune "$@"',
                                                  container["workingDir"], *container["args"]],
                    "env": container["env"],
                    "numNodes": res.nodes, "numProcPerNode": max(res.gpus, 1),
                    "resourcesPerNode": container["resources"]},
        "runtimePatches": [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {
            "replicatedJobs": [node_job]}}}}],
    }
    if k.active_deadline_s is not None:
        spec["activeDeadlineSeconds"] = k.active_deadline_s
    if k.queue:  # Kueue admits a suspended TrainJob like a Job
        meta["labels"][render.KUEUE_QUEUE_LABEL] = k.queue
        spec["suspend"] = True
    return {"apiVersion": TRAINER_API, "kind": "TrainJob", "metadata": meta, "spec": spec}


def _pytorch_job(recipe: Recipe, meta: dict[str, Any]) -> dict[str, Any]:
    k, res = recipe.kubernetes, recipe.resources.finetune
    pod = render.stage_pod(recipe, STAGE)
    pod["containers"][0]["name"] = PYTORCH_CONTAINER
    template = {"metadata": render._pod_metadata(recipe, "stage", STAGE), "spec": pod}

    def replicas(count: int) -> dict[str, Any]:
        # ExitCode: codes 128+ (a signal: preemption 143, OOM kill 137) are retried, 1-127 fail the job, as the
        # Job's podFailurePolicy does for the permanent codes of docs/exit-codes.md.
        return {"replicas": count, "restartPolicy": "ExitCode", "template": copy.deepcopy(template)}

    run_policy: dict[str, Any] = {"backoffLimit": k.backoff_limit, "cleanPodPolicy": "None"}
    if k.active_deadline_s is not None:
        run_policy["activeDeadlineSeconds"] = k.active_deadline_s
    if k.queue:
        meta["labels"][render.KUEUE_QUEUE_LABEL] = k.queue
        run_policy["suspend"] = True
    return {"apiVersion": TRAINING_OPERATOR_API, "kind": "PyTorchJob", "metadata": meta,
            "spec": {"nprocPerNode": str(max(res.gpus, 1)), "runPolicy": run_policy,
                     "pytorchReplicaSpecs": {"Master": replicas(1), "Worker": replicas(res.nodes - 1)}}}
