"""finetune.packing: packed examples never attend to each other, and models that cannot keep them apart are refused
before any data is read."""

from __future__ import annotations

import pytest
import torch

from tiny import build_tokenizer

from kubetune.errors import RecipeError
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


def test_counts_tokens_and_examples_not_padding():
    rows = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 2, 0, 0, 0, 0, 0, 0]])
    assert packing.count_packed_batch(rows) == (12, 3)
    flat = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])  # TRL's padding-free row
    assert packing.count_packed_batch(flat) == (9, 3)


def test_bloom_packing_is_refused_before_training(tmp_path, recipe_dict_for):
    from transformers import BloomConfig, BloomForCausalLM

    tok = build_tokenizer()
    model_dir = tmp_path / "bloom"
    BloomForCausalLM(BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=1, n_head=4,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    recipe = recipe_dict_for(model_dir, finetune={"packing": True, "max_steps": 2})
    with pytest.raises(RecipeError, match=r"finetune\.packing: .*BloomForCausalLM, eager attention\) would attend "
                                          r"across packed examples.*group_by_length") as err:
        run_stage(recipe, "finetune")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "artifacts" / "tiny" / "finetune").exists()


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
