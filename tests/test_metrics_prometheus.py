"""End to end with real servers: a fine-tune runs on CPU with a fake NVML device, serves /metrics, pushes to a
real Pushgateway; a real Prometheus scrapes both; every dashboard panel's PromQL returns data from it.

Around the real fine-tune, two stages run through the same run_stage wiring with their work replaced by test
functions (GPTQ and generation would take minutes here): a quantize that reports its layers and an infer that
fails, so the quantization panel and the timeline's "failed" have data too.
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from kubetune.errors import VerificationError
from kubetune.metrics import assets, collector, exporter
from kubetune.stages import run_stage
from metrics.fakes import GIB, FakeGpu, FakeNvml, fake_torch
from metrics.servers import free_port, http_get, prometheus, pushgateway

pytestmark = [pytest.mark.server, pytest.mark.timeout(180)]
N_LAYERS = 4


class GrowingGpu(FakeGpu):
    """Memory in use grows by 1 GiB at every read, as a model loading and warming up would (up to 70 GiB)."""

    def __getattribute__(self, name):
        value = object.__getattribute__(self, name)
        if name == "used":
            object.__setattr__(self, "used", min(value + GIB, 70 * GIB))
            object.__setattr__(self, "processes", [(os.getpid(), min(value + GIB, 70 * GIB) - 2 * GIB)])
        return value


def fake_quantize(ctx):
    ctx.progress("quantize", 0, None, "loading the model")
    for layer in range(1, N_LAYERS + 1):
        time.sleep(0.4)  # long enough for a 0.5 s scrape to see each layer count
        ctx.progress("quantize", layer, N_LAYERS, f"layer {layer}/{N_LAYERS}")
    (ctx.out / "model.safetensors").write_bytes(b"")
    return {"bits": 4}


def failing_infer(ctx):
    time.sleep(0.6)
    raise VerificationError("generation produced nothing (a test failure on purpose)")


def test_stage_metrics_reach_prometheus_and_every_panel_has_data(tiny_recipe, tmp_path, monkeypatch):
    gpu = GrowingGpu("GPU-5b1e3f0a-0000-4000-8000-000000000001", used=8 * GIB)
    monkeypatch.setattr(exporter, "default_nvml", lambda: FakeNvml([gpu]))
    torch = fake_torch([3 * GIB], [4 * GIB], [5 * GIB], [6 * GIB])
    monkeypatch.setattr(collector, "loaded_torch", lambda: torch)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    import kubetune.stages.infer as infer_stage
    import kubetune.stages.quantize as quantize_stage
    monkeypatch.setattr(quantize_stage, "run", fake_quantize)
    monkeypatch.setattr(infer_stage, "run", failing_infer)

    port = free_port()
    with pushgateway(tmp_path) as pg_url, prometheus(tmp_path, port, pg_url) as prom:
        recipe = tiny_recipe(
            stages=["finetune", "quantize", "infer"], infer={"models": ["adapter", "quantized"]},
            finetune={"max_steps": 10, "batch_size": 4, "max_length": 128, "save_steps": 100, "logging_steps": 1,
                      "lora": {"r": 4, "alpha": 8}},
            metrics={"local": True, "port": port, "pushgateway": pg_url})
        start = time.time() - 1

        first_scrape = []

        def slow(stage, completed, total, description):
            if not first_scrape:  # Prometheus starts scraping on its own schedule: let it see the stage once
                first_scrape.append(prom.wait_for('kubetune_gpu_memory_used_bytes{stage="finetune"}'))
            time.sleep(0.4)  # a progress bar that takes its time: the 10 steps span several 0.5 s scrapes

        result = run_stage(recipe, "finetune", progress=slow)
        assert result.status == "done"
        run_stage(recipe, "quantize")
        with pytest.raises(VerificationError):
            run_stage(recipe, "infer")

        # the final values come through the Pushgateway; wait until Prometheus has scraped the last push
        assert prom.wait_for('kubetune_stage_status{stage="infer", status="failed", job="kubetune"} == 1')
        end = time.time() + 1

        # ---- the GPU memory series, as the closing note quotes it ------------------------------------
        used = prom.query_range('kubetune_gpu_memory_used_bytes{stage="finetune"}', start, end)
        assert len(used) == 1
        series = used[0]
        labels = series["metric"]
        assert {k: labels[k] for k in ("run", "stage", "model", "technique", "gpu", "uuid")} == {
            "run": "tiny", "stage": "finetune", "model": recipe.model.name_or_path, "technique": "lora",
            "gpu": "0", "uuid": gpu.uuid}
        values = [float(v) for _, v in series["values"]]
        assert len(values) >= 3, "the fine-tune spans several scrapes"
        assert all(v % GIB == 0 and 9 * GIB <= v <= 70 * GIB for v in values)  # what the fake device said
        assert values == sorted(values) and values[-1] > values[0]  # it grew while the stage ran
        print("\nPromQL kubetune_gpu_memory_used_bytes{stage=\"finetune\"} over the run:")
        print(json.dumps({"metric": labels, "values": series["values"]}, indent=1))

        # ---- what the Pushgateway holds: the final values, grouped by run and stage ----------------------------
        groups = json.loads(http_get(f"{pg_url}/api/v1/metrics"))["data"]
        by_stage = {g["labels"]["stage"]: g for g in groups if g["labels"].get("run") == "tiny"}
        assert set(by_stage) == {"finetune", "quantize", "infer"}
        assert by_stage["finetune"]["labels"]["job"] == exporter.PUSH_JOB

        def pushed(stage, name, **want):
            for m in by_stage[stage].get(name, {}).get("metrics", []):
                if want.items() <= m["labels"].items():
                    return float(m["value"])
            raise AssertionError(f"{name} {want} not pushed for {stage}")

        assert pushed("finetune", "kubetune_stage_status", status="done") == 1
        assert pushed("finetune", "kubetune_stage_status", status="running") == 0
        assert pushed("infer", "kubetune_stage_status", status="failed") == 1
        assert pushed("finetune", "kubetune_train_completed_steps") == 10
        assert pushed("quantize", "kubetune_quantize_completed_layers") == N_LAYERS
        duration = pushed("finetune", "kubetune_stage_duration_seconds")
        assert 2.5 <= duration <= result.report["duration_s"] + 30  # ≥ 10 steps × 0.25 s of slow progress
        peak = pushed("finetune", "kubetune_gpu_process_memory_peak_bytes", gpu="0")
        assert peak >= max(values) - 2 * GIB  # this process held used - 2 GiB; the push read the device once more
        assert "kubetune_gpu_memory_used_bytes" not in by_stage["finetune"], "live readings are never pushed"

        # ---- every panel of the dashboard returns data -------------------------------------------------------
        empty = []
        for panel in assets.dashboard()["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$run", "tiny").replace("$__rate_interval", "5s")
                if not prom.query_range(expr, start, end):
                    empty.append(f"{panel['title']}: {target['expr']}")
        assert empty == []

        # the timeline ends with each stage's last status
        timeline = next(p for p in assets.dashboard()["panels"] if p["title"] == "Stage timeline")
        expr = timeline["targets"][0]["expr"].replace("$run", "tiny")
        last = {r["metric"]["stage"]: float(r["values"][-1][1]) for r in prom.query_range(expr, start, end)}
        codes = assets.STATUS_CODES
        assert last == {"finetune": codes["done"], "quantize": codes["done"], "infer": codes["failed"]}
        # the training series came from the Trainer callback: the pushed final loss is the run's last logged loss
        loss = prom.query_range(f'kubetune_train_loss{{run="tiny", job="{exporter.PUSH_JOB}"}}', start, end)
        log = json.loads((result.path / "training_log.json").read_text())
        assert float(loss[0]["values"][-1][1]) == pytest.approx(next(e["loss"] for e in reversed(log) if "loss" in e))


def test_dashboard_queries_only_name_exported_metrics():
    from kubetune.metrics.names import METRICS

    known = set(METRICS) | {f"{n}_total" for n, (kind, _) in METRICS.items() if kind == "counter"}
    board = assets.dashboard()
    for panel in board["panels"]:
        for target in panel["targets"]:
            names = set(re.findall(r"kubetune_[a-z_]+", target["expr"]))
            assert names and names <= known, (panel["title"], names - known)
