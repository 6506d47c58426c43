"""GPTQ's block update replayed as CUDA graphs: the numbers GPTQ defines, and how it plugs into GPTQModel.

The graphs themselves need a GPU: ``bench/gptq_block.py`` checks on the bench's H200 that graph replays equal the
eager loop and GPTQModel's compiled kernel bit for bit, and times them. Here the captured body runs eagerly.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch  # a dependency of kubetune: missing, the suite fails here rather than skipping

from kubetune.stages.gptq_block import WIDTH, GraphedBlockUpdate, block_update, graphed_when_uncompiled

# The bench script's inputs and call (outputs as GPTQModel passes them: column slices of wider matrices)
_spec = importlib.util.spec_from_file_location("bench_gptq_block",
                                               Path(__file__).resolve().parents[1] / "bench" / "gptq_block.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
MAXQ = bench.MAXQ  # 8-bit


def block_inputs(rows=24, groups=1, seed=0):
    return bench.block_inputs(rows, seed=seed, groups=groups)


def run(*inputs, update=block_update):
    return bench.run_once(update, inputs)


def gptq_reference(work, hinv, scale, zero, column_group):
    """GPTQ (Frantar et al. 2022, Algorithm 1) in float64, written from the paper, one row at a time: the quantized
    weights, the errors over the pivot, and each weight's loss (w - q)² / pivot² (GPTQModel halves it later)."""
    w = work.double().clone()
    h, s, z = hinv.double(), scale.double(), zero.double()
    q = torch.empty_like(w)
    err = torch.empty_like(w)
    loss = torch.empty_like(w)
    for j in range(WIDTH):
        g = int(column_group[j])
        for r in range(w.shape[0]):
            code = min(max(round(float(w[r, j] / s[g, r])) + float(z[g, r]), 0.0), MAXQ)
            q[r, j] = s[g, r] * (code - z[g, r])
            err[r, j] = (w[r, j] - q[r, j]) / h[j, j]
            loss[r, j] = (w[r, j] - q[r, j]) ** 2 / h[j, j] ** 2
            w[r, j:] -= err[r, j] * h[j, j:]
    return q, err, loss


@pytest.mark.parametrize("groups", [1, 4])
def test_block_update_is_gptq(groups):
    inputs = block_inputs(groups=groups)
    _, quantized, errors, losses = run(*inputs)
    q_ref, err_ref, loss_ref = gptq_reference(*inputs)
    # A value that lands within float32 rounding of a half step may round the other way than in float64:
    # allow one quantization step on a handful of weights, and nothing beyond that.
    step = inputs[2].double()[inputs[4].long()].T  # rows x 128: each weight's own scale
    off = (quantized.double() - q_ref).abs()
    assert (off <= step * 1.001).all() and (off > 1e-5).float().mean() < 0.01
    close = off <= 1e-5
    torch.testing.assert_close(errors.double()[close], err_ref[close], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(losses.double()[close], loss_ref[close], rtol=2e-3, atol=1e-6)


def test_identity_hessian_is_round_to_nearest():
    """With no error to push on, GPTQ is GPTQModel's own round-to-nearest, bit for bit, and every output is on
    the grid of its group's scale."""
    from gptqmodel.quantization.quantizer import quantize

    work, _, scale, zero, column_group = block_inputs(groups=2)
    _, quantized, errors, losses = run(work, torch.eye(WIDTH), scale, zero, column_group)
    per_col_scale, per_col_zero = scale[column_group.long()].T, zero[column_group.long()].T
    assert torch.equal(quantized, quantize(work, per_col_scale, per_col_zero, MAXQ, False))
    assert torch.equal(errors, work - quantized) and torch.equal(losses, (work - quantized) ** 2)
    codes = quantized / per_col_scale + per_col_zero
    torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)


def test_error_feedback_lowers_the_output_error():
    """The reason for GPTQ: against a layer input with correlated features, pushing each column's error onto the
    next ones gives a smaller output error than rounding every weight on its own."""
    work, hinv, scale, zero, column_group = block_inputs(rows=64, seed=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4 * WIDTH, WIDTH, generator=gen) @ torch.randn(WIDTH, WIDTH, generator=gen)
    hinv = bench.inverse_hessian_factor(x)
    gptq = run(work, hinv, scale, zero, column_group)[1]
    rtn = run(work, torch.eye(WIDTH), scale, zero, column_group)[1]
    out_error = lambda q: ((x @ (work - q).T) ** 2).mean()  # noqa: E731
    assert out_error(gptq) < 0.8 * out_error(rtn)


def test_graphed_update_runs_cpu_blocks_eagerly():
    inputs = block_inputs()
    graphed = GraphedBlockUpdate()
    assert all(torch.equal(a, b) for a, b in zip(run(*inputs, update=graphed), run(*inputs)))
    assert (graphed.eager_blocks, graphed.replays, graphed.kind()) == (1, 0, "torch-loop")


@pytest.mark.parametrize("compiled", [True, False])
def test_gptqmodel_seam_prefers_its_compiled_kernel(monkeypatch, compiled):
    from gptqmodel.quantization import gptq_cuda

    calls = []
    monkeypatch.setattr(gptq_cuda, "block_update_available", lambda: compiled)
    monkeypatch.setattr(gptq_cuda, "gptq_block_update", lambda *args: calls.append("kernel"))
    original = gptq_cuda.block_update_available, gptq_cuda.gptq_block_update
    inputs = block_inputs()
    with graphed_when_uncompiled() as graphed:
        # What GPTQModel's GPTQ.quantize does at a 128-column block on a CUDA device:
        from gptqmodel.quantization.gptq_cuda import block_update_available, gptq_block_update

        assert block_update_available()
        run(*inputs, update=gptq_block_update)
    assert calls == (["kernel"] if compiled else [])
    assert graphed.kind() == ("cuda-kernel" if compiled else "torch-loop")  # CPU blocks: eager, not graphs
    assert graphed.eager_blocks == (0 if compiled else 1)
    assert (gptq_cuda.block_update_available, gptq_cuda.gptq_block_update) == original


def test_gptqmodel_seam_is_restored_after_an_error():
    from gptqmodel.quantization import gptq_cuda

    original = gptq_cuda.block_update_available, gptq_cuda.gptq_block_update
    with pytest.raises(KeyError), graphed_when_uncompiled():
        assert gptq_cuda.block_update_available is not original[0]
        raise KeyError("boom")
    assert (gptq_cuda.block_update_available, gptq_cuda.gptq_block_update) == original
