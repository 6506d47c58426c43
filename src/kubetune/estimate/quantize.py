"""The quantize stage's peak GPU memory, as kubetune.stages.quantize runs it: GPTQModel 7.6's layer loop over
the calibration rows, then (after GPTQModel's model is released) the reload check of the saved checkpoint
through transformers. The larger of the two is the peak."""

from __future__ import annotations

from kubetune.estimate.components import ALLOCATOR_SLACK, GIB, Component, StageEstimate, dtype_bytes
from kubetune.estimate.estimator import Estimator
from kubetune.estimate.storage import gptq_weight_bytes

# GPTQModel's layer loop also sets garbage_collection_threshold:0.7: the allocator keeps freed blocks of every
# layer's differently sized tensors until 70% of the card is reserved. Measured reserved (NVML less the context)
# over allocated: 1.38-1.48 for bloom-1b1/7b1 with short and 2048-token rows (H200, bench/RESULTS.md).
GPTQ_LOOP_SLACK = 0.45


def estimate_memory(est: Estimator, recipe=None) -> StageEstimate:
    """The quantize stage's peak: the larger of GPTQModel's layer loop and the reload check that follows it
    in the same process (kubetune.stages.quantize.run: ``_quantize`` releases GPTQModel's model with
    ``variants.release`` before ``load_quantized`` reads the saved checkpoint back through transformers, so
    the two never hold the GPU together)."""
    recipe = recipe or est.recipe
    shape = est.shape
    q = recipe.quantize
    dtype = recipe.merge.dtype
    length, why = calibration_length(est, recipe)
    loop = layer_loop(est, recipe, length)
    qb, rest = gptq_weight_bytes(shape, q.bits, q.group_size, dtype)
    reload = [Component(f"reload check: GPTQ {q.bits}-bit model", qb + rest,
                        f"packed layers {qb / GIB:.2f} GiB + 16-bit embeddings/head {rest / GIB:.2f} GiB "
                        "(variants.load_quantized, after GPTQModel's model is released)")]
    # (components, allocator slack) per phase, judged as nvidia-smi sees them: the loop's allocator keeps more
    # of what it frees
    phases = {"layer loop": (loop, GPTQ_LOOP_SLACK), "reload check": (reload, ALLOCATOR_SLACK)}
    peak, (comps, slack) = max(phases.items(), key=lambda kv: sum(c.bytes for c in kv[1][0]) * (1 + kv[1][1]))
    other = "; ".join(f"the {name} needs {sum(c.bytes for c in parts) / GIB:.2f} GiB"
                      for name, (parts, _) in phases.items() if name != peak)
    host = q.calibration.samples * length * shape.hidden_size * dtype_bytes(dtype) * 2
    notes = [f"peak phase: {peak}; {other}",
             f"calibration length {why}",
             f"host RAM: calibration inputs and outputs of every sample ≈ {host / GIB:.2f} GiB, plus the "
             "CPU copy of the model",
             "GPTQModel's subset forwards (two batches' scratch) vs its replay (inputs and outputs of all "
             "rows, all Hessians): the larger one (docs/estimator.md)"]
    return StageEstimate("quantize", comps, notes, settings={
        "bits": q.bits, "group_size": q.group_size, "calibration_length": length}, slack=slack)


def calibration_length(est: Estimator, recipe) -> tuple[int, str]:
    """(padded length of the longest calibration batch, why). GPTQModel pads each batch to its longest row
    (gptqmodel/utils/calibration.py, ``prepare_calibration_dataset`` → ``collate_data``); the rows are the
    first ``calibration.samples`` of the split, prompt + answer + eos, cut at ``calibration.max_length``
    (kubetune.stages.quantize.calibration_examples). Without readable training rows: max_length."""
    cal = recipe.quantize.calibration
    if cal.source != "train":
        return cal.max_length, f"max_length {cal.max_length} (calibration on the eval split: rows not read)"
    found, reason = est.training_rows()
    if found is None or not found.total:
        return cal.max_length, f"max_length {cal.max_length} (worst case: {reason})"
    longest = min(cal.max_length, max(found.total[:cal.samples]))
    return longest, f"{longest} tokens: the longest of the first {cal.samples} training rows"

def layer_loop(est: Estimator, recipe, length: int) -> list[Component]:
    """GPU memory of GPTQModel 7.6's layer loop (``GPTQModel.quantize`` → looper/module_looper.py ``loop``):
    the larger of its two phases for the layer on the GPU.

    - The model itself stays off the GPU: ``ModelLoader.from_pretrained`` (models/loader.py) loads a
      non-quantized model "always into cpu" (a meta shell over the checkpoint with ``offload_to_disk``), whatever
      ``device=`` says; looper/stage_layer.py materialises one decoder layer on the GPU and, once quantized and
      packed, resets it to the CPU.
    - Subset forwards (phase A, the peak with long calibration rows): for each group of linears
      (qkv, out-projection, MLP in, MLP out) every calibration batch runs the layer until the group's last
      linear raises GPTQModel's one shared ``StopForward`` exception (nn_modules/hooked_linear.py); the
      exception keeps its traceback, so the previous batch's attention and MLP locals stay alive while the
      current batch runs (looper/forward_executor.py catches it and never clears it): two batches' forward
      scratch at once. Eager attention in bf16 also makes an fp32 copy of the scores before softmax (ATen's
      softmax(dtype=float32) converts a bf16 input first; only fp16 has the fused path). The layer inputs of
      all rows are on the GPU once; one fp32 in×in Hessian partial.
    - Replay (phase B, the peak with short rows): ``fwd_replay_after_process`` produces every row's output
      while all inputs are still held (stage_layer.py): inputs and outputs of all rows, the Hessians of the
      layer's linears and GPTQ's working set for the largest one.

    Measured (H200, bench/RESULTS.md): rows of ~65 tokens and rows of 2048 tokens, bloom-1b1 and bloom-7b1.
    """
    shape, q = est.shape, recipe.quantize
    dtype = recipe.merge.dtype  # GPTQModel.load(dtype=merge.dtype) in the quantize stage
    db = dtype_bytes(dtype)
    layer = shape.layer_linears()
    cal = q.calibration
    b = min(q.batch_size, cal.samples)
    hessians = sum(4 * lin.in_features ** 2 for lin in layer)
    largest_hessian = max((4 * lin.in_features ** 2 for lin in layer), default=0)
    widest = max(layer, key=lambda lin: lin.weights + lin.in_features ** 2, default=None)
    working = (3 * 4 * widest.weights + 4 * widest.in_features ** 2) if widest else 0
    rows = cal.samples * length * shape.hidden_size * db  # one copy of every calibration row's hidden states
    # GPTQModel runs the decoder layers only: no logits (scratch() adds a last-position row; negligible)
    scratch = est.scratch(b, length, db)
    upcast = b * shape.num_heads * length ** 2 * 4 if est.keeps_scores() and dtype == "bfloat16" else 0
    one_layer = Component(f"one decoder layer ({dtype})", shape.layer_params() * db,
                          "GPTQModel keeps the model on CPU/disk and moves one layer at a time to the GPU")
    subset = [
        one_layer,
        Component(f"layer inputs of all {cal.samples} calibration rows", rows,
                  f"{cal.samples} × {length} tokens × hidden {shape.hidden_size} × {db} B"),
        Component(f"forward scratch of two batches ({b} × {length} tokens each)", 2 * scratch,
                  "the current batch and the previous one, kept alive by GPTQModel's StopForward traceback"),
        Component("fp32 copy of the attention scores", upcast, "softmax(dtype=float32) of bf16 eager scores"),
        Component("one Hessian partial (fp32 in²)", largest_hessian, "the widest input of the layer"),
    ]
    replay = [
        one_layer,
        Component(f"layer inputs + outputs of all {cal.samples} calibration rows", 2 * rows,
                  f"2 × {cal.samples} × {length} tokens × hidden {shape.hidden_size} × {db} B, until the "
                  "replay has produced every output (gptqmodel looper/stage_layer.py)"),
        Component("Hessians (fp32 in² per linear)", hessians, f"{len(layer)} linears of one layer at once"),
        Component("GPTQ working set (largest linear)", working,
                  "fp32 weight, quantized copy and losses (3 × out·in·4) + inverse Hessian"),
        Component(f"forward scratch (batch {b} × {length} tokens)", scratch, "one layer's no-grad working set"),
    ]
    phase_a, phase_b = sum(c.bytes for c in subset), sum(c.bytes for c in replay)
    return [c for c in (subset if phase_a > phase_b else replay) if c.bytes]
