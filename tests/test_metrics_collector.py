"""The stage collector with a fake NVML and a fake torch: names, labels, values, process attribution, peaks,
and what is pushed; read back through prometheus_client's own exposition and parser."""

from __future__ import annotations

import os

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kubetune.config import recipe_from_dict
from kubetune.metrics.collector import FINAL_FAMILIES, ProcessTable, StageCollector, visible_indices
from kubetune.metrics.exporter import stage_labels
from kubetune.metrics.names import METRICS
from kubetune.metrics.state import StageState
from metrics.fakes import GIB, FakeGpu, FakeNvml, FakeProcesses, fake_torch

LABELS = {"run": "r1", "stage": "finetune", "model": "org/m", "technique": "lora"}


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def scrape(collector) -> dict[tuple[str, tuple], float]:
    """Exposition text -> {(sample name, sorted labels): value}, as Prometheus would read it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def value(samples, metric, **labels):
    matches = [v for (n, lab), v in samples.items() if n == metric and labels.items() <= dict(lab).items()]
    assert len(matches) == 1, (metric, labels, matches)
    return matches[0]


def test_names_follow_the_convention():
    for name, (kind, doc) in METRICS.items():
        assert name.startswith("kubetune_") and name.count("_") >= 2 and ":" not in name and doc
        assert not name.endswith("_total"), "counters are declared without _total; the client appends it"
        subsystem = name.split("_")[1]
        assert subsystem in {"stage", "gpu", "torch", "train", "quantize"}, name
    assert [n for n, (k, _) in METRICS.items() if k == "counter"] == ["kubetune_train_tokens"]
    assert FINAL_FAMILIES <= set(METRICS)


def test_gpu_torch_and_stage_series_with_fake_devices():
    pid = os.getpid()
    nvml = FakeNvml([FakeGpu("GPU-aaaa", used=30 * GIB, utilization=87, processes=[(pid, 20 * GIB), (99999, GIB)]),
                     FakeGpu("GPU-bbbb", name="NVIDIA A10", total=24 * GIB, used=GIB, processes=[])])
    clock = Clock()
    state = StageState(dict(LABELS), info={"kubetune_version": "0.1.0"}, clock=clock)
    torch = fake_torch([5 * GIB], [6 * GIB], [7 * GIB], [8 * GIB])
    collector = StageCollector(state, nvml=nvml, torch=lambda: torch, env={},
                               processes=FakeProcesses(tree={pid}, visible={pid, 99999}))
    clock.t += 42
    s = scrape(collector)
    g0 = dict(LABELS, gpu="0", uuid="GPU-aaaa")
    assert value(s, "kubetune_gpu_memory_used_bytes", **g0) == 30 * GIB
    assert value(s, "kubetune_gpu_memory_total_bytes", **g0) == 80 * GIB
    assert value(s, "kubetune_gpu_utilization_ratio", **g0) == pytest.approx(0.87)
    # PID 99999 is visible here but not ours (another user's job on a workstation): not counted
    assert value(s, "kubetune_gpu_process_memory_used_bytes", **g0) == 20 * GIB
    assert value(s, "kubetune_gpu_process_memory_used_bytes", gpu="1") == 0
    assert value(s, "kubetune_gpu_memory_total_bytes", gpu="1", uuid="GPU-bbbb") == 24 * GIB
    assert value(s, "kubetune_gpu_info", gpu="1", name="NVIDIA A10") == 1
    assert value(s, "kubetune_gpu_nvml_available") == 1
    assert value(s, "kubetune_torch_memory_allocated_bytes", device="0") == 5 * GIB
    assert value(s, "kubetune_torch_memory_peak_reserved_bytes", device="0") == 8 * GIB
    assert value(s, "kubetune_stage_duration_seconds", **LABELS) == 42
    assert value(s, "kubetune_stage_status", status="running") == 1
    assert value(s, "kubetune_stage_status", status="failed") == 0
    assert value(s, "kubetune_stage_info", kubetune_version="0.1.0") == 1
    # every sample carries the four stage labels
    assert all(dict(lab).items() >= LABELS.items() for _, lab in s)


def test_container_pid_namespace_counts_every_process_on_the_gpu():
    # NVML's host PIDs are invisible in the pod's own PID namespace: the pod owns the GPU, all of it is its
    nvml = FakeNvml([FakeGpu("GPU-c", used=12 * GIB, processes=[(412345, 9 * GIB), (412399, 2 * GIB)])])
    collector = StageCollector(StageState(dict(LABELS)), nvml=nvml, torch=lambda: None, env={},
                               processes=FakeProcesses(tree={1}, visible={1, 7, 8}))
    assert value(scrape(collector), "kubetune_gpu_process_memory_used_bytes") == 11 * GIB


def test_process_table_reads_this_process_tree():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        tree, visible = ProcessTable().view()
        assert {os.getpid(), child.pid} <= tree <= visible
        assert 1 in visible and 1 not in tree
    finally:
        child.kill()
        child.wait()


def test_peak_is_the_highest_seen_and_the_report_raises_it():
    gpu = FakeGpu("GPU-p", processes=[(os.getpid(), 10 * GIB)])
    state = StageState(dict(LABELS))
    collector = StageCollector(state, nvml=FakeNvml([gpu]), torch=lambda: None, env={},
                               processes=FakeProcesses({os.getpid()}, {os.getpid()}))
    scrape(collector)
    gpu.processes = [(os.getpid(), 4 * GIB)]
    s = scrape(collector)
    assert value(s, "kubetune_gpu_process_memory_used_bytes") == 4 * GIB
    assert value(s, "kubetune_gpu_process_memory_peak_bytes", gpu="0", uuid="GPU-p") == 10 * GIB
    # the stage's own 0.25 s sampler saw a spike between two scrapes
    state.finish("done", {"per_gpu": {"0": {"nvml_process_bytes": 13 * GIB}}, "host_rss_bytes": 3 * GIB})
    s = scrape(collector)
    assert value(s, "kubetune_gpu_process_memory_peak_bytes", uuid="GPU-p") == 13 * GIB
    assert value(s, "kubetune_stage_host_memory_peak_bytes") == 3 * GIB
    assert value(s, "kubetune_stage_status", status="done") == 1


def test_no_driver_means_no_gpu_series_but_a_zero_flag():
    state = StageState(dict(LABELS))
    s = scrape(StageCollector(state, nvml=FakeNvml([], fail_init=True), torch=lambda: None, env={}))
    assert value(s, "kubetune_gpu_nvml_available") == 0
    assert not any(n.startswith("kubetune_gpu_memory") for n, _ in s)
    # torch imported but CUDA never initialised (a CPU stage): no torch series, and no CUDA context made
    cpu_torch = fake_torch([1], [1], [1], [1], initialized=False)
    s = scrape(StageCollector(state, nvml=FakeNvml([], fail_init=True), torch=lambda: cpu_torch, env={}))
    assert not any(n.startswith("kubetune_torch") for n, _ in s)


def test_training_figures_tokens_per_second_and_eta():
    clock = Clock()
    state = StageState(dict(LABELS), clock=clock, window=4)
    for step in range(0, 6):  # 2 s a step, 1000 tokens a step
        state.train_step(step, 100, tokens=1000 * step)
        clock.t += 2
    state.train_log(loss=1.25, learning_rate=2e-4)
    s = scrape(StageCollector(state, nvml=FakeNvml([], fail_init=True), torch=lambda: None, env={}))
    assert value(s, "kubetune_train_completed_steps") == 5
    assert value(s, "kubetune_train_planned_steps") == 100
    assert value(s, "kubetune_train_tokens_total") == 5000
    assert value(s, "kubetune_train_tokens_per_second") == pytest.approx(500)
    assert value(s, "kubetune_train_eta_seconds") == pytest.approx(95 * 2)
    assert value(s, "kubetune_train_loss") == 1.25
    assert value(s, "kubetune_train_learning_rate") == pytest.approx(2e-4)
    assert value(s, "kubetune_stage_last_progress_timestamp_seconds") == clock.t - 2


def test_quantize_layers_from_the_progress_function():
    state = StageState(dict(LABELS, stage="quantize", technique="gptq-int4"))
    state.progress("quantize", 0, None, "loading the model")  # before the layer loop: no layer figures yet
    s = scrape(StageCollector(state, nvml=FakeNvml([], fail_init=True), torch=lambda: None, env={}))
    assert not any(n.startswith("kubetune_quantize") for n, _ in s)
    state.progress("quantize", 3, 28, "layer 3/28")
    s = scrape(StageCollector(state, nvml=FakeNvml([], fail_init=True), torch=lambda: None, env={}))
    assert value(s, "kubetune_quantize_completed_layers") == 3
    assert value(s, "kubetune_quantize_planned_layers") == 28
    assert value(s, "kubetune_stage_progress_ratio") == pytest.approx(3 / 28)


def test_final_only_leaves_out_live_readings():
    nvml = FakeNvml([FakeGpu("GPU-f", used=79 * GIB, processes=[(os.getpid(), 70 * GIB)])])
    state = StageState(dict(LABELS))
    pid = os.getpid()
    s = scrape(StageCollector(state, nvml=nvml, torch=lambda: None, final_only=True, env={},
                              processes=FakeProcesses({pid}, {pid})))
    names = {n for n, _ in s}
    assert "kubetune_gpu_memory_used_bytes" not in names and "kubetune_gpu_utilization_ratio" not in names
    assert {"kubetune_gpu_process_memory_peak_bytes", "kubetune_gpu_memory_total_bytes",
            "kubetune_stage_status", "kubetune_stage_duration_seconds"} <= names


@pytest.mark.parametrize("spec, expected", [(None, [0, 1, 2]), ("2,0", [2, 0]), ("GPU-b", [1]), ("1,9,0", [1]),
                                            ("", [])])
def test_cuda_visible_devices(spec, expected):
    env = {} if spec is None else {"CUDA_VISIBLE_DEVICES": spec}
    assert visible_indices(3, ["GPU-a1", "GPU-b2", "GPU-c3"], env) == expected


def test_stage_labels_and_technique():
    recipe = recipe_from_dict({"run": {"name": "r"}, "model": {"name_or_path": "org/m"},
                               "finetune": {"base_precision": "4bit"}, "quantize": {"bits": 4}})
    assert stage_labels(recipe, "finetune") == {"run": "r", "stage": "finetune", "model": "org/m",
                                                "technique": "qlora-4bit"}
    assert stage_labels(recipe, "quantize")["technique"] == "gptq-int4"
