"""Quantize stage: GPTQ 4- and 8-bit checkpoints that transformers reloads on the torch kernel and that generate."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from kubetune.artifacts import RunLayout
from kubetune.errors import RecipeError
from kubetune.prompt import PROMPT_FILE, PromptTemplate
from kubetune.stages import run_stage
from test_merge import SAMPLE, commit_adapter

TINY_PARAMETERS = 150_848  # tests/tiny.py's 2-layer Llama, hidden 64, vocab 600, untied head


def commit_fake_merge(recipe, model_dir, adapter_dir):
    """A finished "merge" artifact holding the adapter merged in memory (what the merge stage would save)."""
    from kubetune.stages.merge import merge_adapter

    layout = RunLayout.from_recipe(recipe)
    merged, tokenizer, _ = merge_adapter(recipe, adapter_dir)
    tmp = layout.new_temp_dir("merge")
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.copy2(model_dir / "generation_config.json", tmp / "generation_config.json")
    PromptTemplate(recipe.prompt.template).save(tmp)
    return layout.commit("merge", tmp, recipe.fingerprint("merge"), report={}), merged


def _logits(model, tokenizer, text):
    import torch

    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits.float()


@pytest.mark.parametrize("bits, stages", [(4, ["finetune", "merge", "quantize"]), (8, ["finetune", "quantize"])],
                         ids=["4bit-from-merge", "8bit-merged-in-memory"])
def test_quantize_reloads_with_the_torch_kernel_and_generates(tiny_recipe, tiny_model_dir, bits, stages):
    import torch

    from kubetune.variants import load_variant, release

    recipe = tiny_recipe(stages=stages, quantize={"bits": bits})
    adapter_dir = commit_adapter(recipe)
    merged = None
    if "merge" in stages:
        _, merged = commit_fake_merge(recipe, tiny_model_dir, adapter_dir)
    else:
        from kubetune.stages.merge import merge_adapter

        merged, _, _ = merge_adapter(recipe, adapter_dir)
    calls = []
    result = run_stage(recipe, "quantize", progress=lambda *a: calls.append(a))

    report = result.report
    assert (report["bits"], report["group_size"], report["calibration_samples"]) == (bits, 32, 8)
    assert report["seconds"] > 0 and report["backend"] == "torch"
    assert report["block_update"] == "torch-loop"  # on the CPU GPTQModel never offers its CUDA seam
    # Packed int32 qweight counts as the weights it holds: the same total as the merged float model.
    params = report["parameters"]
    assert params["total"] == report["source_parameters_total"] == TINY_PARAMETERS
    assert params["by_dtype"][f"gptq-int{bits}"] == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)  # 2 layers
    assert report["memory_footprint_bytes"] < TINY_PARAMETERS * 4
    assert report["metrics"]["gptq_modules"] == 14 and report["metrics"]["gptq_loss_max"] >= 0
    assert 0 < report["metrics"]["gptq_solve_seconds"] < report["seconds"]  # the solves, not the forwards
    assert report["metrics"]["gptq_solve_max_seconds"] <= report["metrics"]["gptq_solve_seconds"]
    assert report["metrics"]["gptq_solve_slowest_module"].split(".")[0] in ("0", "1")  # "<layer>.<module>"
    assert [c for c in calls if c[3].startswith("layer") and c[1]] == [
        ("quantize", 1, 2, "layer 1/2"), ("quantize", 2, 2, "layer 2/2")]
    out = result.path
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["bits"], config["group_size"], config["quant_method"]) == (bits, 32, "gptq")
    assert json.loads((out / PROMPT_FILE).read_text())["template"] == recipe.prompt.template
    assert not json.loads((out / "generation_config.json").read_text()).get("do_sample")

    model, tok, _ = load_variant(recipe, RunLayout.from_recipe(recipe), "quantized")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "TorchLinear" and q_proj.bits == bits
    quantized_logits = _logits(model, tok, SAMPLE)
    ids = tok(SAMPLE, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    release(model)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 4 or tok.eos_token_id in generated[0].tolist()
    # It is a quantization of the *merged* model: much closer to it than to the base.
    merged_logits = _logits(merged, tok, SAMPLE)
    base, _, _ = load_variant(recipe, RunLayout.from_recipe(recipe), "base")
    base_logits = _logits(base, tok, SAMPLE)
    release(base)
    release(merged)
    error = (quantized_logits - merged_logits).abs().mean()
    assert error < 0.5 * (base_logits - merged_logits).abs().mean()


def test_a_group_size_that_does_not_divide_the_hidden_size_fails_before_any_slow_work(tiny_recipe, tiny_model_dir,
                                                                                      monkeypatch):
    import kubetune.stages.quantize as quantize

    def must_not_run(*args, **kwargs):
        raise AssertionError("GPTQ started despite a bad group size")

    monkeypatch.setattr(quantize, "_quantize", must_not_run)
    monkeypatch.setattr("kubetune.stages.merge.merge_adapter", must_not_run)
    recipe = tiny_recipe(stages=["finetune", "quantize"], quantize={"group_size": 48})
    commit_adapter(recipe)
    started = time.perf_counter()
    with pytest.raises(RecipeError) as err:
        run_stage(recipe, "quantize")
    assert time.perf_counter() - started < 10
    message = str(err.value)
    assert "quantize.group_size: 48" in message and "hidden size is 64" in message and "e.g. 64" in message
    assert RunLayout.from_recipe(recipe).marker("quantize") is None
