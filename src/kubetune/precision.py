"""torch's float32 matmul precision (IEEE or TF32), as a stage finds it and as it leaves it.

transformers' TrainingArguments turns TF32 on for the whole process whenever ``torch_compile`` is set
(``enable_tf32(True)`` in its ``__post_init__``): fp32 matmuls then keep ~10 bits of mantissa. In a pod that ends
with the fine-tune, but ``kubetune run`` runs every stage in one process, and the merge's float32 verification
then compared two TF32 forward passes: on Gemma 3 270M they differed by 0.068 where IEEE fp32 gives 6.5e-5
(H100, 2026-12-06, bench/results/quality-gemma3-270m-packed-*), and a correct merge was refused.
:func:`kept` undoes what the code inside changed; :func:`ieee` makes the code inside compute in IEEE fp32.
"""

from __future__ import annotations

import contextlib

# torch ≥ 2.9's per-backend knobs (``torch.backends.<path>.fp32_precision``): "" is the global default, set first
# on restore because setting it rewrites the others
KNOBS = ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul", "mkldnn.conv",
         "mkldnn.rnn")


def _backend(path: str):
    import torch

    obj = torch.backends
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part, None)
    return obj if hasattr(obj, "fp32_precision") else None


def settings() -> dict[str, str]:
    """Each knob's current value ("none" = inherit, "ieee", "tf32")."""
    return {path: _backend(path).fp32_precision for path in KNOBS if _backend(path) is not None}


def _apply(values: dict[str, str]) -> None:
    for path, value in values.items():
        _backend(path).fp32_precision = value


@contextlib.contextmanager
def kept():
    """Within: anything may change the precision; after: every knob as it was before."""
    before = settings()
    try:
        yield
    finally:
        _apply(before)


@contextlib.contextmanager
def ieee():
    """Within: IEEE fp32 matmuls and convolutions, whatever the process set before; after: as it was."""
    with kept():
        _apply({path: "ieee" for path in KNOBS if _backend(path) is not None})
        yield
