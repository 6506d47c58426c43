"""The GPU cards kubetune knows: memory, bf16 support, speed, and the node label that selects them.

One table, read by ``kubetune estimate`` (does a stage fit?), the report (which card a figure came from) and the
Kubernetes launcher (``--gpu`` → ``nvidia.com/gpu.product``). Memory is what ``nvidia-smi`` reports as the
card's total (MiB × 2**20), before the CUDA context takes its share: the estimator adds the context itself.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20


@dataclass(frozen=True)
class Gpu:
    name: str
    """Short name used on the command line and in tables."""
    memory_bytes: int
    """Total device memory as nvidia-smi reports it."""
    bf16: bool
    """Has bf16 tensor cores: ``auto`` dtypes and precision resolve to bf16 (else fp16 weights, fp32 training)."""
    bf16_tflops: float
    """Dense (no sparsity) bf16 tensor-core peak from the vendor's datasheet, TFLOP/s."""
    products: tuple[str, ...]
    """Values of the node label ``nvidia.com/gpu.product`` (GPU feature discovery) for this card, first = usual."""

    @property
    def product(self) -> str:
        return self.products[0]


# Figures: NVIDIA datasheets (TFLOP/s dense bf16) and nvidia-smi's "Total" (MiB). The H100 and H200 totals were
# read on this project's benchmark machines (81559 and 143771 MiB); the others are the cards' usual readings.
GPUS: tuple[Gpu, ...] = (
    Gpu("A100-40GB", 40960 * MIB, True, 312.0, ("NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB")),
    Gpu("A100-80GB", 81920 * MIB, True, 312.0, ("NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe")),
    Gpu("L40S", 46068 * MIB, True, 362.0, ("NVIDIA-L40S",)),
    Gpu("H100-80GB", 81559 * MIB, True, 989.0, ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe", "NVIDIA-H100-NVL")),
    Gpu("H200", 143771 * MIB, True, 989.0, ("NVIDIA-H200", "NVIDIA-H200-NVL")),
)


def _key(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def find_gpu(name: str) -> Gpu | None:
    """The card called ``name``: its short name or a product label, ignoring case and punctuation
    (``h100``, ``H100-80GB`` and ``NVIDIA-H100-80GB-HBM3`` all find the H100). None if unknown or ambiguous."""
    key = _key(name)
    exact = [g for g in GPUS if key in {_key(g.name), *map(_key, g.products)}]
    if exact:
        return exact[0]
    prefix = [g for g in GPUS if _key(g.name).startswith(key)]
    return prefix[0] if len(prefix) == 1 else None


def gpu_names() -> list[str]:
    return [g.name for g in GPUS]
