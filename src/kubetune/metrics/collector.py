"""The stage's Prometheus collector: NVML and torch are read when Prometheus scrapes, not by a polling thread
(the figures are always as fresh as the scrape, and an idle exporter costs nothing).

NVML and torch are injected: ``nvml`` is anything with pynvml's function names (tests pass a fake device),
``torch`` a callable returning the torch module or None. By default torch is taken only if the stage already
imported it, and read only once CUDA is initialised, so a scrape never imports torch (seconds) nor creates a
CUDA context (hundreds of MiB on the GPU) on the scrape thread.

"This pod's processes" on a GPU: NVML reports host PIDs. Where they are visible (a workstation, hostPID) the
process tree of this process counts. In a container with its own PID namespace none of them is visible; then
every process on the GPU counts, because the device plugin gives a GPU to one pod (with time-slicing or MPS
sharing, that figure includes the other tenants; the device-wide figure always does).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kubetune.metrics.names import METRICS, STAGE_LABELS, STATUSES
from kubetune.metrics.state import Snapshot, StageState
from kubetune.measure import Nvml

log = logging.getLogger(__name__)

# Families that describe the stage as a whole and stay true after it ended: what is pushed to the Pushgateway.
# Live readings (memory in use now, utilisation, tokens/s, ETA) are left out there: a Pushgateway keeps a value
# until it is deleted, so a pushed "used" would draw a flat line and could hold a memory alert firing forever.
FINAL_FAMILIES = frozenset({
    "kubetune_stage_info", "kubetune_stage_status", "kubetune_stage_start_time_seconds",
    "kubetune_stage_end_time_seconds", "kubetune_stage_duration_seconds", "kubetune_stage_progress_ratio",
    "kubetune_stage_last_progress_timestamp_seconds", "kubetune_stage_host_memory_peak_bytes",
    "kubetune_gpu_info", "kubetune_gpu_memory_total_bytes", "kubetune_gpu_process_memory_peak_bytes",
    "kubetune_torch_memory_peak_allocated_bytes", "kubetune_torch_memory_peak_reserved_bytes",
    "kubetune_train_completed_steps", "kubetune_train_planned_steps", "kubetune_train_loss",
    "kubetune_train_learning_rate", "kubetune_train_tokens", "kubetune_quantize_completed_layers",
    "kubetune_quantize_planned_layers",
})


def loaded_torch():
    return sys.modules.get("torch")


class ProcessTable:
    """PIDs as this process sees them: its own process tree, and whether a PID is visible at all."""

    def __init__(self, root: int | None = None, proc: Path = Path("/proc")):
        self.root = os.getpid() if root is None else root
        self.proc = proc

    def _parents(self) -> dict[int, int]:
        parents = {}
        for entry in self.proc.iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses: split after it.
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
        return parents

    def view(self) -> tuple[set[int], set[int]]:
        """(this process and its descendants, every visible PID)."""
        parents = self._parents()
        tree = {self.root}
        grew = True
        while grew:
            new = {pid for pid, parent in parents.items() if parent in tree and pid not in tree}
            tree |= new
            grew = bool(new)
        return tree, set(parents) | {self.root}


def visible_indices(count: int, uuids: list[str], env: dict[str, str] | None = None) -> list[int]:
    """NVML indices of the GPUs that CUDA_VISIBLE_DEVICES lets this process use (all if it is unset).

    Entries are indices or (prefixes of) UUIDs, as CUDA reads them; CUDA stops at the first invalid entry.
    """
    env = os.environ if env is None else env
    spec = env.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return list(range(count))
    chosen: list[int] = []
    for item in (s.strip() for s in spec.split(",")):
        if item.isdigit() and int(item) < count:
            index = int(item)
        else:
            index = next((i for i, u in enumerate(uuids) if item and u.startswith(item)), -1)
        if index < 0:
            break
        if index not in chosen:
            chosen.append(index)
    return chosen


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class StageCollector(Collector):
    """All kubetune series of one stage. ``final_only``: just the families in FINAL_FAMILIES (for a push)."""

    def __init__(self, state: StageState, nvml: Any = None, torch: Callable[[], Any] = loaded_torch,
                 processes: ProcessTable | None = None, final_only: bool = False,
                 env: dict[str, str] | None = None):
        self.state = state
        self.nvml = nvml
        self.torch = torch
        self.processes = processes or ProcessTable()
        self.final_only = final_only
        self.env = env
        self._nvml = Nvml(nvml)  # initialised at the first scrape, not at registration

    def describe(self) -> list[Metric]:
        return []  # registering must not read NVML; the families are known only at scrape time

    # ---- reading the sources -----------------------------------------------------------------------------
    def _nvml_init(self) -> bool:
        ready = self._nvml.ready()
        self.nvml = self._nvml.module
        return ready

    def read_gpus(self) -> list[dict[str, Any]]:
        """Per visible GPU: index, uuid, name, used/total bytes, utilisation ratio, this pod's process bytes."""
        if not self._nvml_init():
            return []
        nv = self.nvml
        try:
            handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(nv.nvmlDeviceGetCount())]
            uuids = [_text(nv.nvmlDeviceGetUUID(h)) for h in handles]
        except Exception as exc:  # a GPU fell off the bus (Xid 79): report no GPU rather than fail the scrape
            log.warning("NVML failed to list GPUs: %s", exc)
            return []
        gpus, tree, visible = [], None, None
        for i in visible_indices(len(handles), uuids, self.env):
            h = handles[i]
            gpu: dict[str, Any] = {"gpu": str(i), "uuid": uuids[i]}
            try:
                gpu["name"] = _text(nv.nvmlDeviceGetName(h))
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                gpu["used"], gpu["total"] = int(mem.used), int(mem.total)
            except Exception as exc:
                log.warning("NVML failed to read GPU %s: %s", i, exc)
                continue
            with contextlib.suppress(Exception):  # not every device reports utilisation (some MIG slices)
                gpu["utilization"] = nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0
            with contextlib.suppress(Exception):
                procs = [(int(p.pid), int(p.usedGpuMemory or 0)) for p in nv.nvmlDeviceGetComputeRunningProcesses(h)]
                if tree is None:
                    tree, visible = self.processes.view()
                if any(pid in visible for pid, _ in procs):
                    gpu["process"] = sum(b for pid, b in procs if pid in tree)
                else:  # another PID namespace (a container): the GPU is this pod's alone (see the module doc)
                    gpu["process"] = sum(b for _, b in procs)
            gpus.append(gpu)
        return gpus

    def read_torch(self) -> list[dict[str, Any]]:
        torch = self.torch()
        if torch is None:
            return []
        try:
            if not torch.cuda.is_initialized():
                return []
            c = torch.cuda
            return [{"device": str(i), "allocated": c.memory_allocated(i), "reserved": c.memory_reserved(i),
                     "peak_allocated": c.max_memory_allocated(i), "peak_reserved": c.max_memory_reserved(i)}
                    for i in range(c.device_count())]
        except Exception as exc:
            log.debug("torch memory figures unavailable: %s", exc)
            return []

    # ---- families ----------------------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        gpus = self.read_gpus()
        for g in gpus:
            if "process" in g:
                self.state.observe_process_memory(g["gpu"], g["process"])
        snap = self.state.snapshot()
        families = self._families(snap, gpus, self.read_torch())
        for name, family in families.items():
            if family.samples and (not self.final_only or name in FINAL_FAMILIES):
                yield family

    def _families(self, snap: Snapshot, gpus: list[dict], torch: list[dict]) -> dict[str, Metric]:
        base = [snap.labels[k] for k in STAGE_LABELS]
        fam: dict[str, Metric] = {}

        def family(name: str, extra: tuple[str, ...] = ()) -> Metric:
            if name not in fam:
                kind, doc = METRICS[name]
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                fam[name] = cls(name, doc, labels=[*STAGE_LABELS, *extra])
            return fam[name]

        def put(name: str, value: float | None, extra: dict[str, str] | None = None) -> None:
            extra = extra or {}
            f = family(name, tuple(extra))
            if value is not None:
                f.add_metric([*base, *extra.values()], float(value))

        info_keys = tuple(sorted(snap.info))
        put("kubetune_stage_info", 1, {k: snap.info[k] for k in info_keys})
        for status in STATUSES:
            put("kubetune_stage_status", 1 if snap.status == status else 0, {"status": status})
        put("kubetune_stage_start_time_seconds", snap.started)
        put("kubetune_stage_end_time_seconds", snap.ended)
        put("kubetune_stage_duration_seconds", (snap.ended or snap.now) - snap.started)
        put("kubetune_stage_progress_ratio", snap.progress_ratio)
        put("kubetune_stage_last_progress_timestamp_seconds", snap.last_progress)
        put("kubetune_stage_host_memory_peak_bytes", snap.host_peak)

        put("kubetune_gpu_nvml_available", 1 if self._nvml.ready() else 0)
        uuid_of = {g["gpu"]: g["uuid"] for g in gpus}
        for g in gpus:
            ids = {"gpu": g["gpu"], "uuid": g["uuid"]}
            put("kubetune_gpu_info", 1, {**ids, "name": g["name"]})
            put("kubetune_gpu_memory_used_bytes", g["used"], ids)
            put("kubetune_gpu_memory_total_bytes", g["total"], ids)
            put("kubetune_gpu_utilization_ratio", g.get("utilization"), ids)
            put("kubetune_gpu_process_memory_used_bytes", g.get("process"), ids)
        for gpu, peak in sorted(snap.process_peak.items()):
            put("kubetune_gpu_process_memory_peak_bytes", peak, {"gpu": gpu, "uuid": uuid_of.get(gpu, "")})

        for t in torch:
            dev = {"device": t["device"]}
            put("kubetune_torch_memory_allocated_bytes", t["allocated"], dev)
            put("kubetune_torch_memory_reserved_bytes", t["reserved"], dev)
            put("kubetune_torch_memory_peak_allocated_bytes", t["peak_allocated"], dev)
            put("kubetune_torch_memory_peak_reserved_bytes", t["peak_reserved"], dev)

        tr = snap.train
        put("kubetune_train_completed_steps", tr.completed_steps)
        put("kubetune_train_planned_steps", tr.planned_steps)
        put("kubetune_train_loss", tr.loss)
        put("kubetune_train_learning_rate", tr.learning_rate)
        put("kubetune_train_tokens_per_second", tr.tokens_per_second)
        put("kubetune_train_eta_seconds", tr.eta_seconds)
        if tr.completed_steps is not None:
            put("kubetune_train_tokens", tr.tokens)
        if snap.layers is not None:
            put("kubetune_quantize_completed_layers", snap.layers[0])
            put("kubetune_quantize_planned_layers", snap.layers[1])
        return fam
