"""kubetune's image, built from this checkout and run the way a kubelet runs a pod's container: podman with runc
(scripts/install-containers.sh sets them up), a read-only root filesystem, a numeric user in group 0 plus the
pod's supplemental groups, all capabilities dropped, no privilege escalation, no network, a memory limit, and
host folders mounted where the pod mounts its volumes. tests/test_image.py and the pod runner use it.

    if podman_works():
        image = build_image("cpu")
        result = run_in_image(image, ["validate", "/etc/kubetune/recipe.yaml"],
                              mounts=[(claim, "/data", False), (recipe_dir, "/etc/kubetune", True)],
                              user="1000680000:0", group_add=[1000680000], workdir="/data", memory="4Gi")
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTAINERS_CONF = ROOT / ".cache" / "containers" / "containers.conf"  # written by scripts/install-containers.sh
CPU_BASE_IMAGE = "localhost/kubetune-base:bookworm"  # mmdebstrap's Debian, made by scripts/install-containers.sh
TEST_IMAGE = "localhost/kubetune:{flavour}-test"
BUILD_TIMEOUT_S = 1800  # a cold CPU build here: ~4 min (PyPI downloads, pypcre and gptqmodel from source)


def podman_env() -> dict[str, str]:
    """The environment podman needs on this kind of host: runc and explicit ulimits (containers.conf)."""
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def _podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], env=podman_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} … failed ({result.returncode}):\n"
                           f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@functools.cache
def podman_problem() -> str | None:
    """Why podman cannot run containers here (not installed, scripts/install-containers.sh not run, runc
    failing), or None when it starts a container of the CPU base image in its own namespaces."""
    if not (shutil.which("podman") and shutil.which("runc")):
        return "podman or runc is not installed (scripts/install-containers.sh)"
    if not CONTAINERS_CONF.is_file():
        return f"{CONTAINERS_CONF.relative_to(ROOT)} is missing (scripts/install-containers.sh)"
    try:  # generous: podman waits for its storage lock while another podman commits a layer
        result = _podman("run", "--rm", "--network", "none", CPU_BASE_IMAGE, "true", check=False, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"podman run {CPU_BASE_IMAGE} true: {exc}"
    if result.returncode != 0:
        return f"podman run {CPU_BASE_IMAGE} true: exit {result.returncode}: {result.stderr.strip()[-500:]}"
    return None


def podman_works() -> bool:
    """podman and runc are installed, set up by scripts/install-containers.sh, and start a container."""
    return podman_problem() is None


def setup_podman() -> None:
    """Install podman/runc and write their set-up (apt-get: needs root); idempotent, seconds when done."""
    subprocess.run([str(ROOT / "scripts" / "install-containers.sh")], check=True, capture_output=True, text=True,
                   timeout=900)
    podman_problem.cache_clear()


def build_image(flavour: str = "cpu", tag: str | None = None) -> str:
    """Build FLAVOUR of images/Dockerfile from this checkout (layers cached: seconds when nothing changed)."""
    tag = tag or TEST_IMAGE.format(flavour=flavour)
    env = {**podman_env(), "CONTAINER": "podman", "CPU_IMAGE": CPU_BASE_IMAGE}
    result = subprocess.run([str(ROOT / "scripts" / "build-image.sh"), flavour, tag], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f"building the {flavour} image failed ({result.returncode}):\n"
                           f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return tag


def memory_bytes(quantity: str | int) -> int:
    """A Kubernetes quantity ("4Gi", "512M") or a byte count, as bytes."""
    from kubernetes.utils.quantity import parse_quantity

    return int(parse_quantity(quantity))


def podman_run_args(image: str, argv: Sequence[str], *, name: str, command: Sequence[str] | None = None,
                    env: Mapping[str, str] | None = None, mounts: Iterable[tuple[Path | str, str, bool]] = (),
                    tmpfs: Iterable[tuple[str, int]] = (), user: str = "1001:0", group_add: Iterable[int] = (),
                    workdir: str | None = None, read_only: bool = True, memory: str | int | None = None,
                    shm_size: str | int | None = None, network: str = "none") -> list[str]:
    """`podman run` arguments (without "podman") for one container as a kubelet would start it: see run_in_image.
    tmpfs: (container path, size in bytes) for `emptyDir: {medium: Memory}` volumes."""
    args = ["run", "--rm", "--user", user, "--network", network, "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges", "--pull", "never"]
    if read_only:
        args.append("--read-only")
    for gid in group_add:
        args += ["--group-add", str(gid)]
    if memory is not None:
        args += ["--memory", f"{memory_bytes(memory)}b", "--memory-swap", f"{memory_bytes(memory)}b"]
    if shm_size is not None:
        args += ["--shm-size", f"{memory_bytes(shm_size)}b"]
    if workdir:
        args += ["--workdir", workdir]
    for key, value in (env or {}).items():
        args += ["--env", f"{key}={value}"]
    for host, container, ro in mounts:
        args += ["--volume", f"{Path(host).resolve()}:{container}:{'ro' if ro else 'rw'}"]
    for container, size in tmpfs:
        args += ["--tmpfs", f"{container}:rw,size={size},mode=1777"]
    if command:
        args += ["--entrypoint", command[0]]
        argv = [*command[1:], *argv]
    return [*args, "--name", name, image, *argv]


def run_in_image(image: str, argv: Sequence[str], *, timeout: float = 600, **options) -> subprocess.CompletedProcess:
    """Run one container of IMAGE to completion and return its exit code and output (text).

    argv: the container's args (a pod's `args`), given to the image's entrypoint (`kubetune`) unless command
    (a pod's `command`) replaces it. mounts: (host path, container path, read-only) like a pod's volumeMounts.
    user "UID:GID" as runAsUser/runAsGroup; group_add as the pod's fsGroup and supplementalGroups. memory: the
    container's memory limit (a Kubernetes quantity or bytes; the OOM killer ends it with 137 past it).
    read_only: the root filesystem (/tmp, /var/tmp and /run stay writable tmpfs, as podman gives them).
    network "none" (default: nothing is reached), or "host" for a container that talks to a server on loopback.
    A container still running after timeout is killed and subprocess.TimeoutExpired raised.
    """
    name = f"kubetune-test-{os.getpid()}-{next(_counter)}"
    args = podman_run_args(image, argv, name=name, **options)
    try:  # cwd: conmon drops an empty file named "oom" in its working directory when the container is OOM-killed
        return subprocess.run(["podman", *args], env=podman_env(), capture_output=True, text=True, timeout=timeout,
                              cwd=CONTAINERS_CONF.parent)
    except subprocess.TimeoutExpired:
        _podman("rm", "--force", "--time", "0", name, check=False)
        raise


def image_size_bytes(image: str) -> int:
    return int(_podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())


def image_labels(image: str) -> dict[str, str]:
    import json

    return json.loads(_podman("image", "inspect", "--format", "{{json .Labels}}", image).stdout) or {}


_counter = iter(range(1, 1 << 62))
