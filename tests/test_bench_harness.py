"""bench/harness.py: the arithmetic behind its tokens/s and MFU, and the recipes it builds (no GPU, no timing)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("bench_harness", ROOT / "bench" / "harness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_batch_lengths_padded_padding_free_and_packed_rows(harness):
    import torch

    timer = harness.StepTimer(cuda=False)
    timer._pending = {"tokens": 0, "sum_s2": 0, "rows": 0, "padded_tokens": 0}
    # padded rows: lengths 3 and 5 in a 2×5 batch
    timer.note_batch({"input_ids": torch.zeros(2, 5, dtype=torch.long),
                      "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])})
    # padding-free: one row of 2 examples (2, 4 tokens); position_ids restart at 0
    timer.note_batch({"input_ids": torch.zeros(1, 6, dtype=torch.long),
                      "position_ids": torch.tensor([[0, 1, 0, 1, 2, 3]])})
    # packed rows: (3, 2) and (4) + 3 positions of right padding (each a lone 0)
    timer.note_batch({"input_ids": torch.zeros(2, 7, dtype=torch.long),
                      "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 0], [0, 1, 2, 3, 0, 0, 0]])})
    assert timer._pending["tokens"] == 3 + 5 + 2 + 4 + 3 + 2 + 4
    assert timer._pending["sum_s2"] == 9 + 25 + 4 + 16 + 9 + 4 + 16
    assert timer._pending["padded_tokens"] == 10 + 6 + 14


def test_step_summary_flops(harness):
    steps = [{"ms": 1000.0, "tokens": 100, "sum_s2": 10_000, "rows": 1, "padded_tokens": 100}] * 3
    s = harness.step_summary(steps, warmup=1, n_matmul=1_000, layers=2, hidden=8)
    assert s["steps_measured"] == 2
    assert s["tokens_per_s"] == pytest.approx(100.0)
    linear = 4 * 1_000 * 100  # per step, 1 s each
    attention = 6 * 2 * 8 * 10_000
    assert s["mfu_4nt"] == pytest.approx(linear / harness.PEAK_BF16_FLOPS)
    assert s["mfu_4nt_attention"] == pytest.approx((linear + attention) / harness.PEAK_BF16_FLOPS)
    assert s["padding_fraction"] == 0


def test_a_profiled_step_after_the_measured_ones_is_left_out(harness):
    steps = [{"ms": 100.0, "tokens": 100, "sum_s2": 0, "rows": 1, "padded_tokens": 100}] * 3 + \
        [{"ms": 900.0, "tokens": 100, "sum_s2": 0, "rows": 1, "padded_tokens": 100}]
    s = harness.step_summary(steps, warmup=1, n_matmul=1, layers=1, hidden=1, measured_steps=2)
    assert s["steps_measured"] == 2 and s["step_ms_max"] == 100.0


def test_one_record_from_the_per_stage_processes(harness):
    finetune = {"case": "c", "reports": {"finetune": {"duration_s": 1}}, "steps": [{"ms": 1}], "summary": {"x": 1}}
    merge = {"case": "c", "reports": {"merge": {"duration_s": 2}}, "steps": [], "summary": None}
    record = harness.merge_stage_records([finetune, merge])
    assert list(record["reports"]) == ["finetune", "merge"] and record["stage_processes"] == 2
    assert record["steps"] == [{"ms": 1}] and record["summary"] == {"x": 1}
    assert harness.merge_stage_records([]) is None


def test_profile_of_a_micro_batch_names_its_kernels(harness):
    import torch

    into: dict = {}
    x = torch.randn(64, 64, requires_grad=True)
    out = harness.profile_micro_batch(lambda: (x @ x).relu().sum().backward(), into, cuda=False)
    assert out is None and into["wall_ms"] > 0 and into["kernels"] > 0
    assert any("mm" in k["name"] for k in into["top"])


@pytest.mark.parametrize("case", ["bloom-1b1/baseline", "bloom-7b1/ours", "falcon-7b/baseline", "bloom-1b1/gptq8"])
def test_case_recipes_validate(harness, case, tmp_path):
    recipe = harness.recipe_for(case, harness.CASES[case], tmp_path / "model", tmp_path, steps=10, warmup=3,
                                tiny=False)
    assert recipe.data.source == "builtin:text2sql"
    if case.endswith("baseline"):
        ft = recipe.finetune
        assert (ft.batch_size, ft.max_length, ft.packing, ft.completion_only_loss) == (1, 2048, True, False)
        assert ft.lora.target_modules == ["query_key_value"]
    if case.endswith("gptq8"):
        assert recipe.stages == ["finetune", "merge", "quantize"] and recipe.quantize.bits == 8
