"""What every stage's memory model returns: named components that add up to the allocator's peak, and the
constants that turn that peak into what nvidia-smi shows (the CUDA context, the allocator's slack)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GIB = 2**30
MIB = 2**20

# What a process holds on the GPU beyond torch's allocator once CUDA is up, torch's kernels are loaded and cuBLAS has
# a handle: 685 MiB measured on an H200 (torch 2.11, CUDA 13, bench/estimator_gpu_check.py); ~0.5 GiB is usual
# on A100 with CUDA 12's lazy loading. Rounded up: it is the same for every stage.
CUDA_CONTEXT_BYTES = 700 * MIB
# The caching allocator reserves more than it hands out (block rounding, fragmentation). GPTQModel, which peft
# imports, sets PYTORCH_ALLOC_CONF=expandable_segments:True in every stage, which keeps this small.
ALLOCATOR_SLACK = 0.05
DEFAULT_HEADROOM = 0.10
"""Share of a card's memory left unused when judging 'fits': covers this estimate's error and other processes."""


def dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "bf16": 2, "fp16": 2}[name]


@dataclass
class Component:
    name: str
    bytes: int
    note: str = ""


@dataclass
class StageEstimate:
    stage: str
    components: list[Component]
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    """The recipe values this estimate depends on (shown in the table, used by suggestions)."""
    slack: float = ALLOCATOR_SLACK
    """Reserved beyond allocated, as a share of allocated."""

    @property
    def allocated_bytes(self) -> int:
        """Peak of torch's allocator (``torch.cuda.max_memory_allocated``)."""
        return sum(c.bytes for c in self.components)

    @property
    def total_bytes(self) -> int:
        """Peak as nvidia-smi shows it: allocated, the allocator's slack and the CUDA context."""
        return int(self.allocated_bytes * (1 + self.slack)) + CUDA_CONTEXT_BYTES

    def fits(self, memory_bytes: int, headroom: float = DEFAULT_HEADROOM) -> bool:
        return self.total_bytes <= memory_bytes * (1 - headroom)

    def component(self, prefix: str) -> Component:
        """The component whose name starts with ``prefix`` (names carry dtypes and sizes after a stable start)."""
        return next(c for c in self.components if c.name.startswith(prefix))
