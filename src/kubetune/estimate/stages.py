"""Peak GPU memory of each stage, as a list of named components that add up to it.

The numbers come from three sources: the model's shape (parameters and linear layers of its meta build), the
saved-tensor trace (:mod:`kubetune.estimate.trace`), and the storage formats of the libraries the stages use
(bitsandbytes, peft, TRL, GPTQModel), each written next to the code that counts it. docs/estimator.md derives
every formula; the tests check the parts against real tensors on tiny models.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from kubetune.estimate.modelshape import Linear, ModelShape, build_meta_model, shape_of
from kubetune.estimate.trace import Trace, TrainSetup, kv_cache_elements, prepare_for_training, trace_backbone

GIB = 2**30
MIB = 2**20

# What a process holds on the GPU beyond torch's allocator once CUDA is up, torch's kernels are loaded and cuBLAS has
# a handle: 685 MiB measured on an H200 (torch 2.11, CUDA 13, bench/estimator_gpu_check.py); ~0.5 GiB is usual
# on A100 with CUDA 12's lazy loading. Rounded up: it is the same for every stage.
CUDA_CONTEXT_BYTES = 700 * MIB
# The caching allocator reserves more than it hands out (block rounding, fragmentation). GPTQModel, which peft
# imports, sets PYTORCH_ALLOC_CONF=expandable_segments:True in every stage, which keeps this small.
ALLOCATOR_SLACK = 0.05
# A fine-tune's batches of different lengths leave freed blocks the next batch cannot reuse. Measured reserved (NVML
# less the context) over allocated on the H200 (bench/RESULTS.md): 1.04-1.19 when batches are grouped by length
# or packed (one length), 1.27-1.58 when every batch has its own padded length.
FINETUNE_SLACK = 0.10
FINETUNE_VARYING_SLACK = 0.30
# GPTQModel's layer loop also sets garbage_collection_threshold:0.7: the allocator keeps freed blocks of every
# layer's differently sized tensors until 70% of the card is reserved. Measured reserved (NVML less the context)
# over allocated: 1.38-1.48 for bloom-1b1/7b1 with short and 2048-token rows (H200, bench/RESULTS.md).
GPTQ_LOOP_SLACK = 0.45
DEFAULT_HEADROOM = 0.10
"""Share of a card's memory left unused when judging 'fits': covers this estimate's error and other processes."""

# bitsandbytes 0.50 4-bit storage (functional.quantize_4bit): two weights per byte, one absmax per 64 weights
# (fp32, or with double quantization uint8 + one fp32 per 256 blocks + a 256-entry fp32 code), a 16-entry code.
NF4_BLOCK = 64
NF4_DQ_BLOCK = 256
# TRL 1.16 chunked log-prob head (kernels/chunked_logprob.py): tiles of TOKEN_CHUNK_SIZE × _CHUNKED_LOGPROB_CHUNK_SIZE.
TRL_TOKEN_TILE = 4096
TRL_VOCAB_TILE = 32768
TRL_PER_TOKEN_FP32 = 7  # running max, sums, target logit ... (fp32 vectors of N tokens in forward)


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


# ---- storage formats ---------------------------------------------------------------------------------------------
def nf4_bytes(n: int, double_quant: bool) -> int:
    """Bytes of one 4-bit (nf4/fp4) weight of ``n`` elements with its quantization state."""
    blocks = math.ceil(n / NF4_BLOCK)
    packed = math.ceil(n / 2)
    code = 16 * 4
    if double_quant:
        return packed + blocks + 4 * math.ceil(blocks / NF4_DQ_BLOCK) + 256 * 4 + code
    return packed + 4 * blocks + code


def int8_bytes(lin: Linear) -> int:
    """LLM.int8 weight: int8 matrix plus one fp32 scale per output row (SCB)."""
    return lin.weights + 4 * lin.out_features


def gptq_bytes(lin: Linear, bits: int, group_size: int) -> int:
    """GPTQ packed weight: qweight (bits/weight), qzeros (bits per group and column), fp16 scales, int32 g_idx."""
    groups = math.ceil(lin.in_features / (lin.in_features if group_size == -1 else group_size))
    return (lin.weights * bits // 8 + groups * lin.out_features * bits // 8 + groups * lin.out_features * 2
            + lin.in_features * 4)


def weight_bytes(shape: ModelShape, dtype: str, precision: str = "none", double_quant: bool = True,
                 rest_dtype: str | None = None) -> tuple[int, int]:
    """(bytes of the quantized linears, bytes of everything else) for a base held at ``precision``.

    ``rest_dtype`` is the dtype of the parameters bitsandbytes does not quantize (fp32 after peft's
    prepare_model_for_kbit_training, else the load dtype).
    """
    if precision == "none":
        return 0, shape.total_params * dtype_bytes(dtype)
    weights = shape.linear_weight_names()
    quantized = {f"{lin.name}.weight" for lin in shape.quantizable()}
    q = 0
    rest = 0
    for name, n in shape.params.items():
        if name in quantized:
            lin = weights[name]
            q += nf4_bytes(n, double_quant) if precision == "4bit" else int8_bytes(lin)
        else:
            rest += n * dtype_bytes(rest_dtype or dtype)
    return q, rest


def gptq_weight_bytes(shape: ModelShape, bits: int, group_size: int, dtype: str) -> tuple[int, int]:
    """(packed decoder-layer linears, the rest at ``dtype``): GPTQModel quantizes the linears of the decoder
    layers and leaves embeddings, norms and the LM head in 16-bit."""
    prefix = f"{shape.layers_path}."
    layer_linears = {f"{lin.name}.weight": lin for lin in shape.linears if lin.name.startswith(prefix)}
    q = sum(gptq_bytes(layer_linears[name], bits, group_size) for name in shape.params if name in layer_linears)
    rest = sum(n for name, n in shape.params.items() if name not in layer_linears) * dtype_bytes(dtype)
    return q, rest


def lora_params(shape: ModelShape, target_modules, r: int) -> int:
    """LoRA A (r × in) and B (out × r) per targeted linear, no biases (peft's bias='none')."""
    return sum(r * (lin.in_features + lin.out_features) for lin in shape.lora_targets(target_modules))


# ---- no-grad forward scratch ---------------------------------------------------------------------------------------
def forward_scratch(shape: ModelShape, batch: int, length: int, dbytes: int, scores: bool,
                    all_logits: bool) -> int:
    """Working memory of a no-grad forward (inference, verification, calibration), on top of the weights.

    Per layer, freed before the next: the residual stream and its norm, three MLP-wide tensors at once (gate
    output after the activation, up output, their product), and when attention runs eagerly or on SDPA's math
    backend, the batch × heads × length² scores and their softmax. After the last layer: the logits, of the last
    position only when the model takes ``logits_to_keep`` (generate passes 1), else of every position, plus the
    fp32 copy the caller makes. A bound from the shapes, not a trace: on the GPU it came within 5-15% (under).
    """
    h = shape.hidden_size
    widest = max((lin.out_features for lin in shape.layer_linears()), default=4 * h)
    tokens = batch * length
    scratch = tokens * dbytes * (4 * h + 3 * widest)
    if scores:
        scratch += batch * shape.num_heads * length * length * (dbytes + 4)
    positions = tokens if all_logits else batch
    return scratch + positions * shape.vocab_size * (dbytes + 4)


# ---- the estimator ---------------------------------------------------------------------------------------------------
def _read_rows_on_one_core(recipe):
    """:func:`kubetune.estimate.rows.read_rows` in the forked process, leaving the other core to the imports."""
    import os

    from kubetune.estimate import rows as rows_mod

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # tokenizers' thread pool starts at its first use, after this
    return rows_mod.read_rows(recipe)


class Estimator:
    """Estimates for one recipe's model. The meta builds and traces are made at most once per process (and
    kept in the disk cache of :mod:`kubetune.estimate.cache` when the config came from a file), so suggestions
    and a second estimate of the same model re-use them; torch and transformers are imported only on a miss."""

    def __init__(self, recipe, config=None, bf16: bool = True, target: str = "cuda", raw_config: dict | None = None,
                 config_source: str = "config.json", read_rows: bool = True):
        from kubetune.estimate.cache import DiskCache, NoCache, key_of

        if config is None and raw_config is None:
            raise ValueError("Estimator needs a config or a raw config.json dict")
        self.target = target  # whose kernels the trace emulates: "cuda", or "cpu" to compare with CPU runs
        self.recipe = recipe
        self._config = config
        self._raw = raw_config
        self._config_source = config_source
        self.bf16 = bf16
        half = "bfloat16" if bf16 else "float16"
        self.model_dtype = half if recipe.model.dtype == "auto" else recipe.model.dtype
        self._half = half
        self._meta = None
        self._models: dict[tuple, Any] = {}
        self._plain = None
        self._traces: dict[tuple, Trace] = {}
        self._kv: dict[tuple, int] = {}  # (batch, length) -> cache elements
        self._rows = None
        self.read_rows = read_rows
        """Tokenize the training rows for the padded length (False: every row is max_length tokens)."""
        self._rows_disk, self._rows_why = self._rows_cache() if read_rows else (None, "training rows not read")
        self._rows_future = self._prefetch_rows() if "finetune" in recipe.stages else None
        # Only a config read from a file has a cheap key; a config object (tests, the GPU check) stays in memory.
        self.disk = (DiskCache("model", key_of(raw_config, self.model_dtype, target)) if raw_config is not None
                     else NoCache())
        facts = self.disk.get("facts")
        if facts is None:
            self.shape = shape_of(self.meta)
            n, layer_map = self._layers_to_trace()
            facts = {"shape": self.shape.to_dict(), "trace_layers": n, "layer_map": layer_map,
                     "logits_to_keep": self._takes_logits_to_keep(), "packs_apart": self._packs_apart()}
            self.disk.put("facts", facts)
        else:
            self.shape = ModelShape.from_dict(facts["shape"])
        self.trace_layers = facts["trace_layers"]
        self.layer_map: list[int] = facts["layer_map"]
        """For each of the model's layers, the traced layer that stands for it."""
        self._logits_to_keep = facts["logits_to_keep"]
        self.packs_apart: bool | None = facts["packs_apart"]
        """Whether packed examples stay apart in the model's attention (None: the meta forward could not say)."""

    # -- helpers -----------------------------------------------------------------------------------------------------
    @property
    def torch(self):
        import torch

        return torch

    @property
    def config(self):
        if self._config is None:
            from kubetune.estimate.modelshape import config_from_raw

            self._config = config_from_raw(self._raw, self._config_source)
        return self._config

    @property
    def meta(self):
        """The whole model on the meta device, built once (only on a cache miss)."""
        if self._meta is None:
            self._meta = build_meta_model(self.config, getattr(self.torch, self.model_dtype))
        return self._meta

    def worst_batch(self, ft):
        """Padded length and labelled positions of the fine-tune's largest batch (:mod:`kubetune.estimate.rows`):
        from the training rows when the tokenizer and the data are on this machine, else ``max_length``."""
        from kubetune.estimate import rows as rows_mod

        found, reason = self.training_rows()
        return rows_mod.worst_batch(found, reason, ft.batch_size, ft.max_length, ft.completion_only_loss,
                                    ft.packing)

    def _rows_cache(self):
        """(the rows' disk cache entry, "") when the rows can be read here, else (None, why not)."""
        from kubetune.estimate import rows as rows_mod
        from kubetune.estimate.cache import DiskCache, key_of

        try:
            fingerprint, reason = rows_mod.fingerprint(self.recipe)
        except Exception as exc:  # noqa: BLE001 - unreadable rows: fall back to the worst case, say why
            return None, f"training rows not readable here ({type(exc).__name__}: {exc})"
        if fingerprint is None:
            return None, reason
        return DiskCache("rows", key_of(fingerprint)), ""

    def training_rows(self):
        """(token counts of the training rows, "") or (None, why they are not known), read once."""
        if self._rows is None:
            self._rows = self._read_rows()
        return self._rows

    def _read_rows(self):
        from kubetune.estimate import rows as rows_mod

        disk = self._rows_disk
        if disk is None:
            return None, self._rows_why
        try:
            cached = disk.get("rows")
            if cached is None:
                found = self._prefetched_rows() or rows_mod.read_rows(self.recipe)
                disk.put("rows", dataclasses.asdict(found))
                disk.save()
            else:
                found = rows_mod.Rows(tuple(cached["total"]), tuple(cached["completion"]), cached["source"])
            return found, ""
        except Exception as exc:  # noqa: BLE001 - unreadable rows: fall back to the worst case, say why
            return None, f"training rows not readable here ({type(exc).__name__}: {exc})"

    def _prefetch_rows(self):
        """On a cache miss, tokenize the training rows in a forked process while this one imports torch and builds
        the meta model: loading a large tokenizer.json alone takes ~1 s (Gemma 3's 262k tokens), and the two use
        different cores. Only before torch is imported (forking after its threads started is unsafe); else the
        rows are read in this process when needed."""
        import sys

        if "torch" in sys.modules or self._rows_disk is None or self._rows_disk.get("rows") is not None:
            return None
        try:
            import concurrent.futures
            import multiprocessing

            pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
            future = pool.submit(_read_rows_on_one_core, self.recipe)
            pool.shutdown(wait=False)
            return future
        except Exception:  # noqa: BLE001 - no prefetch: the rows are read in this process instead
            return None

    def _prefetched_rows(self):
        future, self._rows_future = self._rows_future, None
        if future is None:
            return None
        try:
            return future.result()
        except Exception:  # noqa: BLE001 - the forked read failed: read again here, where errors are reported
            return None

    def save(self) -> None:
        """Write what this estimate found to the disk cache (nothing happens when nothing new was found)."""
        self.disk.save()

    def _per_layer_settings(self) -> list[str]:
        """Names of the text config's per-layer lists that vary (e.g. Gemma 3's sliding/full ``layer_types``)."""
        text = self.config.get_text_config()
        return [k for k, v in vars(text).items() if isinstance(v, (list, tuple))
                and len(v) == self.shape.num_layers and len(set(map(str, v))) > 1]

    def _layers_to_trace(self) -> tuple[int, list[int]]:
        """(how many leading layers to trace, the traced layer standing for each layer). A layer is represented by
        a traced one with the same parameter count and the same per-layer settings; the first layer stands only
        for itself (its input needs no gradient). All layers alike: two are traced. Gemma 3 (five sliding-window
        layers, then a full-attention one): the first six. Tracing time grows with the layers traced, and the
        trace is most of a cold estimate's time after the imports."""
        layers = self.meta.get_submodule(self.shape.layers_path)
        text = self.config.get_text_config()
        lists = [getattr(text, k) for k in self._per_layer_settings()]
        kinds = [(sum(p.numel() for p in layer.parameters()), *(str(v[i]) for v in lists))
                 for i, layer in enumerate(layers)]
        total = len(kinds)
        needed = set(kinds[1:])
        n, seen = total, set()
        for i in range(1, total):
            seen.add(kinds[i])
            if seen >= needed:
                n = max(2, i + 1)
                break
        if n >= total:
            return total, list(range(total))
        stand_in = {kinds[i]: i for i in range(1, n)}  # the last traced layer of each kind (past the first layer)
        return n, list(range(n)) + [stand_in[k] for k in kinds[n:]]

    def _config_with_layers(self, n: int):
        if n == self.shape.num_layers:
            return self.config
        cfg = copy.deepcopy(self.config)
        text = cfg.get_text_config()
        for name in self._per_layer_settings():  # the leading n layers' settings, as the model would read them
            setattr(text, name, type(getattr(text, name))(getattr(text, name)[:n]))
        text.num_hidden_layers = n
        return cfg

    def _packs_apart(self) -> bool | None:
        from kubetune.stages.packing import keeps_examples_apart

        try:
            return keeps_examples_apart(self.meta)
        except Exception:  # a model whose forward does not run on meta: the fine-tune stage checks it for real
            return None

    def _takes_logits_to_keep(self) -> bool:
        import inspect

        return "logits_to_keep" in inspect.signature(type(self.meta).forward).parameters

    def precision(self, ft) -> tuple[str, Any]:
        """(load dtype name, autocast dtype or None) of the fine-tune on a GPU."""
        if ft.precision == "auto":
            autocast = self._half if self.bf16 else None  # auto → bf16 mixed precision, fp32 without bf16
        elif ft.precision == "fp32":
            autocast = None
        else:
            autocast = {"bf16": "bfloat16", "fp16": "float16"}[ft.precision]
        return self.model_dtype, autocast

    def kbit_upcast(self, ft) -> bool:
        """Whether the fine-tune turns a k-bit base's 16-bit rest into fp32 (kubetune.modelio.upcasts_kbit_rest)."""
        from kubetune.modelio import upcasts_kbit_rest

        autocast = self.precision(ft)[1]
        return upcasts_kbit_rest({"bfloat16": "bf16", "float16": "fp16"}.get(autocast, "fp32"))

    @staticmethod
    def lora_dtype(ft) -> str:
        """peft keeps adapters in fp32 (autocast_adapter_dtype); TRL's SFTTrainer converts them to bf16 on a
        quantized base, as the QLoRA paper does (trl/trainer/sft_trainer.py, ``_is_quantized_model``)."""
        return "bfloat16" if ft.base_precision != "none" else "float32"

    def train_trace(self, ft, batch: int, length: int) -> Trace:
        """The saved-tensor trace for ``batch × length``, extrapolated from the traced layers to all of them."""
        dtype, autocast = self.precision(ft)
        compute = dtype if ft.bnb.compute_dtype == "auto" else ft.bnb.compute_dtype
        targets = tuple(lin.name for lin in self.shape.lora_targets(ft.lora.target_modules))
        model_key = (ft.base_precision, compute, targets, ft.lora.r, ft.lora.dropout, autocast)
        key = (*model_key, batch, length, ft.gradient_checkpointing)
        if key in self._traces:
            return self._traces[key]
        disk_key = "trace:" + json.dumps(key)
        cached = self.disk.get(disk_key)
        if cached is not None:
            self._traces[key] = Trace(**cached)
            return self._traces[key]
        torch = self.torch
        if model_key not in self._models:
            n = self.trace_layers
            if n == self.shape.num_layers and self._meta is not None and self.model_dtype == dtype:
                meta, self._meta = self._meta, None  # the whole model is traced: re-use its build (it is changed)
            else:
                meta = build_meta_model(self._config_with_layers(n), getattr(torch, dtype))
            shape = shape_of(meta) if n != self.shape.num_layers else self.shape
            small_targets = tuple(lin.name for lin in shape.lora_targets(ft.lora.target_modules))
            setup = TrainSetup(getattr(torch, dtype), ft.base_precision, getattr(torch, compute), small_targets,
                               ft.lora.r, ft.lora.dropout, getattr(torch, autocast) if autocast else None,
                               lora_dtype=getattr(torch, self.lora_dtype(ft)))
            self._models[model_key] = prepare_for_training(meta, shape, setup)
        model = self._models[model_key]
        trace = trace_backbone(model, self.shape.layers_path, batch, length,
                               getattr(torch, autocast) if autocast else None, target=self.target,
                               inputs_require_grad=ft.gradient_checkpointing)
        trace = self._extrapolate(trace)
        self._traces[key] = trace
        self.disk.put(disk_key, dataclasses.asdict(trace))
        return trace

    def _extrapolate(self, trace: Trace) -> Trace:
        if len(trace.per_layer) == self.shape.num_layers:
            return trace

        def spread(values: list[int]) -> list[int]:
            return [values[i] for i in self.layer_map]

        return Trace(per_layer=spread(trace.per_layer), outside=trace.outside, layer_input=spread(trace.layer_input),
                     largest_in_layer=trace.largest_in_layer, hidden_dtype_bytes=trace.hidden_dtype_bytes,
                     by_kind=dict(trace.by_kind), math_attention=trace.math_attention,
                     int8_held=spread(trace.int8_held))

    def kv_cache(self, dtype: str, batch: int, length: int) -> int:
        """KV cache bytes: the elements of the cache a meta forward through the traced layers returns (per layer,
        each layer counted by its stand-in), at ``dtype``'s size: the cache holds keys and values in the model's
        dtype, so one forward serves every dtype."""
        key = (batch, length)
        if key not in self._kv:
            disk_key = "kv-elements:" + json.dumps(key)
            cached = self.disk.get(disk_key)
            if cached is None:
                if self._plain is None:  # one plain model of the traced layers serves every batch and length
                    self._plain = build_meta_model(self._config_with_layers(self.trace_layers), self.torch.bfloat16)
                per_layer = kv_cache_elements(self._plain, batch, length)
                if len(per_layer) == self.trace_layers:
                    cached = sum(per_layer[i] for i in self.layer_map)
                else:  # a cache not kept per layer: the layers are alike (else all of them were traced)
                    cached = sum(per_layer) * self.shape.num_layers // self.trace_layers
                self.disk.put(disk_key, cached)
            self._kv[key] = cached
        return self._kv[key] * dtype_bytes(dtype)

    def keeps_scores(self) -> bool:
        """Does attention materialise length² scores (eager, or SDPA on its math backend)? A property of the model
        and the fine-tune's setup, not of the batch: any trace already made answers it."""
        if self.shape.attn_implementation == "eager":
            return True
        if self._traces:
            return next(iter(self._traces.values())).math_attention
        return self.train_trace(self.recipe.finetune, 1, 16).math_attention

    def takes_logits_to_keep(self) -> bool:
        return self._logits_to_keep

    def scratch(self, batch: int, length: int, dbytes: int, all_logits: bool = False) -> int:
        return forward_scratch(self.shape, batch, length, dbytes, self.keeps_scores(),
                               all_logits or not self.takes_logits_to_keep())

    # -- stages --------------------------------------------------------------------------------------------------------
    def finetune(self, ft) -> StageEstimate:
        shape = self.shape
        dtype, autocast = self.precision(ft)
        worst = self.worst_batch(ft)
        b, s = ft.batch_size, worst.length
        n_lora = lora_params(shape, ft.lora.target_modules, ft.lora.r)
        comps: list[Component] = []
        notes: list[str] = []
        if ft.base_precision == "none":
            _, rest = weight_bytes(shape, dtype)
            comps.append(Component(f"base weights ({dtype})", rest, f"{shape.total_params / 1e9:.2f}B params"))
        else:
            rest_dtype = "float32" if self.kbit_upcast(ft) else dtype
            q, rest = weight_bytes(shape, dtype, ft.base_precision, ft.bnb.double_quant, rest_dtype=rest_dtype)
            fmt = (f"{ft.bnb.quant_type}{' + double quant' if ft.bnb.double_quant else ''}"
                   if ft.base_precision == "4bit" else "LLM.int8 + fp32 row scales")
            n_q = sum(lin.weights for lin in shape.quantizable())
            comps.append(Component(f"base linears ({fmt})", q, f"{n_q / 1e9:.2f}B weights, "
                                                                f"{q / max(n_q, 1):.3f} bytes each"))
            comps.append(Component(f"rest of the base ({rest_dtype})", rest,
                                   "embeddings, norms, head: upcast by peft's prepare_model_for_kbit_training"
                                   if rest_dtype == "float32" else
                                   "embeddings, norms, head: kept 16-bit under bf16 training"))
        lora_dtype = self.lora_dtype(ft)
        lb, short = dtype_bytes(lora_dtype), {"float32": "fp32", "bfloat16": "bf16"}[lora_dtype]
        comps.append(Component(f"LoRA weights ({short})", lb * n_lora, f"{n_lora / 1e6:.1f}M params, r={ft.lora.r}"
                               + ("; TRL casts adapters to bf16 on a k-bit base" if lb == 2 else "")))
        comps.append(Component(f"LoRA gradients ({short})", lb * n_lora))
        comps.append(Component(f"AdamW states ({short} ×2)", 2 * lb * n_lora,
                               "exp_avg and exp_avg_sq, in the weights' dtype"))

        trace = self.train_trace(ft, b, s)
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
        comps.append(Component(f"activations (batch {b} × {s} tokens)", act, act_note))

        head_saved, head_scratch = self._loss_head(ft, trace, b, s, worst.labelled, dtype, autocast)
        comps.append(Component("loss head saved (TRL chunked log-probs)", head_saved,
                               f"hidden states of the {worst.labelled} labelled positions + per-token statistics"))
        # Backward starts at the head (its tiles and fp32 grad of the hidden states), then runs each layer's
        # backward with that layer's saved tensors still alive: ~2× its largest tensor plus gradients of the
        # residual stream. Both come on top of everything saved; the larger one is the peak.
        residual_grad = 2 * b * s * shape.hidden_size * trace.hidden_dtype_bytes
        layer_scratch = 2 * trace.largest_in_layer + residual_grad
        comps.append(Component("backward scratch", max(head_scratch, layer_scratch),
                               f"max(loss-head tiles {head_scratch / MIB:.0f} MiB, layer backward "
                               f"{layer_scratch / MIB:.0f} MiB)"))
        mixed = f"{autocast} autocast" if autocast else "no autocast"
        notes.append(f"padded length {s}: {worst.why}")
        notes.append(f"{shape.architecture}, {shape.attn_implementation} attention, load {dtype}, {mixed}")
        if shape.attn_implementation == "eager":
            notes.append("eager attention keeps batch × heads × length² scores per layer: gradient checkpointing "
                         "or a shorter max_length helps most")
        varying = not (ft.group_by_length or ft.packing)
        return StageEstimate("finetune", comps, notes, settings={
            "base_precision": ft.base_precision, "batch_size": b, "grad_accum": ft.grad_accum,
            "max_length": ft.max_length, "padded_length": s, "labelled_tokens": worst.labelled,
            "gradient_checkpointing": ft.gradient_checkpointing, "lora_r": ft.lora.r, "lora_params": n_lora,
            "precision": autocast or dtype}, slack=FINETUNE_VARYING_SLACK if varying else FINETUNE_SLACK)

    def _loss_head(self, ft, trace: Trace, b: int, s: int, n: int, dtype: str, autocast) -> tuple[int, int]:
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
        h, vocab = self.shape.hidden_size, self.shape.vocab_size
        hb = trace.hidden_dtype_bytes
        cb = dtype_bytes(autocast or dtype)  # compute dtype of the tiles
        # k-bit under fp16/fp32 training: the head was upcast to fp32 (stages.finetune.prepare_kbit_base)
        head_dtype = "float32" if ft.base_precision != "none" and self.kbit_upcast(ft) else dtype
        saved = n * h * hb + n * 8 + 2 * n * 4 + 2 * n * 8 + b * (s - 1)
        tile_t, tile_v = min(n, TRL_TOKEN_TILE), min(vocab, TRL_VOCAB_TILE)
        tiles = tile_t * tile_v * cb  # mm_buf
        tiles += tile_v * h * cb if dtype_bytes(head_dtype) != cb else 0  # weight[start:end].to(compute)
        tiles += tile_t * h * cb if hb != cb else 0  # hidden[token_start:token_end].to(compute)
        forward = TRL_PER_TOKEN_FP32 * n * 4 + tiles
        backward = n * h * 4 + n * h * hb + tiles  # grad_hidden fp32 accumulator, then .to(hidden dtype)
        return saved, max(forward, backward)

    def merge(self) -> StageEstimate:
        """The merge stage as kubetune.stages.merge runs it: with verification on, the base is loaded, merged and
        checked in fp32 (a bf16 check cannot tell a correct merge from a broken one), then cast to merge.dtype."""
        recipe, shape = self.recipe, self.shape
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
        check = self.scratch(1, length, cb, all_logits=True) if verify else 0
        # Module.to(merge.dtype) converts one parameter at a time: the largest one exists in both dtypes at once.
        cast = max(shape.params.values()) * dtype_bytes(dtype) if compute != dtype else 0
        comps.append(Component("scratch", max(merge_scratch, check, cast),
                               f"max(B·A of the largest layer {merge_scratch / MIB:.0f} MiB, verification forward "
                               f"of {length} tokens {check / MIB:.0f} MiB, cast of the largest tensor to {dtype} "
                               f"{cast / MIB:.0f} MiB)"))
        return StageEstimate("merge", comps, ["measured on an H200 in its own process: within 7% (bench/RESULTS.md)"],
                             settings={"dtype": dtype, "verify": verify})

    def calibration_length(self) -> tuple[int, str]:
        """(padded length of the longest calibration batch, why). GPTQModel pads each batch to its longest row
        (gptqmodel/utils/calibration.py, ``prepare_calibration_dataset`` → ``collate_data``); the rows are the
        first ``calibration.samples`` of the split, prompt + answer + eos, cut at ``calibration.max_length``
        (kubetune.stages.quantize.calibration_examples). Without readable training rows: max_length."""
        cal = self.recipe.quantize.calibration
        if cal.source != "train":
            return cal.max_length, f"max_length {cal.max_length} (calibration on the eval split: rows not read)"
        found, reason = self.training_rows()
        if found is None or not found.total:
            return cal.max_length, f"max_length {cal.max_length} (worst case: {reason})"
        longest = min(cal.max_length, max(found.total[:cal.samples]))
        return longest, f"{longest} tokens: the longest of the first {cal.samples} training rows"

    def quantize_loop(self, length: int) -> list[Component]:
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
        shape, q = self.shape, self.recipe.quantize
        dtype = self.recipe.merge.dtype  # GPTQModel.load(dtype=merge.dtype) in the quantize stage
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
        scratch = self.scratch(b, length, db)
        upcast = b * shape.num_heads * length ** 2 * 4 if self.keeps_scores() and dtype == "bfloat16" else 0
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

    def quantize(self) -> StageEstimate:
        """The quantize stage's peak: the larger of GPTQModel's layer loop and the reload check that follows it
        in the same process (kubetune.stages.quantize.run: ``_quantize`` releases GPTQModel's model with
        ``variants.release`` before ``load_quantized`` reads the saved checkpoint back through transformers, so
        the two never hold the GPU together)."""
        recipe, shape = self.recipe, self.shape
        q = recipe.quantize
        dtype = recipe.merge.dtype
        length, why = self.calibration_length()
        loop = self.quantize_loop(length)
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

    def infer_model(self, name: str, batch: int) -> StageEstimate:
        recipe, shape = self.recipe, self.shape
        ft = recipe.finetune
        length = ft.max_length + recipe.infer.max_new_tokens
        comps: list[Component] = []
        if name == "base":
            dtype = self.model_dtype
            comps.append(Component(f"weights: base ({dtype})", shape.total_params * dtype_bytes(dtype)))
        elif name == "adapter":
            dtype = self.model_dtype
            qb, rest = weight_bytes(shape, dtype, ft.base_precision, ft.bnb.double_quant)
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
        kv_dtype = dtype
        kv = self.kv_cache(kv_dtype, batch, length)
        comps.append(Component(f"KV cache ({batch} × {length} tokens)", kv,
                               f"prompt ≤ finetune.max_length {ft.max_length} + {recipe.infer.max_new_tokens} new"))
        db = dtype_bytes(kv_dtype)
        prefill = self.scratch(batch, ft.max_length, db)
        comps.append(Component("prefill scratch", prefill, "one layer's working set + logits"))
        return StageEstimate("infer", comps, [f"model '{name}'"], settings={"model": name, "batch_size": batch})

    def infer(self, batch: int | None = None) -> StageEstimate:
        """The infer stage loads its models one after another: its peak is the largest of them."""
        batch = batch or self.recipe.infer.batch_size
        models = self.recipe.infer.models or ["base"]
        worst = max((self.infer_model(m, batch) for m in models), key=lambda e: e.allocated_bytes)
        others = [m for m in models if m != worst.settings["model"]]
        worst.notes = [f"largest of {', '.join(models)}: '{worst.settings['model']}'"
                       + (f" (the others need less)" if others else "")]
        return worst
