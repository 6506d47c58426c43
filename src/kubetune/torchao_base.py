"""torchao as the library that holds a 4-bit or 8-bit frozen base (finetune.base_quantizer: torchao).

The base is loaded in its 16-bit dtype, then the decoder's linear layers are quantized in place: the layers that
bitsandbytes would replace (type exactly ``nn.Linear``, Falcon's FalconLinear built as one while loading, never the
output head or what transformers keeps out of quantization), each weight swapped for a torchao tensor:

* 4bit: ``NF4Tensor`` (torchao.quantization.to_nf4), the QLoRA data type as torchtune's QLoRA uses it: absmax
  scales per block of 64 weights, the scales themselves quantized to int8 in blocks of 256. Its ``F.linear``
  dequantizes to the input's dtype and, through its own autograd Function, keeps only the NF4 weight for the
  input gradient.
* 8bit: torchao's int8 weight-only ``Int8Tensor`` (one scale per output row; Int8WeightOnlyConfig). Its linear
  converts the int8 matrix to the activations' dtype and multiplies; autograd would keep that 16-bit copy of
  every weight until the backward (measured: one bf16 weight-sized tensor per layer), so the forward here goes
  through :class:`Int8WeightOnlyLinear`, which keeps the int8 weight and converts again in the backward.

Both are tensor subclasses that torch.compile traces (bitsandbytes' layers are opaque kernels to it), so under
finetune.compile the dequantize becomes part of the compiled step. peft wraps these layers with its own LoRA
layers (lora.Linear for NF4, TorchaoLoraLinear for Int8Tensor); the adapter is never merged into them: the merge
stage loads the base unquantized.
"""

from __future__ import annotations

import functools

# NF4: weights per absmax scale, and scales per block of their own (int8) quantization; QLoRA's and torchtune's
NF4_BLOCK = 64
NF4_SCALER_BLOCK = 256
# What the weight of a torchao-quantized linear layer is, by class name: the key count_parameters reports it under
QUANTIZED_WEIGHTS = {"NF4Tensor": "nf4", "Int8Tensor": "int8"}


def quantize_base(model, base_precision: str, device=None) -> None:
    """Quantize ``model``'s decoder linears in place: 4bit → NF4, 8bit → int8 weight-only (module docstring), each
    on ``device`` (its quantized weight stays there; the rest of the model is left where it is). Layers NF4 cannot
    hold (a weight whose size is not a multiple of 64) stay 16-bit; check_kbit_quantized names them."""
    quantize_linears(model, linear_layers_to_quantize(model), base_precision, device)


def quantize_linears(model, names, base_precision: str, device=None) -> None:
    """Quantize the nn.Linear modules ``names`` of ``model`` in place (see quantize_base)."""
    import torch

    names = set(names)
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name not in names or (base_precision == "4bit" and weight.numel() % NF4_BLOCK):
            continue
        if device is not None:
            module.to(device)
        if base_precision == "4bit":
            from torchao.quantization import to_nf4

            blocks = weight.numel() // NF4_BLOCK
            nf4 = to_nf4(module.weight.detach().contiguous(), NF4_BLOCK, scaler_block_size(blocks))
            module.weight = torch.nn.Parameter(nf4, requires_grad=False)
        else:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            quantize_(module, Int8WeightOnlyConfig())
            module.forward = _int8_forward(module)


def linear_layers_to_quantize(model) -> list[str]:
    """The modules bitsandbytes would replace under a 4/8-bit load (transformers' replace_with_bnb_linear): type
    exactly nn.Linear, outside transformers' modules_to_not_convert (output embeddings, tied weights, the last
    module, the model's _keep_in_fp32_modules)."""
    import torch
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
    return [name for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and should_convert_module(name, skip)]


def scaler_block_size(blocks: int) -> int:
    """NF4's scales are quantized in blocks that must divide their count: 256 where it does (every 2ⁿ-wide layer),
    else the largest divisor below it (falcon-7b's 4544-wide layers: 146). A smaller block gives its scales finer
    quantization for a few more bytes (one scale factor per block)."""
    return max(d for d in range(1, min(NF4_SCALER_BLOCK, blocks) + 1) if blocks % d == 0)


def is_quantized_weight(tensor) -> bool:
    return type(tensor).__name__ in QUANTIZED_WEIGHTS and type(tensor).__module__.startswith("torchao.")


def _int8_forward(module):
    import torch

    function = _int8_linear_function()

    def forward(x):
        if torch.is_grad_enabled() and x.requires_grad:  # the input gradient needs W: keep it in int8
            out = function.apply(x, module.weight)
        else:  # nothing is kept for a backward: torchao's own linear
            out = torch.nn.functional.linear(x, module.weight)
        return out if module.bias is None else out + module.bias

    return forward


@functools.cache
def _int8_linear_function():
    """The autograd Function of a frozen int8 weight-only linear: built on first use (importing torch at module load
    would slow every command that imports modelio)."""
    import torch

    class Int8WeightOnlyLinear(torch.autograd.Function):
        """y = x Wᵀ with W an Int8Tensor that needs no gradient: keeps W (1 byte a weight) for the backward, not
        the 16-bit copy torchao's linear makes, and converts it again there."""

        @staticmethod
        def forward(ctx, x, weight):
            ctx.save_for_backward(weight)
            out = torch.nn.functional.linear(x, weight)
            # torchao returns a view (a reshape of its product), and autograd forbids modifying a custom
            # Function's view output in place, which Falcon does (``mlp_output += attention_output``): a copy of
            # the output (not of the weight; asking _is_view() would break torch.compile's graph)
            return out.clone()

        @staticmethod
        def backward(ctx, grad):
            (weight,) = ctx.saved_tensors
            return grad @ weight.dequantize(grad.dtype), None

    return Int8WeightOnlyLinear
