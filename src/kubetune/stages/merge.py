"""Merge: fold the fine-tune's LoRA adapter into the base weights and prove the result computes the same thing.

Steps: load the base unquantized (even after a 4-bit QLoRA fine-tune: folding the update into quantized
weights would round most of it away), apply the adapter, record its logits on a few training examples,
``merge_and_unload()``, record the merged logits, and refuse (VerificationError, nothing committed) if any logit
moved by more than ``merge.verify.tolerance``. Then cast to ``merge.dtype`` and save sharded safetensors, the
tokenizer and the prompt template.

Why float32 while verifying: in bf16 the two forward passes round differently, and on Gemma 3 270M a correct
merge already differs by 0.7–1.2 in some logit (mean ~0.09) while a small trained adapter moves logits by ~3:
a bf16 check could not tell a correct merge from a broken one. In float32 a correct merge differs by ~1e-4, so
the tolerance means something; and the bf16 weights are rounded once (peft's bf16 merge rounds the update,
then the sum). The price is memory: 4 bytes per parameter instead of 2 while merging. With
``merge.verify.enabled: false`` the merge is computed directly in ``merge.dtype`` (half the memory, no check).

Artifact (``<run>/merge/``): ``config.json``, ``model*.safetensors`` (+ index when sharded), the tokenizer files,
``kubetune_prompt.json``, ``report.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kubetune import modelio, precision
from kubetune.errors import VerificationError
from kubetune.measure import count_parameters, memory_footprint_bytes
from kubetune.prompt import template_for
from kubetune.stages import StageContext
from kubetune.variants import apply_adapter, carry_prompt, load_tokenizer_of

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> dict:
    recipe = ctx.recipe
    adapter_dir = ctx.input("finetune")
    template = template_for(adapter_dir, recipe)
    steps = 4
    ctx.progress("merge", 0, steps, "loading base + adapter")
    model, tokenizer, verify = merge_adapter(recipe, adapter_dir,
                                             progress=lambda i, text: ctx.progress("merge", i, steps, text))

    ctx.progress("merge", 3, steps, "saving")
    model.save_pretrained(ctx.out, max_shard_size=recipe.merge.max_shard_size)
    tokenizer.save_pretrained(ctx.out)
    carry_prompt(adapter_dir, ctx.out, template)
    extras = {
        "metrics": verify,
        "parameters": count_parameters(model),
        "memory_footprint_bytes": memory_footprint_bytes(model),
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    ctx.progress("merge", steps, steps, "done")
    return extras


def merge_adapter(recipe, adapter_dir: Path, progress=lambda i, description: None):
    """See :func:`_merge_adapter`; computed in IEEE float32 matmuls whatever the process set before (a compiled
    fine-tune in the same process, ``kubetune run``, leaves TF32 on: kubetune.precision)."""
    with precision.ieee():
        return _merge_adapter(recipe, adapter_dir, progress)


def _merge_adapter(recipe, adapter_dir: Path, progress):
    """``(merged model in merge.dtype, tokenizer, verify metrics)``: the adapter in ``adapter_dir`` folded into the
    unquantized base.

    Also used by quantize when the recipe has no merge stage. Raises VerificationError when the merged model's
    logits differ from adapter-on-base by more than ``merge.verify.tolerance``.
    """
    import torch

    verify = recipe.merge.verify
    dtype = modelio.resolve_dtype(recipe.merge.dtype)
    compute_dtype = torch.float32 if verify.enabled else dtype  # see the module docstring
    tokenizer = load_tokenizer_of(recipe, adapter_dir)
    # No quantization_config here on purpose, whatever finetune.base_precision was (see the module docstring).
    base = modelio.load_base_model(recipe.model, dtype=compute_dtype)
    model = apply_adapter(base, adapter_dir, tokenizer)

    batches = verification_inputs(recipe, tokenizer, verify.prompts) if verify.enabled else []
    progress(1, f"adapter logits on {len(batches)} training example(s)")
    # Kept on the host: n × tokens × vocab floats (4 × 128 × 262k ≈ 0.5 GB for Gemma) need not hold the GPU.
    before = [_logits(model, ids).cpu() for ids in batches]
    progress(2, "merge_and_unload")
    merged = model.merge_and_unload()
    merged.eval()
    metrics: dict = {"verify_prompts": len(batches), "verify_dtype": str(compute_dtype).removeprefix("torch.")}
    if batches:
        diff = max(float((_logits(merged, ids).cpu() - ref).abs().max()) for ids, ref in zip(batches, before))
        metrics["verify_max_abs_logit_diff"] = diff
        if not diff <= verify.tolerance:  # written so that NaN fails too
            raise VerificationError(
                f"merge: merged logits differ from adapter-on-base by up to {diff:.4g} (> merge.verify.tolerance "
                f"{verify.tolerance}); the merged model is not the fine-tuned one, nothing was saved")
        log.info("merge verified on %d example(s): max |Δlogit| = %.3g", len(batches), diff)
    if merged.dtype != dtype:
        merged = merged.to(dtype)  # one rounding of the float32 merge; the config records the new dtype too
    return merged, tokenizer, metrics


def verification_inputs(recipe, tokenizer, n: int) -> list:
    """Token ids of the first ``n`` training examples, prompt *and* answer: the adapter was trained to change
    the answer's logits, so those positions are where a broken merge shows. One tensor per example (no padding
    to mask out); truncated to ``finetune.max_length`` like in training."""
    from kubetune.data import example_texts, load_splits
    from kubetune.prompt import PromptTemplate

    template = PromptTemplate(recipe.prompt.template)
    train = load_splits(recipe.data).train
    out = []
    for row in train.select(range(min(n, len(train)))):
        text = "".join(example_texts(row, template, None))  # no eos: the logits of the answer are compared
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=recipe.finetune.max_length)
        out.append(ids["input_ids"])
    return out


def _logits(model, input_ids):
    import torch

    with torch.no_grad():
        return model(input_ids=input_ids.to(model.device)).logits.float()
