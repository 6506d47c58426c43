"""Tiny models, recipes and measurements that the estimator's tests share (tests/test_estimate*.py): each
estimate is compared with tensors that torch, peft, bitsandbytes or GPTQModel really make on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.config import recipe_from_dict

ROOT = Path(__file__).parent.parent
CONFIGS = ROOT / "bench" / "configs"
BLOOM_7B1 = CONFIGS / "bigscience--bloom-7b1.json"
FALCON_7B = CONFIGS / "tiiuae--falcon-7b.json"


def tiny_config(model_type: str, layers: int = 2, kv_heads: int = 4):
    """Small configs of three families whose memory behaves differently (RMSNorm/SDPA, LayerNorm/alibi/eager
    attention in fp32, parallel attention with multi-query, which SDPA runs on its math backend)."""
    from transformers import BloomConfig, FalconConfig, LlamaConfig

    if model_type == "llama":
        return LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                           tie_word_embeddings=False)
    if model_type == "bloom":
        return BloomConfig(vocab_size=300, hidden_size=64, n_layer=layers, n_head=4)
    return FalconConfig(vocab_size=300, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                        multi_query=True, parallel_attn=True, new_decoder_architecture=False, bias=False, alibi=False)


def recipe_for(tmp_path, config, **finetune):
    """A recipe whose model is ``config`` saved to a folder (no weights: the estimator reads config.json only)."""
    folder = tmp_path / f"model-{config.model_type}"
    folder.mkdir(exist_ok=True)
    config.save_pretrained(folder)
    ft = {"batch_size": 3, "max_length": 24, "precision": "fp32", "lora": {"r": 4, "dropout": 0.1}, **finetune}
    return recipe_from_dict({"model": {"name_or_path": str(folder), "dtype": "float32"}, "finetune": ft})


def real_peft_model(config, recipe, quantized_dir=None):
    """The fine-tune's model for real: transformers model (or a 4-bit load), peft's k-bit preparation, LoRA."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from kubetune.stages.finetune import lora_config

    torch.manual_seed(0)
    if quantized_dir is None:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(quantized_dir, quantization_config=q, dtype=torch.float32)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, lora_config(recipe.finetune.lora))
    if quantized_dir is not None:  # what TRL's SFTTrainer does to the adapter of a quantized model
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    model.train()
    return model


def saved_storages(backbone, batch: int, length: int, autocast=None,
                   layers=()) -> tuple[dict[int, int], list[dict[int, int]]]:
    """(storages saved outside ``layers``, storages saved while each of them ran) as {address: bytes}: what
    autograd really saves in a forward of ``backbone`` (under ``saved_tensors_hooks`` and, if given, CPU
    autocast), parameters and buffers left out, each storage once."""
    import contextlib

    import torch

    params = {s.data_ptr() for t in (*backbone.parameters(), *backbone.buffers()) for s in _storages(t)}
    where: dict[str, int | None] = {"layer": None}
    outside: dict[int, int] = {}
    per_layer: list[dict[int, int]] = [{} for _ in layers]
    seen: set[int] = set()

    def pack(t):
        for st in _storages(t):
            if st.data_ptr() not in params and st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                (outside if where["layer"] is None else per_layer[where["layer"]])[st.data_ptr()] = st.nbytes()
        return t.detach()  # t itself, when an op saves its own output, is a cycle through grad_fn: never freed

    hooks = [h for i, layer in enumerate(layers) for h in (
        layer.register_forward_pre_hook(lambda *_, i=i: where.update(layer=i)),
        layer.register_forward_hook(lambda *_: where.update(layer=None)))]
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
            out = backbone(input_ids=torch.randint(0, 300, (batch, length)), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert out.last_hidden_state.requires_grad
    return outside, per_layer


def _storages(tensor) -> list:
    """The storages holding a tensor's data: a wrapper subclass's (torchao's NF4Tensor, Int8Tensor) are those of
    its inner tensors; it has none of its own."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None:
        return [tensor.untyped_storage()]
    return [s for name in flatten()[0] if getattr(tensor, name) is not None for s in _storages(getattr(tensor, name))]


def saved_bytes(model, batch: int, length: int, autocast=None) -> int:
    """Bytes autograd really saves in a forward of a peft model's backbone (the decoder without its LM head)."""
    outside, _ = saved_storages(model.get_base_model().base_model, batch, length, autocast)
    return sum(outside.values())


def saved_adapter(model_dir: Path, recipe, folder: Path) -> int:
    """Save a LoRA adapter for ``recipe`` on the model in ``model_dir`` with peft; the bytes of its tensors."""
    import torch
    from peft import get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from kubetune.stages.finetune import lora_config

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    get_peft_model(base, lora_config(recipe.finetune.lora)).save_pretrained(folder)
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys())


@pytest.fixture(autouse=True)
def estimate_cache(tmp_path, monkeypatch):
    """Every test gets its own estimate cache (never the user's ~/.cache)."""
    monkeypatch.setenv("KUBETUNE_ESTIMATE_CACHE", str(tmp_path / "estimate-cache"))
