"""Tiny random models with a locally trained tokenizer: the real code paths, in about a second, with no hub."""

from __future__ import annotations

import random
from pathlib import Path

_WORDS = ("SELECT FROM WHERE AND OR COUNT SUM AVG MIN MAX ORDER BY LIMIT GROUP DISTINCT JOIN ON AS DESC ASC "
          "CREATE TABLE VARCHAR INTEGER REAL name age city salary team score year country price id title "
          "what which how many is the of in for with highest lowest average total number").split()


def _corpus(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16)))
                     + f" {rng.randint(0, 999)} '{rng.choice(_WORDS).lower()}' (a, b) = < > * ; # . ,\n")
    return lines


def build_tokenizer(vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def build_tiny_model(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 64, so GPTQ group size 32 divides it) saved with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_tiny_gemma3(path: Path, seed: int = 0) -> Path:
    """A 2-layer Gemma 3 text model as the Gemma recipe's model is shaped (Gemma3ForCausalLM, model_type
    gemma3_text, a sliding-window and a full-attention layer, one KV head, tied embeddings), saved with the tiny
    tokenizer. Hidden 64, so GPTQ group size 32 divides it."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    tok = build_tokenizer()
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=32,
                           layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    Gemma3ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_tiny_bloom(path: Path, seed: int = 0) -> Path:
    """A 1-layer BLOOM (ALiBi; its attention mask ignores position_ids) saved with the tiny tokenizer."""
    return _build_tiny("BloomConfig", "BloomForCausalLM", path, seed, hidden_size=32, n_layer=1, n_head=4)


def build_tiny_mpt(path: Path, seed: int = 0) -> Path:
    """A 1-layer MPT (ALiBi, like BLOOM, but no document attention in kubetune: packing it is refused)."""
    return _build_tiny("MptConfig", "MptForCausalLM", path, seed, d_model=32, n_layers=1, n_heads=4)


def _build_tiny(config_class: str, model_class: str, path: Path, seed: int, **dims) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    tok = build_tokenizer()
    cfg = getattr(transformers, config_class)(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **dims)
    getattr(transformers, model_class)(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_recipe_dict(model_dir: Path, artifacts: Path, **sections) -> dict:
    """A recipe that runs every stage on the tiny model in seconds; keyword arguments update sections."""
    recipe = {
        "run": {"name": "tiny", "artifacts_root": str(artifacts)},
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "data": {"source": "builtin:text2sql", "builtin_examples": 200, "eval_size": 16, "max_eval_examples": 8},
        "finetune": {"max_steps": 6, "batch_size": 4, "max_length": 128, "save_steps": 2, "logging_steps": 1,
                     "lora": {"r": 4, "alpha": 8}},
        "merge": {"dtype": "float32", "verify": {"prompts": 2, "tolerance": 1e-3}},
        "quantize": {"bits": 4, "group_size": 32, "calibration": {"samples": 8, "max_length": 64}, "batch_size": 4},
        "infer": {"max_new_tokens": 12, "batch_size": 4},
        # CPU stages: `kubetune stage` refuses a GPU request it cannot meet (exit 14), as a pod does
        "resources": {stage: {"gpus": 0} for stage in ("finetune", "merge", "quantize", "infer")},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


if __name__ == "__main__":  # python tests/tiny.py DIR: the model that jobs/tiny-test.yaml uses
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/models/tiny-llama")
    if not (target / "config.json").exists():
        build_tiny_model(target)
    print(target)
