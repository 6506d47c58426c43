"""The infer stage's peak GPU memory, as kubetune.stages.infer runs it: it loads its models one after another
(base, base + adapter, merged, GPTQ-quantized) and generates in batches, so its peak is the largest model's
weights, KV cache and prefill scratch."""

from __future__ import annotations

from kubetune.estimate.components import GIB, Component, StageEstimate, dtype_bytes
from kubetune.estimate.estimator import Estimator
from kubetune.estimate.storage import double_quantized, gptq_weight_bytes, lora_params, weight_bytes


def estimate_memory(est: Estimator, recipe=None) -> StageEstimate:
    """The largest of ``infer.models`` at ``infer.batch_size``."""
    recipe = recipe or est.recipe
    batch = recipe.infer.batch_size
    models = recipe.infer.models or ["base"]
    worst = max((model_memory(est, recipe, m, batch) for m in models), key=lambda e: e.allocated_bytes)
    others = [m for m in models if m != worst.settings["model"]]
    worst.notes = [f"largest of {', '.join(models)}: '{worst.settings['model']}'"
                   + (" (the others need less)" if others else "")]
    return worst


def model_memory(est: Estimator, recipe, name: str, batch: int) -> StageEstimate:
    """Generation with model ``name`` (base | adapter | merged | quantized) in batches of ``batch`` prompts."""
    shape = est.shape
    ft = recipe.finetune
    length = ft.max_length + recipe.infer.max_new_tokens
    comps: list[Component] = []
    if name == "base":
        dtype = est.model_dtype
        comps.append(Component(f"weights: base ({dtype})", shape.total_params * dtype_bytes(dtype)))
    elif name == "adapter":
        dtype = est.model_dtype
        qb, rest = weight_bytes(shape, dtype, ft.base_precision, double_quantized(ft))
        what = ft.base_precision if ft.base_precision != "none" else dtype
        comps.append(Component(f"weights: base as trained ({what})", qb + rest))
        comps.append(Component("LoRA adapter (fp32)", 4 * lora_params(shape, ft.lora.target_modules, ft.lora.r)))
    elif name == "merged":
        dtype = recipe.merge.dtype
        comps.append(Component(f"weights: merged ({dtype})", shape.total_params * dtype_bytes(dtype)))
    else:
        dtype = recipe.merge.dtype  # dtype="auto" keeps the checkpoint's, i.e. the merge's
        qb, rest = gptq_weight_bytes(shape, recipe.quantize.bits, recipe.quantize.group_size, dtype)
        comps.append(Component(f"weights: GPTQ {recipe.quantize.bits}-bit", qb + rest,
                               f"packed layers {qb / GIB:.2f} GiB + 16-bit embeddings/head {rest / GIB:.2f} GiB"))
    kv = est.kv_cache(dtype, batch, length)
    comps.append(Component(f"KV cache ({batch} × {length} tokens)", kv,
                           f"prompt ≤ finetune.max_length {ft.max_length} + {recipe.infer.max_new_tokens} new"))
    prefill = est.scratch(batch, ft.max_length, dtype_bytes(dtype))
    comps.append(Component("prefill scratch", prefill, "one layer's working set + logits"))
    return StageEstimate("infer", comps, [f"model '{name}'"], settings={"model": name, "batch_size": batch})
