"""The shared machinery of every stage's memory model, for one recipe's model: its shape (the meta build), the
saved-tensor trace of a training forward (:mod:`kubetune.estimate.trace`), the KV cache, a no-grad forward's
scratch, the training rows' padded length (:mod:`kubetune.estimate.rows`) and the disk cache that keeps what
the meta builds found (:mod:`kubetune.estimate.cache`).

Each stage's model lives in its own module, beside the others and named after the stage
(:mod:`kubetune.estimate.finetune`, ``merge``, ``quantize``, ``infer``), each with one function
``estimate_memory(est, recipe=None) -> StageEstimate`` taking this class. docs/estimator.md derives every
formula; the tests check the parts against real tensors on tiny models.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

from kubetune.estimate.components import StageEstimate, dtype_bytes
from kubetune.estimate.modelshape import ModelShape, build_meta_model, shape_of
from kubetune.estimate.trace import Trace, TrainSetup, kv_cache_elements, prepare_for_training, trace_backbone

"""Where each GPU stage's memory model lives: a module with ``estimate_memory(est, recipe=None)``."""


def memory_model(stage: str):
    """The memory model the stage registry names for ``stage`` (``kubetune.estimate.<stage>:estimate_memory`` for
    kubetune's own): ``fn(est, recipe=None) -> StageEstimate``."""
    from kubetune import registry

    return registry.resolve(registry.spec(stage).estimate)


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

    @staticmethod
    def lora_dtype(ft) -> str:
        """peft keeps adapters in fp32 (autocast_adapter_dtype); TRL's SFTTrainer converts them to bf16 on a
        quantized base, as the QLoRA paper does (trl/trainer/sft_trainer.py, ``_is_quantized_model``), and the
        fine-tune does the same on a torchao base (stages.finetune.adapters_in_bf16)."""
        return "bfloat16" if ft.base_precision != "none" else "float32"

    def train_trace(self, ft, batch: int, length: int) -> Trace:
        """The saved-tensor trace for ``batch × length``, extrapolated from the traced layers to all of them."""
        dtype, autocast = self.precision(ft)
        compute = dtype if ft.bnb.compute_dtype == "auto" else ft.bnb.compute_dtype
        targets = tuple(lin.name for lin in self.shape.lora_targets(ft.lora.target_modules))
        quantizer = ft.base_quantizer if ft.base_precision != "none" else None
        model_key = (ft.base_precision, compute, targets, ft.lora.r, ft.lora.dropout, autocast, quantizer)
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
                               lora_dtype=getattr(torch, self.lora_dtype(ft)), quantizer=ft.base_quantizer)
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

    # -- the stages ----------------------------------------------------------------------------------------------
    def estimate(self, stage: str, recipe=None) -> StageEstimate:
        """``stage``'s peak for ``recipe`` (default: the recipe this estimator was made for; what-ifs and
        suggestions pass a changed copy of it, for the same model)."""
        return memory_model(stage)(self, recipe)
