"""Switching models in the compare UI gives their memory back: ten switches leave the process's resident memory
(RSS) within 5% of where it started. A pool that keeps the old models referenced (what the original notebook
did) is measured the same way and must fail the same bound, so the test shows it can catch the leak.

The model is ~10M parameters (40 MB in float32) so that one leaked model per switch is far above the noise:
ten of them are about half of this process's RSS.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from kubetune.config import recipe_from_dict
from kubetune.ui.backend import ModelPool, ask, open_run
from kubetune.ui.memory import process_rss_bytes, trim_heap
from tiny import build_tokenizer, tiny_recipe_dict

SWITCHES = 10
CONTEXT = "CREATE TABLE city (name VARCHAR, population INTEGER)"
TOLERANCE = 0.05


def build_small_model(path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from kubetune.stages import run_stage

    base = tmp_path_factory.mktemp("ui-memory")
    model = build_small_model(base / "model")
    recipe = recipe_from_dict(tiny_recipe_dict(model, base / "artifacts", stages=["finetune"],
                                               finetune={"max_steps": 1, "batch_size": 2, "max_length": 128,
                                                         "save_steps": 1}))
    run_stage(recipe, "finetune")
    return open_run("tiny", base / "artifacts")


class LeakyPool(ModelPool):
    """Drops a model from the pool but keeps a reference to it and never releases it."""

    def __init__(self, info):
        super().__init__(info)
        self.kept = []

    def _free(self, name: str) -> None:
        self.kept.append(self._loaded.pop(name))


def switch(pool: ModelPool, names: list[str]) -> None:
    """Select, then answer once: the weights of a float32 checkpoint are memory-mapped from its file and become
    resident only when a forward pass reads them, so a model that is loaded but never used costs no RSS."""
    pool.select(names)
    ask(pool, CONTEXT, "How many cities are there?", max_new_tokens=2)


def rss_growth(pool: ModelPool) -> float:
    """Relative RSS change over SWITCHES alternations base ↔ adapter, after a warm-up of each."""
    for names in (["base"], ["adapter"], ["base"]):  # first loads allocate caches once (tokenizer, PEFT, kernels)
        switch(pool, names)
    gc.collect()
    trim_heap()
    start = process_rss_bytes()
    for i in range(SWITCHES):
        switch(pool, ["adapter"] if i % 2 == 0 else ["base"])
    gc.collect()
    trim_heap()
    end = process_rss_bytes()  # an even number of switches: base is loaded again, as at the start
    return (end - start) / start


def test_ten_switches_return_memory_to_its_baseline(small_run):
    pool = ModelPool(small_run)
    growth = rss_growth(pool)
    loaded = pool.loaded()
    assert [m.name for m in loaded] == ["base"] and loaded[0].footprint_bytes > 30 << 20
    pool.close()
    print(f"\nRSS change over {SWITCHES} switches: {growth:+.2%}")
    assert abs(growth) <= TOLERANCE, f"RSS changed by {growth:+.1%} over {SWITCHES} switches"

    leaky = LeakyPool(small_run)
    leaked_growth = rss_growth(leaky)
    from kubetune.variants import release

    for entry in leaky.kept + leaky.loaded():
        release(entry.model)
    leaky.kept.clear()
    leaky._loaded.clear()
    trim_heap()
    print(f"RSS change with a leaking pool: {leaked_growth:+.2%}")
    # the measurement catches a pool that forgets to free: ten models stay (about +50% here)
    assert leaked_growth > TOLERANCE, f"a leaking pool grew only {leaked_growth:+.1%}"
