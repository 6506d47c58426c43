"""The objects that serve a finished run's model on the cluster, read from the claim (docs/serving.md).

* ``serve.platform: kserve`` — a KServe InferenceService (v1beta1) whose predictor uses the vLLM ServingRuntime
  (``serve.runtime``, ``serve.model_format``) with ``storageUri: pvc://<claim>/<artifacts>/<run>/<stage>``: KServe
  mounts the claim read-only, nothing is copied. RawDeployment mode: no Knative or Istio needed.
* ``serve.platform: deployment`` — a Deployment running ``vllm serve`` (``serve.image``) on the claim mounted
  read-only, and a ClusterIP Service in front of it: where KServe is absent.

Both: Pod Security "restricted" (as the stage pods), GPUs from ``serve.resources`` on ``kubernetes.gpu_resource``,
readiness on vLLM's ``/health``, and the run's prompt template as vLLM's chat template (:mod:`kubetune.serving`).
"""

from __future__ import annotations

from posixpath import isabs, join, normpath, relpath
from typing import Any

from kubetune.config import MODEL_PRODUCERS, Recipe
from kubetune.k8s.render import (CONTAINER_SECURITY, LABEL_RUN, _artifacts_check, _meta, _pod_common, _pod_metadata,
                                 claim_name, labels, namespace_of, placement)
from kubetune.serve import engine_args, served_name

COMPONENT = "serve"
LABEL_MODEL = "kubetune.io/model"
CONTAINER = "vllm"
HEALTH_PATH = "/health"
RAW_DEPLOYMENT = {"serving.kserve.io/deploymentMode": "RawDeployment"}


def model_path_on_claim(recipe: Recipe, which: str) -> str:
    """The model's folder relative to the claim's root (artifacts_root is relative to the pods' mount path)."""
    _artifacts_check(recipe)
    mount, root = recipe.kubernetes.pvc.mount_path, recipe.run.artifacts_root
    root = relpath(normpath(root), normpath(mount)) if isabs(root) else normpath(root)
    path = join(root, recipe.run.name, MODEL_PRODUCERS[which])
    return path.removeprefix("./")


def _resources(recipe: Recipe) -> dict[str, Any]:
    res, gpu = recipe.serve.resources, recipe.kubernetes.gpu_resource
    requests = {"cpu": res.cpu, "memory": res.memory}
    limits = {"memory": res.memory}
    if res.gpus:
        requests[gpu] = limits[gpu] = str(res.gpus)
    return {"requests": requests, "limits": limits}


def _probes(port: int | str) -> dict[str, Any]:
    def health() -> dict[str, Any]:
        return {"httpGet": {"path": HEALTH_PATH, "port": port}}

    # loading the weights (and compiling CUDA graphs) takes minutes: the startup probe allows 20 of them
    return {"readinessProbe": {**health(), "periodSeconds": 10, "failureThreshold": 3},
            "startupProbe": {**health(), "periodSeconds": 10, "failureThreshold": 120}}


def _placement(recipe: Recipe) -> dict[str, Any]:
    """Pod-level fields: security, pull secrets, priority, runtime class, node selector, tolerations, affinity."""
    res = recipe.serve.resources
    pod = _pod_common(recipe, res.gpus)
    pod.pop("restartPolicy")  # a server restarts (Always, the default of both kinds)
    pod["automountServiceAccountToken"] = False
    pod.update(placement(recipe, res))
    return pod


def _selector(recipe: Recipe, which: str) -> dict[str, str]:
    """The Deployment's selector: immutable, so without the version label that an upgrade changes."""
    own = labels(recipe, COMPONENT)
    return {k: own[k] for k in ("app.kubernetes.io/component", LABEL_RUN)} | {LABEL_MODEL: which}


def inference_service(recipe: Recipe, namespace: str, which: str) -> dict[str, Any]:
    serve = recipe.serve
    model = {"modelFormat": {"name": serve.model_format}, "runtime": serve.runtime,
             "storageUri": f"pvc://{claim_name(recipe)}/{model_path_on_claim(recipe, which)}",
             "args": engine_args(recipe, which, recipe.prompt.template), "resources": _resources(recipe),
             "securityContext": dict(CONTAINER_SECURITY), **_probes(serve.port)}
    predictor = {"minReplicas": serve.replicas, "maxReplicas": max(serve.replicas, 1), **_placement(recipe),
                 "model": model}
    meta = _meta(recipe, served_name(recipe, which), namespace, COMPONENT, annotations=dict(RAW_DEPLOYMENT))
    meta["labels"][LABEL_MODEL] = which
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": meta,
            "spec": {"predictor": predictor}}


def deployment(recipe: Recipe, namespace: str, which: str) -> list[dict[str, Any]]:
    """A Deployment running vLLM on the claim, and its Service."""
    serve, k = recipe.serve, recipe.kubernetes
    name, mount = served_name(recipe, which), "/mnt/models"
    container = {
        "name": CONTAINER, "image": serve.image, "imagePullPolicy": k.image_pull_policy,
        "args": [join(mount, model_path_on_claim(recipe, which)), *engine_args(recipe, which, recipe.prompt.template),
                 "--host", "0.0.0.0", "--port", str(serve.port)],
        # the image's user may be any UID (OpenShift): caches go to the writable /tmp, weights come from the claim
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HOME", "value": "/tmp/huggingface"},
                {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"}, {"name": "HF_HUB_OFFLINE", "value": "1"},
                *[dict(e) for e in k.env]],
        "ports": [{"name": "http", "containerPort": serve.port, "protocol": "TCP"}],
        "resources": _resources(recipe), "securityContext": dict(CONTAINER_SECURITY), **_probes("http"),
        "volumeMounts": [{"name": "data", "mountPath": mount, "readOnly": True},
                         {"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}]}
    if k.env_from:
        container["envFrom"] = [dict(e) for e in k.env_from]
    pod = {**_placement(recipe), "containers": [container], "volumes": [
        {"name": "data", "persistentVolumeClaim": {"claimName": claim_name(recipe), "readOnly": True}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k.shm_size}},
        {"name": "tmp", "emptyDir": {}}]}
    selector = _selector(recipe, which)
    template_meta = _pod_metadata(recipe, COMPONENT)
    template_meta["labels"][LABEL_MODEL] = which
    meta = _meta(recipe, name, namespace, COMPONENT)
    meta["labels"][LABEL_MODEL] = which
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
              "spec": {"replicas": serve.replicas, "selector": {"matchLabels": selector},
                       "template": {"metadata": template_meta, "spec": pod}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {**meta, "labels": dict(meta["labels"])},
               "spec": {"type": "ClusterIP", "selector": selector,
                        "ports": [{"name": "http", "port": serve.port, "targetPort": "http", "protocol": "TCP"}]}}
    return [deploy, service]


def serving_objects(recipe: Recipe, namespace: str | None = None, which: str | None = None) -> list[dict[str, Any]]:
    """What serves ``which`` (default ``serve.model``) on ``serve.platform``; the claim must already hold it."""
    ns, which = namespace_of(recipe, namespace), which or recipe.serve.model
    if recipe.serve.platform == "kserve":
        return [inference_service(recipe, ns, which)]
    return deployment(recipe, ns, which)
