"""The cluster, behind a small interface: the launcher and the driver never touch the ``kubernetes`` package.

:class:`Cluster` is what they need (create, get, list with a label selector, delete with propagation, pod
logs); :class:`KubeCluster` implements it with the official client against any API server, real or fake.
Objects go in and come out as plain dicts (``_preload_content=False``): the rendered objects are dicts
already, and a dict never hides a field that the client's models do not know.

Every API failure becomes a :class:`~kubetune.errors.ClusterError` with one line that says what was refused:
``forbidden: cannot create jobs (batch) in namespace "ml" …``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from kubetune.errors import ClusterError

IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class NotFoundError(ClusterError):
    """The object does not exist."""


class AlreadyExistsError(ClusterError):
    """An object of that name exists already."""


# kind -> (API attribute, plural, group, method suffix); the rendered objects use exactly these kinds.
KINDS: dict[str, tuple[str, str, str, str]] = {
    "ConfigMap": ("core", "configmaps", "", "config_map"),
    "PersistentVolumeClaim": ("core", "persistentvolumeclaims", "", "persistent_volume_claim"),
    "ServiceAccount": ("core", "serviceaccounts", "", "service_account"),
    "Pod": ("core", "pods", "", "pod"),
    "Event": ("core", "events", "", "event"),
    "Job": ("batch", "jobs", "batch", "job"),
    "Role": ("rbac", "roles", "rbac.authorization.k8s.io", "role"),
    "RoleBinding": ("rbac", "rolebindings", "rbac.authorization.k8s.io", "role_binding"),
    "Deployment": ("apps", "deployments", "apps", "deployment"),
    "Service": ("core", "services", "", "service"),
}
# kind -> (group, version, plural) of the custom resources kubetune creates (kubetune.k8s.serving)
CUSTOM_KINDS: dict[str, tuple[str, str, str]] = {
    "InferenceService": ("serving.kserve.io", "v1beta1", "inferenceservices"),
    "TrainJob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs"),  # Kubeflow Trainer v2
    "PyTorchJob": ("kubeflow.org", "v1", "pytorchjobs"),  # Kubeflow Training Operator v1
}


class Cluster(Protocol):
    """What kubetune asks of a cluster, all in one namespace."""

    namespace: str

    def create(self, obj: dict[str, Any], dry_run: bool = False) -> dict[str, Any]: ...

    def get(self, kind: str, name: str) -> dict[str, Any] | None: ...

    def list(self, kind: str, selector: str) -> list[dict[str, Any]]: ...

    def delete(self, kind: str, name: str) -> None: ...

    def patch(self, kind: str, name: str, changes: dict[str, Any]) -> dict[str, Any]: ...

    def pod_log(self, name: str, container: str | None = None, follow: bool = False) -> Iterator[str]: ...

    def exec(self, pod: str, command: list[str], stdin: BinaryIO | None = None,
             timeout_s: float = 3600) -> tuple[int, str]: ...


def _resource(kind: str) -> str:
    if kind in CUSTOM_KINDS:
        group, _, plural = CUSTOM_KINDS[kind]
        return f"{plural} ({group})"
    _, plural, group, _ = KINDS[kind]
    return f"{plural} ({group})" if group else plural


def api_error(exc: Exception, verb: str, kind: str, namespace: str, name: str | None = None) -> ClusterError:
    """One line for a failed request; 403 names the verb and resource that the user's role lacks."""
    status = getattr(exc, "status", None)
    message = ""
    body = getattr(exc, "body", None)
    if body:
        try:
            message = json.loads(body).get("message", "")
        except (ValueError, AttributeError):
            message = str(body)[:200]
    target = f"{_resource(kind)}{'/' + name if name else ''} in namespace \"{namespace}\""
    if status == 403:
        return ClusterError(f"forbidden: cannot {verb} {target}; ask for a Role granting '{verb}' on "
                            f"{_resource(kind)} ({message})")
    if status == 401:
        return ClusterError(f"unauthorized: the API server refused your credentials ({message or exc}); "
                            "log in again (oc login, or refresh your kubeconfig)")
    if status == 404:
        return NotFoundError(f"not found: {target}" + (f" ({message})" if message else ""))
    if status == 409:
        return AlreadyExistsError(f"already exists: {target}")
    if status == 422:
        return ClusterError(f"invalid {kind} {name or ''}: {message}")
    if status is not None:
        return ClusterError(f"cannot {verb} {target}: HTTP {status} {getattr(exc, 'reason', '')} {message}".rstrip())
    return ClusterError(f"cannot reach the Kubernetes API to {verb} {target}: {_short(exc)}")


def _short(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)  # urllib3's MaxRetryError hides the cause in .reason
    return str(reason or exc).splitlines()[0][:300]


def object_model(name: str):
    """The kubernetes client's pydantic model of an API object type (``V1Toleration``): offline checks of the
    objects a recipe embeds (kubetune.k8s.embedded). Importing the models takes ~2 s."""
    from kubernetes.client import models

    return getattr(models, name)


def load_client(context: str | None = None, kubeconfig: str | None = None):
    """An ApiClient found the way kubectl finds one: --kubeconfig, $KUBECONFIG, ~/.kube/config, else in-cluster.

    Returns (api_client, namespace of the context or of the pod, or None)."""
    import yaml
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    paths = kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    # $KUBECONFIG is read now and passed on (several files are merged): the client's own default is the value the
    # variable had when the kubernetes package was first imported.
    config_file = kubeconfig or os.environ.get("KUBECONFIG") or None
    try:
        if any(Path(p).is_file() for p in paths.split(os.pathsep) if p):
            cfg = client.Configuration()
            config.load_kube_config(config_file=config_file, context=context, client_configuration=cfg)
            contexts, active = config.list_kube_config_contexts(config_file=config_file)
            chosen = next((c for c in contexts if c["name"] == context), None) if context else active
            return client.ApiClient(cfg), ((chosen or {}).get("context") or {}).get("namespace")
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)
            namespace = IN_CLUSTER_NAMESPACE.read_text().strip() if IN_CLUSTER_NAMESPACE.exists() else None
            return client.ApiClient(cfg), namespace
    except (ConfigException, OSError, ValueError, TypeError, yaml.YAMLError) as exc:  # YAMLError: not a kubeconfig
        raise ClusterError(f"cannot load the Kubernetes configuration ({paths}): {_short(exc)}") from None
    raise ClusterError(f"no Kubernetes configuration: {paths} does not exist and this is not a pod; "
                       "set --kubeconfig or KUBECONFIG")


class KubeCluster:
    """:class:`Cluster` over the official client (any API server: a real one, or a fake in the tests)."""

    def __init__(self, api_client, namespace: str):
        from kubernetes import client

        self.namespace = namespace
        self._apis = {"core": client.CoreV1Api(api_client), "batch": client.BatchV1Api(api_client),
                      "rbac": client.RbacAuthorizationV1Api(api_client), "apps": client.AppsV1Api(api_client),
                      "custom": client.CustomObjectsApi(api_client)}

    def _call(self, verb: str, kind: str, name: str | None, method: str, *args, **kwargs) -> Any:
        from kubernetes.client.exceptions import ApiException, OpenApiException
        from urllib3.exceptions import HTTPError

        api = self._apis["custom" if kind in CUSTOM_KINDS else KINDS[kind][0]]
        try:
            response = getattr(api, method)(*args, _preload_content=False, **kwargs)
        except ApiException as exc:
            raise api_error(exc, verb, kind, self.namespace, name) from None
        except (HTTPError, OpenApiException, OSError) as exc:
            raise api_error(exc, verb, kind, self.namespace, name) from None
        return response

    def _json(self, response) -> Any:
        try:
            return json.loads(response.data or b"{}")
        except ValueError as exc:
            raise ClusterError(f"the API server sent something that is not JSON: {exc}") from None

    def create(self, obj: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        kind, name = obj["kind"], obj["metadata"]["name"]
        extra = {"dry_run": "All"} if dry_run else {}
        if kind in CUSTOM_KINDS:
            return self._json(self._call("create", kind, name, "create_namespaced_custom_object",
                                         *CUSTOM_KINDS[kind][:2], self.namespace, CUSTOM_KINDS[kind][2], obj, **extra))
        method = f"create_namespaced_{KINDS[kind][3]}"
        return self._json(self._call("create", kind, name, method, self.namespace, obj, **extra))

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        try:
            if kind in CUSTOM_KINDS:
                group, version, plural = CUSTOM_KINDS[kind]
                return self._json(self._call("get", kind, name, "get_namespaced_custom_object", group, version,
                                             self.namespace, plural, name))
            return self._json(self._call("get", kind, name, f"read_namespaced_{KINDS[kind][3]}", name,
                                         self.namespace))
        except NotFoundError:
            return None

    def list(self, kind: str, selector: str) -> list[dict[str, Any]]:
        if kind in CUSTOM_KINDS:
            group, version, plural = CUSTOM_KINDS[kind]
            response = self._call("list", kind, None, "list_namespaced_custom_object", group, version,
                                  self.namespace, plural, label_selector=selector)
        else:
            response = self._call("list", kind, None, f"list_namespaced_{KINDS[kind][3]}", self.namespace,
                                  label_selector=selector)
        return list(self._json(response).get("items") or [])

    def delete(self, kind: str, name: str) -> None:
        # Jobs default to orphaning their pods when deleted through the API; Background deletes them too.
        if kind in CUSTOM_KINDS:
            group, version, plural = CUSTOM_KINDS[kind]
            self._call("delete", kind, name, "delete_namespaced_custom_object", group, version, self.namespace,
                       plural, name, propagation_policy="Background")
            return
        self._call("delete", kind, name, f"delete_namespaced_{KINDS[kind][3]}", name, self.namespace,
                   propagation_policy="Background")

    def patch(self, kind: str, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        """A strategic merge patch (what the client sends for a dict body): the fields given, nothing else."""
        return self._json(self._call("patch", kind, name, f"patch_namespaced_{KINDS[kind][3]}", name,
                                     self.namespace, changes))

    def pod_log(self, name: str, container: str | None = None, follow: bool = False) -> Iterator[str]:
        extra = {"container": container} if container else {}
        response = self._call("get", "Pod", f"{name}/log", "read_namespaced_pod_log", name, self.namespace,
                              follow=follow, **extra)
        pending = b""
        try:
            for chunk in response.stream(4096, decode_content=True):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", "replace")
            if pending:
                yield pending.decode("utf-8", "replace")
        finally:
            response.release_conn()


    def exec(self, pod: str, command: list[str], stdin: BinaryIO | None = None,
             timeout_s: float = 3600) -> tuple[int, str]:
        """Run ``command`` in ``pod`` (pods/exec over a WebSocket, as `kubectl exec` does), sending ``stdin`` in
        1 MiB frames; (exit code, stderr)."""
        from kubernetes.client.exceptions import ApiException
        from kubernetes.stream import stream

        try:
            ws = stream(self._apis["core"].connect_get_namespaced_pod_exec, pod, self.namespace, command=command,
                        stdin=stdin is not None, stdout=True, stderr=True, tty=False, _preload_content=False)
        except ApiException as exc:
            raise api_error(exc, "create", "Pod", self.namespace, f"{pod}/exec") from None
        except Exception as exc:  # websocket-client's own errors: a refused upgrade, a broken connection
            raise ClusterError(f"cannot exec in pod {pod}: {_short(exc)}") from None
        errors: list[str] = []
        try:
            while stdin is not None and (chunk := stdin.read(2**20)):
                ws.write_stdin(chunk)
                ws.update(timeout=0)
                errors.append(ws.read_stderr())
            ws.run_forever(timeout=timeout_s)
            errors.append(ws.read_stderr())
            code = ws.returncode
        finally:
            ws.close()
        return (code if code is not None else -1), "".join(errors)


def connect(namespace: str | None = None, context: str | None = None, kubeconfig: str | None = None,
            default_namespace: str | None = None) -> KubeCluster:
    """A cluster client in ``namespace`` (else ``default_namespace``, else the context's, else "default")."""
    api_client, context_namespace = load_client(context, kubeconfig)
    return KubeCluster(api_client, namespace or default_namespace or context_namespace or "default")
