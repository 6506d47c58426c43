"""Run one container of a pod as a fresh process on this machine, the way a container runtime would.

``unshare`` gives the process its own mount and PID namespaces (so it is PID 1, as a container's entrypoint is:
a SIGTERM it has no handler for is ignored, as in a pod without an init). Inside, before dropping root, a setup
script bind-mounts each volume at its mountPath (read-only where the pod says so), mounts tmpfs for
``emptyDir: {medium: Memory}`` (/dev/shm), gives the container a minimal /dev (null, zero, random, urandom, tty,
the NVIDIA device nodes where the machine has them, and the termination log file), a private /tmp, then
``setpriv`` switches to the pod's UID, GID and supplementary groups with no capabilities and execs the command
with exactly the pod's environment. Paths that do not exist on this machine (/workspace, /etc/kubetune) are
created as empty root-owned folders to mount on; nothing is written into them outside the namespace.

The "image" is this checkout's venv (``bin_dir``): its ``kubetune`` is the image's entrypoint.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")


@dataclass
class Mount:
    source: Path | None  # None with tmpfs_bytes: a tmpfs of that size
    target: str
    read_only: bool = False
    tmpfs_bytes: int | None = None
    image_part: bool = False  # stands for a folder the image has (HOME, /workspace): only the host executor mounts it


@dataclass
class ContainerSpec:
    argv: list[str]
    env: dict[str, str]
    mounts: list[Mount]
    uid: int
    gid: int
    groups: list[int] = field(default_factory=list)
    workdir: str = "/"
    log: Path = Path("/dev/null")
    termination_log: Path | None = None
    image: str = ""
    name: str = ""
    memory_limit_bytes: int | None = None  # resources.limits.memory: enforced by the podman executor only


class Running:
    """A started container: poll() gives its exit code as the kubelet reports it (128 + signal when killed)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.killed = False

    def _init_pid(self) -> int | None:
        """The container's PID 1 as this machine sees it: unshare's forked child."""
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def _signal(self, sig: int) -> None:
        pid = self._init_pid()
        try:
            os.kill(pid if pid else self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self.killed = True
        self._signal(signal.SIGKILL)  # PID 1 of the namespace: the kernel kills every process in it

    def poll(self) -> int | None:
        code = self.proc.poll()
        if code is None:
            return None
        if self.killed and code not in (0, 143):  # unshare reports its SIGKILLed child as 1; the kubelet says 137
            return 128 + signal.SIGKILL
        return 128 - code if code < 0 else code


# What images/Dockerfile sets (ENV, USER's home): the host executor gives the same to its processes.
IMAGE_ENV = {"HOME": "/home/kubetune", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}


class HostExecutor:
    """Containers as namespaced processes on this machine (root needed for unshare and mount, as in CI)."""

    kind = "host processes (unshare + setpriv; this checkout's venv as the image)"

    def __init__(self, bin_dir: str | Path | None = None):
        self.bin_dir = str(bin_dir or Path(sys.executable).parent)

    def start(self, spec: ContainerSpec) -> Running:
        argv, env = self.command(spec)
        log = open(spec.log, "ab")
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        finally:
            log.close()
        return Running(proc)

    def command(self, spec: ContainerSpec) -> tuple[list[str], dict[str, str]]:
        """(argv, environment) of the process that runs ``spec`` in its namespaces (also what `kubectl exec`
        starts beside a pod's container: the same mounts, user and environment, another command)."""
        argv = ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private",
                "sh", "-ec", self._setup_script(spec)]
        return argv, {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

    def _reveal_interpreter(self) -> list[str]:
        """The venv's python may live under a folder the pod's user cannot enter (pyenv under /root, mode 0700),
        where the image has it under /opt. Inside the namespace only, such a folder is replaced by an empty tmpfs
        that holds just the interpreter's tree, so that path resolves for any UID and nothing else there shows."""
        prefix = Path(os.path.realpath(sys.base_prefix))
        for closed in [*reversed(prefix.parents), prefix]:
            if str(closed) != "/" and not os.stat(closed).st_mode & 0o001:
                rest = prefix.relative_to(closed)
                staging = "/run/kubetune-interpreter"
                return [f"mkdir -p {staging}", f"mount --bind {shlex.quote(str(prefix))} {staging}",
                        f"mount -t tmpfs -o mode=755 tmpfs {shlex.quote(str(closed))}",
                        f"mkdir -p {shlex.quote(str(closed / rest))}",
                        f"mount --bind {staging} {shlex.quote(str(closed / rest))}", f"umount -l {staging}"]
        return []

    def _setup_script(self, spec: ContainerSpec) -> str:
        q = shlex.quote
        lines = []
        for m in spec.mounts:
            target = q(m.target)
            if m.target.startswith("/dev/"):
                continue  # mounted below, on the container's own /dev
            if m.tmpfs_bytes:
                lines += [f"mkdir -p {target}", f"mount -t tmpfs -o size={m.tmpfs_bytes},mode=1777 tmpfs {target}"]
                continue
            lines += [f"mkdir -p {target}" if m.source.is_dir() else f"touch {target}",
                      f"mount --bind {q(str(m.source))} {target}"]
            if m.read_only:
                lines.append(f"mount -o remount,bind,ro {target}")
        # A minimal /dev on a tmpfs: the host's device nodes bound one by one (GPUs too), the termination log.
        old = "/run/kubetune-host-dev"
        lines += [f"mkdir -p {old}", f"mount --rbind /dev {old}", "mount -t tmpfs -o mode=755 tmpfs /dev"]
        for node in DEV_NODES:
            lines += [f"touch /dev/{node}", f"mount --bind {old}/{node} /dev/{node}"]
        lines += [f'for n in {old}/nvidia*; do [ -e "$n" ] || continue; b=$(basename "$n"); '
                  f'if [ -d "$n" ]; then mkdir -p /dev/$b; else touch /dev/$b; fi; mount --rbind "$n" /dev/$b; done',
                  "mkdir -p /dev/shm /dev/pts", "ln -s /proc/self/fd /dev/fd", "ln -s /proc/self/fd/0 /dev/stdin",
                  "ln -s /proc/self/fd/1 /dev/stdout", "ln -s /proc/self/fd/2 /dev/stderr"]
        for m in spec.mounts:  # volumes under /dev (the shm emptyDir) again, now that /dev is new
            if m.target.startswith("/dev/") and m.tmpfs_bytes:
                lines.append(f"mount -t tmpfs -o size={m.tmpfs_bytes},mode=1777 tmpfs {q(m.target)}")
        if spec.termination_log:
            lines += ["touch /dev/termination-log", f"mount --bind {q(str(spec.termination_log))} /dev/termination-log"]
        lines += [f"umount -l {old}", "mount -t tmpfs -o mode=1777 tmpfs /tmp"]
        lines += self._reveal_interpreter()
        groups = ",".join(str(g) for g in spec.groups)
        user = [f"--reuid={spec.uid}", f"--regid={spec.gid}",
                f"--groups={groups}" if groups else "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]
        image_env = dict(IMAGE_ENV, PATH=f"{self.bin_dir}:/usr/local/bin:/usr/bin:/bin")
        env = [f"{k}={v}" for k, v in {**image_env, **spec.env}.items()]
        lines.append(f"cd {q(spec.workdir)}")
        lines.append("exec setpriv " + " ".join(user) + " -- env -i " + " ".join(q(e) for e in env) + " "
                     + " ".join(q(a) for a in spec.argv))
        return "\n".join(lines)


class PodmanRunning(Running):
    """A container started by `podman run`: signals go through podman, which reports 128 + signal as the kubelet."""

    def __init__(self, proc: subprocess.Popen, name: str, env: dict[str, str]):
        super().__init__(proc)
        self.name, self.env = name, env

    def _signal(self, sig: int) -> None:
        subprocess.run(["podman", "kill", "--signal", str(int(sig)), self.name], env=self.env,
                       capture_output=True, timeout=60)

    def poll(self) -> int | None:
        return self.proc.poll()


class PodmanExecutor:
    """The pod's container in its image (the Job's ``image``, built by `make test-image`) through podman and runc
    (tests/containers.py has the set-up): the pod's user and groups, all capabilities dropped, no privilege
    escalation, the volumes at their mountPaths, the termination log file, and the host's network so that the
    driver reaches the fake API server on 127.0.0.1. The image's own HOME and /workspace are used as they are."""

    kind = "containers (podman + runc, the CPU image)"

    def __init__(self):
        from containers import podman_env

        self.env = podman_env()

    def start(self, spec: ContainerSpec) -> PodmanRunning:
        from containers import podman_run_args

        mounts = [(m.source, m.target, m.read_only) for m in spec.mounts if not m.image_part and not m.tmpfs_bytes]
        if spec.termination_log:
            mounts.append((spec.termination_log, "/dev/termination-log", False))
        args = ["podman", *podman_run_args(
            spec.image, spec.argv[1:], name=spec.name, command=spec.argv[:1], env=spec.env, mounts=mounts,
            tmpfs=[(m.target, m.tmpfs_bytes) for m in spec.mounts if m.tmpfs_bytes],
            user=f"{spec.uid}:{spec.gid}", group_add=spec.groups, workdir=spec.workdir,
            read_only=False,  # the rendered pods do not set readOnlyRootFilesystem
            memory=spec.memory_limit_bytes,  # the cgroup limit the kubelet sets: past it the OOM killer ends it, 137
            network="host")]  # the driver reaches the fake API server on 127.0.0.1
        log = open(spec.log, "ab")
        try:
            # conmon drops a file named 'oom' in its working folder when a container is OOM-killed: not the checkout
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                    cwd=spec.log.parent)
        finally:
            log.close()
        return PodmanRunning(proc, spec.name, self.env)
