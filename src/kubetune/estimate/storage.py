"""Bytes of a model's weights in the storage formats the stages hold them in: bitsandbytes' 4-bit and LLM.int8
(the fine-tune's k-bit base, the adapter's inference), GPTQModel's packed layers (quantize, infer), peft's LoRA
matrices (fine-tune, merge, infer). Each is written after the library code that stores it; the tests compare
each with the real library's tensors."""

from __future__ import annotations

import math

from kubetune.estimate.components import dtype_bytes
from kubetune.estimate.modelshape import Linear, ModelShape

# bitsandbytes 0.50 4-bit storage (functional.quantize_4bit): two weights per byte, one absmax per 64 weights
# (fp32, or with double quantization uint8 + one fp32 per 256 blocks + a 256-entry fp32 code), a 16-entry code.
NF4_BLOCK = 64
NF4_DQ_BLOCK = 256


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


# torchao's formats (finetune.base_quantizer: torchao; kubetune.torchao_base) store within 0.1 % of these for layers
# of a million weights or more (tests/test_estimate.py), so they are reused: NF4Tensor = 4 bits a weight, an int8
# absmax per 64 weights and one 16-bit factor per block of 256 absmaxes (bitsandbytes' double-quantized nf4: the
# same with fp32 factors and a 256-entry code); Int8Tensor = int8 weights, an fp32 scale and an int8 zero point per
# output row (LLM.int8: the same without the zero point).
def double_quantized(finetune_section) -> bool:
    """Whether a 4-bit base's absmax scales are quantized too: bnb.double_quant for bitsandbytes, always in torchao."""
    return finetune_section.bnb.double_quant or finetune_section.base_quantizer == "torchao"


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
