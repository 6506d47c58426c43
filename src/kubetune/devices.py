"""Does a stage that asked for GPUs have one it can use? Checked once, before the stage reads anything.

A pod that requests ``nvidia.com/gpu`` but whose torch cannot reach the card (the node's driver is older than the
CUDA that the image's torch was built for, no device plugin, a missing runtime class on k3s/RKE2) would otherwise
load the model on the CPU and train there for hours while holding the GPU. :func:`require_gpus` stops it at once
with exit 14 (permanent: the same node gives the same answer) and one line that names torch's own reason, the
image's CUDA version, the driver that version needs and, where NVML can say, the node's driver.

It also initialises CUDA, so that everything after it (peak-memory resets, NVML sampling) meets a live context.
"""

from __future__ import annotations

import logging

from kubetune.errors import DeviceError

log = logging.getLogger(__name__)

# The oldest driver that runs any toolkit of a CUDA major version (NVIDIA's "minor version compatibility" table:
# torch wheels bundle their CUDA runtime, so the major version is what the node's driver must cover). Newer minor
# versions may need a newer driver only for PTX JIT, which PyPI's torch wheels do not rely on.
MIN_DRIVER_FOR_CUDA_MAJOR = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}


def _node_driver() -> str | None:
    """The node's NVIDIA driver version as NVML reports it, or None (no library, no driver, no device)."""
    from kubetune.measure import Nvml

    nvml = Nvml()
    if not nvml.ready():
        return None
    try:
        version = nvml.module.nvmlSystemGetDriverVersion()
    except Exception:  # an NVML too old for the call: the reason from torch still stands
        return None
    return version.decode() if isinstance(version, bytes) else str(version)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].rstrip(".")


def require_gpus(stage: str, gpus: int) -> int:
    """Raise DeviceError unless ``gpus`` == 0 or CUDA is usable; returns the number of CUDA devices seen."""
    if gpus <= 0:
        return 0
    import torch

    cuda = torch.version.cuda
    reason = None
    count = 0
    if cuda is None:
        reason = f"this image's torch {torch.__version__} is a CPU-only build"
    else:
        try:
            torch.cuda.init()
            count = torch.cuda.device_count()
        except Exception as exc:  # torch words the cause: no driver, driver too old, no device
            reason = _first_line(exc)
        else:
            if count == 0:
                reason = "torch sees no CUDA device (is the NVIDIA device plugin giving this pod its GPU?)"
    if reason is None and count < gpus and gpus > 1:
        # the fine-tune starts one process per GPU: the extra ones would share a device or fail to find theirs
        raise DeviceError(f"{stage}: resources.{stage}.gpus is {gpus} but torch sees {count} CUDA device(s), and a "
                          "fine-tune on several GPUs runs one process per GPU; check CUDA_VISIBLE_DEVICES and that "
                          f"the pod was given all {gpus}, or lower resources.{stage}.gpus")
    if reason is None:
        return count
    needs = ""
    if cuda is not None:
        major = int(cuda.split(".")[0])
        minimum = MIN_DRIVER_FOR_CUDA_MAJOR.get(major)
        needs = (f"; this image's torch {torch.__version__} is built for CUDA {cuda}, which needs an NVIDIA driver "
                 f">= {minimum}" if minimum else f"; this image's torch {torch.__version__} is built for CUDA {cuda}")
        driver = _node_driver()
        needs += f" (this node has {driver})" if driver else " (no NVIDIA driver answered on this node)"
    raise DeviceError(f"{stage}: resources.{stage}.gpus is {gpus} but no CUDA device is usable: {reason}{needs}. "
                      f"Check the node's driver (nvidia-smi), the device plugin and kubernetes.runtime_class_name; "
                      f"resources.{stage}.gpus: 0 runs this stage on the CPU")
