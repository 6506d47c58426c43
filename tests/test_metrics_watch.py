"""`kubetune watch` against the fake API server (tests/k8s/fakeapi.py), extended with the pods/proxy subresource:
it forwards to a real stage exporter on loopback, as a real API server forwards to the pod. The watch reads the
figures through the proxy, draws them, and ends with the stage reports when the Job finishes."""

from __future__ import annotations

import json
import threading
import time

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner

from k8s.fakeapi import FakeCluster, FakeKube
from kmock import Server
from kubetune.cli import cli
from kubetune.config import recipe_from_dict
from kubetune.k8s import render
from kubetune.metrics import exporter
from kubetune.metrics.watch import Figures, parse
from metrics.fakes import GIB, one_gpu_for_this_process
from metrics.servers import free_port

pytestmark = pytest.mark.timeout(60)


class ProxyKube(FakeKube):
    """FakeKube plus GET pods/NAME:PORT/proxy/PATH, forwarded to ``proxies[(namespace, pod, port)]``."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.proxies: dict[tuple[str, str, int], str] = {}

    async def _handle(self, request):
        sub = request.subresource or ""
        if request.resource is not None and request.resource.plural == "pods" and sub.startswith("proxy"):
            pod, _, port = (request.name or "").partition(":")
            target = self.proxies.get((request.namespace, pod, int(port or 80)))
            if target is None:
                return _status(404, f'pods "{pod}" not found')
            try:
                async with aiohttp.ClientSession() as session, session.get(target + sub[len("proxy"):]) as r:
                    return web.Response(body=await r.read(), status=r.status,
                                        content_type=r.content_type or "text/plain")
            except aiohttp.ClientError as exc:  # what a real API server says when nothing listens
                return _status(503, f"error trying to reach service: {exc}")
        return await super()._handle(request)


def _status(code: int, message: str) -> web.Response:
    return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                              "code": code}, status=code)


class ProxyCluster(FakeCluster):
    async def _serve(self) -> None:
        import asyncio

        self._stop = asyncio.Event()
        async with ProxyKube() as kube, Server(kube) as server:
            self.kube, self.url = kube, str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def proxy(self, pod: str, port: int, target: str) -> None:
        self._run(lambda: self.kube.proxies.__setitem__((self.namespace, pod, port), target))


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    port = free_port()
    recipe = recipe_from_dict({"run": {"name": "w1"}, "model": {"name_or_path": "org/m"},
                               "stages": ["finetune", "merge"], "metrics": {"local": True, "port": port}})
    with ProxyCluster("ml") as fake, exporter.StageMonitor(recipe, "finetune",
                                                           nvml=one_gpu_for_this_process()) as monitor:
        fake.put("ConfigMap", render.recipe_configmap(recipe, "ml"))
        job = render.stage_job(recipe, "finetune", "ml")
        fake.put("Job", job)
        fake.start_job("w1-finetune")
        fake.add_pod(job, "w1-finetune-x7k2p")
        fake.proxy("w1-finetune-x7k2p", port, f"http://127.0.0.1:{monitor.port}")
        monitor.state.train_step(3, 10, tokens=3000)
        monitor.state.train_log(loss=1.25, learning_rate=1e-4)
        monitor.progress(lambda *a: None)("finetune", 3, 10, "loss 1.250")
        yield fake, monitor, str(fake.kubeconfig(tmp_path / "kubeconfig", namespace="ml"))


def invoke(args):
    # a wide console: rich wraps table cells at CliRunner's 80 columns, which would split the texts checked below
    return CliRunner().invoke(cli, args, catch_exceptions=False, env={"COLUMNS": "200"})


def test_watch_once_reads_the_pod_through_the_api_proxy(setup):
    fake, monitor, kubeconfig = setup
    result = invoke(["watch", "w1", "--once", "--kubeconfig", kubeconfig])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "finetune │ running" in out and "30%" in out and "step 3/10" in out and "loss 1.25" in out
    assert "GPU0 20.0 GiB (peak 20.0 GiB) / 80.0 GiB" in out
    assert "merge │ not started" in out
    assert "fetch │ not started" in out  # a hub model: the pipeline's first stage is listed too
    assert "stage reports" not in out  # the run goes on
    proxied = fake.requests("get", "/proxy/metrics")
    assert [str(r.url.path) for r in proxied] == [
        f"/api/v1/namespaces/ml/pods/w1-finetune-x7k2p:{monitor.port}/proxy/metrics"]


def test_watch_follows_until_the_stage_ends_then_prints_the_reports(setup):
    fake, monitor, kubeconfig = setup

    def finish_later():
        time.sleep(1.0)
        monitor.state.train_step(10, 10, tokens=10000)
        time.sleep(0.5)  # a scrape or two sees the last step
        monitor.finish("done")
        summary = {"kubetune": 1, "stage": "finetune", "duration_s": 754.2, "peak_vram_bytes": 21 * GIB,
                   "host_rss_bytes": 3 * GIB}
        fake.patch("Pod", "w1-finetune-x7k2p", {"status": {"phase": "Succeeded", "containerStatuses": [
            {"name": "stage", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
             "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": json.dumps(summary)}}}]}})
        fake.finish_job("w1-finetune")

    thread = threading.Thread(target=finish_later)
    thread.start()
    try:
        result = invoke(["watch", "w1", "--interval", "0.2", "--kubeconfig", kubeconfig])
    finally:
        thread.join()
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "finetune │ done" in out and "100%" in out and "step 10/10" in out  # the last figures it read
    assert "stage reports:" in out
    report = result.output[result.output.index("stage reports:"):]
    assert "PEAK VRAM" in report and "21.0 GiB" in report and "Succeeded" in report


def test_watch_says_why_there_are_no_figures(setup):
    fake, monitor, kubeconfig = setup
    fake.proxy("w1-finetune-x7k2p", monitor.port, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    out = " ".join(invoke(["watch", "w1", "--once", "--kubeconfig", kubeconfig]).output.split())
    assert "finetune │ running" in out and "no metrics yet" in out


def test_parse_reads_a_real_exposition(setup):
    _, monitor, _ = setup
    from prometheus_client import generate_latest

    f = parse(generate_latest(monitor.registry).decode())
    assert isinstance(f, Figures) and f.steps == (3, 10) and f.loss == 1.25 and f.progress == pytest.approx(0.3)
    assert f.gpus["0"]["total"] == 80 * GIB and f.gpus["0"]["process"] == 20 * GIB


def test_unknown_run(tmp_path):
    with ProxyCluster("ml") as fake:
        result = CliRunner().invoke(cli, ["watch", "nope", "--once", "--kubeconfig",
                                          str(fake.kubeconfig(tmp_path / "k", namespace="ml"))])
    assert result.exit_code == 10 and "no run 'nope'" in result.output
