"""The pod runner: plays the Job controller and the kubelet against the fake API server, for real.

tests/k8s/fakeapi.py stores objects and has no controllers. This runner watches it and does what a cluster
does with kubetune's Jobs: for each Job that is not suspended and not finished it creates a pod from the
template (labels, ownerReference, a new name per attempt), executes the pod's one container as a fresh process
(:mod:`k8s.executor`: its own mount and PID namespaces, the volumes at their mountPaths, the user and groups
the securityContext or the image gives, a minimal /dev with the termination log), streams its log into the
fake server's pods/log, writes the container's exit code, reason and termination message back as pod status,
and keeps the Job's status (active/succeeded/failed counts, Complete or Failed conditions) as the Job
controller does: podFailurePolicy's FailJob on listed exit codes, then backoffLimit. A deleted pod gets SIGTERM,
then SIGKILL after terminationGracePeriodSeconds; a deleted Job takes its pods with it.

So the real CLI (`kubetune submit`, `status`, `logs`, `cancel`) and the real in-pod entrypoints (`kubetune drive`,
`kubetune stage`) meet a cluster that runs what they asked for. What it does not emulate: scheduling (every pod
starts at once, node "pod-runner"), image pulls (the image is this checkout's venv, or the CPU image through
podman when the executor is the container one), cgroup limits (requests and limits are not enforced),
Services/networking, TTL deletion, and the in-cluster service-account token (the fake speaks plain HTTP, so
the driver pod gets a kubeconfig naming the fake in the token's folder and $KUBECONFIG pointing at it).
"""

from __future__ import annotations

import base64
import datetime
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k8s.executor import ContainerSpec, HostExecutor, Mount, Running

IMAGE_USER = (1001, 0)  # images/Dockerfile: USER 1001, group 0 (OpenShift's arbitrary-UID convention)
IMAGE_ENTRYPOINT = ["kubetune"]
IMAGE_WORKDIR = "/workspace"
IMAGE_HOME = "/home/kubetune"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TERMINATION_MESSAGE_LIMIT = 4096  # bytes the kubelet keeps of a termination message
FALLBACK_LOG_LINES = 80  # FallbackToLogsOnError: the last 80 lines (within the byte limit)


def _now() -> str:
    # Fractional seconds so that two attempts within one second still sort by creation (newest_pod_of).
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _quantity_bytes(text: str | None) -> int | None:
    from containers import memory_bytes  # the kubernetes client's own quantity parser

    return memory_bytes(text) if text else None


@dataclass
class PodRun:
    """One attempt of one Job: the pod object's name, its process, and what happens to it."""

    job: str
    name: str
    folder: Path
    log: Path
    termination: Path
    process: Running | None = None
    policy: str = "File"
    deleted_at: float | None = None  # the pod object was deleted: SIGTERM sent at this time
    grace_s: float = 30.0
    finished: bool = False
    started_at: float | None = None
    wall_s: float | None = None  # from process start to exit, as the container's lifetime
    spec: ContainerSpec | None = None  # what the container was started with (pods/exec starts its like)


class PodRunner:
    """Start with ``with PodRunner(fake, tmp_path, claims={...}):``; every Job in the fake's namespace runs."""

    def __init__(self, fake, root: Path, claims: dict[str, Path] | None = None, executor=None,
                 poll_s: float = 0.2):
        self.fake, self.root, self.poll_s = fake, Path(root), poll_s
        self.claims = dict(claims or {})  # claimName -> host folder (made root-owned 0755 if missing)
        self.executor = executor or HostExecutor()
        self.runs: dict[str, PodRun] = {}  # pod name -> attempt
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pod-runner", daemon=True)

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> PodRunner:
        self.fake.kube.exec_handler = self.exec
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        for run in self.runs.values():
            if run.process and run.process.poll() is None:
                run.process.kill()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.reconcile()
            except Exception:  # keep running; the test reads self.errors when something hangs
                import traceback

                self.errors.append(traceback.format_exc(limit=4))

    def claim_folder(self, name: str) -> Path:
        """The host folder behind a claim: as a fresh block volume's filesystem, root-owned with mode 0755."""
        folder = self.claims.get(name) or self.root / "claims" / name
        if not folder.exists():
            folder.mkdir(parents=True)
            folder.chmod(0o755)
        self.claims[name] = folder
        return folder

    def exec(self, pod: str, command: list[str]):
        """pods/exec: the process that runs ``command`` in ``pod`` (its volumes, user, groups, environment and
        working directory), or None when the pod is not running. The fake API server streams its stdio."""
        run = self.runs.get(pod)
        if run is None or run.spec is None or run.finished or not command:
            return None
        from dataclasses import replace

        return self.executor.command(replace(run.spec, argv=list(command), termination_log=None))

    # ---- the Job controller ------------------------------------------------------------------------------
    def reconcile(self) -> None:
        jobs = self.fake.objects("Job")
        pods = self.fake.objects("Pod")
        for run in list(self.runs.values()):
            if run.finished:
                continue
            if run.job not in jobs and run.deleted_at is None:  # Job deleted: its pods go with it
                self._delete_pod(run, pods)
            elif run.name not in pods and run.deleted_at is None:
                self._terminate(run)
            if run.process is None and run.deleted_at is not None:
                run.finished = True
            self._follow(run)
        for name, job in self.fake.objects("Job").items():  # read again: following may have finished a Job
            self._control(name, job)

    def _control(self, name: str, job: dict[str, Any]) -> None:
        spec, status = job["spec"], job.get("status") or {}
        if spec.get("suspend") or any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                                      for c in status.get("conditions") or []):
            return
        mine = [r for r in self.runs.values() if r.job == name]
        if any(not r.finished for r in mine):
            return
        failed = int(status.get("failed") or 0)
        if failed > int(spec.get("backoffLimit", 6)):
            self._set_job(name, {"active": 0}, "Failed", "BackoffLimitExceeded",
                          "Job has reached the specified backoff limit")
            return
        self._start_pod(name, job)

    def _set_job(self, name: str, counts: dict[str, Any], condition: str | None = None, reason: str = "",
                 message: str = "") -> None:
        status = dict(counts)
        if condition:
            status["conditions"] = [{"type": condition, "status": "True", "reason": reason, "message": message,
                                     "lastTransitionTime": _now()}]
            if condition == "Complete":
                status["completionTime"] = _now()
        self.fake.patch("Job", name, {"status": status})

    # ---- the kubelet -------------------------------------------------------------------------------------
    def _start_pod(self, job_name: str, job: dict[str, Any]) -> None:
        template = job["spec"]["template"]
        pod_name = f"{job_name}-{secrets.token_hex(3)[:5]}"
        labels = dict(template.get("metadata", {}).get("labels") or {},
                      **{"batch.kubernetes.io/job-name": job_name, "job-name": job_name,
                         "batch.kubernetes.io/controller-uid": job["metadata"].get("uid", "")})
        spec = dict(template["spec"], nodeName="pod-runner")
        container = spec["containers"][0]
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": pod_name, "labels": labels, "creationTimestamp": _now(),
                            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name,
                                                 "uid": job["metadata"].get("uid", ""), "controller": True}]},
               "spec": spec, "status": {"phase": "Pending"}}
        self.fake.put("Pod", pod)
        folder = self.root / "pods" / pod_name
        folder.mkdir(parents=True)
        run = PodRun(job=job_name, name=pod_name, folder=folder, log=folder / "log", termination=folder / "termination-log",
                     policy=container.get("terminationMessagePolicy", "File"),
                     grace_s=float(spec.get("terminationGracePeriodSeconds", 30)))
        self.runs[pod_name] = run
        self._set_job(job_name, {"active": 1, "startTime": (job.get("status") or {}).get("startTime") or _now(),
                                 "failed": int((job.get("status") or {}).get("failed") or 0)})
        try:
            container_spec = self._container_spec(pod_name, spec, container, run)
        except ConfigError as exc:  # what the kubelet reports as CreateContainerConfigError: the pod waits
            self.fake.patch("Pod", pod_name, {"status": {"phase": "Pending", "containerStatuses": [
                {"name": container["name"], "ready": False, "restartCount": 0, "image": container.get("image", ""),
                 "imageID": "", "state": {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}}]}})
            # never starts: the Job stays active with this pod waiting, as on a cluster
            self.errors.append(f"{pod_name}: {exc}")
            return
        run.spec = container_spec
        run.process = self.executor.start(container_spec)
        run.started_at = time.monotonic()
        self.fake.patch("Pod", pod_name, {"status": {"phase": "Running", "startTime": _now(), "containerStatuses": [
            {"name": container["name"], "ready": True, "restartCount": 0, "image": container.get("image", ""),
             "imageID": "", "state": {"running": {"startedAt": _now()}}}]}})

    def _follow(self, run: PodRun) -> None:
        if run.process is None:
            return
        self._publish_log(run)
        if run.deleted_at is not None and run.process.poll() is None and time.monotonic() - run.deleted_at > run.grace_s:
            run.process.kill()  # the grace period is over: SIGKILL
        code = run.process.poll()
        if code is None:
            return
        run.finished = True
        run.wall_s = round(time.monotonic() - run.started_at, 2)
        self._publish_log(run)
        message = self._termination_message(run, code)
        reason = "Completed" if code == 0 else ("OOMKilled" if code == 137 and run.deleted_at is None else "Error")
        terminated = {"exitCode": code, "reason": reason, "startedAt": _now(), "finishedAt": _now()}
        if message:
            terminated["message"] = message
        if run.deleted_at is None:  # a deleted pod's object is gone; only the Job learns how it ended
            self.fake.patch("Pod", run.name, {"status": {
                "phase": "Succeeded" if code == 0 else "Failed",
                "containerStatuses": [{"name": "x", "ready": False, "restartCount": 0, "image": "", "imageID": "",
                                       "state": {"terminated": terminated}}]}})
        jobs = self.fake.objects("Job")
        if run.job not in jobs:
            return
        self._count(run, jobs[run.job], code)

    def _count(self, run: PodRun, job: dict[str, Any], code: int) -> None:
        status = job.get("status") or {}
        if code == 0:
            self._set_job(run.job, {"active": 0, "succeeded": 1, "failed": int(status.get("failed") or 0)},
                          "Complete", "CompletionsReached", "Reached expected number of succeeded pods")
            return
        failed = int(status.get("failed") or 0) + 1
        container = job["spec"]["template"]["spec"]["containers"][0]["name"]
        for rule in (job["spec"].get("podFailurePolicy") or {}).get("rules") or []:
            on_codes = rule.get("onExitCodes")
            if on_codes and on_codes.get("containerName", container) == container:
                listed = code in on_codes.get("values", [])
                if listed == (on_codes.get("operator", "In") == "In") and rule["action"] == "FailJob":
                    self._set_job(run.job, {"active": 0, "failed": failed}, "Failed", "PodFailurePolicy",
                                  f"Container {container} for pod {run.name} failed with exit code {code} "
                                  "matching FailJob rule at index 0")
                    return
        self._set_job(run.job, {"active": 0, "failed": failed})  # the next reconcile retries or gives up

    def _terminate(self, run: PodRun) -> None:
        run.deleted_at = time.monotonic()
        if run.process is not None:
            run.process.terminate()  # SIGTERM to the container's PID 1

    def _delete_pod(self, run: PodRun, pods: dict[str, Any]) -> None:
        if run.name in pods:
            self.fake.delete("Pod", run.name)
        self._terminate(run)

    def _publish_log(self, run: PodRun) -> None:
        text = run.log.read_text(errors="replace") if run.log.exists() else ""
        self.fake._run(lambda: self.fake.kube.logs.__setitem__((self.fake.namespace, run.name), text))

    def _termination_message(self, run: PodRun, code: int) -> str:
        text = run.termination.read_text(errors="replace") if run.termination.exists() else ""
        if not text and code != 0 and run.policy == "FallbackToLogsOnError":
            lines = (run.log.read_text(errors="replace") if run.log.exists() else "").splitlines()
            text = "\n".join(lines[-FALLBACK_LOG_LINES:])
        return text[-TERMINATION_MESSAGE_LIMIT:]

    # ---- what the container gets -------------------------------------------------------------------------
    def _container_spec(self, pod_name: str, spec: dict[str, Any], container: dict[str, Any],
                        run: PodRun) -> ContainerSpec:
        pod_sc, ctr_sc = spec.get("securityContext") or {}, container.get("securityContext") or {}
        uid = ctr_sc.get("runAsUser", pod_sc.get("runAsUser", IMAGE_USER[0]))
        gid = ctr_sc.get("runAsGroup", pod_sc.get("runAsGroup", IMAGE_USER[1]))
        if (ctr_sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) and uid == 0):
            raise ConfigError("container has runAsNonRoot and image will run as root")
        fs_group = pod_sc.get("fsGroup")
        groups = sorted({g for g in [fs_group, *(pod_sc.get("supplementalGroups") or [])] if g is not None})
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        mounts: list[Mount] = []
        for vm in container.get("volumeMounts") or []:
            mounts.append(self._mount(pod_name, volumes[vm["name"]], vm, fs_group,
                                      pod_sc.get("fsGroupChangePolicy", "Always")))
        home = run.folder / "home"  # the image's HOME: writable, but gone with the pod (not on the claim)
        home.mkdir()
        shutil.chown(home, uid, 0)
        mounts.append(Mount(home, IMAGE_HOME, image_part=True))
        if spec.get("automountServiceAccountToken", True) and spec.get("serviceAccountName"):
            sa = run.folder / "serviceaccount"
            sa.mkdir()
            (sa / "namespace").write_text(self.fake.namespace)
            (sa / "token").write_text("fake-token")
            self.fake.kubeconfig(sa / "kubeconfig", namespace=self.fake.namespace)
            mounts.append(Mount(sa, SA_DIR, read_only=True))
        workdir = container.get("workingDir") or IMAGE_WORKDIR
        if not any(m.target == IMAGE_WORKDIR for m in mounts):  # the image's own /workspace (group 0, g=u)
            own = run.folder / "workspace"
            own.mkdir()
            shutil.chown(own, 1001, 0)
            own.chmod(0o775)
            mounts.append(Mount(own, IMAGE_WORKDIR, image_part=True))
        run.termination.touch()
        run.termination.chmod(0o666)
        # the kubelet sets these whatever enableServiceLinks says; nothing listens there in the runner
        env = {"HOSTNAME": pod_name, "KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
        if any(m.target == SA_DIR for m in mounts):
            env["KUBECONFIG"] = f"{SA_DIR}/kubeconfig"
        for item in container.get("env") or []:
            env[item["name"]] = self._env_value(pod_name, item)
        argv = list(container.get("command") or IMAGE_ENTRYPOINT) + list(container.get("args") or [])
        return ContainerSpec(argv=argv, env=env, mounts=mounts, uid=uid, gid=gid, groups=groups, workdir=workdir,
                             log=run.log, termination_log=run.termination, image=container.get("image", ""),
                             name=pod_name, memory_limit_bytes=_quantity_bytes(
                                 ((container.get("resources") or {}).get("limits") or {}).get("memory")))

    def _mount(self, pod_name: str, volume: dict[str, Any], vm: dict[str, Any], fs_group: int | None,
               change_policy: str) -> Mount:
        read_only = bool(vm.get("readOnly"))
        if "configMap" in volume:
            cm = self.fake.objects("ConfigMap").get(volume["configMap"]["name"])
            if cm is None:
                raise ConfigError(f'configmap "{volume["configMap"]["name"]}" not found')
            folder = self.root / "pods" / pod_name / "volumes" / vm["name"]
            folder.mkdir(parents=True)
            for key, text in (cm.get("data") or {}).items():
                (folder / key).write_text(text)
                (folder / key).chmod(0o644)
            return Mount(folder, vm["mountPath"], read_only=True)  # ConfigMap volumes are always read-only
        if "persistentVolumeClaim" in volume:
            folder = self.claim_folder(volume["persistentVolumeClaim"]["claimName"])
            if fs_group is not None:
                apply_fs_group(folder, fs_group, change_policy)
            return Mount(folder, vm["mountPath"], read_only=read_only or volume["persistentVolumeClaim"].get("readOnly", False))
        if "emptyDir" in volume:
            empty = volume["emptyDir"]
            if empty.get("medium") == "Memory":
                return Mount(None, vm["mountPath"], tmpfs_bytes=_quantity_bytes(empty.get("sizeLimit")) or 64 * 2**20)
            folder = self.root / "pods" / pod_name / "volumes" / vm["name"]
            folder.mkdir(parents=True)
            folder.chmod(0o777)
            return Mount(folder, vm["mountPath"], read_only=read_only)
        raise ConfigError(f"volume {volume['name']}: kind not emulated by the pod runner")

    def _env_value(self, pod_name: str, item: dict[str, Any]) -> str:
        if "value" in item:
            return str(item["value"])
        source = item.get("valueFrom") or {}
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            values = {"metadata.namespace": self.fake.namespace, "metadata.name": pod_name,
                      "spec.nodeName": "pod-runner", "status.podIP": "127.0.0.1"}
            if path not in values:
                raise ConfigError(f"fieldRef {path}: not emulated by the pod runner")
            return values[path]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = self.fake.objects("Secret").get(ref["name"])
            if secret is None or ref["key"] not in (secret.get("data") or {}):
                if ref.get("optional"):
                    return ""
                raise ConfigError(f'secret "{ref["name"]}" not found' if secret is None else
                                  f"couldn't find key {ref['key']} in Secret {self.fake.namespace}/{ref['name']}")
            return base64.b64decode(secret["data"][ref["key"]]).decode()
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            cm = self.fake.objects("ConfigMap").get(ref["name"]) or {}
            return (cm.get("data") or {})[ref["key"]]
        raise ConfigError(f"env {item['name']}: source not emulated by the pod runner")


class ConfigError(Exception):
    """What the kubelet would report as CreateContainerConfigError."""


def apply_fs_group(folder: Path, gid: int, policy: str = "Always") -> None:
    """What the kubelet does to a volume for a pod with fsGroup: every file group-owned by it and group-writable,
    directories setgid (new files inherit the group). OnRootMismatch skips the walk when the root already matches."""
    def fix(path: Path) -> None:
        st = path.lstat()
        if path.is_symlink():
            return
        import os
        os.chown(path, -1, gid)
        mode = st.st_mode & 0o7777 | 0o060
        if path.is_dir():
            mode |= 0o2010
        path.chmod(mode)

    st = folder.stat()
    if policy == "OnRootMismatch" and st.st_gid == gid and st.st_mode & 0o2070 == 0o2070:
        return
    fix(folder)
    for sub in folder.rglob("*"):
        fix(sub)
