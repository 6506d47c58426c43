"""StageMonitor: when it serves and pushes, that monitoring never fails a stage, and the wiring in run_stage."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import urllib.request

import pytest

from kubetune.config import recipe_from_dict
from kubetune.metrics.exporter import StageMonitor
from metrics.fakes import FakeNvml, one_gpu_for_this_process
from metrics.servers import free_port


def recipe(**metrics):
    return recipe_from_dict({"run": {"name": "e1"}, "model": {"name_or_path": "org/m"}, "metrics": metrics})


def get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def test_inactive_on_a_workstation_by_default_and_never_imports_prometheus():
    code = ("import sys; from kubetune.config import recipe_from_dict; from kubetune.metrics.exporter import "
            "StageMonitor\nr = recipe_from_dict({'model': {'name_or_path': 'm'}})\n"
            "with StageMonitor(r, 'finetune', env={}) as m: assert not m.active and m.state is None\n"
            "assert 'prometheus_client' not in sys.modules, 'imported for nothing'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_pod_serves_on_all_interfaces_local_on_loopback_only():
    port = free_port()
    pod = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert StageMonitor(recipe(port=port), "merge", env=pod).serve_address == "0.0.0.0"
    assert StageMonitor(recipe(port=port, local=True), "merge", env={}).serve_address == "127.0.0.1"
    assert StageMonitor(recipe(port=port, enabled=False, local=True), "merge", env={}).active is False


def test_serves_while_the_stage_runs_and_stops_after():
    port = free_port()
    with StageMonitor(recipe(port=port, local=True), "finetune", nvml=one_gpu_for_this_process(), env={}) as m:
        text = get(port)
        assert ('kubetune_stage_status{model="org/m",run="e1",stage="finetune",status="running",'
                'technique="lora"} 1.0') in text
        assert "kubetune_gpu_memory_used_bytes{" in text
    with pytest.raises(OSError):
        get(port)
    assert m.state.status == "done"


def test_port_in_use_and_unreachable_pushgateway_are_warnings(caplog):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused at once
        caplog.set_level(logging.WARNING)
        with pytest.raises(ZeroDivisionError):
            with StageMonitor(recipe(port=port, local=True, pushgateway=dead, push_timeout_s=2), "merge",
                              nvml=FakeNvml([], fail_init=True), env={}) as m:
                1 / 0  # the stage's own error comes through unchanged
    assert m.state.status == "failed" and m.port is None
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert f"cannot serve on 127.0.0.1:{port}" in messages and f"push to {dead} failed" in messages


def test_run_stage_reports_failure_and_feeds_progress(tiny_recipe, monkeypatch):
    from kubetune.errors import VerificationError
    from kubetune.metrics import exporter
    from kubetune.stages import run_stage
    import kubetune.stages.finetune as finetune

    seen = {}

    def fake_run(ctx):
        seen["state"] = ctx.extras["metrics"]
        ctx.progress("finetune", 2, 8, "training")
        raise VerificationError("on purpose")

    monkeypatch.setattr(finetune, "run", fake_run)
    monkeypatch.setattr(exporter, "default_nvml", lambda: FakeNvml([], fail_init=True))
    r = tiny_recipe(stages=["finetune"], infer={"models": ["base", "adapter"]},
                    metrics={"local": True, "port": free_port()})
    with pytest.raises(VerificationError):
        run_stage(r, "finetune")
    state = seen["state"].snapshot()
    assert state.status == "failed" and state.progress_ratio == 0.25 and state.labels["run"] == "tiny"


def test_an_interrupted_stage_is_not_a_failed_one():
    with pytest.raises(SystemExit):
        with StageMonitor(recipe(port=free_port(), local=True), "finetune", nvml=FakeNvml([], fail_init=True),
                          env={}) as m:
            raise SystemExit(143)  # what the fine-tune does after its SIGTERM checkpoint
    assert m.state.status == "interrupted"
