"""Loading the recipe's base model and tokenizer: dtype, device, bitsandbytes, GGUF, remote code, and the
errors a user can act on. Every stage loads the base through here so that they agree.
"""

from __future__ import annotations

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


def _source(model_section) -> tuple[str, dict]:
    kwargs = {"trust_remote_code": model_section.trust_remote_code}
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
    return (str(path) if looks_local else name), kwargs


def _translate(exc: Exception, name: str, what: str) -> ModelError:
    text = str(exc)
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


def bnb_config(finetune_section, compute_dtype):
    """BitsAndBytesConfig for finetune.base_precision 4bit/8bit, or None."""
    if finetune_section.base_precision == "none":
        return None
    from transformers import BitsAndBytesConfig

    if finetune_section.base_precision == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    bnb = finetune_section.bnb
    cdtype = compute_dtype if bnb.compute_dtype == "auto" else resolve_dtype(bnb.compute_dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=bnb.quant_type,
                              bnb_4bit_use_double_quant=bnb.double_quant, bnb_4bit_compute_dtype=cdtype)


def load_base_model(model_section, *, dtype=None, quantization_config=None, path: str | Path | None = None):
    """The base causal LM on this machine's device. ``path`` loads a saved stage output instead of the base."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or resolve_dtype(model_section.dtype)
    if path is None:
        name, kwargs = _source(model_section)
    else:
        name, kwargs = str(path), {"trust_remote_code": model_section.trust_remote_code}
    dev = device()
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, device_map={"": dev}, **kwargs)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:
        raise _translate(exc, name, "the model") from None
    if getattr(model, "hf_quantizer", None) is not None and model_section.gguf_file and path is None:
        # GGUF weights arrive dequantized; drop the quantizer so the model can be saved and trained normally.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model
