"""One optimizer step of the fine-tune under torch.profiler (``finetune.profile_step``): where its time went.

A step that is slower than its arithmetic says is either launch-bound (the GPU waits for the host between small
kernels: many launches, low busy share) or bound by the wrong kernels (busy, but mostly elementwise or copies, not
matrix multiplies). The report's ``profile`` tells which, without a trace viewer::

    {"step": 12, "wall_ms": 231.0, "device": "cuda", "device_busy_ms": 151.2, "busy_fraction": 0.65,
     "kernel_launches": 6120, "top": [{"name": "ampere_bf16_s16816gemm…", "calls": 96, "ms": 41.3}, …]}

``wall_ms`` is the step between two synchronisations, profiler overhead included (it inflates host time, hardly
the kernels'); ``device_busy_ms`` sums the kernels' own times (overlapping streams would count twice: training
runs on one). On a CPU there are no kernels: ``top`` then lists operators by their own CPU time and the device
fields are null. The whole trace goes next to the adapter as ``profile-step-N.json.gz`` (Chrome trace format:
Perfetto or chrome://tracing open it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOP_KERNELS = 12
NAME_CHARS = 120  # kernel names of generated code run to hundreds of characters


def trace_name(step: int) -> str:
    return f"profile-step-{step}.json.gz"


@dataclass
class StepProfile:
    """Profiles optimizer step ``step`` (the trainer's global step, from 1) of this process and writes the trace
    into ``trace_dir``; ``report()`` is the fine-tune report's ``profile`` (None when the step did not run here,
    e.g. a resumed run that started past it)."""

    step: int
    trace_dir: Path
    cuda: bool
    summary: dict[str, Any] | None = None
    _profiler: Any = None
    _start: float = 0.0

    def step_begins(self, step: int) -> None:
        if step != self.step:
            return
        import torch
        from torch.profiler import ProfilerActivity, profile

        if self.cuda:
            torch.cuda.synchronize()  # the previous step's kernels are not this step's
        self._profiler = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else []))
        self._profiler.__enter__()
        self._start = time.perf_counter()

    def step_ends(self) -> None:
        if self._profiler is None:
            return
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - self._start) * 1e3
        self._profiler.__exit__(None, None, None)
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        self._profiler.export_chrome_trace(str(self.trace_dir / trace_name(self.step)))
        self.summary = summarize(self._profiler, self.step, wall_ms, self.cuda)
        self._profiler = None

    def report(self) -> dict[str, Any] | None:
        return self.summary

    def callback(self, trainer):
        """The TrainerCallback; the step about to run is ``trainer.state.global_step + 1`` (read at each step: the
        trainer makes a new state when training starts or resumes)."""
        from kubetune.metrics.callbacks import step_callback

        return step_callback(lambda: self.step_begins(trainer.state.global_step + 1), self.step_ends)


def summarize(prof, step: int, wall_ms: float, cuda: bool) -> dict[str, Any]:
    """Wall time, device busy time, kernel launches and the costliest kernels (or CPU operators) of one step."""
    from torch.autograd import DeviceType

    if cuda:
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        busy_us = sum(e.device_time for e in kernels)  # each kernel's own duration, µs
        by_name: dict[str, list[float]] = {}
        for e in kernels:
            by_name.setdefault(e.name, []).append(e.device_time)
        top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:TOP_KERNELS]
        return {"step": step, "wall_ms": round(wall_ms, 3), "device": "cuda",
                "device_busy_ms": round(busy_us / 1e3, 3), "busy_fraction": round(busy_us / 1e3 / wall_ms, 4),
                "kernel_launches": len(kernels),
                "top": [{"name": name[:NAME_CHARS], "calls": len(times), "ms": round(sum(times) / 1e3, 3)}
                        for name, times in top]}
    averages = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:TOP_KERNELS]
    return {"step": step, "wall_ms": round(wall_ms, 3), "device": "cpu", "device_busy_ms": None,
            "busy_fraction": None, "kernel_launches": None,
            "top": [{"name": a.key[:NAME_CHARS], "calls": a.count, "ms": round(a.self_cpu_time_total / 1e3, 3)}
                    for a in averages]}
