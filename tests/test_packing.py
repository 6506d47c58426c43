"""finetune.packing: packed examples never attend to each other (a model that cannot keep them apart is refused:
test_bad_inputs.py)."""

from __future__ import annotations

import pytest
import torch

from kubetune.stages import packing, run_stage


def _packed_batch(pad_token_id: int, rows: list[list[list[int]]]):
    """TRL's packed dataset rows (input_ids + seq_lengths) through the row collator."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = [{"input_ids": [t for ex in row for t in ex], "seq_lengths": [len(ex) for ex in row]} for row in rows]
    collator = packing.RowPackedCollator(DataCollatorForLanguageModeling(pad_token_id=pad_token_id,
                                                                         padding_free=True))
    return collator(examples)


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_rows_keep_examples_apart(tiny_llama):
    first, second, third = [5, 9, 14, 30, 7], [11, 12, 40, 41], [8, 60, 61]
    pad = tiny_llama.config.pad_token_id
    batch = _packed_batch(pad, [[first, second], [third]])
    assert "attention_mask" not in batch and batch["input_ids"].shape == (2, 9)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 2, 0, 0, 0, 0, 0, 0]]
    # no label at an example's first token (it would be predicted from the previous example) nor on padding
    assert batch["labels"].tolist() == [[-100, 9, 14, 30, 7, -100, 12, 40, 41], [-100, 60, 61] + [-100] * 6]

    with torch.no_grad():
        packed = tiny_llama(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = tiny_llama(input_ids=torch.tensor([second])).logits
        joined = tiny_llama(input_ids=batch["input_ids"][:1]).logits  # one plain causal sequence: sees the first
    torch.testing.assert_close(packed[0, 5:], alone[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(joined[0, 5:], alone[0], atol=1e-3)  # the check above can fail


def _tiny(architecture: str):
    import transformers

    torch.manual_seed(0)
    config = {"gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                         {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                          "num_key_value_heads": 1, "head_dim": 16, "sliding_window": 4}),
              "falcon": ("FalconConfig", "FalconForCausalLM",
                         {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}),
              "codegen": ("CodeGenConfig", "CodeGenForCausalLM", {"n_embd": 32, "n_layer": 2, "n_head": 4,
                                                                  "rotary_dim": 4})}[architecture]
    cfg = getattr(transformers, config[0])(vocab_size=100, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                           **config[2])
    return getattr(transformers, config[1])(cfg).eval()


@pytest.mark.parametrize("architecture", ["gemma3", "falcon", "codegen"])
def test_accepted_architectures_really_keep_examples_apart(architecture):
    # what the check accepts must hold numerically: the second example's logits as if it ran alone
    model = _tiny(architecture)
    packing.check_examples_kept_apart(model, architecture)
    first, second = [5, 9, 14, 30, 7, 8], [11, 12, 40, 41, 42, 43]
    batch = _packed_batch(0, [[first, second]])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = model(input_ids=torch.tensor([second]), use_cache=False).logits
    torch.testing.assert_close(packed[0, 6:], alone[0], atol=1e-5, rtol=1e-4)


def test_counts_tokens_and_examples_not_padding():
    """The example lengths the fine-tune counts tokens, examples and attention spans from: padded rows by their
    attention_mask, packed ones (rows, or TRL's one padding-free row) by where position_ids restart."""
    from kubetune.stages.finetune import example_lengths

    rows = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 2, 0, 0, 0, 0, 0, 0]])
    assert example_lengths({"position_ids": rows}) == [5, 4, 3]
    flat = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])  # TRL's padding-free row
    assert example_lengths({"position_ids": flat}) == [3, 2, 4]
    padded = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert example_lengths({"attention_mask": padded, "position_ids": rows}) == [3, 5]


def test_llama_packing_trains_on_rows(recipe_dict_for, tiny_model_dir):
    recipe = recipe_dict_for(tiny_model_dir, finetune={"packing": True, "max_steps": 2, "max_length": 256})
    report = run_stage(recipe, "finetune").report
    assert report["metrics"]["packing"] == packing.ROWS
    assert report["metrics"]["train_sequences"] < report["metrics"]["train_examples"]
    assert report["throughput"]["padding_fraction"] < 0.5  # rows are full but for the last example's gap


@pytest.fixture
def recipe_dict_for(tmp_path):
    from tiny import tiny_recipe_dict

    from kubetune.config import recipe_from_dict

    return lambda model_dir, **sections: recipe_from_dict(
        tiny_recipe_dict(model_dir, tmp_path / "artifacts", **sections))
