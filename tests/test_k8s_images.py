"""Dockerfiles: hadolint-clean, and the properties the cluster depends on, checked on the text (the CUDA
flavour cannot be built here; tests/test_image.py builds and runs the CPU one): a CUDA runtime base and a
Debian one chosen by FLAVOUR, multi-stage, a venv from the flavour's hash-checked lock, a non-root user in
group 0 with group-writable paths, exec-form ENTRYPOINT ["kubetune"], OCI labels; both locks pin pyproject's
dependencies; the CUDA/driver pairing documented next to the image is the one `kubetune stage` enforces."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from k8s import tools

DOCKERFILES = sorted((tools.ROOT / "images").glob("Dockerfile*"))
DOCKERFILES = [p for p in DOCKERFILES if not p.name.endswith(".dockerignore")]


def test_there_is_a_dockerfile():
    assert DOCKERFILES


@pytest.mark.server
@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_hadolint_clean(path):
    result = tools.run("hadolint", "--failure-threshold", "info", str(path), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_image_contract(path):
    text = path.read_text()
    assert re.search(r"^ARG FLAVOUR=cuda$", text, re.M)  # what users pull is the default
    assert re.search(r"^ARG CUDA_IMAGE=(docker\.io/)?nvidia/cuda:[\w.-]+-runtime-", text, re.M)
    assert re.search(r"^ARG CPU_IMAGE=(docker\.io/library/)?debian:bookworm", text, re.M)  # Python 3.11: the CPU lock's
    assert re.search(r"^FROM base-\$\{FLAVOUR\} AS base$", text, re.M)
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert "--require-hashes" in text and "images/requirements-${FLAVOUR}.lock" in text
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0") and user[-1].isdigit()  # numeric: runAsNonRoot can verify it
    assert "--gid 0" in text and "chmod -R g=u" in text
    assert re.search(r'^ENTRYPOINT \["kubetune"\]$', text, re.M)
    for label in ("title", "version", "revision", "source", "licenses", "created"):
        assert f"org.opencontainers.image.{label}=" in text


def _pins(flavour: str) -> dict[str, str]:
    text = (tools.ROOT / "images" / f"requirements-{flavour}.lock").read_text()
    return {name.lower().replace("_", "-"): version
            for name, version in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M)}


@pytest.mark.parametrize("flavour, local_version", [("cuda", ""), ("cpu", "+cpu")])
def test_lock_covers_every_pinned_dependency(flavour, local_version):
    import tomllib

    pins = _pins(flavour)
    deps = tomllib.loads((tools.ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name, _, version = dep.partition("==")
        expected = version + (local_version if name == "torch" else "")
        assert pins.get(name.lower().replace("_", "-")) == expected, \
            f"{dep} is not in images/requirements-{flavour}.lock: run scripts/lock-image.sh {flavour}"


def test_cpu_lock_has_no_cuda_wheels():
    cuda_libraries = ("nvidia-cu", "nvidia-nccl", "nvidia-nv", "cuda-", "triton")  # not nvidia-ml-py (NVML, pure Python)
    assert not [name for name in _pins("cpu") if name.startswith(cuda_libraries)]


def test_documented_driver_is_the_one_stage_pods_require():
    """images/README.md names the CUDA of the CUDA flavour's torch and the driver it needs: the same pair that
    kubetune.devices refuses a GPU stage without (exit 14)."""
    from kubetune.devices import MIN_DRIVER_FOR_CUDA_MAJOR

    cuda = _pins("cuda")["nvidia-cuda-runtime"]  # the CUDA runtime torch's wheels bring
    major = int(cuda.split(".")[0])
    readme = (tools.ROOT / "images" / "README.md").read_text()
    assert f"CUDA {major}" in readme and f">= {MIN_DRIVER_FOR_CUDA_MAJOR[major]}" in readme
    base = re.search(r"^ARG CUDA_IMAGE=\S*nvidia/cuda:(\d+)\.", (tools.ROOT / "images" / "Dockerfile").read_text(), re.M)
    assert int(base.group(1)) == major  # the base's driver-compat layer is for the same CUDA major


def test_release_workflow_pushes_kubetunes_repository_by_digest_signed_with_its_sbom():
    import yaml

    from kubetune.k8s.image import PROJECT_REPOSITORY

    job = yaml.safe_load((tools.ROOT / ".github" / "workflows" / "release.yaml").read_text())["jobs"]["image"]
    assert job["env"]["REPOSITORY"] == PROJECT_REPOSITORY
    assert job["permissions"] == {"contents": "write", "packages": "write", "id-token": "write"}
    script = "\n".join(step.get("run", "") for step in job["steps"])
    assert "make images FLAVOUR=cuda" in script
    assert 'cosign sign --yes "$IMAGE"' in script and "--predicate dist/kubetune-cuda.cdx.json" in script
    makefile = (tools.ROOT / "Makefile").read_text()
    for target in re.findall(r"\bmake (\w[\w-]*)", script):
        assert re.search(rf"^{target}:", makefile, re.M), f"make {target}: no such target"
    for path in re.findall(r"\b(scripts/[\w.-]+)", script):
        assert (tools.ROOT / path).is_file(), path


@pytest.mark.server
def test_sbom_lists_every_locked_package_with_the_hashes_pip_checks(tmp_path):
    """scripts/sbom.sh (make sbom, the release workflow): CycloneDX 1.6, kubetune as the root component, one
    component per package of the lock with its version, PyPI purl and sha256 hashes."""
    from kubetune import __version__

    cyclonedx = tools.require_binary("cyclonedx-py")
    out = tmp_path / "kubetune-cuda.cdx.json"
    subprocess.run([str(tools.ROOT / "scripts" / "sbom.sh"), "cuda", str(out)], check=True, capture_output=True,
                   timeout=120, env={**os.environ, "CYCLONEDX": cyclonedx})
    bom = json.loads(out.read_text())
    assert (bom["bomFormat"], bom["specVersion"]) == ("CycloneDX", "1.6")
    assert (bom["metadata"]["component"]["name"], bom["metadata"]["component"]["version"]) == ("kubetune", __version__)
    components = {c["name"].lower().replace("_", "-"): c for c in bom["components"]}
    assert {name: c["version"] for name, c in components.items()} == _pins("cuda")
    assert components["torch"]["purl"] == "pkg:pypi/torch@2.13.0"
    lock = (tools.ROOT / "images" / "requirements-cuda.lock").read_text()
    torch_hashes = re.search(r"^torch==\S+ \\\n((?:\s+--hash=sha256:\w+(?: \\)?\n)+)", lock, re.M).group(1)
    sbom_hashes = {h["content"] for ref in components["torch"]["externalReferences"] for h in ref.get("hashes", [])}
    assert sbom_hashes == set(re.findall(r"sha256:(\w+)", torch_hashes)) != set()
