"""A stage that asked for GPUs and cannot use one stops at once (exit 14) instead of training on the CPU."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from kubetune import devices
from kubetune.errors import DeviceError

ROOT = Path(__file__).resolve().parents[1]


def fake_torch(cuda_version, init_error=None, count=1):
    def init():
        if init_error:
            raise RuntimeError(init_error)

    cuda = types.SimpleNamespace(init=init, device_count=lambda: count)
    return types.SimpleNamespace(__version__="2.13.0", version=types.SimpleNamespace(cuda=cuda_version), cuda=cuda)


@pytest.fixture
def torch_as(monkeypatch):
    def install(torch, driver=None):
        monkeypatch.setitem(sys.modules, "torch", torch)
        monkeypatch.setattr(devices, "_node_driver", lambda: driver)
    return install


def test_a_cpu_stage_needs_no_device(torch_as):
    torch_as(fake_torch(None))
    assert devices.require_gpus("evaluate", 0) == 0


def test_a_driver_older_than_the_images_cuda_is_named_with_the_driver_it_needs(torch_as):
    torch_as(fake_torch("12.8", init_error="The NVIDIA driver on your system is too old (found version 11040). "
                                           "Please update your GPU driver.\nmore text"), driver="470.82.01")
    with pytest.raises(DeviceError) as err:
        devices.require_gpus("finetune", 1)
    msg = str(err.value)
    assert "\n" not in msg
    assert "resources.finetune.gpus is 1" in msg
    assert "The NVIDIA driver on your system is too old (found version 11040)" in msg
    assert "CUDA 12.8" in msg and ">= 525.60.13" in msg and "this node has 470.82.01" in msg
    assert "resources.finetune.gpus: 0 runs this stage on the CPU" in msg
    assert err.value.exit_code == 14 and err.value.permanent


def test_no_visible_device_is_refused(torch_as):
    torch_as(fake_torch("13.0", count=0))
    with pytest.raises(DeviceError, match="sees no CUDA device.*CUDA 13.0.*>= 580.65.06.*no NVIDIA driver answered"):
        devices.require_gpus("merge", 1)


def test_a_usable_device_passes_and_is_counted(torch_as):
    torch_as(fake_torch("12.8", count=2))
    assert devices.require_gpus("finetune", 2) == 2


def test_stage_pod_entrypoint_refuses_a_gpu_stage_on_a_cpu_only_torch(tmp_path):
    """`kubetune stage` in a fresh process, as a pod runs it; this machine's torch is the CPU build."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: {name: dev, artifacts_root: %s}\nmodel: {name_or_path: org/m}\n"
                      "stages: [finetune]\nresources: {finetune: {gpus: 1}}\n" % (tmp_path / "a"))
    proc = subprocess.run([str(Path(sys.executable).parent / "kubetune"), "stage", "finetune", "--recipe", str(recipe)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 14, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "CPU-only build" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "a").exists()  # stopped before anything was read or written


def test_fewer_devices_than_the_fine_tunes_processes_is_refused(torch_as):
    torch_as(fake_torch("12.8", count=2))
    with pytest.raises(DeviceError) as info:
        devices.require_gpus("finetune", 4)
    assert str(info.value).startswith("finetune: resources.finetune.gpus is 4 but torch sees 2 CUDA device(s)")
    assert info.value.exit_code == 14
