"""Merge stage: a verified merge is saved and reloads as the fine-tuned model; a corrupted one is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.artifacts import RunLayout
from kubetune.errors import ArtifactError, VerificationError
from kubetune.prompt import PROMPT_FILE, PromptTemplate
from kubetune.stages import run_stage


def commit_adapter(recipe, template: str | None = None, seed: int = 0, scale: float = 0.5) -> Path:
    """A finished "finetune" artifact without training: LoRA on the tiny base with random, non-zero B (peft
    initialises B to zero, which would make the adapter a no-op and every merge check pass trivially)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from kubetune import modelio

    torch.manual_seed(seed)
    base = modelio.load_base_model(recipe.model)
    tokenizer = modelio.load_tokenizer(recipe.model)
    lora = recipe.finetune.lora
    model = get_peft_model(base, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, scale)
    layout = RunLayout.from_recipe(recipe)
    tmp = layout.new_temp_dir("finetune")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    PromptTemplate(template or recipe.prompt.template).save(tmp)
    return layout.commit("finetune", tmp, recipe.fingerprint("finetune"), report={})


def _logits(model, tokenizer, text: str):
    import torch

    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


SAMPLE = "# context:\nCREATE TABLE t (name VARCHAR, age INTEGER). Who is older than 30?\n# result:\nSELECT name FROM t"


def test_merge_verifies_saves_sharded_and_reloads_as_the_adapter_model(tiny_recipe):
    from kubetune.variants import load_variant, release

    recipe = tiny_recipe(stages=["finetune", "merge"], merge={"max_shard_size": "200KB"})
    commit_adapter(recipe)
    result = run_stage(recipe, "merge")

    assert result.status == "done"
    report = result.report
    assert report["metrics"]["verify_prompts"] == 2
    assert 0 <= report["metrics"]["verify_max_abs_logit_diff"] <= recipe.merge.verify.tolerance
    assert report["dtype"] == "float32"
    assert report["parameters"]["by_dtype"] == {"float32": report["parameters"]["total"]}
    weights = report["parameters"]["total"] * 4
    assert weights <= report["memory_footprint_bytes"] < weights + 1024  # + rotary inv_freq buffers
    out = result.path
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").is_file()  # ~600 KB in 200 KB shards
    assert json.loads((out / PROMPT_FILE).read_text())["template"] == recipe.prompt.template
    assert (out / "tokenizer.json").is_file()

    layout = RunLayout.from_recipe(recipe)
    merged, tok, template = load_variant(recipe, layout, "merged")
    assert report["parameters"]["total"] == sum(p.numel() for p in merged.parameters())
    merged_logits = _logits(merged, tok, SAMPLE)
    release(merged)
    adapter, tok, _ = load_variant(recipe, layout, "adapter")
    adapter_logits = _logits(adapter, tok, SAMPLE)
    release(adapter)
    base, tok, _ = load_variant(recipe, layout, "base")
    base_logits = _logits(base, tok, SAMPLE)
    release(base)
    assert (merged_logits - adapter_logits).abs().max() < 1e-3
    assert (merged_logits - base_logits).abs().max() > 0.1  # the adapter really changed the model


def test_a_corrupted_merge_is_refused_and_nothing_is_committed(tiny_recipe, monkeypatch):
    import torch
    from peft.tuners.lora import LoraModel

    original = LoraModel.merge_and_unload  # what PeftModel.merge_and_unload delegates to

    def noisy_merge(self, *args, **kwargs):
        model = original(self, *args, **kwargs)
        with torch.no_grad():  # one weight off by a little: what a dtype or scaling bug would do
            model.model.layers[1].mlp.down_proj.weight.add_(0.05 * torch.randn_like(
                model.model.layers[1].mlp.down_proj.weight))
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", noisy_merge)
    recipe = tiny_recipe(stages=["finetune", "merge"])
    commit_adapter(recipe)
    with pytest.raises(VerificationError, match=r"merge.verify.tolerance"):
        run_stage(recipe, "merge")
    layout = RunLayout.from_recipe(recipe)
    assert layout.marker("merge") is None
    assert not layout.stage_dir("merge").exists()


@pytest.mark.parametrize("verify, compute_dtype", [(True, "float32"), (False, "bfloat16")])
def test_merge_loads_an_unquantized_base_after_a_4bit_finetune_and_saves_merge_dtype(tiny_recipe, monkeypatch,
                                                                                    verify, compute_dtype):
    import torch

    from kubetune import modelio

    seen = []
    load = modelio.load_base_model

    def spy(model_section, **kwargs):
        seen.append(kwargs)
        return load(model_section, **kwargs)

    recipe = tiny_recipe(stages=["finetune", "merge"], finetune={"base_precision": "4bit"},
                         merge={"dtype": "bfloat16", "verify": {"enabled": verify, "prompts": 2, "tolerance": 1e-3}})
    commit_adapter(recipe)
    monkeypatch.setattr(modelio, "load_base_model", spy)
    result = run_stage(recipe, "merge")
    assert [(kw.get("quantization_config"), kw.get("dtype")) for kw in seen] == [(None, getattr(torch, compute_dtype))]
    assert result.report["dtype"] == "bfloat16"
    assert set(result.report["parameters"]["by_dtype"]) == {"bfloat16"}
    assert json.loads((result.path / "config.json").read_text())["dtype"] == "bfloat16"
    metrics = result.report["metrics"]
    if verify:  # float32 comparison: a correct merge is far inside a tight tolerance
        assert metrics["verify_dtype"] == "float32" and metrics["verify_max_abs_logit_diff"] < 1e-3
    else:
        assert metrics["verify_prompts"] == 0 and "verify_max_abs_logit_diff" not in metrics


def test_merge_refuses_an_adapter_trained_with_another_template_unless_allowed(tiny_recipe):
    other = "Q: {question}\nSQL: "
    recipe = tiny_recipe(stages=["finetune", "merge"])
    commit_adapter(recipe, template=other)
    with pytest.raises(ArtifactError, match="allow_mismatch"):
        run_stage(recipe, "merge")

    allowed = tiny_recipe(stages=["finetune", "merge"], prompt={"allow_mismatch": True})
    result = run_stage(allowed, "merge")
    # The merged model still records the template it was trained with, not the recipe's.
    assert json.loads((result.path / PROMPT_FILE).read_text())["template"] == other


def test_the_merge_verifies_in_ieee_float32_when_the_process_runs_tf32(tiny_recipe, monkeypatch):
    """`kubetune run` merges in the process that fine-tuned; a compiled fine-tune leaves TF32 on there, whose
    rounding (0.068 on Gemma 3 270M, H100) broke the 0.05 check of a correct merge. The verification's forward
    passes run in IEEE fp32 anyway, and the process gets its TF32 back afterwards."""
    import torch

    from kubetune import precision
    from kubetune.stages import merge

    seen = []
    logits = merge._logits
    monkeypatch.setattr(merge, "_logits", lambda model, ids: seen.append(precision.settings()["cuda.matmul"])
                        or logits(model, ids))
    recipe = tiny_recipe(stages=["finetune", "merge"])
    commit_adapter(recipe)
    with precision.kept():
        torch.backends.fp32_precision = "tf32"
        assert run_stage(recipe, "merge").status == "done"
        assert precision.settings()[""] == "tf32"
    assert seen and set(seen) == {"ieee"}
