"""A fake NVML (pynvml's function names, one object per GPU) and a fake torch.cuda, for the metrics tests."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import SimpleNamespace

GIB = 2**30


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    total: int = 80 * GIB
    used: int = 0
    utilization: int = 0  # percent, as NVML reports it
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, bytes or None)


class FakeNvml:
    """The subset of pynvml that kubetune.metrics.collector calls. ``fail_init``: no driver."""

    def __init__(self, gpus: list[FakeGpu], fail_init: bool = False):
        self.gpus = gpus
        self.fail_init = fail_init
        self.inits = 0

    def nvmlInit(self):
        self.inits += 1
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.gpus[i]

    def nvmlDeviceGetUUID(self, h):
        return h.uuid

    def nvmlDeviceGetName(self, h):
        return h.name.encode()  # older pynvml returns bytes: the collector must take both

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=h.total, used=h.used, free=h.total - h.used)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=h.utilization, memory=0)

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=pid, usedGpuMemory=b) for pid, b in h.processes]


class FakeProcesses:
    """ProcessTable stand-in: (own tree, visible PIDs)."""

    def __init__(self, tree: set[int], visible: set[int]):
        self.tree, self.visible = tree, visible

    def view(self):
        return set(self.tree), set(self.visible)


def fake_torch(allocated: list[int], reserved: list[int], peak_allocated: list[int], peak_reserved: list[int],
               initialized: bool = True):
    cuda = SimpleNamespace(
        is_initialized=lambda: initialized, device_count=lambda: len(allocated),
        memory_allocated=lambda i: allocated[i], memory_reserved=lambda i: reserved[i],
        max_memory_allocated=lambda i: peak_allocated[i], max_memory_reserved=lambda i: peak_reserved[i])
    return SimpleNamespace(cuda=cuda)


def one_gpu_for_this_process(used: int = 30 * GIB, mine: int = 20 * GIB) -> FakeNvml:
    """One GPU on which this test process holds ``mine`` bytes (NVML attributes memory to our PID)."""
    return FakeNvml([FakeGpu("GPU-11111111-2222-3333-4444-555555555555", used=used, utilization=87,
                             processes=[(os.getpid(), mine)])])
