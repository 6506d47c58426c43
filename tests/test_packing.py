"""finetune.packing: packed examples never attend to each other (a model that cannot keep them apart is refused:
test_bad_inputs.py)."""

from __future__ import annotations

import pytest
import torch

from kubetune.stages import packing, run_stage


def _packed_batch(pad_token_id: int, rows: list[list[list[int]]], static: tuple[int, int] | None = None):
    """TRL's packed dataset rows (input_ids + seq_lengths) through the row collator."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = [{"input_ids": [t for ex in row for t in ex], "seq_lengths": [len(ex) for ex in row]} for row in rows]
    collator = packing.RowPackedCollator(DataCollatorForLanguageModeling(pad_token_id=pad_token_id,
                                                                         padding_free=True), static)
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
    """A 2-layer random model of each shipped architecture (jobs/*.yaml: Llama-likes, Gemma 3, Falcon, CodeGen,
    BLOOM with ALiBi)."""
    import transformers

    torch.manual_seed(0)
    config = {"llama": ("LlamaConfig", "LlamaForCausalLM",
                        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "num_key_value_heads": 2}),
              "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                         {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                          "num_key_value_heads": 1, "head_dim": 16, "sliding_window": 4}),
              "falcon": ("FalconConfig", "FalconForCausalLM",
                         {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}),
              "codegen": ("CodeGenConfig", "CodeGenForCausalLM", {"n_embd": 32, "n_layer": 2, "n_head": 4,
                                                                  "rotary_dim": 4}),
              # 6 heads: ALiBi slopes of a non-power-of-2 head count take BLOOM's second formula too
              "bloom": ("BloomConfig", "BloomForCausalLM", {"hidden_size": 48, "n_layer": 2, "n_head": 6})}[architecture]
    cfg = getattr(transformers, config[0])(vocab_size=100, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                           **config[2])
    return getattr(transformers, config[1])(cfg).eval()


SHIPPED_ARCHITECTURES = ["llama", "gemma3", "falcon", "codegen", "bloom"]


def _summed_loss(logits, labels):
    """Next-token cross-entropy summed over labelled positions (float64 for the comparison)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].double().flatten(0, 1), labels[:, 1:].flatten(),
                                             ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("architecture", SHIPPED_ARCHITECTURES)
def test_packed_rows_equal_each_example_alone(architecture):
    """For every shipped architecture, a fixed-shape packed batch (what finetune.compile trains on) gives each
    example the logits, the loss and the gradients it gets alone; BLOOM through document attention (FlexAttention
    block mask + ALiBi score_mod). Tolerance: 1e-5 absolute / 1e-4 relative on fp32 logits."""
    model = _tiny(architecture)
    packing.check_examples_kept_apart(model, architecture)
    if packing.document_attention_needed(model):
        from kubetune.stages import document_attention

        document_attention.use_document_attention(model)
    examples = [[5, 9, 14, 30, 7, 8], [11, 12, 40, 41, 42, 43, 44], [60, 61, 62], [70, 71, 72, 73, 74]]
    rows = [examples[:3], examples[3:]]  # 16 tokens, then 5 + padding, then an empty row
    batch = _packed_batch(0, rows, static=(3, 20))
    assert batch["input_ids"].shape == (3, 20)

    packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    packed_loss = _summed_loss(packed, batch["labels"])
    packed_grads = torch.autograd.grad(packed_loss, [p for p in model.parameters() if p.requires_grad],
                                       allow_unused=True)
    alone_loss = 0
    offsets = [(0, 0), (0, 6), (0, 13), (1, 0)]
    for (row, start), example in zip(offsets, examples):
        ids = torch.tensor([example])
        alone = model(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(packed[row, start:start + len(example)], alone[0], atol=1e-5, rtol=1e-4)
        labels = ids.clone()
        labels[0, 0] = -100
        alone_loss = alone_loss + _summed_loss(alone, labels)
    torch.testing.assert_close(packed_loss, alone_loss, atol=1e-4, rtol=1e-5)
    alone_grads = torch.autograd.grad(alone_loss, [p for p in model.parameters() if p.requires_grad],
                                      allow_unused=True)
    for got, want in zip(packed_grads, alone_grads):
        if want is not None:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_bloom_flex_attention_path_equals_each_example_alone():
    """The CUDA path (FlexAttention block mask + ALiBi score_mod), forward only: FlexAttention has no CPU backward."""
    from kubetune.stages import document_attention

    model = _tiny("bloom")
    document_attention.use_document_attention(model, flex=True)
    first, second = [5, 9, 14, 30, 7, 8], [11, 12, 40, 41, 42, 43, 44]
    batch = _packed_batch(0, [[first, second]], static=(1, 16))
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for start, example in ((0, first), (6, second)):
            alone = model(input_ids=torch.tensor([example]), use_cache=False).logits
            torch.testing.assert_close(packed[0, start:start + len(example)], alone[0], atol=1e-5, rtol=1e-4)


def test_bloom_packed_without_document_attention_would_mix_examples():
    """Why BLOOM needs document attention: its own mask lets the second example see the first."""
    model = _tiny("bloom")
    first, second = [5, 9, 14, 30, 7, 8], [11, 12, 40, 41, 42, 43]
    batch = _packed_batch(0, [[first, second]])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = model(input_ids=torch.tensor([second]), use_cache=False).logits
    assert not torch.allclose(packed[0, 6:], alone[0], atol=1e-3)


def test_static_batches_have_one_shape():
    """finetune.compile: every batch is batch_size rows × max_length tokens, the short last one included (empty
    rows: padding, position 0, no label)."""
    batch = _packed_batch(0, [[[5, 9, 14], [11, 12]]], static=(3, 8))
    assert batch["input_ids"].tolist() == [[5, 9, 14, 11, 12, 0, 0, 0]] + [[0] * 8] * 2
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 0]] + [[0] * 8] * 2
    assert batch["labels"].tolist() == [[-100, 9, 14, -100, 12] + [-100] * 3] + [[-100] * 8] * 2


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


def test_bloom_packed_finetune_trains_through_document_attention(recipe_dict_for, tiny_bloom_dir, monkeypatch):
    """Every training micro-batch of a packed BLOOM fine-tune reaches the model as a document mask (through peft's
    wrapper and TRL's fused loss head), not as BLOOM's own causal mask."""
    from kubetune.stages import document_attention

    shapes = []
    build = document_attention.dense_document_mask
    monkeypatch.setattr(document_attention, "dense_document_mask", lambda ids: shapes.append(ids.shape) or build(ids))
    recipe = recipe_dict_for(tiny_bloom_dir, finetune={"packing": True, "max_steps": 2, "max_length": 256,
                                                       "batch_size": 2})
    report = run_stage(recipe, "finetune").report
    assert report["metrics"]["attention"] == "flex-document"
    assert len(shapes) == sum(report["step_times"]["rows"]) // 2 == 2  # one mask per micro-batch of 2 rows
    assert all(shape[0] == 2 for shape in shapes)


def _compiled_finetune(recipe_dict_for, model_dir, run: str = "tiny", **finetune):
    recipe = recipe_dict_for(model_dir, run={"name": run}, finetune={"packing": True, "compile": True, "max_steps": 4,
                                                                     "max_length": 256, "batch_size": 2, **finetune})
    return run_stage(recipe, "finetune").report


def test_compiled_packed_bloom_never_recompiles(recipe_dict_for, tiny_bloom_dir, monkeypatch):
    """finetune.compile on packed BLOOM (document attention): static batches, so torch.compile compiles in the
    first step only, and the report says so. aot_eager: Dynamo's guards, what decides a recompile, are the same as
    under inductor (test_inductor_compiled_finetune_never_recompiles, `make test-slow`)."""
    from kubetune.stages import finetune

    monkeypatch.setattr(finetune, "COMPILE_BACKEND", "aot_eager")
    report = _compiled_finetune(recipe_dict_for, tiny_bloom_dir)
    assert report["metrics"]["attention"] == "flex-document" and report["metrics"]["packing"] == packing.ROWS
    assert report["compile"]["frames_first_step"] > 0  # it did compile
    assert report["compile"]["frames_after_warmup"] == 0, report["compile"]
    assert set(report["step_times"]["padded_tokens"]) == {2 * 256}  # one shape: batch_size × max_length


def test_a_compiled_finetune_leaves_the_float32_precision_as_it_found_it(recipe_dict_for, tiny_model_dir,
                                                                          monkeypatch):
    """transformers turns TF32 on process-wide under torch_compile (on a GPU that has it: faked here); the stages
    that `kubetune run` runs next in the same process must not inherit it (the merge's fp32 check failed so)."""
    import transformers.training_args

    from kubetune import precision
    from kubetune.stages import finetune

    monkeypatch.setattr(finetune, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(transformers.training_args, "is_torch_tf32_available", lambda: True)
    before = precision.settings()
    seen = []
    monkeypatch.setattr(finetune, "final_eval_loss", lambda trainer: seen.append(precision.settings()[""]) or 0.0)
    recipe = recipe_dict_for(tiny_model_dir, finetune={"packing": True, "compile": True, "max_steps": 2,
                                                       "max_length": 256, "batch_size": 2, "eval_steps": 2})
    run_stage(recipe, "finetune")
    assert seen == ["tf32"]  # transformers did turn it on while training
    assert precision.settings() == before


def test_compiled_packed_finetune_on_a_torchao_base_never_recompiles(recipe_dict_for, tiny_model_dir, monkeypatch):
    """finetune.base_quantizer torchao: the NF4 and int8 weights are tensors Dynamo traces (their dequantize inside
    the compiled graph), so the static packed step compiles in the first step only, into the same frames and with
    the same graph breaks (TRL's chunked loss, peft's forward) as on the 16-bit base: torchao adds none."""
    from kubetune.stages import finetune

    monkeypatch.setattr(finetune, "COMPILE_BACKEND", "aot_eager")
    reports = {}
    for precision in ("none", "4bit", "8bit"):
        torch._dynamo.reset()  # each run compiles from scratch: Dynamo's cache of the one before would not
        quantizer = {"base_quantizer": "torchao"} if precision != "none" else {}
        reports[precision] = _compiled_finetune(recipe_dict_for, tiny_model_dir, run=f"base-{precision}",
                                                base_precision=precision, **quantizer)
    for precision, kind in (("4bit", "nf4"), ("8bit", "int8")):
        report = reports[precision]
        assert report["parameters"]["by_dtype"][kind] > 0 and report["base_quantizer"] == "torchao"
        assert report["compile"]["frames_first_step"] > 0
        assert report["compile"]["frames_after_warmup"] == 0, report["compile"]
        assert report["compile"] == reports["none"]["compile"], precision


@pytest.mark.slow  # inductor generates and builds C++ for the forward and backward: ~2 min on 2 shared cores
def test_inductor_compiled_finetune_never_recompiles(recipe_dict_for, tiny_model_dir):
    report = _compiled_finetune(recipe_dict_for, tiny_model_dir)
    assert report["compile"]["frames_first_step"] > 0
    assert report["compile"]["frames_after_warmup"] == 0, report["compile"]


@pytest.mark.slow  # inductor generates and builds C++ for the first pod's step: ~2 min on 2 shared cores
def test_a_restarted_compiled_finetune_reads_its_compiled_step_from_the_claim(tiny_model_dir, tmp_path):
    """A pod's TORCHINDUCTOR_CACHE_DIR is on the claim (k8s/render.py). The fine-tune of a second pod with the same
    shapes (a retry after preemption, a rerun) reads every compiled graph back from there instead of generating
    it again, and its report says so. Each pod is `kubetune stage finetune` in a fresh process."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from tiny import tiny_recipe_dict

    from kubetune.k8s.render import _cache_env

    kubetune = Path(sys.executable).parent / "kubetune"
    claim_env = {e["name"]: e["value"] for e in _cache_env(str(tmp_path / "claim"))}  # what a stage pod gets
    caches = []
    for pod in ("first", "second"):
        own_tmp = tmp_path / pod / "tmp"  # each pod has its own /tmp, where inductor caches by default
        own_tmp.mkdir(parents=True)
        # not this process's own TORCHINDUCTOR_CACHE_DIR (inductor exports its default once used)
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR_")}
        env = {**inherited, "TMPDIR": str(own_tmp), **claim_env}
        data = tiny_recipe_dict(tiny_model_dir, tmp_path / "artifacts", run={"name": pod},
                                finetune={"packing": True, "compile": True, "max_steps": 2, "max_length": 256,
                                          "batch_size": 2})
        recipe_file = tmp_path / f"{pod}.yaml"
        recipe_file.write_text(yaml.safe_dump(data))
        proc = subprocess.run([str(kubetune), "stage", "finetune", "--recipe", str(recipe_file)], env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        report = json.loads((tmp_path / "artifacts" / pod / "finetune" / "report.json").read_text())
        assert report["compile"]["frames_after_warmup"] == 0
        caches.append(report["compile"]["cache"])
    first, second = caches
    assert first["fx_graph_misses"] > 0  # the first pod generated its code
    assert second["fx_graph_hits"] >= first["fx_graph_misses"] and second["fx_graph_misses"] == 0, caches


@pytest.fixture(scope="module")
def tiny_bloom_dir(tmp_path_factory):
    from tiny import build_tiny_bloom

    return build_tiny_bloom(tmp_path_factory.mktemp("bloom") / "model")


@pytest.fixture
def recipe_dict_for(tmp_path):
    from tiny import tiny_recipe_dict

    from kubetune.config import recipe_from_dict

    return lambda model_dir, **sections: recipe_from_dict(
        tiny_recipe_dict(model_dir, tmp_path / "artifacts", **sections))
