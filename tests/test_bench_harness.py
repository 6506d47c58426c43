"""bench/harness.py: the arithmetic behind its tokens/s and MFU, and the cases it runs: every case a valid recipe
that kubetune's pre-flight accepts, pinned by a hash of its resolved settings (no GPU, no timing)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_harness():
    spec = importlib.util.spec_from_file_location("bench_harness", ROOT / "bench" / "harness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


harness = load_harness()


def case_recipe(case, tmp_path, steps=10, warmup=3):
    spec = harness.CASES[case]
    return harness.recipe_for(case, spec, tmp_path / "models" / spec["model"], tmp_path, steps=steps, warmup=warmup,
                              tiny=False)


def test_steps_from_the_fine_tune_report():
    report = {"step_times": {"clock": "cuda-events", "ms": [10.0, 12.5], "tokens": [100, 90], "sum_s2": [5000, 4100],
                             "rows": [2, 2], "padded_tokens": [128, 128]}}
    assert harness.report_steps(report) == [
        {"ms": 10.0, "tokens": 100, "sum_s2": 5000, "rows": 2, "padded_tokens": 128},
        {"ms": 12.5, "tokens": 90, "sum_s2": 4100, "rows": 2, "padded_tokens": 128}]
    assert harness.report_steps({}) == []  # a report from before step_times


def test_step_summary_flops():
    steps = [{"ms": 1000.0, "tokens": 100, "sum_s2": 10_000, "rows": 1, "padded_tokens": 100}] * 3
    s = harness.step_summary(steps, warmup=1, n_matmul=1_000, layers=2, hidden=8)
    assert s["steps_measured"] == 2
    assert s["tokens_per_s"] == pytest.approx(100.0)
    linear = 4 * 1_000 * 100  # per step, 1 s each
    attention = 6 * 2 * 8 * 10_000
    assert s["mfu_4nt"] == pytest.approx(linear / harness.PEAK_BF16_FLOPS)
    assert s["mfu_4nt_attention"] == pytest.approx((linear + attention) / harness.PEAK_BF16_FLOPS)
    assert s["padding_fraction"] == 0


def test_one_record_from_the_per_stage_processes():
    finetune = {"case": "c", "reports": {"finetune": {"duration_s": 1}}, "steps": [{"ms": 1}], "summary": {"x": 1}}
    merge = {"case": "c", "reports": {"merge": {"duration_s": 2}}, "steps": [], "summary": None}
    record = harness.merge_stage_records([finetune, merge])
    assert list(record["reports"]) == ["finetune", "merge"] and record["stage_processes"] == 2
    assert record["steps"] == [{"ms": 1}] and record["summary"] == {"x": 1}
    assert harness.merge_stage_records([]) is None


def test_packed_bench_checks_the_7b_memory_targets_as_ratios_to_the_baseline():
    """Issue 22's 7B targets: ≥ 2× the original's tokens/s at ≤ 1.0× (bloom-7b1, 4-bit) or ≤ 0.8× (falcon-7b,
    8-bit) its allocated memory, both measured in the same call."""
    packed = _load_packed()

    def figures(tokens_per_s, allocated_gib):
        return {"tokens_per_s": tokens_per_s, "allocated_gib": allocated_gib}

    compared = packed.comparisons({
        "bloom-7b1/baseline": figures(4_000, 8.0), "bloom-7b1/packed-compiled": figures(9_000, 8.4),
        "bloom-7b1/packed-compiled-torchao": figures(8_400, 7.6),
        "falcon-7b/baseline": figures(3_000, 20.0), "falcon-7b/packed-compiled": figures(5_000, 15.0),
        "falcon-7b/packed-compiled-torchao": figures(7_000, 10.0)})
    assert compared["bloom-7b1/packed-compiled"]["targets_met"] == {"speedup": True, "memory_ratio": False}
    assert compared["bloom-7b1/packed-compiled-torchao"]["targets_met"] == {"speedup": True, "memory_ratio": True}
    assert compared["falcon-7b/packed-compiled"]["targets_met"] == {"speedup": False, "memory_ratio": True}
    assert compared["falcon-7b/packed-compiled-torchao"]["targets_met"] == {"speedup": True, "memory_ratio": True}
    # against the shipped recipe (no baseline in the call) a ratio is shown, no target judged
    alone = packed.comparisons({"falcon-7b/ours": figures(3_000, 20.0),
                                "falcon-7b/packed-compiled": figures(7_000, 9.0)})
    assert alone["falcon-7b/packed-compiled"]["targets_met"] == {}


@pytest.mark.parametrize("case", sorted(harness.CASES))
def test_every_case_is_a_recipe_that_kubetune_runs(case, tmp_path):
    """Each case validates, and passes the check that refused bloom-*/baseline on an H100 (2026-12-06: exit 3,
    finetune.packing on BLOOM): the pre-flight of `kubetune estimate`/`submit`, on the published config."""
    from kubetune.estimate import estimate_recipe

    spec = harness.CASES[case]
    recipe = case_recipe(case, tmp_path)
    assert recipe.data.source.startswith("builtin:") or spec.get("data") == "wrapped"
    assert recipe.stages == spec.get("stages", ["finetune"])
    assert set(spec) <= {"model", "set", "stages", "env", "data", "probe"}  # no patches, no SFTConfig overrides
    if spec.get("data") == "wrapped":
        harness.wrapped_data_path(tmp_path, spec["model"], False).parent.mkdir(parents=True)
        harness.wrapped_data_path(tmp_path, spec["model"], False).write_text(
            '{"context": "", "question": "a b c", "answer": "d e f"}\n' * 20)
    estimate_recipe(recipe, model_config=ROOT / "bench" / "configs" / harness.MODELS[spec["model"]], suggest=False)


@pytest.mark.parametrize("model", ["bloom-1b1", "bloom-7b1", "falcon-7b"])
def test_baseline_is_the_original_recipe(model, tmp_path):
    recipe = case_recipe(f"{model}/baseline", tmp_path)
    ft = recipe.finetune
    assert (ft.batch_size, ft.grad_accum, ft.max_length, ft.completion_only_loss) == (1, 1, 2048, False)
    assert not ft.packing and not ft.group_by_length and ft.gradient_checkpointing
    assert (ft.lora.r, ft.lora.alpha, ft.lora.target_modules) == (16, 32, ["query_key_value"])
    assert ft.base_precision == {"bloom-1b1": "none", "bloom-7b1": "4bit", "falcon-7b": "8bit"}[model]
    assert recipe.prompt.template == "{question}"
    assert recipe.data.source == str(harness.wrapped_data_path(tmp_path, model, False))


def test_wrapped_rows_cut_the_joined_examples_every_length_tokens():
    """TRL's wrapped packing as data: the token stream of the joined examples, cut mid-example into rows of
    length - 1 tokens (the fine-tune appends the end-of-sequence token), each row split into question + answer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(50)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    texts = [" ".join(words[1 + 7 * i:1 + 7 * i + 7]) for i in range(7)]  # 7 examples of 7 tokens: 49 tokens
    rows = harness.wrapped_rows(texts, tokenizer, length=11)  # rows of 10 tokens: 4 rows, 9 tokens left over
    joined = [row["question"] + " " + row["answer"] for row in rows]
    assert joined == [" ".join(words[1 + 10 * r:11 + 10 * r]) for r in range(4)]
    assert all(len(tokenizer(row["question"])["input_ids"]) == 5 for row in rows)
    assert all(row["context"] == "" for row in rows)


def test_a_case_is_pinned_by_its_resolved_settings(tmp_path):
    """The hash follows every resolved setting, not the case's name or the machine's paths: the shipped recipe
    changed under "<model>/ours" three times, and only the hash tells such runs apart."""
    ours = harness.case_settings("bloom-1b1/ours", case_recipe("bloom-1b1/ours", tmp_path))
    elsewhere = harness.case_settings("bloom-1b1/ours", case_recipe("bloom-1b1/ours", tmp_path / "other"))
    assert harness.settings_sha256(ours) == harness.settings_sha256(elsewhere)
    changed = harness.case_settings("bloom-1b1/ours", harness.recipe_for(
        "bloom-1b1/ours", {"model": "bloom-1b1", "set": ["finetune.lora.dropout=0.0"]}, tmp_path / "m", tmp_path,
        steps=10, warmup=3, tiny=False))
    assert harness.settings_sha256(changed) != harness.settings_sha256(ours)
    assert ours["recipe"]["finetune"]["batch_size"] == case_recipe("bloom-1b1/ours", tmp_path).finetune.batch_size
    torch_loop = harness.case_settings("bloom-1b1/gptq8-torch-loop", case_recipe("bloom-1b1/gptq8-torch-loop", tmp_path))
    gptq8 = harness.case_settings("bloom-1b1/gptq8", case_recipe("bloom-1b1/gptq8", tmp_path))
    assert torch_loop["recipe"] == gptq8["recipe"] and torch_loop["env"] == {"GPTQMODEL_DISABLE_GPTQ_CUDA": "1"}
    assert harness.settings_sha256(torch_loop) != harness.settings_sha256(gptq8)


def test_environment_records_commit_source_lock_and_every_version():
    env = harness.environment()
    assert env["git_commit"] and len(env["git_commit"].split("-")[0]) == 40  # this checkout has .git
    assert len(env["source_sha256"]) == 64 and len(env["lock"]["sha256"]) == 64
    assert env["lock"]["file"] == "images/requirements-cuda.lock"
    import torch
    import transformers

    assert env["all_versions"]["torch"] == torch.__version__ and env["all_versions"]["transformers"] == \
        transformers.__version__
    assert len(env["all_versions"]) > 50  # every distribution, not a chosen few


def test_wrapped_rows_keep_the_prompt_tokens_when_trl_tokenizes_the_answer_apart():
    """With the bench's byte-level tokenizer, each row's prompt ends at an example's end: stripped and tokenized
    alone, as the stages do, it is the start of the whole row's tokens (TRL warns and trains on another boundary
    otherwise), and the row is about ``length`` tokens again once the end-of-sequence token is appended."""
    from kubetune.config import DEFAULT_PROMPT_TEMPLATE
    from kubetune.text2sql import generate

    tokenizer = harness.train_tokenizer()
    texts = [DEFAULT_PROMPT_TEMPLATE.format(context=r["context"], question=r["question"]) + r["answer"] + "</s>"
             for r in generate(60, seed=1)]
    rows = harness.wrapped_rows(texts, tokenizer, length=129)
    assert len(rows) >= 10
    for row in rows:
        prompt = tokenizer(row["question"].strip())["input_ids"]
        whole = tokenizer(row["question"].strip() + row["answer"].strip())["input_ids"]
        assert whole[:len(prompt)] == prompt
        assert abs(len(whole) + 1 - 129) <= 2


def _load_packed():
    spec = importlib.util.spec_from_file_location("bench_packed", ROOT / "bench" / "packed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_packed_bench_reads_each_case_from_its_reports_and_compares_with_the_baseline():
    """bench/packed.py: tokens/s and MFU from the harness summary, memory, the compile's first step and recompiles
    from the fine-tune report; ratios against the same call's baseline and issue 22's targets."""
    packed = _load_packed()
    assert set(packed.QUICK) <= set(harness.CASES) and set(packed.FULL) <= set(harness.CASES)

    def record(tokens_per_s, allocated_gib, mfu, compile_=None):
        return {"summary": {"tokens_per_s": tokens_per_s, "mfu_4nt": mfu, "step_ms_median": 100.0},
                "reports": {"finetune": {"peak_memory": {"torch_allocated_bytes": allocated_gib * 2**30},
                                         "step_times": {"ms": [30_000.0, 100.0]}, "compile": compile_}}}

    figures = {"bloom-1b1/baseline": packed.case_figures(record(4_000, 5.0, 0.02)),
               "bloom-1b1/packed-compiled": packed.case_figures(
                   record(48_000, 4.0, 0.20, {"frames_after_warmup": 0, "frames_first_step": 30})),
               "gemma3-270m/packed-compiled": packed.case_figures(record(120_000, 3.0, 0.1)),
               "gemma3-270m/ours": packed.case_figures({"error": "exit 1"})}
    assert figures["bloom-1b1/packed-compiled"]["first_step_s"] == 30.0
    assert figures["bloom-1b1/packed-compiled"]["recompiles"] == 0
    assert figures["bloom-1b1/baseline"]["recompiles"] is None  # not compiled: no count, not a zero
    compared = packed.comparisons(figures)
    row = compared["bloom-1b1/packed-compiled"]
    assert row["against"] == "bloom-1b1/baseline" and row["speedup"] == 12.0 and row["memory_ratio"] == 0.8
    assert row["targets_met"] == {"speedup": True, "allocated_gib": True, "mfu_4nt": False}
    # no baseline or shipped figure for Gemma in this call: its absolute target only, no ratio
    assert compared["gemma3-270m/packed-compiled"] == {"against": None, "targets_met": {"tokens_per_s": True}}
    assert "bloom-1b1/baseline" not in compared and "gemma3-270m/ours" not in compared
