"""GPTQ's 128-column block update three ways, on the GPU: checked bit for bit against each other, and timed.

    python bench/gptq_block.py --out DIR        # needs a CUDA device; the device call is in bench/README.md

* ``torch-loop``: :func:`kubetune.stages.gptq_block.block_update` run eagerly, the operations of GPTQModel's torch
  column loop (what a pod runs when GPTQModel's CUDA kernel cannot be built): the baseline.
* ``cuda-graphs``: the same operations captured once per shape and replayed
  (:class:`kubetune.stages.gptq_block.GraphedBlockUpdate`, what kubetune's image now runs).
* ``cuda-kernel``: GPTQModel's own kernel, JIT-compiled with nvcc (where the machine has nvcc; build time
  recorded).

Blocks are the shapes of bloom-1b1 and bloom-7b1's Linears (rows = output features), 8-bit asymmetric with one
group per block, inputs made as GPTQ meets them (weights, the upper Cholesky factor of a damped inverse Hessian,
min-max scales). Per shape and way: the median of ``--repeat`` timed blocks (CUDA events, after one warm-up), and
whether the outputs equal the torch loop's exactly. Writes ``gptq-block-<card>-<date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import environment  # noqa: E402  (bench/harness.py: commit, source and lock hashes, versions)
from kubetune.measure import library_versions  # noqa: E402
from kubetune.stages.gptq_block import WIDTH, GraphedBlockUpdate, block_update  # noqa: E402

MAXQ = 255
# rows (output features) of each Linear: bloom-1b1 (hidden 1536) and bloom-7b1 (hidden 4096)
SHAPES = {"bloom-1b1 query_key_value": 4608, "bloom-1b1 dense / dense_4h_to_h": 1536,
          "bloom-1b1 dense_h_to_4h": 6144, "bloom-7b1 query_key_value": 12288,
          "bloom-7b1 dense / dense_4h_to_h": 4096, "bloom-7b1 dense_h_to_4h": 16384}


def inverse_hessian_factor(x):
    """GPTQ's Hinv for layer inputs ``x`` (samples × 128): the upper Cholesky factor of the inverse of the
    Hessian x^T x / n, damped by 1% of its mean diagonal."""
    import torch

    hessian = x.T @ x / x.shape[0]
    hessian += 0.01 * hessian.diagonal().mean() * torch.eye(x.shape[1], device=x.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)


def block_inputs(rows: int, device="cpu", seed: int = 0, groups: int = 1):
    """A block as GPTQ meets it: weights, Hinv of random layer inputs, and per row the asymmetric min-max scales
    and zero points of each of ``groups`` column groups."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    work = torch.randn(rows, WIDTH, generator=gen, device=device)
    hinv = inverse_hessian_factor(torch.randn(4 * WIDTH, WIDTH, generator=gen, device=device))
    per = WIDTH // groups
    column_group = torch.arange(WIDTH, dtype=torch.int32, device=device) // per
    lo = torch.stack([work[:, g * per:(g + 1) * per].amin(1).clamp(max=0) for g in range(groups)])
    hi = torch.stack([work[:, g * per:(g + 1) * per].amax(1).clamp(min=0) for g in range(groups)])
    scale = (hi - lo) / MAXQ
    zero = torch.round(-lo / scale)
    return work, hinv, scale, zero, column_group


def run_once(update, inputs):
    import torch

    work = inputs[0].clone()
    # Outputs as GPTQModel passes them: column slices of full-width matrices (row stride > 128)
    full = [torch.full((work.shape[0], 4 * WIDTH), float("nan"), device=work.device) for _ in range(3)]
    outs = [m[:, WIDTH:2 * WIDTH] for m in full]
    update(work, *inputs[1:], *outs, MAXQ)
    return [work, *outs]


def timed(update, inputs, repeat: int) -> float:
    """Median milliseconds per block."""
    import torch

    run_once(update, inputs)  # warm-up (and, for the graphs, the capture)
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run_once(update, inputs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--no-kernel", action="store_true", help="skip GPTQModel's compiled kernel")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    ways = {"torch-loop": block_update, "cuda-graphs": GraphedBlockUpdate()}
    kernel_build_s = None
    if not args.no_kernel:
        from gptqmodel.quantization import gptq_cuda

        started = time.perf_counter()
        if gptq_cuda.block_update_available():
            ways["cuda-kernel"] = gptq_cuda.gptq_block_update
        kernel_build_s = round(time.perf_counter() - started, 1)
    rows_out = []
    for name, rows in SHAPES.items():
        inputs = block_inputs(rows, device)
        reference = run_once(block_update, inputs)
        row = {"shape": name, "rows": rows}
        for way, update in ways.items():
            torch.cuda.synchronize()
            started = time.perf_counter()
            outputs = run_once(update, inputs)  # first call: for the graphs, capture included
            torch.cuda.synchronize()
            row[f"{way}_first_ms"] = round(1000 * (time.perf_counter() - started), 2)
            row[f"{way}_ms"] = round(timed(update, inputs, args.repeat), 3)
            row[f"{way}_equal"] = all(torch.equal(a, b) for a, b in zip(outputs, reference))
            row[f"{way}_max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(outputs, reference))
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    now = dt.datetime.now(dt.timezone.utc)
    card = torch.cuda.get_device_name(device)
    result = {"card": card, "date": now.isoformat(timespec="seconds"), "versions": library_versions(),
              "command": " ".join(["python", "bench/gptq_block.py", *(argv or sys.argv[1:])]),
              "ways": list(ways), "kernel_build_s": kernel_build_s, "repeat": args.repeat, "shapes": rows_out,
              "environment": environment()}
    stem = f"gptq-block-{card.split()[-1].lower()}-{now.date()}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(f"wrote {args.out / stem}.json and .md")
    return 0


def markdown(result: dict) -> str:
    ways = result["ways"]
    lines = [f"# GPTQ block update, {result['card']}, {result['date']}", "",
             f"Command: `{result['command']}`; torch {result['versions'].get('torch')}, gptqmodel "
             f"{result['versions'].get('gptqmodel')}. Median ms per 128-column block over {result['repeat']} blocks "
             "(inputs copied in and outputs out included); \"first\" is the first call (the capture, for the graphs); "
             "\"= loop\": outputs equal to the torch loop's, bit for bit.", ""]
    if result.get("note"):
        lines += [f"Note: {result['note']}", ""]
    if result.get("kernel_build_s") is not None:
        lines += [f"GPTQModel's kernel: loading it (nvcc build when not cached) took {result['kernel_build_s']} s.", ""]
    head = "| shape | rows | " + " | ".join(f"{w} ms | {w} first ms | = loop" for w in ways) + " | loop ÷ graphs |"
    lines += [head, "|" + "---|" * (3 + 3 * len(ways))]
    for row in result["shapes"]:
        cells = " | ".join(f"{row[f'{w}_ms']:.3f} | {row[f'{w}_first_ms']:.1f} | {'yes' if row[f'{w}_equal'] else 'no'}"
                           for w in ways)
        lines.append(f"| {row['shape']} | {row['rows']} | {cells} | {row['torch-loop_ms'] / row['cuda-graphs_ms']:.1f}× |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
