"""The memory estimator as a whole: the storage formats every stage shares against the real libraries'
tensors (tiny models, CPU), published 7B parameter counts, one memory model per stage, the whole estimate and
`kubetune estimate`, the training rows' padded length and the disk cache. Each stage's own model is tested in
tests/test_estimate_<stage>.py, against real tensors too; no expected value is computed by a copy of the
estimator's arithmetic."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from estimate_models import BLOOM_7B1, CONFIGS, FALCON_7B, ROOT, estimate_cache, tiny_config  # noqa: F401

from kubetune.cli import cli
from kubetune.config import recipe_from_dict
from kubetune.errors import WontFitError
from kubetune.estimate import estimate_recipe
from kubetune.estimate.estimator import Estimator
from kubetune.estimate.modelshape import build_meta_model, load_config, shape_of
from kubetune.estimate.storage import weight_bytes
from kubetune.gpus import find_gpu

# Llama-2-7b's published config.json shape fields: its parameter count (6,738,415,616) is on the model card.
LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
             "max_position_embeddings": 4096, "tie_word_embeddings": False}


# ---- parameters and storage formats ------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "bloom", "falcon"])
def test_weight_bytes_equal_a_real_models_parameters(model_type):
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    shape = shape_of(build_meta_model(config, torch.float32))
    real = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    unique = {id(p): p for p in real.parameters()}.values()
    assert shape.total_params == sum(p.numel() for p in unique)
    assert weight_bytes(shape, "bfloat16") == (0, sum(p.numel() * p.element_size() for p in unique))


def test_quantized_bytes_equal_bitsandbytes_storage(tiny_model_dir):
    """nf4 (with and without double quantization) and LLM.int8, as bitsandbytes really stores them on load."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = load_config(recipe_from_dict({"model": {"name_or_path": str(tiny_model_dir)}}).model)
    shape = shape_of(build_meta_model(config, torch.float32))
    cases = {("4bit", True): BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True),
             ("4bit", False): BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=False),
             ("8bit", True): BitsAndBytesConfig(load_in_8bit=True)}
    for (precision, dq), qconfig in cases.items():
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=qconfig, dtype=torch.float32)
        quantized = rest = 0
        for module in model.modules():
            for p in module.parameters(recurse=False):
                state = getattr(p, "quant_state", None)
                if state is not None:  # 4-bit: packed bytes + every tensor of the quantization state
                    quantized += p.numel() * p.element_size()
                    quantized += sum(v.numel() * v.element_size() for v in state.as_dict().values()
                                     if isinstance(v, torch.Tensor))
                elif type(p).__name__ == "Int8Params":
                    quantized += p.numel() * p.element_size() + p.SCB.numel() * p.SCB.element_size()
                else:
                    rest += p.numel() * p.element_size()
        assert (quantized, rest) == weight_bytes(shape, "float32", precision, dq), (precision, dq)


@pytest.mark.parametrize("precision", ["4bit", "8bit"])
@pytest.mark.parametrize("rows, columns", [(4096, 4096), (4672, 4544)])  # bloom-7b1's attention, falcon-7b's qkv
def test_torchao_bytes_are_bitsandbytes_bytes_within_a_tenth_of_a_percent(precision, rows, columns):
    """The estimator counts a torchao base (finetune.base_quantizer: torchao) with bitsandbytes' formulas: nf4 with
    double quantization, LLM.int8. Checked against the bytes torchao's own tensors hold for 7B layer shapes."""
    import torch

    from kubetune.estimate.modelshape import Linear
    from kubetune.estimate.storage import int8_bytes, nf4_bytes
    from kubetune.measure import stored_bytes
    from kubetune.torchao_base import quantize_linears

    layer = torch.nn.Sequential(torch.nn.Linear(columns, rows, bias=False, dtype=torch.bfloat16))
    quantize_linears(layer, ["0"], precision)
    real = stored_bytes(layer[0].weight)
    estimated = (nf4_bytes(rows * columns, True) if precision == "4bit"
                 else int8_bytes(Linear("0", columns, rows, False)))
    assert abs(estimated - real) <= real / 1000, (estimated, real)


# ---- published 7B shapes ---------------------------------------------------------------------------------------
def test_7b_shapes_match_published_parameter_counts(tmp_path):
    import torch
    from transformers import LlamaConfig

    llama = shape_of(build_meta_model(LlamaConfig(**{k: v for k, v in LLAMA2_7B.items() if k != "model_type"}),
                                      torch.bfloat16))
    assert llama.total_params == 6_738_415_616
    assert weight_bytes(llama, "bfloat16") == (0, 2 * 6_738_415_616)
    q, rest = weight_bytes(llama, "bfloat16", "4bit", True)
    assert 3.5e9 <= q + rest <= 3.9e9  # a 7B model in nf4 with 16-bit embeddings and head: 3.5-3.9 GB as published
    bloom = shape_of(build_meta_model(load_config(None, BLOOM_7B1), torch.bfloat16))
    falcon = shape_of(build_meta_model(load_config(None, FALCON_7B), torch.bfloat16))
    assert bloom.total_params == 7_069_016_064 and falcon.total_params == 6_921_720_704


# ---- the whole estimate and the command ------------------------------------------------------------------------
def test_each_gpu_stage_has_one_memory_model_of_one_signature_and_none_imports_torch():
    """``kubetune.estimate.<stage>:estimate_memory(est, recipe=None)`` for every GPU stage (what the stage registry
    names); importing them, as the CLI does, leaves torch and transformers out."""
    import subprocess
    import sys

    code = ("import inspect, json, sys\n"
            "from kubetune.estimate import GPU_STAGES\n"
            "from kubetune.estimate.estimator import memory_model\n"
            "found = {s: [memory_model(s).__module__, str(inspect.signature(memory_model(s)))] for s in GPU_STAGES}\n"
            "print(json.dumps([found, 'torch' in sys.modules, 'transformers' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    found, torch_imported, transformers_imported = json.loads(out.stdout)
    assert found == {s: [f"kubetune.estimate.{s}", "(est: 'Estimator', recipe=None) -> 'StageEstimate'"]
                     for s in ("finetune", "merge", "quantize", "infer")}
    assert not torch_imported and not transformers_imported


def shipped(name: str, *overrides: str):
    from kubetune.config import load_recipe

    return load_recipe(ROOT / "jobs" / name, list(overrides))


def test_bloom_7b1_16bit_without_checkpointing_does_not_fit_40gb_and_the_suggestions_do():
    recipe = shipped("bloom-7b1-qlora.yaml", "finetune.base_precision=none", "finetune.batch_size=8",
                     "finetune.gradient_checkpointing=false")
    a100 = find_gpu("A100-40GB")
    result = estimate_recipe(recipe, model_config=BLOOM_7B1, gpu=a100)
    ft = result.stage("finetune")
    assert not ft.fits(a100.memory_bytes) and ft.fits(find_gpu("H200").memory_bytes)
    assert result.failures() == [("finetune", a100)]
    options = result.suggestions["finetune"]
    assert any("gradient checkpointing" in o.change for o in options)
    for option in options:  # each suggestion, applied to the recipe, really fits
        again = estimate_recipe(shipped("bloom-7b1-qlora.yaml", "finetune.base_precision=none", "finetune.batch_size=8",
                                        "finetune.gradient_checkpointing=false", *option.overrides),
                                model_config=BLOOM_7B1, gpu=a100, suggest=False)
        assert again.stage("finetune").total_bytes == option.total_bytes
        assert again.failures() == []


def test_bloom_7b1_qlora_fits_the_40gb_card_its_recipe_asks_for():
    result = estimate_recipe(shipped("bloom-7b1-qlora.yaml"), model_config=BLOOM_7B1)
    assert result.stage("finetune").fits(find_gpu("A100-40GB").memory_bytes)
    assert result.target == {"finetune": find_gpu("A100-40GB")}  # resources.finetune.gpu_type of that recipe


def test_estimate_command_tables_json_and_exit_codes(tmp_path):
    runner = CliRunner()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": "bigscience/bloom-7b1"},
                                      "finetune": {"gradient_checkpointing": False}}))
    ok = runner.invoke(cli, ["estimate", str(recipe), "--model-config", str(BLOOM_7B1), "--gpu", "H200"])
    assert ok.exit_code == 0, ok.output
    for text in ("finetune", "merge", "quantize", "infer", "A100-40GB", "H200", "peak (nvidia-smi)"):
        assert text in ok.output
    data = json.loads(runner.invoke(cli, ["estimate", str(recipe), "--model-config", str(BLOOM_7B1),
                                          "--json"]).output)
    ft = next(s for s in data["stages"] if s["stage"] == "finetune")
    assert ft["fits"]["H200"] and not ft["fits"]["A100-40GB"]
    assert sum(c["bytes"] for c in ft["components"]) == ft["allocated_bytes"]
    assert data["suggestions"]["finetune"]["gpu"] == "A100-40GB"
    too_small = runner.invoke(cli, ["estimate", str(recipe), "--model-config", str(BLOOM_7B1), "--gpu", "a100-40gb"])
    assert too_small.exit_code == WontFitError.exit_code == 12
    assert "finetune needs" in too_small.output and "Traceback" not in too_small.output
    unknown = runner.invoke(cli, ["estimate", str(recipe), "--model-config", str(BLOOM_7B1), "--gpu", "V100"])
    assert unknown.exit_code == 2 and "not a card kubetune knows" in unknown.output


def test_hub_model_without_network_or_config_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": "nobody/no-such-model-xyz"}}))
    result = CliRunner().invoke(cli, ["estimate", str(recipe)])
    assert result.exit_code == 5 and "--model-config" in result.output


def test_a_7b_estimate_traces_two_layers_and_answers_quickly():
    import time

    started = time.perf_counter()
    result = estimate_recipe(shipped("falcon-7b-8bit.yaml"), model_config=FALCON_7B)
    assert time.perf_counter() - started < 10  # < 5 s on an idle laptop; CI shares two cores
    assert math.isclose(result.params, 6_921_720_704)
    assert [s.stage for s in result.stages] == ["finetune", "merge", "quantize", "infer"]


# ---- padded length from the training rows, the disk cache ----------------------------------------------------------


def test_worst_batch_pads_to_the_longest_row_and_counts_labels_by_hand():
    from kubetune.estimate.rows import Rows, worst_batch

    # rows of (total, completion) tokens: (10, 4), (30, 5), (20, 12), (50, 2)
    rows = Rows((10, 30, 20, 50), (4, 5, 12, 2), "test")
    wb = worst_batch(rows, "", batch=2, max_length=40, completion_only=True, packing=False)
    # longest row 50 is cut at 40; completion-only labels per row: 4, 5, 12, and the 50-row keeps 40-48 < 0 -> dropped
    assert wb.length == 40 and wb.labelled == 12 + 5
    wb = worst_batch(rows, "", batch=2, max_length=64, completion_only=False, packing=False)
    assert wb.length == 50 and wb.labelled == 49 + 29  # whole-sequence loss: every position but the first
    assert worst_batch(None, "no tokenizer", 3, 64, True, False).length == 64
    assert worst_batch(rows, "", 3, 64, True, packing=True).labelled == 3 * 63


def test_training_rows_are_tokenized_and_split_as_trl_and_kubetune_data_do(tiny_model_dir):
    from transformers import AutoTokenizer

    from kubetune.data import load_splits, prompt_completion
    from kubetune.estimate.rows import read_rows
    from kubetune.prompt import PromptTemplate

    recipe = recipe_from_dict({"model": {"name_or_path": str(tiny_model_dir)},
                               "data": {"source": "builtin:text2sql", "builtin_examples": 120, "eval_size": 20}})
    rows = read_rows(recipe)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    train = prompt_completion(load_splits(recipe.data).train, PromptTemplate(recipe.prompt.template), tok.eos_token)
    assert len(rows.total) == len(train) == 100
    for i, row in enumerate(train):  # TRL's tokenize_fn: prompt, and prompt + completion
        whole = tok(row["prompt"] + row["completion"])["input_ids"]
        prompt = tok(row["prompt"])["input_ids"]
        common = next((k for k, (a, b) in enumerate(zip(prompt, whole)) if a != b), min(len(prompt), len(whole)))
        assert (rows.total[i], rows.completion[i]) == (len(whole), len(whole) - common)


def test_estimate_uses_the_padded_length_of_local_rows_and_says_so(tiny_model_dir):
    recipe = recipe_from_dict({"model": {"name_or_path": str(tiny_model_dir)},
                               "data": {"source": "builtin:text2sql", "builtin_examples": 120, "eval_size": 20},
                               "finetune": {"batch_size": 4, "max_length": 512}})
    ft = estimate_recipe(recipe, suggest=False).stage("finetune")
    assert ft.settings["padded_length"] < 512 and "longest of 100 training rows" in " ".join(ft.notes)
    worst = estimate_recipe(recipe_from_dict({**recipe.model_dump(mode="json"), "model": {
        "name_or_path": str(tiny_model_dir)}, "data": {"source": "nobody/hub-data"}}), suggest=False)
    assert worst.stage("finetune").settings["padded_length"] == 512
    assert "worst case" in " ".join(worst.stage("finetune").notes)


def test_the_cli_reads_the_rows_in_a_forked_process_and_gets_the_same_figures(tiny_model_dir, tmp_path):
    """`kubetune estimate` starts before torch is imported, so it tokenizes the rows in a forked process while it
    imports; the figures are those of the in-process read."""
    import subprocess
    import sys

    data = {"model": {"name_or_path": str(tiny_model_dir)},
            "data": {"source": "builtin:text2sql", "builtin_examples": 120, "eval_size": 20},
            "finetune": {"batch_size": 4, "max_length": 512}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "KUBETUNE_ESTIMATE_CACHE": "off"}
    out = subprocess.run([str(Path(sys.executable).with_name("kubetune")), "estimate", str(path), "--json"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    ft = next(s for s in json.loads(out.stdout)["stages"] if s["stage"] == "finetune")
    here = estimate_recipe(recipe_from_dict(data), suggest=False).stage("finetune")
    assert ft["settings"]["padded_length"] == here.settings["padded_length"] < 512
    assert ft["allocated_bytes"] == here.allocated_bytes


def test_the_console_script_skips_teardown_yet_prints_everything_and_keeps_exit_codes(tmp_path):
    """`kubetune estimate` ends its process without Python's finalization (~1 s after torch and transformers): the
    whole table still comes out, and a stage that does not fit still exits 12 with its one-line error."""
    import subprocess
    import sys

    script = str(Path(sys.executable).with_name("kubetune"))
    env = {**os.environ, "KUBETUNE_ESTIMATE_CACHE": str(tmp_path / "cache")}
    config = str(ROOT / "bench" / "configs" / "bigscience--bloom-7b1.json")
    fits = subprocess.run([script, "estimate", str(ROOT / "jobs" / "bloom-7b1-qlora.yaml"), "--model-config", config],
                          capture_output=True, text=True, env=env, timeout=120)
    assert fits.returncode == 0, fits.stderr
    assert all(stage in fits.stdout for stage in ("finetune", "merge", "quantize", "infer"))
    assert fits.stdout.rstrip().endswith("┘")  # the last table's bottom border: nothing was cut off
    big = subprocess.run([script, "estimate", str(ROOT / "jobs" / "bloom-7b1-qlora.yaml"), "--model-config", config,
                          "--set", "finetune.batch_size=256", "--gpu", "A100-40GB"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert big.returncode == 12
    assert big.stderr.strip().splitlines() == [line for line in big.stderr.strip().splitlines()
                                               if line.startswith("error: ")] and "A100-40GB" in big.stderr


def test_a_second_estimate_reads_the_disk_cache_without_building_the_model():
    first = estimate_recipe(shipped("bloom-1b1-lora.yaml"), model_config=CONFIGS / "bigscience--bloom-1b1.json")
    from kubetune.estimate.modelshape import raw_config

    raw, source = raw_config(None, CONFIGS / "bigscience--bloom-1b1.json")
    est = Estimator(shipped("bloom-1b1-lora.yaml"), raw_config=raw, config_source=source)
    again = [est.estimate(stage) for stage in ("finetune", "merge", "quantize", "infer")]
    assert est._meta is None and est._config is None and not est._models  # nothing built, no config object
    assert [s.allocated_bytes for s in again] == [s.allocated_bytes for s in first.stages]
