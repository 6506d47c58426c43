"""Memory figures for the compare UI's panel: each GPU's used/total from NVML, this process's resident memory,
and a way to hand freed heap back to the operating system.

NVML is read on every refresh (it is cheap: a few microseconds a call) and initialised once. Where it cannot be
(no driver, no library: a CPU machine), :func:`gpu_memory` returns None and the panel says "no GPU".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from dataclasses import dataclass

from kubetune.measure import Nvml, proc_status_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuMemory:
    index: int
    name: str
    used_bytes: int
    """Used on the whole device, by every process (what nvidia-smi shows)."""
    total_bytes: int
    process_bytes: int | None
    """Used by this process; None where NVML lists no PID of ours (a container's own PID namespace)."""


_NVML = Nvml()


def gpu_memory(nvml: Nvml | None = None) -> list[GpuMemory] | None:
    """Per GPU used/total (and this process's share); None when NVML is absent, [] when it sees no GPU."""
    nvml = nvml or _NVML
    if not nvml.ready():
        return None
    nv, pid = nvml.module, os.getpid()
    out = []
    try:
        count = nv.nvmlDeviceGetCount()
    except Exception as exc:  # a GPU fell off the bus: say so rather than break the page
        log.warning("NVML cannot count GPUs: %s", exc)
        return []
    for i in range(count):
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(i)
            name = nv.nvmlDeviceGetName(handle)
            info = nv.nvmlDeviceGetMemoryInfo(handle)
        except Exception as exc:
            log.warning("NVML cannot read GPU %d: %s", i, exc)
            continue
        mine = None
        try:
            procs = [p for p in nv.nvmlDeviceGetComputeRunningProcesses(handle) if int(p.pid) == pid]
            if procs:
                mine = sum(int(p.usedGpuMemory or 0) for p in procs)
        except Exception:  # not supported on some MIG slices: leave the process figure out
            pass
        out.append(GpuMemory(i, name.decode() if isinstance(name, bytes) else str(name), int(info.used),
                             int(info.total), mine))
    return out


def process_rss_bytes() -> int:
    """Resident memory of this process now (VmRSS), in bytes; 0 where /proc is not there."""
    return proc_status_bytes("VmRSS") or 0


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()


def trim_heap() -> bool:
    """Give freed heap pages back to the OS (glibc's malloc_trim). A model's tensors on CPU are malloc'ed; once
    freed, glibc keeps the pages for reuse and RSS stays at the high-water mark, so without this a switch from
    a large model to a small one would not show in the memory panel. False where there is no glibc."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True
