"""The quantize stage's memory model (kubetune.estimate.quantize) against GPTQModel's own tensors on a tiny
model (CPU), and against the reloaded 7B checkpoint an H200 run reported."""

from __future__ import annotations

import json

import pytest
from estimate_models import BLOOM_7B1, ROOT, estimate_cache, recipe_for, tiny_config  # noqa: F401

from kubetune.config import recipe_from_dict
from kubetune.estimate import quantize as quantize_memory
from kubetune.estimate.estimator import Estimator
from kubetune.estimate.modelshape import build_meta_model, load_config, shape_of
from kubetune.estimate.storage import gptq_weight_bytes

MEASURED_GPTQ_7B1 = "bench/results/gpu-h200-2026-11-28-bloom-7b1.json"  # bloom-7b1/gptq8, 8-bit g128, H200


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_bytes_equal_a_real_gptqmodel_checkpoint(tiny_model_dir, tmp_path, bits):
    """qweight, qzeros, fp16 scales and g_idx of GPTQModel's own output, plus the 16-bit rest, tensor for tensor."""
    import os
    import random

    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from safetensors import safe_open

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    rng = random.Random(0)
    calibration = [{"input_ids": [rng.randrange(4, 500) for _ in range(24)], "attention_mask": [1] * 24}
                   for _ in range(8)]
    config = QuantizeConfig(bits=bits, group_size=32, offload_to_disk_path=str(tmp_path / "offload"))
    model = GPTQModel.load(str(tiny_model_dir), config, device="cpu", dtype=torch.float32)
    model.quantize(calibration, batch_size=4)
    model.save(str(tmp_path / "out"))
    stored = 0
    for file in (tmp_path / "out").glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            stored += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    shape = shape_of(build_meta_model(load_config(recipe_from_dict(
        {"model": {"name_or_path": str(tiny_model_dir)}}).model), torch.float32))
    assert sum(gptq_weight_bytes(shape, bits, 32, "float32")) == stored


def test_bloom_7b1_quantize_peak_is_the_reload_check_of_the_packed_checkpoint():
    """GPTQModel's loop holds one layer, all calibration rows' hidden states, the Hessians and GPTQ's working set;
    the stage then reloads the saved checkpoint through transformers (after releasing GPTQModel's model): the larger
    of the two is the peak. 8-bit g128, 128 rows padded to 512 tokens, batches of 8, bf16."""
    recipe = recipe_from_dict({"model": {"name_or_path": "x"}, "quantize": {
        "bits": 8, "group_size": 128, "batch_size": 8, "calibration": {"samples": 128, "max_length": 512}}})
    est = Estimator(recipe, load_config(None, BLOOM_7B1), read_rows=False)
    stage = quantize_memory.estimate_memory(est)
    assert [c.name for c in stage.components] == ["reload check: GPTQ 8-bit model"]
    assert stage.settings["calibration_length"] == 512
    # What transformers reported for the reloaded checkpoint of that run (memory_footprint_bytes of the quantize
    # report, H200): 3,840 bytes more than the packed tensors the estimate counts, 0.00005%.
    measured = next(r for r in json.loads((ROOT / MEASURED_GPTQ_7B1).read_text())["runs"]
                    if r["case"] == "bloom-7b1/gptq8")["reports"]["quantize"]["memory_footprint_bytes"]
    assert stage.allocated_bytes == pytest.approx(measured, rel=1e-6)


def test_quantize_layer_loop_parts_equal_a_real_layer_its_hidden_states_and_gptqmodels_hessians(tmp_path,
                                                                                                   monkeypatch):
    """With many calibration rows the loop is the peak. Its parts against real tensors of the tiny Llama in the
    merge dtype (bf16): decoder layer 0's parameters; the hidden states entering and leaving layer 0 for every
    calibration row (forward hooks on the real model); the Hessians GPTQModel's own ``GPTQ`` accumulates for each
    linear of that layer from the inputs it really sees."""
    import torch
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")  # docs/ENVIRONMENT: GPTQModel's CPU pool needs two
    config = tiny_config("llama")
    recipe = recipe_for(tmp_path, config)
    recipe.quantize.calibration.samples = 512
    recipe.quantize.calibration.max_length = 64
    recipe.quantize.group_size = 32
    est = Estimator(recipe, config, target="cpu", read_rows=False)
    stage = quantize_memory.estimate_memory(est)
    assert stage.settings["calibration_length"] == 64 and stage.slack == quantize_memory.GPTQ_LOOP_SLACK

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    layer = model.model.layers[0]
    hidden: dict[str, int] = {}
    layer.register_forward_pre_hook(lambda _m, args, kwargs: hidden.update(
        inputs=(args[0] if args else kwargs["hidden_states"]).nbytes), with_kwargs=True)
    layer.register_forward_hook(lambda _m, _a, out: hidden.update(
        outputs=(out[0] if isinstance(out, tuple) else out).nbytes))
    linear_inputs: dict[str, tuple] = {}
    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):  # a hook that returned something would replace the output
            module.register_forward_hook(lambda m, args, out, name=name: linear_inputs.update({name: (args[0], out)}))
    with torch.no_grad():
        model.model(input_ids=torch.randint(0, 300, (512, 64)))
    hessians = 0
    for name, (inp, out) in linear_inputs.items():
        gptq = GPTQ(layer.get_submodule(name), QuantizeConfig(bits=8, group_size=32))
        gptq.add_batch(inp[:4], out[:4])
        gptq.materialize_global_hessian()
        hessians += gptq.H.nbytes

    parts = {c.name: c.bytes for c in stage.components}
    assert parts["one decoder layer (bfloat16)"] == sum(p.nbytes for p in layer.parameters())
    assert parts["layer inputs + outputs of all 512 calibration rows"] == hidden["inputs"] + hidden["outputs"]
    assert parts["Hessians (fp32 in² per linear)"] == hessians
