"""Dockerfiles: hadolint-clean, and the properties the cluster depends on (checked on the text, since images
cannot be built here): a CUDA runtime base, multi-stage, a venv from the hash-checked lock, a non-root user in
group 0 with group-writable paths, exec-form ENTRYPOINT ["kubetune"], OCI labels."""

from __future__ import annotations

import re

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
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\w.-]+-runtime-", text, re.M)
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert "--require-hashes" in text and "images/requirements.lock" in text
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0") and user[-1].isdigit()  # numeric: runAsNonRoot can verify it
    assert "--gid 0" in text and "chmod -R g=u" in text
    assert re.search(r'^ENTRYPOINT \["kubetune"\]$', text, re.M)
    for label in ("title", "version", "revision", "source", "licenses", "created"):
        assert f"org.opencontainers.image.{label}=" in text


def test_lock_covers_every_pinned_dependency():
    import tomllib

    lock = (tools.ROOT / "images" / "requirements.lock").read_text().lower()
    deps = tomllib.loads((tools.ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name, _, version = dep.partition("==")
        assert f"\n{name.lower().replace('_', '-')}=={version}" in lock.replace("_", "-"), \
            f"{dep} is not in images/requirements.lock: run scripts/lock-image.sh"
