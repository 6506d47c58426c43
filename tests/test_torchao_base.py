"""finetune.base_quantizer: torchao: the frozen base in torchao's NF4 (4bit) or int8 weight-only (8bit) tensors,
trained, saved and merged through the stages a recipe runs, next to bitsandbytes' base of the same precision."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tiny import build_tiny_bloom, tiny_recipe_dict

from kubetune import modelio, torchao_base
from kubetune.config import FinetuneSection, ModelSection, recipe_from_dict
from kubetune.errors import ModelError
from kubetune.measure import stored_bytes
from kubetune.stages import run_stage

PRECISIONS = ["4bit", "8bit"]


@pytest.fixture(scope="module")
def tiny_bloom_dir(tmp_path_factory):
    return build_tiny_bloom(tmp_path_factory.mktemp("tiny-bloom") / "model")


@pytest.fixture(scope="module")
def one_row_repeated(tmp_path_factory) -> Path:
    """40 copies of one Text-to-SQL row: every batch is the same, so the loss of a learning adapter must fall."""
    row = {"context": "CREATE TABLE people (name VARCHAR, age INTEGER)", "question": "what is the age of ann",
           "answer": "SELECT age FROM people WHERE name = 'ann'"}
    path = tmp_path_factory.mktemp("data") / "one-row.jsonl"
    path.write_text((json.dumps(row) + "\n") * 40, encoding="utf-8")
    return path


def _base(model_dir: Path, precision: str, quantizer: str = "torchao"):
    return modelio.load_finetune_base(ModelSection(name_or_path=str(model_dir), dtype="float32"),
                                      FinetuneSection(base_precision=precision, base_quantizer=quantizer),
                                      dtype=torch.float32)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("model", ["llama", "bloom"])
def test_lora_on_a_torchao_base_learns_saves_and_merges(model, precision, tiny_model_dir, tiny_bloom_dir,
                                                        one_row_repeated, tmp_path):
    model_dir = tiny_model_dir if model == "llama" else tiny_bloom_dir
    recipe = recipe_from_dict(tiny_recipe_dict(
        model_dir, tmp_path / "artifacts", data={"source": str(one_row_repeated), "eval_size": 4},
        finetune={"max_steps": 5, "base_precision": precision, "base_quantizer": "torchao", "learning_rate": 1e-2,
                  "warmup_ratio": 0.0, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        infer={"models": ["adapter"], "max_new_tokens": 4}))
    result = run_stage(recipe, "finetune")
    report = result.report

    kind = {"4bit": "nf4", "8bit": "int8"}[precision]
    linear = sum(m.weight.numel() for n, m in modelio.load_base_model(recipe.model).named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head")
    params = report["parameters"]
    assert params["by_dtype"][kind] == linear  # every decoder linear trained on in torchao's format
    assert report["base_quantizer"] == "torchao"
    # stored in its packed form: under the fp32 model's 4 bytes per weight by at least 2 bytes per quantized weight
    assert report["memory_footprint_bytes"] < 4 * params["total"] - 2 * linear
    assert params["by_dtype"]["bfloat16"] == params["trainable"]  # the adapter in bf16, as TRL makes it for QLoRA
    losses = [e["loss"] for e in json.loads((result.path / "training_log.json").read_text())
              if "loss" in e]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
    # the same batch five times, no dropout: a frozen adapter would repeat the same loss; a learning one lowers it
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses

    merged = run_stage(recipe, "merge").report["metrics"]  # verify compares on the unquantized base, or raises
    assert merged["verify_max_abs_logit_diff"] <= recipe.merge.verify.tolerance
    # the adapter is evaluated on the base it was trained on: torchao's again
    inferred = run_stage(recipe, "infer").report
    assert inferred["parameters"]["adapter"]["by_dtype"][kind] == linear


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_decoder_linears_hold_torchao_tensors_and_give_the_16bit_logits(precision, tiny_model_dir):
    """The same layers bitsandbytes quantizes hold NF4/int8 tensors (not the output head, not the embeddings), and
    the logits stay as close to the unquantized model's as bitsandbytes' are for the same data type (NF4 both;
    int8 with one absmax scale per output row both): within 10 % of bitsandbytes' relative error."""
    ids = torch.arange(5, 69).reshape(2, 32)
    reference = modelio.load_base_model(ModelSection(name_or_path=str(tiny_model_dir), dtype="float32"))
    model = _base(tiny_model_dir, precision)
    expected = {"4bit": "NF4Tensor", "8bit": "Int8Tensor"}[precision]
    for name in torchao_base.linear_layers_to_quantize(reference):
        assert type(model.get_submodule(name).weight).__name__ == expected, name
    assert type(model.lm_head.weight) is torch.nn.Parameter
    assert type(model.get_input_embeddings().weight) is torch.nn.Parameter

    with torch.no_grad():
        exact = reference(ids).logits
        errors = {q: ((_base(tiny_model_dir, precision, q)(ids).logits - exact).norm() / exact.norm()).item()
                  for q in ("bitsandbytes", "torchao")}
    assert 0 < errors["torchao"] <= 1.1 * errors["bitsandbytes"], errors


@pytest.mark.parametrize("precision", PRECISIONS)
def test_falcon_layers_are_quantized_by_torchao(tmp_path, precision):
    """FalconLinear is built as plain nn.Linear while loading, as for bitsandbytes, so torchao quantizes it too."""
    from transformers import AutoModelForCausalLM, FalconConfig

    config = FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = _base(tmp_path, precision)
    layers = [m for n, m in model.named_modules() if "query_key_value" in n or "dense" in n]
    assert layers and all(modelio.is_quantized_linear(m) for m in layers)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_a_torchao_load_that_quantizes_nothing_is_refused(tiny_model_dir):
    """Layers of an nn.Linear subclass are not the layers bitsandbytes replaces, nor torchao here: the load fails
    instead of training a full-size model as '4-bit'."""
    from transformers import AutoModelForCausalLM

    class SubclassLinear(torch.nn.Linear):
        pass

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and child_name != "lm_head":
                setattr(module, child_name, SubclassLinear(child.in_features, child.out_features))
    torchao_base.quantize_base(model, "4bit")
    with pytest.raises(ModelError, match=r"finetune.base_precision: 4bit quantized none.*SubclassLinear"):
        modelio.check_kbit_quantized(model, "4bit", "tiny")


def test_an_int8_layer_keeps_its_int8_weight_for_the_backward_not_a_16bit_copy():
    """torchao's int8 linear converts the weight to the activations' dtype and multiplies; autograd would keep that
    converted copy (2 bytes a weight in bf16) in every layer until the backward. kubetune's keeps the int8 weight
    and gives the same input gradient."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 512, dtype=torch.bfloat16).requires_grad_(False)
    dense = layer.weight.detach().clone()
    model = torch.nn.Sequential(layer)
    torchao_base.quantize_linears(model, ["0"], "8bit")
    x = torch.randn(4, 256, dtype=torch.bfloat16, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    # the int8 weight with its row scales, and the input: under what the bf16 copy alone would take
    assert sum(stored_bytes(t) for t in saved) < 2 * dense.numel(), [(type(t).__name__, t.shape) for t in saved]
    out.float().sum().backward()
    plain = x.detach().clone().requires_grad_(True)  # torchao's own linear, autograd through its 16-bit copy
    (torch.nn.functional.linear(plain, layer.weight) + layer.bias).float().sum().backward()
    assert torch.allclose(x.grad.float(), plain.grad.float(), atol=2e-2), (x.grad - plain.grad).abs().max()
    assert (layer.weight.dequantize(torch.float32) - dense.float()).abs().max() < dense.abs().max() / 100


def test_an_int8_layer_output_can_be_added_into_in_place():
    """Falcon adds into a layer's output in place (``mlp_output += attention_output``), also where no LoRA wraps the
    layer (target_modules [query_key_value]); torchao's linear returns a view, which autograd forbids modifying as
    the output of a custom Function. kubetune's int8 layer returns its own storage."""
    layer = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False)).requires_grad_(False)
    torchao_base.quantize_linears(layer, ["0"], "8bit")
    x = torch.randn(2, 3, 64, requires_grad=True)
    out = layer(x)
    out += 1.0
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()


def test_nf4_scales_are_quantized_in_blocks_that_divide_them():
    assert torchao_base.scaler_block_size(4096 * 4096 // 64) == 256  # bloom-7b1: QLoRA's 256
    assert torchao_base.scaler_block_size(4544 * 4672 // 64) == 146  # falcon-7b's fused qkv: 71 · 73 · 64 blocks
    assert torchao_base.scaler_block_size(16) == 16  # a tiny layer: all its scales in one block
