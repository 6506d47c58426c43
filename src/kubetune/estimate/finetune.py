"""The fine-tune's peak GPU memory, as kubetune.stages.finetune runs it: TRL 1.16's SFTTrainer on a peft LoRA
model, the base at 16/32 bits or k-bit (bitsandbytes), AdamW on the adapter.

Two parts, added up: what the process holds for the whole run (:func:`model_state`: the base, the adapter, its
gradients and AdamW's states) and what the largest micro-batch adds (:func:`micro_batch`: the activations
autograd saves, TRL's fused loss head, backward's scratch). On several GPUs (resources.finetune.gpus × nodes) the
micro-batch is one process's share of the global batch, and the first part is what one GPU holds under DDP or
FSDP2 (kubetune.estimate.processes).
"""

from __future__ import annotations

from kubetune.distributed import resolved_parallelism, split_global_batch
from kubetune.estimate.components import GIB, MIB, Component, StageEstimate, dtype_bytes
from kubetune.estimate.estimator import Estimator
from kubetune.estimate.processes import per_gpu_state
from kubetune.estimate.storage import double_quantized, lora_params, weight_bytes
from kubetune.estimate.trace import Trace

# A fine-tune's batches of different lengths leave freed blocks the next batch cannot reuse. Measured reserved (NVML
# less the context) over allocated on the H200 (bench/RESULTS.md): 1.04-1.19 when batches are grouped by length
# or packed (one length), 1.27-1.58 when every batch has its own padded length.
FINETUNE_SLACK = 0.10
FINETUNE_VARYING_SLACK = 0.30
# TRL 1.16 chunked log-prob head (kernels/chunked_logprob.py): tiles of TOKEN_CHUNK_SIZE × _CHUNKED_LOGPROB_CHUNK_SIZE.
TRL_TOKEN_TILE = 4096
TRL_VOCAB_TILE = 32768
TRL_PER_TOKEN_FP32 = 7  # running max, sums, target logit ... (fp32 vectors of N tokens in forward)


def estimate_memory(est: Estimator, recipe=None) -> StageEstimate:
    """The fine-tune of ``recipe`` (default ``est.recipe``) at its largest micro-batch, on one of its GPUs: each
    of ``resources.finetune.processes`` processes trains on its share of the global batch
    (distributed.split_global_batch) and holds the model state its parallelism leaves it (estimate.processes)."""
    recipe = recipe or est.recipe
    ft, res = recipe.finetune, recipe.resources.finetune
    shape = est.shape
    dtype, autocast = est.precision(ft)
    worst = est.worst_batch(ft)
    b = split_global_batch(ft.batch_size, ft.grad_accum, res.processes)[0]  # per process; validated in config
    n_lora = lora_params(shape, ft.lora.target_modules, ft.lora.r)
    state = per_gpu_state(model_state(est, ft), resolved_parallelism(res.parallelism), res.processes,
                          dtype_bytes(est.lora_dtype(ft)) * n_lora, weight_bytes(shape, dtype)[1] // shape.num_layers)
    batch, trace = micro_batch(est, ft, worst.length, worst.labelled, batch_size=b)
    notes = [f"padded length {worst.length}: {worst.why}",
             f"{shape.architecture}, {shape.attn_implementation} attention, load {dtype}, "
             + (f"{autocast} autocast" if autocast else "no autocast")]
    if shape.attn_implementation == "eager":
        notes.append("eager attention keeps batch × heads × length² scores per layer: gradient checkpointing "
                     "or a shorter max_length helps most")
    varying = not (ft.group_by_length or ft.packing)
    return StageEstimate("finetune", state + batch, notes, settings={
        "base_precision": ft.base_precision, "batch_size": b, "grad_accum": ft.grad_accum,
        "max_length": ft.max_length, "padded_length": worst.length, "labelled_tokens": worst.labelled,
        "gradient_checkpointing": ft.gradient_checkpointing, "lora_r": ft.lora.r, "lora_params": n_lora,
        "precision": autocast or dtype, "processes": res.processes},
        slack=FINETUNE_VARYING_SLACK if varying else FINETUNE_SLACK)


def kbit_upcast(est: Estimator, ft) -> bool:
    """Whether the fine-tune turns a k-bit base's 16-bit rest into fp32 (kubetune.modelio.upcasts_kbit_rest)."""
    from kubetune.modelio import upcasts_kbit_rest

    autocast = est.precision(ft)[1]
    return upcasts_kbit_rest({"bfloat16": "bf16", "float16": "fp16"}.get(autocast, "fp32"))


def model_state(est: Estimator, ft) -> list[Component]:
    """What the process holds from the model's load to the end: the base, the LoRA weights, their gradients and
    AdamW's two states (exp_avg, exp_avg_sq) in the adapter's dtype."""
    shape = est.shape
    dtype, _ = est.precision(ft)
    n_lora = lora_params(shape, ft.lora.target_modules, ft.lora.r)
    comps: list[Component] = []
    if ft.base_precision == "none":
        _, rest = weight_bytes(shape, dtype)
        comps.append(Component(f"base weights ({dtype})", rest, f"{shape.total_params / 1e9:.2f}B params"))
    else:
        rest_dtype = "float32" if kbit_upcast(est, ft) else dtype
        q, rest = weight_bytes(shape, dtype, ft.base_precision, double_quantized(ft), rest_dtype=rest_dtype)
        if ft.base_quantizer == "torchao":
            fmt = "torchao NF4" if ft.base_precision == "4bit" else "torchao int8 weight-only + fp32 row scales"
        else:
            fmt = (f"{ft.bnb.quant_type}{' + double quant' if ft.bnb.double_quant else ''}"
                   if ft.base_precision == "4bit" else "LLM.int8 + fp32 row scales")
        n_q = sum(lin.weights for lin in shape.quantizable())
        comps.append(Component(f"base linears ({fmt})", q, f"{n_q / 1e9:.2f}B weights, "
                                                            f"{q / max(n_q, 1):.3f} bytes each"))
        comps.append(Component(f"rest of the base ({rest_dtype})", rest,
                               "embeddings, norms, head: upcast by peft's prepare_model_for_kbit_training"
                               if rest_dtype == "float32" else
                               "embeddings, norms, head: kept 16-bit under bf16 training"))
    lora_dtype = est.lora_dtype(ft)
    lb, short = dtype_bytes(lora_dtype), {"float32": "fp32", "bfloat16": "bf16"}[lora_dtype]
    comps.append(Component(f"LoRA weights ({short})", lb * n_lora, f"{n_lora / 1e6:.1f}M params, r={ft.lora.r}"
                           + ("; TRL casts adapters to bf16 on a k-bit base" if lb == 2 else "")))
    comps.append(Component(f"LoRA gradients ({short})", lb * n_lora))
    comps.append(Component(f"AdamW states ({short} ×2)", 2 * lb * n_lora,
                           "exp_avg and exp_avg_sq, in the weights' dtype"))
    return comps


def micro_batch(est: Estimator, ft, length: int, labelled: int,
                batch_size: int | None = None) -> tuple[list[Component], Trace]:
    """(what one ``batch_size × length`` micro-batch adds at its peak, the trace it came from): the tensors
    autograd saves (all of them, or under gradient checkpointing each layer's input and one layer again), the
    loss head's, and the larger of the head's and a layer's backward scratch. ``batch_size``: one process's rows
    (default ``ft.batch_size``, a single process's)."""
    shape = est.shape
    dtype, autocast = est.precision(ft)
    b, s = batch_size or ft.batch_size, length
    trace = est.train_trace(ft, b, s)
    if ft.gradient_checkpointing:
        act = trace.outside + sum(trace.layer_input) + max(trace.per_layer)
        act_note = (f"checkpointed: {shape.num_layers} layer inputs + one layer recomputed "
                    f"({max(trace.per_layer) / MIB:.0f} MiB)")
        if any(trace.int8_held):
            act += sum(trace.int8_held)
            act_note += (f" + {sum(trace.int8_held) / GIB:.2f} GiB of inputs the 8-bit matmuls keep "
                         "(checkpointing cannot drop them)")
    else:
        act = trace.saved
        act_note = f"{shape.num_layers} layers × ~{trace.per_layer[-1] / MIB:.0f} MiB saved for backward"
    comps = [Component(f"activations (batch {b} × {s} tokens)", act, act_note)]
    head_saved, head_scratch = loss_head(est, ft, trace, b, s, labelled, dtype, autocast)
    comps.append(Component("loss head saved (TRL chunked log-probs)", head_saved,
                           f"hidden states of the {labelled} labelled positions + per-token statistics"))
    # Backward starts at the head (its tiles and fp32 grad of the hidden states), then runs each layer's
    # backward with that layer's saved tensors still alive: ~2× its largest tensor plus gradients of the
    # residual stream. Both come on top of everything saved; the larger one is the peak.
    residual_grad = 2 * b * s * shape.hidden_size * trace.hidden_dtype_bytes
    layer_scratch = 2 * trace.largest_in_layer + residual_grad
    comps.append(Component("backward scratch", max(head_scratch, layer_scratch),
                           f"max(loss-head tiles {head_scratch / MIB:.0f} MiB, layer backward "
                           f"{layer_scratch / MIB:.0f} MiB)"))
    return comps, trace


def loss_head(est: Estimator, ft, trace: Trace, b: int, s: int, n: int, dtype: str, autocast) -> tuple[int, int]:
    """(saved, scratch) bytes of TRL 1.16's fused LM head for ``n`` labelled positions of a ``b × s`` batch.

    ``add_fused_lm_head`` (trainer/utils.py; SFTTrainer asks for log_probs, entropy and is_top1) scores only
    the positions whose label is not -100 (``hidden_states[mask]``, compact on CUDA with Triton), through
    ``_ChunkedLogProbFunction`` (kernels/chunked_logprob.py). Saved for backward: the selected hidden states
    (a copy, N × H), the targets (int64), log_z and entropy (fp32), the boolean-mask index (two int64 index
    vectors) and the mask itself (masked_scatter). Forward scratch: seven fp32 running statistics per token and
    the ``min(N, 4096) × 32768`` mm tile in the compute dtype, plus casts of the hidden chunk and the weight
    slice when their dtype differs. Backward: an fp32 grad_hidden (N × H) and the tile again, then its cast
    to the hidden states' dtype while the fp32 one still exists.
    """
    h, vocab = est.shape.hidden_size, est.shape.vocab_size
    hb = trace.hidden_dtype_bytes
    cb = dtype_bytes(autocast or dtype)  # compute dtype of the tiles
    # k-bit under fp16/fp32 training: the head was upcast to fp32 (stages.finetune.prepare_kbit_base)
    head_dtype = "float32" if ft.base_precision != "none" and kbit_upcast(est, ft) else dtype
    saved = n * h * hb + n * 8 + 2 * n * 4 + 2 * n * 8 + b * (s - 1)
    tile_t, tile_v = min(n, TRL_TOKEN_TILE), min(vocab, TRL_VOCAB_TILE)
    tiles = tile_t * tile_v * cb  # mm_buf
    tiles += tile_v * h * cb if dtype_bytes(head_dtype) != cb else 0  # weight[start:end].to(compute)
    tiles += tile_t * h * cb if hb != cb else 0  # hidden[token_start:token_end].to(compute)
    forward = TRL_PER_TOKEN_FP32 * n * 4 + tiles
    backward = n * h * 4 + n * h * hb + tiles  # grad_hidden fp32 accumulator, then .to(hidden dtype)
    return saved, max(forward, backward)
