"""A fake Kubernetes API server over real HTTP, for the launcher and driver tests.

kmock's emulator stores objects and serves create/get/list/patch/delete; this subclass fills the gaps that
matter here (see ../shared/docs/ENVIRONMENT.md): it sets metadata.namespace/uid/resourceVersion/
creationTimestamp on create, honours ``labelSelector`` on lists and ``dryRun`` on creates, and serves the
pods/log subresource from texts the test provides. It has no controllers: tests play the Job controller
and the kubelet by setting Job conditions and injecting pods. The server runs on its own event loop in a
thread, so the code under test uses the ordinary synchronous ``kubernetes`` client, as on a laptop.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import threading
import uuid
from pathlib import Path
from typing import Any

import yaml
from kmock import KubernetesEmulator, Server, resource
from kmock._internal import enums

RESOURCES = {"Job": "batch/v1/jobs", "Pod": "v1/pods", "ConfigMap": "v1/configmaps", "Secret": "v1/secrets",
             "Event": "v1/events",
             "PersistentVolumeClaim": "v1/persistentvolumeclaims", "ServiceAccount": "v1/serviceaccounts",
             "Role": "rbac.authorization.k8s.io/v1/roles", "RoleBinding": "rbac.authorization.k8s.io/v1/rolebindings",
             "Deployment": "apps/v1/deployments", "Service": "v1/services",
             "InferenceService": "serving.kserve.io/v1beta1/inferenceservices",
             "TrainJob": "trainer.kubeflow.org/v1alpha1/trainjobs", "PyTorchJob": "kubeflow.org/v1/pytorchjobs"}
_counter = itertools.count(1000)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def matches(selector: str | None, labels: dict[str, str]) -> bool:
    """Equality-based label selectors (k=v, k==v, k!=v, k, !k), comma-separated: what kubetune sends."""
    for term in filter(None, (selector or "").split(",")):
        term = term.strip()
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k) != v:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class FakeKube(KubernetesEmulator):
    logs: dict[tuple[str, str], str]
    deny: set[tuple[str, str]]  # (verb, plural) answered 403, as RBAC would
    # pods/exec: (pod name, command) -> (argv, env) of a process that runs it in that pod; set by the pod runner
    exec_handler: Any

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.logs = {}
        self.deny = set()
        self.exec_handler = None
        for res in RESOURCES.values():
            self.resources[res].namespaced = True

    async def _handle(self, request):
        verb = {"post": "create", "get": "get", "delete": "delete", "patch": "patch"}.get(request.method.value.lower())
        if request.resource is not None and (verb, request.resource.plural) in self.deny:
            from aiohttp import web
            res = request.resource
            what = f"{res.plural}.{res.group}" if res.group else res.plural
            return web.json_response({
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
                "message": f'{what} is forbidden: User "tester" cannot {verb} resource "{res.plural}" in API group '
                           f'"{res.group}" in the namespace "{request.namespace}"'}, status=403)
        if request.action == enums.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if request.params.get("dryRun"):  # a real server validates and answers, but stores nothing
                from aiohttp import web
                return web.json_response(request.data, status=201)
            meta.setdefault("namespace", request.namespace)
            meta.update(uid=str(uuid.uuid4()), resourceVersion=str(next(_counter)), creationTimestamp=_now())
        elif request.action == enums.action.UPDATE and isinstance(request.data, dict):
            request.data.setdefault("metadata", {})["resourceVersion"] = str(next(_counter))
        return await super()._handle(request)

    async def _serve_list(self, request):
        result = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        result["items"] = [o for o in result["items"] if matches(selector, o.get("metadata", {}).get("labels", {}))]
        result["metadata"]["resourceVersion"] = str(next(_counter))
        return result

    async def _serve_exec(self, request):
        """pods/exec over a WebSocket (v5/v4.channel.k8s.io, as the client asks): channel 0 is the command's stdin,
        1 and 2 its stdout and stderr, 3 its exit status; 255 closes a channel (v5). The pod runner starts the
        command in the pod's mounts, user and environment (k8s.podrunner.PodRunner.exec)."""
        import json

        from aiohttp import WSMsgType, web

        raw = request._raw_request
        command = raw.query.getall("command", [])
        launch = self.exec_handler(request.name, command) if self.exec_handler else None
        if launch is None:
            return web.json_response({"kind": "Status", "status": "Failure", "code": 400, "reason": "BadRequest",
                                      "message": f"pod {request.name} is not running"}, status=400)
        ws = web.WebSocketResponse(protocols=("v5.channel.k8s.io", "v4.channel.k8s.io"))
        await ws.prepare(raw)
        argv, env = launch
        proc = await asyncio.create_subprocess_exec(*argv, env=env, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)

        async def pump(stream, channel: int) -> None:
            while chunk := await stream.read(65536):
                await ws.send_bytes(bytes([channel]) + chunk)

        async def feed() -> None:
            async for msg in ws:
                if msg.type != WSMsgType.BINARY or not msg.data:
                    continue
                if msg.data[0] == 0 and not proc.stdin.is_closing():
                    proc.stdin.write(msg.data[1:])
                    await proc.stdin.drain()
                elif msg.data[0] == 255 and msg.data[1:2] == b"\x00":
                    proc.stdin.close()

        feeding = asyncio.ensure_future(feed())
        await asyncio.gather(pump(proc.stdout, 1), pump(proc.stderr, 2))
        code = await proc.wait()
        status = {"metadata": {}, "status": "Success"} if code == 0 else {
            "metadata": {}, "status": "Failure", "reason": "NonZeroExitCode", "message": f"exit code {code}",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}
        await ws.send_bytes(b"\x03" + json.dumps(status).encode())
        feeding.cancel()
        await ws.close()
        return ws

    async def _serve_fetch(self, request):
        if request.subresource == "exec":
            return await self._serve_exec(request)
        if request.subresource == "log":
            if (request.namespace, request.name) not in self.logs:
                await super()._serve_fetch(request)  # 404 unless the pod exists
            return self.logs.get((request.namespace, request.name), "").encode()
        return await super()._serve_fetch(request)


class FakeCluster:
    """A running FakeKube with thread-safe helpers for the test's side (the controllers' part)."""

    def __init__(self, namespace: str = "ml"):
        self.namespace = namespace
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), daemon=True)
        self.kube: FakeKube | None = None
        self.url = ""

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with FakeKube() as kube, Server(kube) as server:
            self.kube, self.url = kube, str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> FakeCluster:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake API server did not start")
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self, fn, *args):
        async def call():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(10)

    # ---- reading -------------------------------------------------------------------------------------
    def objects(self, kind: str) -> dict[str, dict[str, Any]]:
        res = resource(RESOURCES[kind])

        def read():
            return {name: copy.deepcopy(obj.raw) for (r, ns, name), obj in self.kube.objects.items()
                    if r == res and ns == self.namespace and not obj.deleted}
        return self._run(read)

    def requests(self, method: str | None = None, path_part: str = "") -> list:
        def read():
            return [r for r in self.kube._requests if (method is None or r.method.value.lower() == method)
                    and path_part in str(r.url.path)]
        return self._run(read)

    # ---- playing the controllers ---------------------------------------------------------------------
    def put(self, kind: str, obj: dict[str, Any]) -> None:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", self.namespace)
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        meta["resourceVersion"] = str(next(_counter))

        def write():
            self.kube.objects[RESOURCES[kind], self.namespace, meta["name"]] = obj
        self._run(write)

    def patch(self, kind: str, name: str, changes: dict[str, Any]) -> None:
        def write():
            self.kube.objects[RESOURCES[kind], self.namespace, name].patch(changes)
        self._run(write)

    def delete(self, kind: str, name: str) -> None:
        self._run(lambda: self.kube.objects[RESOURCES[kind], self.namespace, name].delete())

    def finish_job(self, name: str, ok: bool = True, reason: str = "BackoffLimitExceeded",
                   message: str = "Job has reached the specified backoff limit") -> None:
        """What the Job controller writes when a Job ends."""
        cond = ({"type": "Complete", "status": "True"} if ok else
                {"type": "Failed", "status": "True", "reason": reason, "message": message})
        status = {"conditions": [cond], "startTime": "2026-11-28T10:00:00Z", "active": 0,
                  "succeeded" if ok else "failed": 1}
        if ok:
            status["completionTime"] = "2026-11-28T10:12:30Z"
        self.patch("Job", name, {"status": status})

    def start_job(self, name: str) -> None:
        self.patch("Job", name, {"status": {"active": 1, "startTime": "2026-11-28T10:00:00Z"}})

    def add_pod(self, job: dict[str, Any], name: str, phase: str = "Running", node: str = "gpu-node-1",
                log: str = "", waiting_reason: str | None = None, terminated: dict | None = None,
                scheduled_message: str | None = None) -> None:
        """A pod as the Job controller and the kubelet would make it for ``job``."""
        template = job["spec"]["template"]
        labels = dict(template["metadata"]["labels"], **{"batch.kubernetes.io/job-name": job["metadata"]["name"]})
        status: dict[str, Any] = {"phase": phase, "startTime": "2026-11-28T10:00:05Z"}
        container = template["spec"]["containers"][0]["name"]
        if waiting_reason:
            status["containerStatuses"] = [{"name": container, "ready": False, "restartCount": 0, "image": "x",
                                            "imageID": "", "state": {"waiting": {"reason": waiting_reason,
                                                                                 "message": "back-off pulling"}}}]
        if terminated:
            status["containerStatuses"] = [{"name": container, "ready": False, "restartCount": 0, "image": "x",
                                            "imageID": "", "state": {"terminated": terminated}}]
        if scheduled_message:
            status["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                     "message": scheduled_message}]
        spec = copy.deepcopy(template["spec"])
        if phase != "Pending" or waiting_reason:
            spec["nodeName"] = node
        self.put("Pod", {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
                         "spec": spec, "status": status})
        self._run(lambda: self.kube.logs.__setitem__((self.namespace, name), log))

    def kubeconfig(self, path: Path, namespace: str | None = None) -> Path:
        context = {"cluster": "fake", "user": "tester", **({"namespace": namespace} if namespace else {})}
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "t"}}],
            "contexts": [{"name": "fake", "context": context}]}))
        return path
