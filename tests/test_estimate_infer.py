"""The infer stage's memory model (kubetune.estimate.infer) against a real KV cache and a saved adapter."""

from __future__ import annotations

import pytest
from estimate_models import estimate_cache, recipe_for, saved_adapter, tiny_config  # noqa: F401
from tiny import tiny_recipe_dict

from kubetune.config import recipe_from_dict
from kubetune.estimate.estimator import Estimator
from kubetune.estimate.modelshape import load_config


@pytest.mark.parametrize("model_type", ["llama", "bloom", "falcon"])
def test_kv_cache_equals_a_real_models_cache(model_type, tmp_path):
    """Grouped-query Llama (2 KV heads of 4), Bloom (every head), Falcon multi-query (one KV head): the cache a
    real fp32 forward returns, storage for storage, against the estimate."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, kv_heads=2)
    est = Estimator(recipe_for(tmp_path, config), config, target="cpu")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        cache = model(input_ids=torch.randint(0, 300, (2, 40)), use_cache=True).past_key_values
    real = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for layer in cache.layers for t in (layer.keys, layer.values)}.values())
    assert est.kv_cache("float32", 2, 40) == real


def test_infer_adapter_model_holds_the_saved_adapter(tiny_model_dir, tmp_path):
    from kubetune.estimate.infer import model_memory

    recipe = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, tmp_path / "artifacts"))
    adapter = saved_adapter(tiny_model_dir, recipe, tmp_path / "adapter")
    est = Estimator(recipe, load_config(recipe.model), target="cpu", read_rows=False)
    assert model_memory(est, recipe, "adapter", 4).component("LoRA adapter").bytes == adapter
