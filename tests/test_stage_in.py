"""`kubetune stage-in`: local folders onto the run's claim through a helper pod and pods/exec, on the fake API
server with the pod runner executing the helper (its pod mounts the claim as the stages' do; the exec runs in the
pod's mounts and user, tests/k8s/podrunner.py). Then `submit` accepts the path that stage-in printed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from k8s.fakeapi import FakeCluster
from k8s.podrunner import PodRunner
from kubetune.k8s import render
from test_k8s_rbac import granted, permission

ROOT = Path(__file__).resolve().parents[1]
KUBETUNE = Path(sys.executable).parent / "kubetune"
RECIPE = ROOT / "jobs" / "tiny-test.yaml"
pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"),
                                 reason="the pod runner needs root, unshare and setpriv (CI has them)")]


def cli(*args, kubeconfig: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(KUBETUNE), *map(str, args)], capture_output=True, text=True, timeout=180, cwd=cwd,
                          env=dict(os.environ, KUBECONFIG=str(kubeconfig), COLUMNS="200"))


def test_stage_in_copies_folders_onto_the_claim_and_never_overwrites(tmp_path):
    laptop = tmp_path / "laptop"
    model = laptop / "shared" / "models" / "m"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "sub" / "weights.bin").write_bytes(os.urandom(300_000))
    rows = laptop / "rows.jsonl"
    rows.write_text('{"question": "q", "answer": "a", "context": "c"}\n')
    claim = tmp_path / "claim"
    with FakeCluster("ml") as fake, PodRunner(fake, tmp_path / "node", claims={"tiny-test-data": claim}) as runner:
        kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig", namespace="ml")
        copied = cli("stage-in", "shared/models/m", "--to", "inputs/m", "--run", "tiny-test", "--recipe", RECIPE,
                     kubeconfig=kubeconfig, cwd=laptop)
        assert copied.returncode == 0, copied.stdout + copied.stderr + str(runner.errors)
        assert "in the recipe: inputs/m" in copied.stdout
        assert (claim / "inputs" / "m" / "config.json").read_text() == '{"model_type": "llama"}'
        assert (claim / "inputs" / "m" / "sub" / "weights.bin").read_bytes() == \
            (model / "sub" / "weights.bin").read_bytes()
        assert {p.stat().st_uid for p in (claim / "inputs").rglob("*")} == {1001}  # written by the pod's user
        assert "tiny-test-stage-in" not in fake.objects("Job")  # the helper is gone
        again = cli("stage-in", "shared/models/m", "--to", "inputs/m", "--run", "tiny-test", "--recipe", RECIPE,
                    kubeconfig=kubeconfig, cwd=laptop)
        assert again.returncode == 10 and "inputs/m is already on the claim" in again.stderr, again.stderr
        assert "Traceback" not in again.stderr
        relative = cli("stage-in", "rows.jsonl", "--run", "tiny-test", "--recipe", RECIPE, kubeconfig=kubeconfig,
                       cwd=laptop)
        assert relative.returncode == 0 and (claim / "rows.jsonl").exists(), relative.stderr
        outside = cli("stage-in", "../laptop/rows.jsonl", "--run", "tiny-test", "--recipe", RECIPE,
                      kubeconfig=kubeconfig, cwd=laptop)
        assert outside.returncode == 3 and "--to" in outside.stderr, outside.stderr
        calls = {permission(r) for r in fake.requests()}
        rules = granted(render.USER_RULES + render.STAGE_IN_RULES)
        assert calls <= rules, f"stage-in needs {sorted(calls - rules)}, which the documented Role lacks"
        assert ("", "pods/exec", "get") in calls  # the WebSocket upgrade, what STAGE_IN_RULES grants it for
