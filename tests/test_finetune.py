"""The fine-tune stage on the tiny model: LoRA, QLoRA (4/8-bit base), packing with a schedule that ends where
training ends, kill-and-resume through the CLI, skip on rerun, and the errors a user can act on."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tiny import tiny_recipe_dict

from kubetune.artifacts import RunLayout
from kubetune.errors import ModelError, RecipeError
from kubetune.stages import StageContext, run_stage
from kubetune.stages import finetune

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "kubetune_prompt.json", "tokenizer.json",
                 "tokenizer_config.json", "training_log.json", "report.json", "_SUCCESS")
KUBETUNE = Path(sys.executable).parent / "kubetune"


@pytest.fixture(scope="session")
def sql_jsonl(tmp_path_factory) -> Path:
    """120 small Text-to-SQL rows (the tiny tokenizer makes each ~100 tokens with the default template)."""
    rng = random.Random(0)
    rows = []
    for i in range(120):
        col = rng.choice(["age", "city", "salary", "score"])
        name = rng.choice(["ann", "bob", "cyd", "dan"])
        rows.append({"context": f"CREATE TABLE people (name VARCHAR, {col} INTEGER)",
                     "question": f"what is the {col} of {name} {i}",
                     "answer": f"SELECT {col} FROM people WHERE name = '{name}'"})
    path = tmp_path_factory.mktemp("data") / "sql.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def recipe_dict(tiny_model_dir, tmp_path, sql_jsonl):
    """Factory: the tiny recipe reading the local data file; keyword arguments update sections."""
    data = {"source": str(sql_jsonl), "eval_size": 16, "max_eval_examples": 8}

    def make(**sections):
        return tiny_recipe_dict(tiny_model_dir, tmp_path / "artifacts", **{"data": data, **sections})

    return make


@pytest.fixture
def recipe(recipe_dict):
    from kubetune.config import recipe_from_dict

    return lambda **sections: recipe_from_dict(recipe_dict(**sections))


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}


def _linear_weights(model_dir: Path) -> tuple[int, int]:
    """(all parameters, weights of the decoder's linear layers: those bitsandbytes quantizes) of the fp32 base."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head")
    return sum(p.numel() for p in model.parameters()), linear


# ---- whole runs --------------------------------------------------------------------------------------------------
def test_lora_run_writes_adapter_and_report_then_skips(recipe):
    r = recipe(finetune={"max_steps": 4, "eval_steps": 3})
    seen = []
    result = run_stage(r, "finetune", progress=lambda *args: seen.append(args))
    assert result.status == "done"
    for name in ADAPTER_FILES:
        assert (result.path / name).is_file(), name
    assert not list(result.path.glob("*.bin")) and not list(result.path.glob("*.pt"))  # safetensors only
    config = json.loads((result.path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8

    report = json.loads((result.path / "report.json").read_text())
    m = report["metrics"]
    assert math.isfinite(m["train_loss"]) and math.isfinite(m["eval_loss"])
    assert m["planned_steps"] == m["steps_run"] == 4
    assert m["resumed_from_step"] is None
    assert m["train_examples"] == 104  # 120 rows - 16 held out
    t = report["throughput"]
    # 4 steps × 4 rows of ~100 real tokens; no padding counted, so fewer than 16 rows × max_length
    assert 16 * 40 < t["train_tokens"] < 16 * 128
    assert t["train_tokens_per_s"] > 0 and t["samples_per_s"] > 0 and t["train_seconds"] > 0
    # each optimizer step's time and work (what bench/harness.py reads): 4 steps of 4 padded rows
    steps = report["step_times"]
    assert steps["clock"] == "host" and len(steps["ms"]) == 4 and all(ms > 0 for ms in steps["ms"])
    assert sum(steps["tokens"]) == t["train_tokens"] and steps["rows"] == [4, 4, 4, 4]
    for tokens, sum_s2, rows, padded in zip(steps["tokens"], steps["sum_s2"], steps["rows"], steps["padded_tokens"]):
        # Σ s² over rows of s tokens: at least all rows equally long, at most every row the padded length
        assert tokens < padded and tokens ** 2 / rows <= sum_s2 <= tokens * padded / rows
    p = report["parameters"]
    assert p["trainable"] > 0 and p["total"] > p["trainable"] and p["by_dtype"] == {"float32": p["total"]}
    assert 0 <= report["memory_footprint_bytes"] - 4 * p["total"] < 1024  # fp32 weights + rotary buffers
    assert report["precision"] == "fp32" and report["device"] == "cpu"
    # the progress callback saw every step, ending at the planned count, with the loss in its text
    assert [s[1] for s in seen] == [1, 2, 3, 4] and all(s[2] == 4 for s in seen)
    assert seen[-1][3].startswith("loss ")

    before = _snapshot(result.path)
    again = run_stage(r, "finetune")
    assert again.status == "skipped" and again.report["fingerprint"] == report["fingerprint"]
    assert _snapshot(result.path) == before


@pytest.mark.parametrize("precision, dtype_key", [("4bit", "nf4"), ("8bit", "int8")])
def test_qlora_on_cpu_counts_quantized_weights(recipe, tiny_model_dir, precision, dtype_key):
    r = recipe(finetune={"max_steps": 2, "base_precision": precision,
                         "bnb": {"quant_type": "nf4", "double_quant": True}})
    report = run_stage(r, "finetune").report
    assert math.isfinite(report["metrics"]["train_loss"])
    assert report["metrics"]["steps_run"] == 2
    params = report["parameters"]
    base_total, linear = _linear_weights(tiny_model_dir)
    # packed weights counted as the weights they hold: same total as the unquantized base plus the adapter
    assert params["by_dtype"][dtype_key] == linear
    assert params["total"] == base_total + params["trainable"]
    # and stored in fewer bytes than fp32 (4-bit: half a byte per weight; 8-bit: one)
    assert report["memory_footprint_bytes"] < 4 * params["total"]


@pytest.mark.parametrize("quantizer", ["bitsandbytes", "torchao"])
@pytest.mark.parametrize("precision, frozen_rest", [("bf16", "bfloat16"), ("fp32", "float32")])
def test_a_kbit_base_keeps_its_16bit_rest_under_bf16(recipe, precision, frozen_rest, quantizer):
    """bf16 training leaves the frozen embeddings and norms of a 4-bit base in bf16 (fp32 would double them: 1.9
    GiB more for BLOOM-7B1); fp32 training upcasts them, as peft's QLoRA preparation does, and leaves the 4-bit
    weights 4-bit (torchao's too)."""
    r = recipe(model={"dtype": "bfloat16"},
               finetune={"max_steps": 2, "base_precision": "4bit", "precision": precision,
                         "base_quantizer": quantizer})
    report = run_stage(r, "finetune").report
    assert math.isfinite(report["metrics"]["train_loss"]) and report["metrics"]["steps_run"] == 2
    by_dtype, trainable = report["parameters"]["by_dtype"], report["parameters"]["trainable"]
    assert by_dtype["nf4"] > 0
    fp32 = by_dtype.get("float32", 0)
    if frozen_rest == "bfloat16":
        assert fp32 <= trainable and by_dtype["bfloat16"] > trainable  # at most the LoRA weights are fp32
    else:
        assert fp32 > trainable  # the frozen embeddings and norms too


def test_packing_schedule_ends_with_training(recipe, sql_jsonl):
    # Epochs, not max_steps: the plan must come from the packed data's length (the bug this guards against
    # planned from an estimate, ~30× the steps that ran, and the learning rate never decayed).
    r = recipe(data={"source": str(sql_jsonl), "eval_size": 16, "train_fraction": 0.5},
               finetune={"max_steps": None, "epochs": 1, "packing": True, "max_length": 512, "batch_size": 2,
                         "lr_scheduler": "linear", "warmup_ratio": 0.1, "save_steps": 100, "logging_steps": 1})
    result = run_stage(r, "finetune")
    m = result.report["metrics"]
    assert m["train_sequences"] < m["train_examples"] / 2  # several ~100-token rows per 512-token sequence
    assert m["planned_steps"] == math.ceil(m["train_sequences"] / 2)
    assert m["steps_run"] == m["planned_steps"]
    assert m["final_learning_rate"] < 1e-3 * 2e-4
    assert m["warmup_steps"] == math.ceil(0.1 * m["planned_steps"])
    lrs = [e["learning_rate"] for e in json.loads((result.path / "training_log.json").read_text())
           if "learning_rate" in e]
    assert max(lrs) == pytest.approx(2e-4) and lrs[-1] < lrs[len(lrs) // 2] < max(lrs)
    assert result.report["throughput"]["train_tokens"] > 0


class _Crash(Exception):
    pass


def test_crash_then_resume_in_process(recipe, monkeypatch):
    """The fast twin of the kill test: a crash at step 5 (after checkpoint-4), a rerun that resumes there and
    crashes again while writing the artifact (after the final checkpoint-8), and a third run that trains no
    further step but saves checkpoint-8's adapter."""
    from safetensors.torch import load_file

    from kubetune.prompt import PromptTemplate

    r = recipe(finetune={"max_steps": 8, "save_steps": 4, "lr_scheduler": "linear"})
    layout = RunLayout.from_recipe(r)
    checkpoints = layout.work_dir("finetune") / "checkpoints"

    def crash_at_step_5(stage, step, total, text):
        if step == 5:
            raise _Crash

    with pytest.raises(_Crash):
        run_stage(r, "finetune", progress=crash_at_step_5)
    assert layout.marker("finetune") is None
    assert [p.name for p in checkpoints.glob("checkpoint-*")] == ["checkpoint-4"]

    def crash(*args):
        raise _Crash

    with monkeypatch.context() as m:
        m.setattr(PromptTemplate, "save", crash)
        with pytest.raises(_Crash):
            run_stage(r, "finetune")
    assert layout.marker("finetune") is None
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]

    result = run_stage(r, "finetune")
    m = result.report["metrics"]
    assert m["resumed_from_step"] == 8 and m["train_loss"] is None
    assert m["steps_run"] == m["planned_steps"] == 8 and m["final_learning_rate"] == 0.0
    saved = load_file(result.path / "adapter_model.safetensors")
    final = load_file(checkpoints / "checkpoint-8" / "adapter_model.safetensors")
    first = load_file(checkpoints / "checkpoint-4" / "adapter_model.safetensors")
    assert saved.keys() == final.keys()
    assert all(saved[k].equal(final[k]) for k in saved)
    assert not all(saved[k].equal(first[k]) for k in saved)


@pytest.mark.slow  # ~25-55 s on 2 shared cores: a fresh `kubetune` process imports torch, transformers, trl
def test_kill_and_resume(recipe_dict, tmp_path):
    """A pod killed mid-run leaves checkpoints and no artifact; the rerun resumes and ends at the planned step."""
    from kubetune.config import recipe_from_dict

    data = recipe_dict(finetune={"max_steps": 24, "save_steps": 3, "save_total_limit": 3})
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    r = recipe_from_dict(data)
    layout = RunLayout.from_recipe(r)
    checkpoints = layout.work_dir("finetune") / "checkpoints"

    proc = subprocess.Popen([str(KUBETUNE), "stage", "finetune", "--recipe", str(recipe_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not list(checkpoints.glob(f"checkpoint-*/{finetune.CHECKPOINT_MARKER}")):  # a sealed checkpoint
            assert proc.poll() is None, f"the stage ended before a checkpoint: {proc.stdout.read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.communicate()
    assert not (layout.stage_dir("finetune") / "_SUCCESS").exists()
    # what a kill during a save leaves behind: a newer, incomplete checkpoint that must not be resumed
    partial = checkpoints / "checkpoint-21"
    partial.mkdir(exist_ok=True)
    (partial / "adapter_model.safetensors").write_bytes(b"")

    result = run_stage(r, "finetune")
    m = result.report["metrics"]
    assert result.status == "done"
    assert m["resumed_from_step"] > 0 and m["resumed_from_step"] % 3 == 0 and m["resumed_from_step"] != 21
    assert m["steps_run"] == m["planned_steps"] == 24
    assert m["final_learning_rate"] < 1e-3 * 2e-4  # cosine over the 24 planned steps, finished
    assert (result.path / "adapter_model.safetensors").is_file()
    assert list((layout.run_dir / ".trash").glob("checkpoint-21-*"))


# ---- checkpoints -------------------------------------------------------------------------------------------------
def _fake_checkpoint(folder: Path, step: int, skip: str | None = None, state: str | None = None) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in finetune.CHECKPOINT_FILES:
        if name != skip:
            (path / name).write_text(state if name == "trainer_state.json" and state is not None
                                     else json.dumps({"global_step": step, "max_steps": 100}))
    return path


def test_latest_complete_checkpoint_skips_partial_ones(tmp_path):
    layout = RunLayout(tmp_path, "r")
    folder = layout.work_dir("finetune") / "checkpoints"
    good = _fake_checkpoint(folder, 10)
    _fake_checkpoint(folder, 5)
    _fake_checkpoint(folder, 15, skip="optimizer.pt")
    _fake_checkpoint(folder, 20, state='{"global_st')  # killed while writing the state
    _fake_checkpoint(folder, 25, skip="trainer_state.json")
    (folder / "checkpoint-x").mkdir()

    assert finetune.latest_complete_checkpoint(folder, layout) == good
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-10", "checkpoint-5", "checkpoint-x"]
    moved = sorted(p.name.split("-")[1] for p in (layout.run_dir / ".trash").iterdir())
    assert moved == ["15", "20", "25"]
    assert finetune.latest_complete_checkpoint(tmp_path / "empty", layout) is None


def test_checkpoints_of_another_recipe_are_moved_aside(recipe, tmp_path):
    def ctx_for(r):
        layout = RunLayout.from_recipe(r)
        return StageContext(recipe=r, layout=layout, stage="finetune", out=tmp_path / "out")

    ctx = ctx_for(recipe())
    folder = finetune.checkpoint_dir(ctx)
    _fake_checkpoint(folder, 4)
    assert finetune.checkpoint_dir(ctx) == folder and (folder / "checkpoint-4").is_dir()  # same recipe: kept

    other = ctx_for(recipe(finetune={"lora": {"r": 8, "alpha": 16}}))
    assert not list(finetune.checkpoint_dir(other).iterdir())
    assert list((other.layout.run_dir / ".trash").glob("checkpoints-*/checkpoint-4"))


# ---- user errors -------------------------------------------------------------------------------------------------
def test_missing_model_folder_exits_5_naming_the_field(recipe_dict, tmp_path):
    from click.testing import CliRunner

    from kubetune.cli import cli

    data = recipe_dict(model={"name_or_path": str(tmp_path / "no-such-model"), "dtype": "float32"})
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(cli, ["stage", "finetune", "--recipe", str(recipe_file)])
    assert result.exit_code == ModelError.exit_code == 5
    assert "model.name_or_path" in result.output and "no-such-model" in result.output
    assert not (tmp_path / "artifacts" / "tiny" / "finetune").exists()


def test_unknown_target_module_is_a_model_error(recipe):
    with pytest.raises(ModelError, match=r"finetune\.lora\.target_modules: \['qkv_proj'\].*q_proj"):
        run_stage(recipe(finetune={"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "qkv_proj"]}}),
                  "finetune")


def test_liger_kernels_without_liger_is_a_model_error_before_training(recipe):
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed here")
    with pytest.raises(ModelError, match=r"finetune\.liger_kernels: liger-kernel cannot be imported here"):
        run_stage(recipe(finetune={"liger_kernels": True}), "finetune")


def test_a_compiled_micro_batch_of_2_31_logits_is_refused_before_training(recipe):
    """Gemma 3 at 8 × 1024 packed positions (2^31 logits) crashed its first compiled step on an H100 with an
    illegal memory access; the same size on the tiny model's vocabulary is refused with the largest batch that fits."""
    from kubetune.stages.finetune import COMPILED_LOGITS_LIMIT

    r = recipe(finetune={"packing": True, "compile": True, "batch_size": 4096, "max_length": 2048})
    vocab = 2**31 // (4096 * 2048) + 1  # what the tiny model must have at least for this test to mean anything
    with pytest.raises(RecipeError, match=r"finetune\.compile: a micro-batch of 4096 × 2048 positions × .* reaches "
                                          r"2\^31.*use batch_size ≤ \d+ per GPU"):
        run_stage(r, "finetune")
    assert COMPILED_LOGITS_LIMIT == 2**31 and vocab < 1000


def test_fp16_needs_a_gpu(recipe):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RecipeError, match="finetune.precision: fp16 needs a CUDA GPU"):
        run_stage(recipe(finetune={"precision": "fp16"}), "finetune")


def test_a_4bit_load_that_quantizes_nothing_is_refused(tiny_model_dir):
    """Falcon builds its layers from an nn.Linear subclass that bitsandbytes skips: never train it as '4-bit'."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune.errors import ModelError
    from kubetune.modelio import check_kbit_quantized

    class SubclassLinear(torch.nn.Linear):
        pass

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for module in model.modules():  # what a FalconLinear model looks like after a bitsandbytes load
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and child_name != "lm_head":
                replacement = SubclassLinear(child.in_features, child.out_features, bias=child.bias is not None)
                setattr(module, child_name, replacement)
    with pytest.raises(ModelError, match=r"finetune.base_precision: 4bit quantized none.*SubclassLinear"):
        check_kbit_quantized(model, "4bit", "tiny")
    check_kbit_quantized(model, "none", "tiny")  # nothing to check without a k-bit base


@pytest.mark.parametrize("base_precision", ["4bit", "8bit"])
def test_falcon_layers_are_quantized_by_a_kbit_load(tmp_path, base_precision):
    """Falcon's FalconLinear layers are built as plain nn.Linear while loading, so bitsandbytes really quantizes them
    (before, a falcon-7b "8-bit" base stayed bf16), and the model still runs."""
    import torch
    from transformers import AutoModelForCausalLM, FalconConfig
    from transformers.models.falcon import modeling_falcon

    from kubetune.config import FinetuneSection, ModelSection
    from kubetune.modelio import bnb_config, load_base_model

    config = FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    section = ModelSection(name_or_path=str(tmp_path), dtype="float32")
    quantization = bnb_config(FinetuneSection(base_precision=base_precision), torch.float32)
    model = load_base_model(section, quantization_config=quantization)

    kinds = {type(m).__name__ for n, m in model.named_modules() if "query_key_value" in n or "dense" in n}
    assert kinds == {"Linear8bitLt" if base_precision == "8bit" else "Linear4bit"}
    assert modeling_falcon.FalconLinear is not torch.nn.Linear  # restored after the load
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def test_group_by_length_cuts_the_padding(recipe_dict, tmp_path):
    """Rows of very different lengths: batching similar lengths together computes on far fewer padding positions,
    and the report says how many there were."""
    from kubetune.config import recipe_from_dict

    rng = random.Random(1)
    # ~60 to ~125 tokens; 400 rows, so that the sampler's groups (a quarter of the data, at most 50 batches) are
    # large enough to hold rows of nearly equal length
    rows = [{"context": "CREATE TABLE t (a VARCHAR)", "question": "which a " + " ".join(["please"] * rng.randint(1, 11)),
             "answer": "SELECT a FROM t"} for _ in range(400)]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    padding = {}
    for grouped in (False, True):
        d = recipe_dict(finetune={"max_steps": 6, "batch_size": 8, "group_by_length": grouped})
        d["data"]["source"] = str(data)
        d["run"]["name"] = f"grouped-{str(grouped).lower()}"
        report = run_stage(recipe_from_dict(d), "finetune").report
        padding[grouped] = report["throughput"]["padding_fraction"]
    assert 0 <= 3 * padding[True] < padding[False]


def test_an_8bit_layer_output_can_be_added_into_in_place():
    """bitsandbytes' int8 matmul returns a view made inside its autograd Function; Falcon adds into that output in
    place, which autograd forbids (seen on the GPU for the original recipe's falcon-7b). kubetune's 8-bit loads give
    such outputs their own storage while gradients are recorded."""
    import torch

    from kubetune.modelio import detach_int8_output_views

    class ViewOfInput(torch.autograd.Function):  # what MatMul8bitLt's output looks like to autograd
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return grad

    class Linear8bitLt(torch.nn.Module):
        def forward(self, x):
            return ViewOfInput.apply(x)

    class FalconLikeBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dense_4h_to_h = Linear8bitLt()

        def forward(self, x):
            mlp_output = self.dense_4h_to_h(x)
            mlp_output += x  # modeling_falcon: mlp_output += attention_output
            return mlp_output

    x = torch.randn(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
        FalconLikeBlock()(x * 1)
    block = FalconLikeBlock()
    detach_int8_output_views(block)
    block(x * 1).sum().backward()
    assert torch.equal(x.grad, torch.full((4,), 2.0))


def test_on_the_cpu_the_lm_head_projects_only_the_answer_positions(recipe, monkeypatch):
    """TRL's chunked LM head scores every position off Triton devices unless told otherwise; with completion-only
    loss only the answer positions carry a label, and only those go through the head (the demo's fine-tune step
    is ~2.7x faster for it; the loss is the same)."""
    from trl.kernels import chunked_logprob

    seen = []
    apply = chunked_logprob.ChunkedLogProbFunction.apply

    def spy(hidden, *args):
        seen.append(hidden.shape[0])  # positions projected through the head
        return apply(hidden, *args)

    monkeypatch.setattr(chunked_logprob.ChunkedLogProbFunction, "apply", spy)
    report = run_stage(recipe(finetune={"max_steps": 1, "batch_size": 4}), "finetune").report
    assert seen and report["metrics"]["steps_run"] == 1
    # the answers (~12 of each row's ~100 tokens): not the prompts, not the padding (all of them: 412 > 415 / 2)
    assert seen[0] < report["throughput"]["train_tokens"] / 2


def test_a_profiled_step_reports_where_its_time_went(recipe):
    import gzip

    result = run_stage(recipe(finetune={"max_steps": 3, "profile_step": 2}), "finetune")
    profile = json.loads((result.path / "report.json").read_text())["profile"]
    assert profile["step"] == 2 and profile["device"] == "cpu" and profile["wall_ms"] > 0
    assert profile["device_busy_ms"] is None  # no kernels on a CPU: the operators stand in
    names = [op["name"] for op in profile["top"]]
    assert any(n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear") for n in names), names
    assert all(op["calls"] >= 1 and op["ms"] >= 0 for op in profile["top"])
    trace = json.loads(gzip.decompress((result.path / "profile-step-2.json.gz").read_bytes()))
    assert trace["traceEvents"]  # the whole step, for Perfetto


def test_a_profile_step_past_the_last_step_profiles_nothing(recipe):
    result = run_stage(recipe(finetune={"max_steps": 2, "profile_step": 5}), "finetune")
    assert json.loads((result.path / "report.json").read_text())["profile"] is None
    assert not list(result.path.glob("profile-step-*"))
