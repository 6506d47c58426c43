"""StageMonitor: when it serves and pushes, that monitoring never fails a stage, and the wiring in run_stage."""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from kubetune.config import recipe_from_dict
from kubetune.metrics.exporter import IN_POD_ENV, StageMonitor
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
    pod = {IN_POD_ENV: "1", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
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


@contextlib.contextmanager
def trickling_server(seconds: float = 30.0):
    """A real HTTP server on 127.0.0.1 that answers every request one byte every 0.1 s for ``seconds``: each read
    gets a byte long before any socket timeout, so only a deadline on the whole push ends it."""
    stop = threading.Event()

    class Trickle(socketserver.StreamRequestHandler):
        def handle(self):
            self.request.recv(65536)  # the PUT's head (and usually its body)
            started = time.monotonic()
            head = b"HTTP/1.1 200 OK\r\nX-Slow: "
            while not stop.is_set() and time.monotonic() - started < seconds:
                self.wfile.write(head[:1] if head else b"a")
                head = head[1:]
                stop.wait(0.1)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


def test_a_pushgateway_that_answers_slowly_does_not_stall_the_stage(caplog):
    """push_timeout_s bounds the whole push (both of a stage's pushes), not each read of the answer."""
    caplog.set_level(logging.WARNING)
    with trickling_server(seconds=30) as slow:
        started = time.monotonic()
        with StageMonitor(recipe(pushgateway=slow, push_timeout_s=0.5), "merge",
                          nvml=FakeNvml([], fail_init=True), env={}) as m:
            pass
        elapsed = time.monotonic() - started
    assert elapsed < 20, f"the stage waited {elapsed:.0f} s on a Pushgateway that trickles its answer for 30 s"
    assert m.state.status == "done"
    given_up = [r for r in caplog.records if "did not finish within metrics.push_timeout_s=0.5 s" in r.getMessage()]
    assert len(given_up) == 2, [r.getMessage() for r in caplog.records]


def test_all_interfaces_only_in_a_pod_that_kubetune_rendered():
    """A notebook or CML session sees KUBERNETES_SERVICE_HOST too: it serves nothing unless metrics.local, and then
    on loopback only. A stage pod gets the marker from the env that render gives it."""
    from kubetune.k8s.render import stage_job

    port = free_port()
    container = stage_job(recipe(port=port), "merge", "ml")["spec"]["template"]["spec"]["containers"][0]
    rendered_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert StageMonitor(recipe(port=port), "merge", env=rendered_env).serve_address == "0.0.0.0"
    notebook = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert StageMonitor(recipe(port=port), "merge", env=notebook).serve_address is None
    assert StageMonitor(recipe(port=port, local=True), "merge", env=notebook).serve_address == "127.0.0.1"
