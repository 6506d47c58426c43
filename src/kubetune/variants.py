"""The four models a run can compare, loaded the same way wherever they are used (infer, evaluate, notebooks).

    base       the recipe's model, as it is
    adapter    base + the fine-tune's LoRA adapter, unmerged (the base in the precision it was trained on)
    merged     the merge stage's checkpoint (adapter folded into 16/32-bit weights)
    quantized  the quantize stage's GPTQ checkpoint, on an explicitly chosen kernel

Each comes with its tokenizer and the prompt template it was trained with (``prompt.template_for`` refuses a
recipe whose template differs). Call :func:`release` before loading the next one: two 7B models do not fit
where one does.
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

from kubetune import modelio
from kubetune.config import MODEL_PRODUCERS
from kubetune.errors import ArtifactError, ModelError
from kubetune.prompt import PromptTemplate, template_for

log = logging.getLogger(__name__)

VARIANTS = tuple(MODEL_PRODUCERS)


def gptq_backend(recipe) -> str:
    """Kernel for GPTQ weights. ``auto`` is decided here, never by GPTQModel: its own choice on a Hopper GPU is
    ``machete``, which downloads CUTLASS at first use and fails offline. triton needs no build step (loads in
    seconds); torch is the portable CPU path."""
    backend = recipe.quantize.backend
    if backend == "auto":
        return "triton" if modelio.device() == "cuda" else "torch"
    return backend


def load_quantized(recipe, path: Path):
    """A GPTQ checkpoint through transformers with the kernel chosen by :func:`gptq_backend`.

    The saved ``quantization_config`` supplies group size, symmetry and format; the GPTQConfig passed here only
    adds the load-time choice (backend), which transformers merges into it. dtype "auto" keeps the dtype the
    checkpoint was written in (scales stay float16 either way).
    """
    from transformers import GPTQConfig

    try:
        saved = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
        bits = int(saved["bits"])
    except (FileNotFoundError, KeyError, ValueError, TypeError) as exc:
        raise ArtifactError(f"{path}: not a GPTQ checkpoint (config.json lacks quantization_config: {exc})") from None
    qconfig = GPTQConfig(bits=bits, backend=gptq_backend(recipe))
    return modelio.load_base_model(recipe.model, dtype="auto", quantization_config=qconfig, path=path)


def load_tokenizer_of(recipe, model_dir: Path | None):
    """The tokenizer saved with a stage's output (it may carry added tokens), else the base model's."""
    if model_dir is not None and (Path(model_dir) / "tokenizer_config.json").is_file():
        return modelio.load_tokenizer(recipe.model, path=model_dir)
    return modelio.load_tokenizer(recipe.model)


def carry_prompt(model_dir: Path, out: Path, template: PromptTemplate) -> None:
    """Copy the prompt file of ``model_dir`` forward into ``out``: it records what the model was *trained* with,
    which differs from ``template`` (the recipe's) when ``prompt.allow_mismatch`` let the recipe's win."""
    saved = PromptTemplate.load(model_dir)
    (saved or template).save(out)


def apply_adapter(model, adapter_dir: Path, tokenizer=None):
    """Wrap ``model`` with the LoRA adapter in ``adapter_dir`` (inference mode, not trainable)."""
    from peft import PeftModel

    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # The fine-tune added tokens: the adapter's saved embedding rows need a base of the same size.
        model.resize_token_embeddings(len(tokenizer))
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (ValueError, RuntimeError, OSError) as exc:  # shape mismatch, wrong base, unreadable file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{adapter_dir}: cannot apply the adapter to model.name_or_path: {first}") from None
    return peft_model.eval()


def load_variant(recipe, layout, name: str):
    """``(model, tokenizer, PromptTemplate)`` for ``name`` in base | adapter | merged | quantized, in eval mode.

    The prompt check comes first, before any weights are read, so a mismatch fails in a second.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown model variant {name!r} (have {', '.join(VARIANTS)})")
    producer = MODEL_PRODUCERS[name]
    model_dir = layout.require(producer) if producer else None
    template: PromptTemplate = template_for(model_dir, recipe)
    tokenizer = load_tokenizer_of(recipe, model_dir)
    if name == "base":
        model = modelio.load_base_model(recipe.model)
    elif name == "adapter":
        # The base in the precision the adapter was trained on (4/8-bit for QLoRA): that is the model the
        # fine-tune evaluated, so its scores are the adapter's own. The merged model is always 16/32-bit.
        base = modelio.load_finetune_base(recipe.model, recipe.finetune,
                                          dtype=modelio.resolve_dtype(recipe.model.dtype))
        model = apply_adapter(base, model_dir, tokenizer)
    elif name == "merged":
        model = modelio.load_base_model(recipe.model, dtype="auto", path=model_dir)
    else:
        model = load_quantized(recipe, model_dir)
    model.eval()
    log.info("loaded %s model (%s)", name, model_dir or recipe.model.name_or_path)
    return model, tokenizer, template


def release(model) -> None:
    """Give a model's memory back now, even if a reference to the module survives somewhere (a traceback, a
    generation cache, a hook). The model is unusable afterwards; the caller should also ``del`` its name.

    Each parameter and buffer is pointed at an empty tensor, so the storage is freed when the last *tensor*
    reference goes, not when the last *module* reference goes; then gc breaks reference cycles (PEFT and
    accelerate hooks make some) and CUDA's caching allocator returns its blocks to the driver.
    """
    import torch

    if model is not None:
        with torch.no_grad():
            for module in model.modules():
                clear = getattr(module, "clear_weight_cache", None)  # GPTQ torch kernel's dequantized copies
                if callable(clear):
                    clear()
                for key, param in list(module._parameters.items()):
                    if param is not None:
                        param.data = torch.empty(0, dtype=param.dtype, device=param.device)
                for key, buf in list(module._buffers.items()):
                    if buf is not None:
                        module._buffers[key] = torch.empty(0, dtype=buf.dtype, device=buf.device)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
