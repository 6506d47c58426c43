"""Activation memory by tracing: run the model's own forward on the meta device and add up what autograd keeps.

Every tensor that autograd saves for the backward pass goes through ``saved_tensors_hooks``; on the meta device
the forward costs no memory and no arithmetic (a 7B model in a fraction of a second), yet the saved tensors
have their real shapes and dtypes. Counting each storage once (views share one) and leaving out the parameters
gives the activation memory of exactly the code that will run, whatever the architecture (Bloom's fp32
attention probabilities, Llama's fp32 RMSNorm copies, Falcon's parallel attention).

Four things differ on a GPU and are emulated here, each mirroring the code it stands for:

* **Mixed precision**: the Trainer runs the forward under CUDA autocast, which casts matmul inputs to bf16 and
  runs layer_norm/softmax/log_softmax in fp32. Meta tensors have no autocast, so the emulation applies
  the CUDA autocast policy (``aten/src/ATen/autocast_mode.cpp``) to the same functions.
  ``GpuEmulation`` (a TorchFunctionMode) does this and the next point.
* **Fused kernels**: on a GPU ``scaled_dot_product_attention`` runs the flash / memory-efficient kernels, which
  keep q, k, v, the output and an fp32 log-sum-exp per query (never the seq × seq matrix), when torch's backend
  rules allow them (same number of key/value heads as query heads, or flash with enable_gqa); otherwise its
  math backend runs, on meta as on the GPU. Dropout runs CUDA's fused kernel, which keeps a bool mask where the
  unfused CPU path keeps a float noise tensor. ``target="cpu"`` switches both to the CPU's behaviour, so the
  tests can compare the trace with real CPU runs.
* **bitsandbytes layers** (QLoRA / 8-bit base): weights cannot be quantized on meta. ``MatMul4Bit`` saves no
  activation (it dequantizes in backward); ``MatMul8bitLt`` keeps its input A in ``ctx.tensors`` whenever the
  input needs a gradient (bitsandbytes 0.50 ``autograd/_functions.py``), where gradient checkpointing cannot
  reach it. Emulated by ``QuantLinear``; the inputs it keeps are reported per layer (``Trace.int8_held``).
  torchao's NF4 and int8 layers (kubetune.torchao_base) save no activation either, at 4 or 8 bits.
* **LoRA**: peft cannot be imported in under 5 s (it pulls torchao). ``Lora`` repeats peft 0.21's
  ``lora.Linear.forward`` (cast x to the adapter's fp32, dropout, A, B, scale, add) and its bitsandbytes
  variants (no cast under autocast; 4-bit clones the base output).

The loss head is not traced: TRL's SFTTrainer projects hidden states through the LM head in tiles and never
builds the batch × length × vocabulary logits; :mod:`kubetune.estimate.finetune` counts it from TRL's code.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

# ---- results ---------------------------------------------------------------------------------------------------


@dataclass
class Trace:
    """Bytes autograd keeps after one training forward of the backbone (the decoder without its LM head)."""

    per_layer: list[int]
    """Saved bytes first saved while decoder layer i ran."""
    outside: int
    """Saved bytes of the embeddings, final norm and anything shared between layers (rotary tables, masks)."""
    layer_input: list[int]
    """Bytes of each layer's hidden-state input: what gradient checkpointing keeps per layer."""
    largest_in_layer: int
    """The largest single saved tensor of any layer (a measure of backward's scratch)."""
    hidden_dtype_bytes: int
    """Element size of the backbone's output hidden states (fp32 when QLoRA upcasts the norms)."""
    by_kind: dict[str, int] = field(default_factory=dict)
    """Saved bytes by dtype, for the breakdown."""
    math_attention: bool = False
    """SDPA fell back to its math backend (e.g. multi-query without enable_gqa): it keeps length² scores."""
    int8_held: list[int] = field(default_factory=list)
    """Per layer, the bytes of inputs that bitsandbytes' 8-bit matmuls keep. They sit in ``ctx.tensors``, out of
    reach of gradient checkpointing's hooks, so a checkpointed 8-bit fine-tune keeps them all the same."""

    @property
    def saved(self) -> int:
        return self.outside + sum(self.per_layer)


@dataclass(frozen=True)
class TrainSetup:
    """How the fine-tune holds the model: everything the trace depends on besides batch and length."""

    dtype: Any
    """torch dtype the model is loaded in (bf16 on GPUs with ``auto``)."""
    base_precision: str  # none | 8bit | 4bit
    compute_dtype: Any
    """bitsandbytes 4-bit compute dtype."""
    lora_targets: tuple[str, ...]
    lora_r: int
    lora_dropout: float
    autocast: Any
    """torch dtype of mixed precision (bf16/fp16), or None for pure fp32/bf16 training."""
    lora_dtype: Any = None
    """dtype of the adapter weights: fp32 (peft's autocast_adapter_dtype), bf16 on a k-bit base (TRL converts)."""
    quantizer: str = "bitsandbytes"
    """finetune.base_quantizer: which library's layers hold the k-bit base."""


# ---- emulated layers -------------------------------------------------------------------------------------------
_INT8_HELD: list[int] | None = None
"""Storages the emulated 8-bit matmuls keep, collected by :func:`trace_backbone` while it runs."""


@functools.lru_cache(maxsize=1)
def _emulation_classes():
    """Defined inside a function: the module must import without torch (``kubetune --help`` stays fast)."""
    import torch
    import torch.nn.functional as F

    class QuantMatmul(torch.autograd.Function):
        """Output of a bitsandbytes matmul with a frozen weight; saves A only for 8-bit (see module docstring)."""

        @staticmethod
        def forward(ctx, x, out_features: int, save_input: bool):
            ctx.in_shape = x.shape
            if save_input and x.requires_grad:
                ctx.save_for_backward(x)
                if _INT8_HELD is not None:
                    _INT8_HELD.append(x.untyped_storage()._cdata)
            return x.new_empty((*x.shape[:-1], out_features))

        @staticmethod
        def backward(ctx, grad):
            # Shape-only, like everything on meta: the estimate never runs backward; defined for completeness.
            return grad.new_empty(ctx.in_shape), None, None

    class QuantLinear(torch.nn.Module):
        """bitsandbytes Linear4bit / Linear8bitLt forward: cast to the compute dtype (4-bit), matmul, cast back.
        torchao's (``bits`` None: peft then wraps it as a plain lora.Linear): NF4's LinearNF4 and kubetune's
        Int8WeightOnlyLinear keep only the weight, no activation, and compute in the input's dtype."""

        def __init__(self, in_features: int, out_features: int, bits: int | None, compute_dtype):
            super().__init__()
            self.in_features, self.out_features, self.bits = in_features, out_features, bits
            self.compute_dtype = compute_dtype

        def forward(self, x):
            if self.bits is None:
                return QuantMatmul.apply(x, self.out_features, False)
            if self.bits == 4:
                inp_dtype = x.dtype
                x = x.to(self.compute_dtype)  # Linear4bit.forward
                return QuantMatmul.apply(x, self.out_features, False).to(inp_dtype)
            return QuantMatmul.apply(x, self.out_features, True)

    class Lora(torch.nn.Module):
        """peft 0.21 ``lora.Linear`` / ``lora.bnb.Linear8bitLt`` / ``Linear4bit`` forward, adapter in fp32."""

        def __init__(self, base, in_features: int, out_features: int, r: int, dropout: float, autocast: bool,
                     dtype=torch.float32):
            super().__init__()
            self.base_layer = base
            self.lora_A = torch.nn.Linear(in_features, r, bias=False, dtype=dtype)
            self.lora_B = torch.nn.Linear(r, out_features, bias=False, dtype=dtype)
            self.p = dropout
            self.bnb_bits = getattr(base, "bits", None)
            self.autocast = autocast

        def _path(self, x):
            h = F.dropout(x, self.p, training=True) if self.p > 0 else x  # peft uses nn.Identity for p = 0
            return self.lora_B(self.lora_A(h)) * 2.0  # the scale's value does not change memory

        def forward(self, x, *args, **kwargs):
            result = self.base_layer(x, *args, **kwargs)
            dtype = self.lora_A.weight.dtype
            if self.bnb_bits is None:
                torch_result_dtype = result.dtype
                x = x if x.dtype == dtype else x.to(dtype)  # _cast_input_dtype
                return (result + self._path(x)).to(torch_result_dtype)
            if self.bnb_bits == 4:
                result = result.clone()  # "defensively clone" (peft lora/bnb.py)
            if self.autocast:  # requires_conversion = not torch.is_autocast_enabled()
                return result + self._path(x)
            expected = result.dtype
            x = x if x.dtype == dtype else x.to(dtype)
            return result + self._path(x).to(expected)

    class FusedDropout(torch.autograd.Function):
        """CUDA's fused dropout (native_dropout) keeps a bool mask; the unfused CPU/meta path keeps a float noise
        tensor of the input's dtype instead (1 vs 2-4 bytes per element)."""

        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x.new_empty(x.shape, dtype=torch.bool))
            return x.new_empty(x.shape)

        @staticmethod
        def backward(ctx, grad):
            return grad.new_empty(grad.shape)

    class FusedAttention(torch.autograd.Function):
        """What flash / memory-efficient SDPA keeps: q, k, v, output, fp32 log-sum-exp (and the mask if any)."""

        @staticmethod
        def forward(ctx, q, k, v, mask):
            out = q.new_empty((*q.shape[:-1], v.shape[-1]))
            lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse, *(() if mask is None else (mask,)))
            ctx.shapes = (q.shape, k.shape, v.shape)
            return out

        @staticmethod
        def backward(ctx, grad):
            qs, ks, vs = ctx.shapes
            return grad.new_empty(qs), grad.new_empty(ks), grad.new_empty(vs), None

    return QuantLinear, Lora, FusedAttention, FusedDropout


TARGETS = ("cuda", "cpu")
"""Which device's kernels to emulate. ``cuda`` for estimates; ``cpu`` lets the tests compare with real CPU runs."""


def _gpu_emulation_mode(autocast_dtype, fused_attention: bool, target: str = "cuda"):
    """A TorchFunctionMode applying CUDA autocast's cast policy, and the saved tensors of the fused SDPA and
    dropout kernels of ``target``."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    _, _, FusedAttention, FusedDropout = _emulation_classes()
    T = torch.Tensor
    # CUDA autocast, lower_precision_fp list (the functions transformers and peft call).
    lower = {F.linear, torch.matmul, T.matmul, T.__matmul__, torch.bmm, T.bmm, torch.baddbmm, T.baddbmm,
             torch.addmm, T.addmm, torch.mm, T.mm, torch.einsum, torch.addbmm, F.conv1d}
    # CUDA autocast, fp32 list and fp32_set_opt_dtype list (softmax family: fp32 unless a dtype is given).
    fp32 = {F.layer_norm, F.group_norm, torch.rsqrt, T.rsqrt, torch.exp, T.exp, torch.pow, T.pow, F.softplus,
            F.cross_entropy, F.nll_loss, torch.log, T.log, torch.logsumexp, T.logsumexp}
    fp32_unless_dtype = {F.softmax, torch.softmax, T.softmax, F.log_softmax, torch.log_softmax, T.log_softmax,
                         torch.cumsum, T.cumsum}
    half = (torch.float16, torch.bfloat16)

    class GpuEmulation(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.cache: dict[int, Any] = {}  # autocast caches the casts of leaf weights that require grad
            self.math_attention = False

        def _cast(self, value, dtype):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype \
                    and value.dtype != torch.float64:
                if value.is_leaf and value.requires_grad:
                    key = id(value)
                    if key not in self.cache:
                        self.cache[key] = value.to(dtype)
                    return self.cache[key]
                return value.to(dtype)
            if isinstance(value, (list, tuple)):
                return type(value)(self._cast(v, dtype) for v in value)
            return value

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is T.__bool__ and args[0].is_meta:
                # Data-dependent checks in transformers' mask code ("is every position attended?", "are these
                # packed sequences?") cannot be answered on meta; answer as for unpadded, unpacked rows.
                return True
            if fused_attention and func is F.scaled_dot_product_attention:
                q, k, v = args[:3]
                if autocast_dtype is not None:
                    q, k, v = (self._cast(t, autocast_dtype) for t in (q, k, v))
                mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
                # torch's CUDA backend choice (sdp_utils.cpp): flash and memory-efficient kernels need as many
                # key/value heads as query heads, except flash with enable_gqa (no mask, 16-bit). Otherwise the
                # math backend runs, and on meta it decomposes into the same matmul/softmax ops as on the GPU.
                # The CPU flash kernel takes any dtype, masks and enable_gqa.
                same_heads = q.dim() < 4 or q.shape[-3] == k.shape[-3] == v.shape[-3]
                gqa = kwargs.get("enable_gqa", False) and (target == "cpu" or (mask is None and q.dtype in half))
                if same_heads or gqa:
                    return FusedAttention.apply(q, k, v, mask)
                self.math_attention = True
                return func(q, k, v, *args[3:], **kwargs)
            if target == "cuda" and func is F.dropout:
                x = args[0]
                p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
                training = kwargs.get("training", args[2] if len(args) > 2 else True)
                if training and 0 < p < 1 and isinstance(x, torch.Tensor) and x.requires_grad:
                    return FusedDropout.apply(x)
            if autocast_dtype is not None:
                if func in lower:
                    args, kwargs = self._cast(args, autocast_dtype), {k: self._cast(v, autocast_dtype)
                                                                       for k, v in kwargs.items()}
                elif func in fp32 or (func in fp32_unless_dtype and kwargs.get("dtype") is None):
                    args = tuple(self._cast(a, torch.float32) if isinstance(a, torch.Tensor) and a.dtype in half
                                 else a for a in args)
            return func(*args, **kwargs)

    return GpuEmulation()


# ---- preparing the model the way the fine-tune does --------------------------------------------------------------
def prepare_for_training(model, shape, setup: TrainSetup):
    """The meta model as the fine-tune holds it: bitsandbytes layers, fp32 upcast of the rest for k-bit training
    (peft's prepare_model_for_kbit_training), everything frozen, LoRA adapters on the targets."""
    import torch

    QuantLinear, Lora, _, _ = _emulation_classes()
    modules = dict(model.named_modules())
    quantized: set[str] = set()
    if setup.base_precision in ("8bit", "4bit"):
        bits = None if setup.quantizer == "torchao" else 8 if setup.base_precision == "8bit" else 4
        for lin in shape.quantizable():
            _replace(model, modules, lin.name,
                     QuantLinear(lin.in_features, lin.out_features, bits, setup.compute_dtype))
            quantized.add(lin.name)
        for p in model.parameters():  # "cast all non INT8 parameters to fp32"
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.to(torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    by_name = {lin.name: lin for lin in shape.linears}
    for name in setup.lora_targets:
        lin = by_name[name]
        with torch.device("meta"):
            wrapped = Lora(modules[name], lin.in_features, lin.out_features, setup.lora_r, setup.lora_dropout,
                           autocast=setup.autocast is not None, dtype=setup.lora_dtype or torch.float32)
        _replace(model, modules, name, wrapped)
    model.train()
    return model


def _replace(model, modules: dict, name: str, new) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(modules[parent_name] if parent_name else model, child, new)
    modules[name] = new


# ---- the trace ---------------------------------------------------------------------------------------------------
def trace_backbone(model, layers_path: str, batch: int, length: int, autocast_dtype=None,
                   target: str = "cuda", inputs_require_grad: bool = False) -> Trace:
    """Saved-tensor bytes of one training forward of ``model.base_model`` on ``batch × length`` tokens.

    ``inputs_require_grad``: the embeddings' output requires a gradient, as after ``enable_input_require_grads()``
    (TRL calls it for a PEFT model with gradient checkpointing); then layer 0 saves what every other layer does.
    """
    import torch

    backbone = model.base_model
    layers = model.get_submodule(layers_path)
    exclude = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    current: list[int | None] = [None]
    layer_input = [0] * len(layers)
    inputs: set[int] = set()  # the layers' hidden-state inputs (layer 0's is made outside, yet its own)
    saved: dict[int, tuple[int, int | None, Any]] = {}
    handles = []

    def pre_hook(index):
        def hook(module, args, kwargs):
            current[0] = index
            hs = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hs, torch.Tensor):
                layer_input[index] = hs.numel() * hs.element_size()
                inputs.add(hs.untyped_storage()._cdata)
        return hook

    def post_hook(module, args, kwargs, output):
        current[0] = None

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook, with_kwargs=True))
    if inputs_require_grad:  # transformers' enable_input_require_grads registers the same hook
        handles.append(model.get_input_embeddings().register_forward_hook(
            lambda module, args, output: output.requires_grad_(True)))

    def pack(t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in exclude and key not in saved:
            saved[key] = (storage.nbytes(), current[0], t.dtype)
        # Keep the storage alive (an address freed mid-trace could be reused and miscounted) but not the tensor
        # itself: an op's own output holds its grad_fn, a reference cycle that would never be freed.
        return t.detach()

    ids = torch.zeros((batch, length), dtype=torch.long, device="meta")
    mode = _gpu_emulation_mode(autocast_dtype, fused_attention=True, target=target)
    made_outside = _outputs_made_outside_layers(current)
    global _INT8_HELD
    _INT8_HELD = held = []
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mode, made_outside:
            out = backbone(input_ids=ids, use_cache=False)
    finally:
        _INT8_HELD = None
        for h in handles:
            h.remove()
    int8_held = [0] * len(layers)
    for key in set(held):
        if key in saved and saved[key][1] is not None:
            int8_held[saved[key][1]] += saved[key][0]
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    per_layer = [0] * len(layers)
    largest = 0
    outside = 0
    by_kind: dict[str, int] = {}
    for key, (nbytes, index, dtype) in saved.items():
        kind = str(dtype).removeprefix("torch.")
        by_kind[kind] = by_kind.get(kind, 0) + nbytes
        # Made before the layers (a mask, rotary cos/sin) and saved by whichever layer first used it: shared by
        # all layers, so it belongs outside them (else a layer standing for others would count it again).
        if index is None or (key in made_outside.keys and key not in inputs):
            outside += nbytes
        else:
            per_layer[index] += nbytes
            largest = max(largest, nbytes)
    return Trace(per_layer=per_layer, outside=outside, layer_input=layer_input, largest_in_layer=largest,
                 hidden_dtype_bytes=hidden.element_size(), by_kind=by_kind, math_attention=mode.math_attention,
                 int8_held=int8_held)


def _outputs_made_outside_layers(current: list):
    """A TorchFunctionMode collecting the storages of tensors made while no decoder layer runs (``current[0]`` is
    None): the inputs every layer shares."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves

    import torch

    class MadeOutside(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            # storage id -> the storage, held so that its id is not reused by a tensor made inside a layer
            self.keys: dict[int, object] = {}

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if current[0] is None:
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        storage = t.untyped_storage()
                        self.keys[storage._cdata] = storage
            return out

    return MadeOutside()


def kv_cache_elements(model, batch: int, length: int) -> list[int]:
    """Elements of the KV cache after ``length`` tokens, per layer (one entry in all when the cache is not kept per
    layer), read from the cache a meta forward returns (so MQA/GQA, Bloom's layout and sliding-window layers are
    whatever the model really keeps)."""
    import torch

    ids = torch.zeros((batch, length), dtype=torch.long, device="meta")
    with torch.no_grad(), _gpu_emulation_mode(None, fused_attention=False):
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    # transformers 5.2x names it ``cache`` (``past_key_values`` still works, with a deprecation warning)
    cache = out["cache"] if "cache" in out else out.past_key_values
    per_layer = getattr(cache, "layers", None)
    groups = list(per_layer) if per_layer is not None else [cache]
    seen: set[int] = set()
    counts = []
    for group in groups:
        total = 0
        for t in _tensors(group if per_layer is None else [getattr(group, n, None) for n in ("keys", "values")]):
            key = t.untyped_storage()._cdata
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes() // t.element_size()
        counts.append(total)
    return counts


def _tensors(obj, depth: int = 0):
    import torch

    if depth > 4 or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item, depth + 1)
    elif hasattr(obj, "layers"):  # transformers 5 Cache: .layers[i].keys / .values
        for layer in obj.layers:
            for name in ("keys", "values"):
                yield from _tensors(getattr(layer, name, None), depth + 1)
    elif hasattr(obj, "key_cache"):
        yield from _tensors(list(obj.key_cache) + list(obj.value_cache), depth + 1)
