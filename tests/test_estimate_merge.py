"""The merge stage's memory model (kubetune.estimate.merge) against what the merge stage's own code holds."""

from __future__ import annotations

import pytest
from estimate_models import estimate_cache, saved_adapter  # noqa: F401
from tiny import tiny_recipe_dict

from kubetune.config import recipe_from_dict
from kubetune.estimate.estimator import Estimator
from kubetune.estimate.modelshape import load_config


@pytest.mark.parametrize("verify", [True, False])
def test_merge_base_and_adapter_equal_what_the_merge_stage_holds(tiny_model_dir, tmp_path, monkeypatch, verify):
    """The merge stage's own ``merge_adapter`` on the tiny model: the base it loads (fp32 when it verifies, else
    merge.dtype bf16) and the adapter as peft saved it, against the estimate's two weight components."""
    from kubetune import modelio
    from kubetune.estimate import merge as merge_memory
    from kubetune.stages.merge import merge_adapter

    recipe = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, tmp_path / "artifacts", merge={
        "dtype": "bfloat16", "verify": {"enabled": verify, "prompts": 1, "tolerance": 1e-3}}))
    adapter = saved_adapter(tiny_model_dir, recipe, tmp_path / "adapter")
    loaded: list[int] = []
    load = modelio.load_base_model

    def load_and_measure(*args, **kwargs):
        model = load(*args, **kwargs)
        loaded.append(sum(p.nbytes for p in model.parameters()))
        return model

    monkeypatch.setattr(modelio, "load_base_model", load_and_measure)
    merge_adapter(recipe, tmp_path / "adapter")
    est = merge_memory.estimate_memory(Estimator(recipe, load_config(recipe.model), target="cpu", read_rows=False))
    assert est.component("base weights (float32)" if verify else "base weights (bfloat16)").bytes == loaded[0]
    assert est.component("LoRA adapter").bytes == adapter
