"""Loading the recipe's base model and tokenizer: dtype, device, bitsandbytes or torchao, GGUF, remote code, and the
errors a user can act on. Every stage loads the base through here so that they agree.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from kubetune.errors import ModelError

log = logging.getLogger(__name__)


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str):
    """``auto`` → bfloat16 on a GPU that has it, float16 on older GPUs, float32 on CPU."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


# Weight files that are Python pickles: loading one can run code (torch.load's weights_only narrows, not removes,
# that risk). Models are loaded from safetensors only, unless the recipe sets model.allow_pickle.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_warned_remote_code: set[str] = set()


def _source(model_section) -> tuple[str, dict]:
    kwargs = {"trust_remote_code": model_section.trust_remote_code}
    if model_section.trust_remote_code and model_section.name_or_path not in _warned_remote_code:
        _warned_remote_code.add(model_section.name_or_path)
        log.warning("model.trust_remote_code is on: Python code shipped with %s runs in this process with its "
                    "access to the volume and the token; keep it on only for models whose authors you trust",
                    model_section.name_or_path)
    if model_section.revision:
        kwargs["revision"] = model_section.revision
    if model_section.gguf_file:
        kwargs["gguf_file"] = model_section.gguf_file
    name = model_section.name_or_path
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise ModelError(f"model.name_or_path: folder '{name}' not found")
    if looks_local and model_section.gguf_file and not (path / model_section.gguf_file).is_file():
        raise ModelError(f"model.gguf_file: '{model_section.gguf_file}' not found in {name}")
    if looks_local and not model_section.gguf_file and not (path / "config.json").is_file():
        raise ModelError(f"model.name_or_path: '{name}' has no config.json (not a transformers model folder; "
                         "for a .gguf file set model.gguf_file or run `kubetune import-gguf`)")
    if looks_local and not model_section.gguf_file and not model_section.allow_pickle:
        _refuse_pickle_only(path, name)
    return (str(path) if looks_local else name), kwargs


def _refuse_pickle_only(path: Path, name: str) -> None:
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.name != "training_args.bin")
    if pickles:
        raise ModelError(f"model.name_or_path: '{name}' holds its weights only as pickle files ({', '.join(pickles)}), "
                         "which can run code when loaded; convert them to safetensors, or set model.allow_pickle: "
                         "true if you trust where they come from")


def _translate(exc: Exception, name: str, what: str) -> ModelError:
    text = str(exc)
    if "no file named model.safetensors" in text or "does not appear to have a file named model.safetensors" in text:
        return ModelError(f"model.name_or_path: {name} has no safetensors weights (pickle weights such as "
                          "pytorch_model.bin can run code when loaded: refused unless model.allow_pickle: true)")
    if "trust_remote_code" in text:
        return ModelError(f"model.trust_remote_code: {name} needs custom code from its repository; set it to true "
                          "only if you trust the model's authors")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return ModelError(f"model.name_or_path: cannot load {what} from '{name}': {first}")


def load_tokenizer(model_section, path: str | Path | None = None):
    """Tokenizer of the base (or of ``path``, a saved stage output), with a pad token and left padding off."""
    from transformers import AutoTokenizer

    if path is None:
        name, kwargs = _source(model_section)
    else:
        name, kwargs = str(path), {"trust_remote_code": model_section.trust_remote_code}
    try:
        tok = AutoTokenizer.from_pretrained(name, **kwargs)
    except Exception as exc:
        raise _translate(exc, name, "the tokenizer") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # batching needs one; the attention mask keeps it out of the loss
    return tok


def upcasts_kbit_rest(training_precision: str) -> bool:
    """Whether a fine-tune in ``training_precision`` (bf16/fp16/fp32) turns a 4/8-bit base's 16-bit rest (norms,
    embeddings, lm_head) into fp32. peft's QLoRA preparation does, to protect fp16's narrow range; bf16 has fp32's
    range, and the upcast costs 4 bytes per parameter of those layers (BLOOM-7B1's embedding: 1.9 → 3.8 GiB)."""
    return training_precision != "bf16"


def bnb_config(finetune_section, compute_dtype):
    """BitsAndBytesConfig for finetune.base_precision 4bit/8bit with bitsandbytes, or None (none, or torchao)."""
    if finetune_section.base_precision == "none" or finetune_section.base_quantizer != "bitsandbytes":
        return None
    from transformers import BitsAndBytesConfig

    if finetune_section.base_precision == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    bnb = finetune_section.bnb
    cdtype = compute_dtype if bnb.compute_dtype == "auto" else resolve_dtype(bnb.compute_dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=bnb.quant_type,
                              bnb_4bit_use_double_quant=bnb.double_quant, bnb_4bit_compute_dtype=cdtype)


def load_finetune_base(model_section, finetune_section, *, dtype, on: str | None = None):
    """The base as the fine-tune trains on it (and the adapter is evaluated on): in ``dtype``, or with its linear
    layers in 4/8 bits by finetune.base_quantizer: bitsandbytes while loading, torchao right after a 16-bit load
    (kubetune.torchao_base)."""
    precision = finetune_section.base_precision
    if precision == "none" or finetune_section.base_quantizer == "bitsandbytes":
        return load_base_model(model_section, dtype=dtype, quantization_config=bnb_config(finetune_section, dtype),
                               on=on)
    from kubetune import torchao_base

    # Loaded into host memory and quantized one layer at a time on the device, as bitsandbytes quantizes while
    # loading: the whole 16-bit model on the GPU first would be the stage's peak (bloom-7b1: 13 GiB, for an 8.9 GiB
    # fine-tune).
    with plain_linear_layers():  # Falcon's layers as nn.Linear: the layers bitsandbytes would quantize
        model = load_base_model(model_section, dtype=dtype, on="cpu")
    dev = on or device()
    torchao_base.quantize_base(model, precision, dev)
    model.to(dev)
    check_kbit_quantized(model, precision, model_section.name_or_path)
    return model


def load_base_model(model_section, *, dtype=None, quantization_config=None, path: str | Path | None = None,
                    on: str | None = None):
    """The base causal LM on this machine's device (or ``on``: "cpu" for a model FSDP shards onto the GPUs
    afterwards). ``path`` loads a saved stage output instead of the base."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or resolve_dtype(model_section.dtype)
    if path is None:
        name, kwargs = _source(model_section)
    else:
        name, kwargs = str(path), {"trust_remote_code": model_section.trust_remote_code}
    dev = on or device()
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if path is not None or not (model_section.gguf_file or model_section.allow_pickle):
        kwargs["use_safetensors"] = True  # a (hub) model without safetensors fails instead of being unpickled
    kbit = type(quantization_config).__name__ == "BitsAndBytesConfig"
    try:
        with plain_linear_layers(enabled=kbit):
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, device_map={"": dev}, **kwargs)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:
        raise _translate(exc, name, "the model") from None
    if kbit:  # every k-bit load, whichever stage asked
        check_kbit_quantized(model, "8bit" if quantization_config.load_in_8bit else "4bit", name)
        if quantization_config.load_in_8bit:
            detach_int8_output_views(model)
    if getattr(model, "hf_quantizer", None) is not None and model_section.gguf_file and path is None:
        # GGUF weights arrive dequantized; drop the quantizer so the model can be saved and trained normally.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


# nn.Linear subclasses whose forward is exactly nn.Linear's (x @ W.T + b), built by these architectures.
# transformers' bitsandbytes integration replaces only modules whose type *is* nn.Linear, so these layers would
# stay 16-bit under a 4/8-bit load (falcon-7b "8-bit": 12.9 GiB of bf16 weights, bench/results/gpu-h200-*.md).
# Built as plain nn.Linear while loading, they are quantized; the computation is the same matmul plus bias.
AFFINE_LINEAR_SUBCLASSES = (("transformers.models.falcon.modeling_falcon", "FalconLinear"),)


@contextlib.contextmanager
def plain_linear_layers(enabled: bool = True):
    """While loading, build the layers named in AFFINE_LINEAR_SUBCLASSES as plain nn.Linear (see there)."""
    if not enabled:
        yield
        return
    import importlib

    import torch

    swapped = []
    try:
        for module_name, class_name in AFFINE_LINEAR_SUBCLASSES:
            module = importlib.import_module(module_name)
            swapped.append((module, class_name, getattr(module, class_name)))
            setattr(module, class_name, torch.nn.Linear)
        yield
    finally:
        for module, class_name, original in swapped:
            setattr(module, class_name, original)


def detach_int8_output_views(model) -> None:
    """Give every 8-bit layer's output its own storage while gradients are recorded.

    bitsandbytes' int8 matmul returns a view made inside its autograd Function; a model that then adds into that
    output in place (Falcon's parallel attention: ``mlp_output += attention_output``) fails in the forward with
    "Output 0 of MatMul8bitLtBackward is a view and is being modified inplace" whenever the layer is not wrapped
    by LoRA (e.g. target_modules [query_key_value]: measured on falcon-7b, bench/results). The copy costs one
    output tensor per 8-bit layer and only where it is a view and autograd is on, not in inference.
    """
    def own_storage(module, inputs, output):
        if getattr(output, "requires_grad", False) and output._is_view():
            return output.clone()
        return None

    for module in model.modules():
        if type(module).__name__ == "Linear8bitLt":
            module.register_forward_hook(own_storage)


def check_kbit_quantized(model, base_precision: str, name: str) -> None:
    """Fail when a 4/8-bit load quantized nothing.

    transformers' bitsandbytes integration replaces modules whose type is exactly ``nn.Linear``; a model that
    builds its layers from another subclass than those AFFINE_LINEAR_SUBCLASSES lists silently stays 16-bit and
    then trains as a full-size model.
    """
    if base_precision == "none":
        return
    import torch

    quantized = [n for n, m in model.named_modules() if is_quantized_linear(m)]
    plain = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and not is_quantized_linear(m) and not n.endswith("lm_head")]
    if not quantized:
        kinds = sorted({type(m).__name__ for n, m in model.named_modules() if n in set(plain)})
        raise ModelError(f"finetune.base_precision: {base_precision} quantized none of {name}'s linear layers "
                         f"(they are {kinds}, which neither bitsandbytes nor torchao replaces); use "
                         "base_precision: none")
    if plain:
        log.warning("%d linear layers of %s stay unquantized (e.g. %s)", len(plain), name, plain[0])


def is_quantized_linear(module) -> bool:
    """A bitsandbytes 4/8-bit layer, or a linear layer whose weight is a torchao NF4/int8 tensor."""
    from kubetune.torchao_base import is_quantized_weight

    return (type(module).__name__ in ("Linear4bit", "Linear8bitLt")
            or is_quantized_weight(getattr(module, "weight", None)))


def mask_reads_position_ids(model) -> bool:
    """Whether the model's attention mask keeps packed examples apart: one forward of 4 tokens packed as two
    examples (position_ids 0 1 0 1, no attention_mask), watching for transformers' mask builder to derive
    per-example blocks from the restarting positions. BLOOM's never gets position_ids. Works on the meta device
    (the estimator's model) as on a loaded one."""
    import torch
    from transformers import masking_utils

    seen = []
    find_blocks = masking_utils.find_packed_sequence_indices

    def watched(position_ids):
        seen.append(True)
        return None if position_ids.is_meta else find_blocks(position_ids)

    device = next(model.parameters()).device
    masking_utils.find_packed_sequence_indices = watched
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 4), dtype=torch.long, device=device),
                  position_ids=torch.tensor([[0, 1, 0, 1]], device=device), use_cache=False)
    finally:
        masking_utils.find_packed_sequence_indices = find_blocks
    return bool(seen)


def packing_refused(model_name: str, architecture: str, attn_implementation: str):
    from kubetune.errors import RecipeError

    return RecipeError("recipe", [
        f"finetune.packing: {model_name} ({architecture}, {attn_implementation} attention) would attend across "
        "packed examples: its attention mask ignores position_ids; use finetune.group_by_length instead"])
