"""Quantize: GPTQ the merged model to 4 or 8 bits with GPTQModel, calibrated on the recipe's own examples.

GPTQModel (the maintained successor of auto-gptq, which no longer builds against transformers 5) quantizes
one decoder layer at a time, choosing rounding that minimizes each Linear's output error on calibration
activations. Those activations come from the task's training rows (prompt + answer + eos), not from c4:
a model that only ever writes SQL should keep the weights that matter for SQL.

Input: the merge artifact, or, when the recipe has no merge stage, the adapter merged in memory (written to
``<run>/.work/quantize/merged`` for GPTQModel to read, and removed afterwards).

Artifact (``<run>/quantize/``): a GPTQ checkpoint (``config.json`` with ``quantization_config``,
``model*.safetensors`` with packed int32 ``qweight``), ``quantize_config.json``, ``quant_log.csv`` (per-module
loss), the tokenizer, ``kubetune_prompt.json``. transformers loads it with
``AutoModelForCausalLM.from_pretrained(dir, quantization_config=GPTQConfig(bits=…, backend=…))``
(see :func:`kubetune.variants.load_quantized`).
"""

from __future__ import annotations

import contextlib

import csv
import io
import logging
import math
import os
import shutil
import time
from pathlib import Path

from kubetune import modelio
from kubetune.errors import DataError, RecipeError
from kubetune.measure import count_parameters, memory_footprint_bytes
from kubetune.prompt import PromptTemplate, template_for
from kubetune.stages import StageContext
from kubetune.stages.gptq_block import graphed_when_uncompiled
from kubetune.variants import carry_prompt, gptq_backend, load_quantized, load_tokenizer_of, release

log = logging.getLogger(__name__)


def _gptqmodel_env() -> None:
    """GPTQModel settings that make it work on small machines; explicit settings from the user win.

    - Its CPU pool defaults to (cores + 1) // 2 workers and then asks for 2: on a 2-core machine that is a
      ValueError ("requests 2 workers but parent 'cpu' only has 1").
    - Its packing extension is compiled with g++ at first use (~50 s, and a compiler the image may lack);
      the Python packer gives the same bytes, and packing is a small part of the run.

    GPTQModel compiles its CUDA "GPTQ block update" with nvcc at first use (29.1 s of a 52.4 s bloom-1b1
    quantize() on the bench's H200 machine: bench/results/gptq-modules-h200-2026-11-28.json), caching the build
    under GPTQMODEL_TORCH_EXTENSIONS_DIR (on the claim in a cluster: k8s.render). In an image without nvcc, such
    as ours, the build fails and :mod:`kubetune.stages.gptq_block` replays GPTQModel's torch loop as CUDA graphs.
    """
    if (os.cpu_count() or 1) < 4:
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")


def run(ctx: StageContext) -> dict:
    recipe, q = ctx.recipe, ctx.recipe.quantize
    from_merge = "merge" in recipe.stages
    src_dir = ctx.input("merge") if from_merge else ctx.input("finetune")
    template = template_for(src_dir, recipe)
    tokenizer = load_tokenizer_of(recipe, src_dir)
    trained_with = src_dir  # whose prompt file travels forward

    # Cheap checks first: a bad group size or an empty calibration set should fail in seconds, not after a
    # merge and a model load.
    source_parameters = check_group_size(recipe, src_dir if from_merge else None)
    calibration = calibration_examples(recipe, template, tokenizer)

    scratch = None
    if not from_merge:
        from kubetune.stages.merge import merge_adapter

        ctx.progress("quantize", 0, None, "merging the adapter in memory")
        merged, _, _ = merge_adapter(recipe, src_dir)
        scratch = ctx.work / "merged"
        shutil.rmtree(scratch, ignore_errors=True)
        merged.save_pretrained(scratch, max_shard_size=recipe.merge.max_shard_size)
        tokenizer.save_pretrained(scratch)
        release(merged)
        del merged
        src_dir = scratch
    try:
        seconds, block_update = _quantize(ctx, src_dir, calibration)
        # GPTQModel saves its own copy of the tokenizer and rewrites generation_config.json (it turns
        # do_sample on); put back the source's, so the quantized model generates like the merged one.
        tokenizer.save_pretrained(ctx.out)
        carry_prompt(trained_with, ctx.out, template)
        if (src_dir / "generation_config.json").is_file():
            shutil.copy2(src_dir / "generation_config.json", ctx.out / "generation_config.json")
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    # Reload the way infer will (transformers + an explicit kernel): proves the checkpoint loads, and counts
    # what is really there.
    log.info("reloading %s with the %s kernel", ctx.out, gptq_backend(recipe))
    model = load_quantized(recipe, ctx.out)
    parameters = count_parameters(model)
    footprint = memory_footprint_bytes(model)
    release(model)
    del model
    if parameters["total"] != source_parameters:
        log.warning("quantized model counts %d parameters, its source %d", parameters["total"], source_parameters)
    return {
        "metrics": _quant_log_summary(ctx.out / "quant_log.csv"),
        "parameters": parameters,
        "source_parameters_total": source_parameters,
        "memory_footprint_bytes": footprint,
        "bits": q.bits,
        "group_size": q.group_size,
        "desc_act": q.desc_act,
        "sym": q.sym,
        "calibration_samples": len(calibration),
        "calibration_tokens": sum(len(example["input_ids"]) for example in calibration),
        "calibration_source": q.calibration.source,
        "backend": gptq_backend(recipe),
        "block_update": block_update,
        "seconds": round(seconds, 3),
    }


def _quantize(ctx: StageContext, src_dir: Path, calibration: list[dict]) -> tuple[float, str]:
    """Run GPTQ on ``src_dir`` and save the checkpoint into ``ctx.out``; returns the quantize() seconds and what
    ran GPTQ's block updates (:meth:`kubetune.stages.gptq_block.GraphedBlockUpdate.kind`)."""
    _gptqmodel_env()
    from gptqmodel import GPTQModel, QuantizeConfig

    recipe, q = ctx.recipe, ctx.recipe.quantize
    offload = ctx.work / "offload"  # finished layers go to disk while the rest run; on the PVC, not a small /tmp
    shutil.rmtree(offload, ignore_errors=True)
    config = QuantizeConfig(bits=q.bits, group_size=q.group_size, desc_act=q.desc_act, sym=q.sym,
                            damp_percent=q.damp_percent, offload_to_disk_path=str(offload))
    ctx.progress("quantize", 0, None, "loading the model")
    gmodel = GPTQModel.load(str(src_dir), config, device=modelio.device(),
                            dtype=modelio.resolve_dtype(recipe.merge.dtype),
                            trust_remote_code=recipe.model.trust_remote_code)
    n_layers = getattr(gmodel.model.config.get_text_config(), "num_hidden_layers", None)

    def layer_done(layer_idx: int, submodule_finalized: bool):
        # GPTQModel calls this twice per decoder layer; the second call (finalized) means quantized and packed.
        if submodule_finalized:
            ctx.progress("quantize", layer_idx + 1, n_layers, f"layer {layer_idx + 1}/{n_layers or '?'}")

    gmodel.layer_callback = layer_done
    ctx.progress("quantize", 0, n_layers, f"layer 0/{n_layers or '?'}")
    started = time.perf_counter()
    try:
        # GPTQModel writes per-module logs into ./logs of the working directory; keep them in the stage's
        # scratch, not wherever the user (or the pod) happens to stand.
        with contextlib.chdir(ctx.work), graphed_when_uncompiled() as block_update:
            gmodel.quantize(calibration, batch_size=q.batch_size)
        seconds = time.perf_counter() - started
        log.info("GPTQ block updates: %s (%d graph replays, %d blocks in the torch loop)", block_update.kind(),
                 block_update.replays, block_update.eager_blocks)
        saved = io.StringIO()  # GPTQModel prints the saved folder's listing and both configs: they are in the artifact
        with contextlib.redirect_stdout(saved):
            gmodel.save(str(ctx.out), max_shard_size=recipe.merge.max_shard_size)
        log.debug("GPTQModel's save said:\n%s", saved.getvalue())
    finally:
        release(gmodel.model)
        del gmodel
        shutil.rmtree(offload, ignore_errors=True)
    return seconds, block_update.kind()


def check_group_size(recipe, merged_dir: Path | None) -> int:
    """Fail unless ``quantize.group_size`` divides the input size of every Linear layer; returns the model's
    parameter count. The model is built on the meta device (shapes only, no weights): this takes a second
    even for a 70B model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kubetune.measure import count_parameters as count

    if merged_dir is not None:
        name, kwargs = str(merged_dir), {"trust_remote_code": recipe.model.trust_remote_code}
    else:
        name, kwargs = modelio._source(recipe.model)
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    except Exception as exc:
        raise modelio._translate(exc, name, "the model configuration") from None
    group = recipe.quantize.group_size
    sizes = {mod_name: m.in_features for mod_name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    hidden = getattr(config.get_text_config(), "hidden_size", None)
    bad = {k: v for k, v in sizes.items() if group > 0 and v % group}
    if bad:
        first, size = next(iter(bad.items()))
        common = math.gcd(*sizes.values())
        choices = [g for g in (32, 64, 128, 256) if common % g == 0]
        hint = f"e.g. {choices[-1]}" if choices else f"a divisor of {common}"
        raise RecipeError("recipe", [
            f"quantize.group_size: {group} does not divide the input size of {len(bad)} Linear layer(s), e.g. "
            f"{first} ({size}; the hidden size is {hidden}); use {hint}, or -1 for one group per row"])
    return count(model)["total"]


def calibration_examples(recipe, template: PromptTemplate, tokenizer) -> list[dict]:
    """The first ``calibration.samples`` rows of the chosen split as token ids: prompt + answer + eos, exactly
    what the fine-tune trained on, truncated to ``calibration.max_length`` tokens."""
    from kubetune.data import example_texts, load_splits

    cal = recipe.quantize.calibration
    splits = load_splits(recipe.data)
    rows = splits.train if cal.source == "train" else splits.eval
    rows = rows.select(range(min(cal.samples, len(rows))))
    out = []
    for row in rows:
        text = "".join(example_texts(row, template, tokenizer.eos_token))
        enc = tokenizer(text, truncation=True, max_length=cal.max_length)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    if not out:
        raise DataError(f"{recipe.data.source}: no rows in the {cal.source} split to calibrate on")
    return out


def _quant_log_summary(path: Path) -> dict:
    """Per-module GPTQ loss (GPTQModel's quant_log.csv) reduced to mean and max: a module with a loss far above
    the rest points at too few or unrepresentative calibration rows. Also the seconds GPTQModel spent solving the
    modules (its per-module ``time``: Hessian inverse and the column-by-column quantization, without the
    calibration forwards), summed: the rest of the stage's quantize time is forwards, packing and saving."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        losses = [float(row["loss"]) for row in rows]
    except (OSError, KeyError, ValueError):
        return {}
    if not losses:
        return {}
    summary = {"gptq_modules": len(losses), "gptq_loss_mean": sum(losses) / len(losses), "gptq_loss_max": max(losses)}
    try:
        seconds = [float(row["time"]) for row in rows]
    except (KeyError, TypeError, ValueError):
        return summary
    slowest = max(range(len(rows)), key=seconds.__getitem__)
    # The slowest is usually the first: GPTQModel JIT-compiles its CUDA block update there when it can (29 s)
    summary.update(gptq_solve_seconds=round(sum(seconds), 3), gptq_solve_max_seconds=seconds[slowest],
                   gptq_solve_slowest_module=f"{rows[slowest].get('layer')}.{rows[slowest].get('module')}")
    return summary
