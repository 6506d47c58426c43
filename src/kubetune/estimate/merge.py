"""The merge stage's peak GPU memory, as kubetune.stages.merge runs it: the base loaded at full size (never
4/8-bit, even after QLoRA), the adapter, LoRA's B·A folded into each target, an optional verification forward,
then the cast to ``merge.dtype``."""

from __future__ import annotations

from kubetune.estimate.components import MIB, Component, StageEstimate, dtype_bytes
from kubetune.estimate.estimator import Estimator
from kubetune.estimate.storage import lora_params


def estimate_memory(est: Estimator, recipe=None) -> StageEstimate:
    """With verification on, the base is loaded, merged and checked in fp32 (a bf16 check cannot tell a correct
    merge from a broken one), then cast to merge.dtype."""
    recipe = recipe or est.recipe
    shape = est.shape
    dtype = recipe.merge.dtype
    verify = recipe.merge.verify.enabled
    compute = "float32" if verify else dtype
    cb = dtype_bytes(compute)
    ft = recipe.finetune
    n_lora = lora_params(shape, ft.lora.target_modules, ft.lora.r)
    comps = [Component(f"base weights ({compute})", shape.total_params * cb,
                       "verification runs in fp32; never 4/8-bit, even after QLoRA" if verify else
                       "never 4/8-bit, even after QLoRA"),
             Component("LoRA adapter (fp32)", 4 * n_lora, "peft keeps adapters in fp32 on a 16-bit base")]
    targets = shape.lora_targets(ft.lora.target_modules)
    biggest = max((lin.weights for lin in targets), default=0)
    merge_scratch = 2 * 4 * biggest  # fp32 B @ A and its scaled copy, for the largest target, one at a time
    length = ft.max_length
    # One example at a time, every position's logits (then moved to the host).
    check = est.scratch(1, length, cb, all_logits=True) if verify else 0
    # Module.to(merge.dtype) converts one parameter at a time: the largest one exists in both dtypes at once.
    cast = max(shape.params.values()) * dtype_bytes(dtype) if compute != dtype else 0
    comps.append(Component("scratch", max(merge_scratch, check, cast),
                           f"max(B·A of the largest layer {merge_scratch / MIB:.0f} MiB, verification forward "
                           f"of {length} tokens {check / MIB:.0f} MiB, cast of the largest tensor to {dtype} "
                           f"{cast / MIB:.0f} MiB)"))
    return StageEstimate("merge", comps, ["measured on an H200 in its own process: within 7% (bench/RESULTS.md)"],
                         settings={"dtype": dtype, "verify": verify})
