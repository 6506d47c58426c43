"""What a stage report measures: peak GPU memory (torch allocator and NVML), peak host RSS, parameters by dtype
(packed 4/8-bit weights counted as the parameters they hold) and library versions.

torch is imported lazily so that the CLI stays fast.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import logging
import os
import resource
import threading
import time
from typing import Any

from kubetune.stage_report import PeakMemory  # the one definition of the GPU peak (gpu_bytes)
from kubetune.torchao_base import QUANTIZED_WEIGHTS, is_quantized_weight

VERSIONED_PACKAGES = ("kubetune", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets",
                      "accelerate", "gptqmodel", "safetensors", "torchao")


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    if versions["kubetune"] is None:  # run from a source tree (PYTHONPATH=src, as on the bench machine)
        from kubetune import __version__
        versions["kubetune"] = __version__
    return versions


def _reset_peak_rss() -> bool:
    """Linux resets VmHWM (peak RSS) when '5' is written to clear_refs; then each stage gets its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def proc_status_bytes(field: str) -> int | None:
    """A memory line of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes; None where /proc is not there."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss_bytes() -> int:
    peak = proc_status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class Nvml:
    """pynvml, initialised at first use and only once; ``module`` lets tests pass a fake with pynvml's names.

    ``ready()`` is False on a machine without driver or library: callers then leave GPU figures out.
    """

    def __init__(self, module: Any = None):
        self.module = module
        self._ready: bool | None = None
        self._lock = threading.Lock()

    def ready(self) -> bool:
        with self._lock:
            if self._ready is None:
                try:
                    if self.module is None:
                        import pynvml

                        self.module = pynvml
                    self.module.nvmlInit()
                    self._ready = True
                except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded: a machine without GPU
                    logging.getLogger(__name__).debug("NVML unavailable: %s", exc)
                    self._ready = False
            return self._ready


class _NvmlSampler:
    """NVML has no peak counter, so sample used memory every ``interval_s`` while the stage runs.

    Records the GPU memory held by this process (what NVML attributes to our PID, which includes the CUDA
    context that torch's allocator does not see) and the device total, per GPU.
    """

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self.peak_process: dict[int, int] = {}
        self.peak_device: dict[int, int] = {}
        self.total: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.available = False

    def start(self) -> None:
        nvml = Nvml()
        if not nvml.ready():  # no driver, no library, no GPU: the report says so with nulls
            return
        try:
            self._handles = [nvml.module.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.module.nvmlDeviceGetCount())]
        except Exception:
            return
        self._nvml = nvml.module
        self.available = bool(self._handles)
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        nv, pid = self._nvml, os.getpid()
        for i, h in enumerate(self._handles):
            with contextlib.suppress(Exception):
                info = nv.nvmlDeviceGetMemoryInfo(h)
                self.total[i] = int(info.total)
                self.peak_device[i] = max(self.peak_device.get(i, 0), int(info.used))
                procs = nv.nvmlDeviceGetComputeRunningProcesses(h)
                mine = sum(int(p.usedGpuMemory or 0) for p in procs if p.pid == pid)
                if not any(p.pid == pid for p in procs):
                    # In a container NVML reports host PIDs, so ours is never listed; a pod's GPU is its own,
                    # so every process on it counts as this stage's.
                    mine = sum(int(p.usedGpuMemory or 0) for p in procs)
                self.peak_process[i] = max(self.peak_process.get(i, 0), mine)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def stop(self) -> None:
        if self._thread:
            self._stop.set()
            self._thread.join(timeout=2)
            self._sample()


@contextlib.contextmanager
def track_peak_memory():
    """Measure the peaks of whatever runs inside the block; yields a PeakMemory filled in on exit."""
    result = PeakMemory()
    torch = _torch_if_loaded_or_importable()
    cuda = torch is not None and torch.cuda.is_available()
    # What an earlier stage of this process left unreachable but uncollected (a Trainer and its callbacks form
    # reference cycles that hold the model) would otherwise sit in this stage's GPU memory and in its peak.
    gc.collect()
    # A fresh process (every pod) has no CUDA allocator yet: torch.cuda.reset_peak_memory_stats then raises
    # "Invalid device argument" (torch 2.11-2.13), and nothing needs resetting anyway, since the allocator's peaks
    # start at zero when CUDA initialises. Only a process that already used CUDA (an earlier stage of `kubetune run`)
    # has figures to clear; initialising CUDA here would cost a CPU-only stage a GPU context for nothing.
    if cuda and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        result.torch_allocated_at_start_bytes = sum(torch.cuda.memory_allocated(i)
                                                    for i in range(torch.cuda.device_count()))
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    elif cuda:
        result.torch_allocated_at_start_bytes = 0
    rss_reset = _reset_peak_rss()
    start_rss = _peak_rss_bytes()
    sampler = _NvmlSampler()
    sampler.start()
    try:
        yield result
    finally:
        sampler.stop()
        if cuda and torch.cuda.is_initialized():  # a stage that never touched the GPU has no peaks to read
            n = torch.cuda.device_count()
            alloc = [torch.cuda.max_memory_allocated(i) for i in range(n)]
            reserved = [torch.cuda.max_memory_reserved(i) for i in range(n)]
            result.torch_allocated_bytes = sum(alloc)
            result.torch_reserved_bytes = sum(reserved)
            for i in range(n):
                result.per_gpu[str(i)] = {"torch_allocated_bytes": alloc[i], "torch_reserved_bytes": reserved[i]}
        if sampler.available:
            result.nvml_process_bytes = sum(sampler.peak_process.values())
            result.nvml_device_used_bytes = sum(sampler.peak_device.values())
            result.gpu_total_bytes = sum(sampler.total.values())
            for i, total in sampler.total.items():
                result.per_gpu.setdefault(str(i), {}).update(
                    nvml_process_bytes=sampler.peak_process.get(i, 0),
                    nvml_device_used_bytes=sampler.peak_device.get(i, 0), total_bytes=total)
        result.host_rss_bytes = _peak_rss_bytes() if rss_reset else max(_peak_rss_bytes(), start_rss)


def _torch_if_loaded_or_importable():
    try:
        import torch

        return torch
    except ImportError:
        return None


# ---- parameters ---------------------------------------------------------------------------------------------
def count_parameters(model) -> dict[str, Any]:
    """Parameters by storage dtype, with packed weights counted as the weights they hold.

    ``model.parameters()`` misreads quantized models: GPTQ keeps weights in int32 *buffers* (8 weights per int32
    at 4 bits), and bitsandbytes 4-bit stores two weights per uint8. Counting those naively is how a 7.1B
    GPTQ model once printed as 1.0B. Scales, zeros and group indices are metadata and not counted.
    """
    by_dtype: dict[str, int] = {}
    trainable = 0
    seen: set[int] = set()

    def add(key: str, n: int) -> None:
        by_dtype[key] = by_dtype.get(key, 0) + int(n)

    for module in model.modules():
        bits = getattr(module, "bits", None)
        qweight = getattr(module, "qweight", None)
        if qweight is not None and isinstance(bits, int) and hasattr(qweight, "numel"):
            seen.add(id(qweight))
            add(f"gptq-int{bits}", qweight.numel() * qweight.element_size() * 8 // bits)
            for meta in ("qzeros", "scales", "g_idx", "bias_int"):
                t = getattr(module, meta, None)
                if t is not None:
                    seen.add(id(t))
            bias = getattr(module, "bias", None)
            if bias is not None and id(bias) not in seen:
                seen.add(id(bias))
                add(str(bias.dtype).removeprefix("torch."), bias.numel())
            continue
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            quant_state = getattr(p, "quant_state", None)
            cls = type(p).__name__
            if cls == "Params4bit" or quant_state is not None:
                qtype = getattr(quant_state, "quant_type", None) or getattr(p, "quant_type", "nf4")
                add(qtype, p.numel() * p.element_size() * 2)  # two 4-bit weights per byte
            elif cls == "Int8Params":
                add("int8", p.numel())
            elif is_quantized_weight(p):  # torchao: the tensor has the shape of the weights it holds
                add(QUANTIZED_WEIGHTS[cls], p.numel())
            else:
                add(str(p.dtype).removeprefix("torch."), p.numel())
            if p.requires_grad:
                trainable += p.numel()
    total = sum(by_dtype.values())
    return {"total": total, "trainable": trainable, "by_dtype": dict(sorted(by_dtype.items()))}


def memory_footprint_bytes(model) -> int:
    """Bytes of parameters and buffers as stored (what the weights occupy on the device)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += stored_bytes(t)
    return total


def stored_bytes(tensor) -> int:
    """Bytes a tensor occupies: a wrapper subclass (torchao's NF4Tensor, Int8Tensor) holds its data in inner
    tensors, while numel × element_size would count the 16-bit weights it stands for."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None:
        return tensor.numel() * tensor.element_size()
    names, _ = flatten()
    return sum(stored_bytes(inner) for inner in (getattr(tensor, n) for n in names) if inner is not None)


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
