"""The fine-tune on 1, 2 and 4 GPUs of one machine (issue 21): tokens/s, memory per GPU, the estimator per GPU.

    # on the GPU machine (see bench/README.md for the wheels to carry and the exact device call):
    PYTHONPATH=$SITE:$PWD/src python3 bench/multi_gpu.py --gpus 1,2,4 --out $OUT

Each run is the real stage entrypoint's path, :func:`kubetune.stages.run_stage` on a recipe with
``resources.finetune.gpus: N`` (N > 1 starts torchrun with N processes, DDP by default), on bloom-7b1 with random
bf16 weights (bench/harness.py builds it from bench/configs) and a LoRA on the bf16 base. The global batch is the
same for every N (``finetune.batch_size × grad_accum``: 8 × 4 = 32 rows a step), so the schedule is too and a step
does the same work; the single-GPU baseline runs in the same call, on the same card.

Per N, from the stage's report: median step time after ``--warmup`` steps (rank 0's CUDA events around each
optimizer step), tokens/s = rank 0's real tokens × N / rank 0's measured time (each rank trains on as many rows
a step; rows differ in length, so this is the mean over the ranks only approximately: ``step_speedup``, the ratio
of median step times at the same global batch, is exact), each rank's peak ``torch.cuda.max_memory_allocated``,
and ``kubetune estimate``'s per-GPU prediction of that peak. Targets (issue 21): ≥ 1.8× on 2 GPUs, ≥ 3.5× on 4,
estimator within 10 % per GPU. Writes ``$OUT/multi-gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402  (bench/harness.py: the model builder, environment and step summaries)

MODEL = "bloom-7b1"
SETTINGS = ["finetune.base_precision=none", "finetune.batch_size=8", "finetune.grad_accum=4",
            "finetune.gradient_checkpointing=true", "finetune.save_steps=100000", "finetune.logging_steps=1",
            "data.source=builtin:text2sql", "data.builtin_examples=4000", "data.train_fraction=1.0",
            "metrics.enabled=false", 'stages=["finetune"]', "model.revision=null"]


def recipe_for(gpus: int, folder: Path, work: Path, steps: int):
    from kubetune.config import load_recipe

    return load_recipe(harness.ROOT / harness.JOBS[MODEL], [
        *SETTINGS, f"run.name=multi-gpu-{gpus}", f"run.artifacts_root={work / 'artifacts'}",
        f"model.name_or_path={folder}", f"finetune.max_steps={steps}", f"resources.finetune.gpus={gpus}"])


def run_one(gpus: int, folder: Path, work: Path, warmup: int, steps: int, tiny: bool) -> dict:
    from kubetune.estimate import estimate_recipe
    from kubetune.stages import run_stage

    recipe = recipe_for(gpus, folder, work, warmup + steps)
    shutil.rmtree(work / "artifacts" / recipe.run.name, ignore_errors=True)  # measure a run, not a skipped one
    # the estimate is of the full-size model (bench/configs); --tiny runs a shrunken one, so it has none
    predicted = None if tiny else estimate_recipe(recipe, model_config=harness.CONFIGS / harness.MODELS[MODEL],
                                                  suggest=False).stage("finetune")
    started = time.perf_counter()
    report = run_stage(recipe, "finetune").report
    measured = harness.report_steps(report)[warmup:]
    seconds = sum(s["ms"] for s in measured) / 1e3
    ranks = report.get("ranks") or [{"rank": 0, "peak_gpu_allocated_bytes": report["peak_memory"].get(
        "torch_allocated_bytes")}]
    peak = max(r["peak_gpu_allocated_bytes"] or 0 for r in ranks)
    return {"gpus": gpus, "wall_s": round(time.perf_counter() - started, 1),
            "global_batch": report["metrics"]["global_batch"], "steps_measured": len(measured),
            "step_ms_median": statistics.median(s["ms"] for s in measured),
            "tokens_per_s": sum(s["tokens"] for s in measured) * recipe.resources.finetune.processes / seconds,
            "ranks": ranks, "peak_allocated_bytes_per_gpu_max": peak,
            "estimate_allocated_bytes_per_gpu": predicted.allocated_bytes if predicted else None,
            "estimate_error": predicted.allocated_bytes / peak - 1 if predicted and peak else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", default="1,2,4", help="GPU counts to run, the baseline 1 first")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--work", default="/tmp/kubetune-multi-gpu", type=Path)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tiny", action="store_true",
                        help="a 2-layer, hidden-64 bloom (harness.py --tiny) to try the script on the CPU")
    parser.add_argument("--only", type=int, default=None, help=argparse.SUPPRESS)  # one N, in a fresh process
    args = parser.parse_args()
    folder = args.work / "models" / (MODEL + ("-tiny" if args.tiny else ""))
    if args.only is not None:
        build = harness.build_model(MODEL, folder, tiny=args.tiny)  # the first run builds it (on GPU 0), the rest reuse
        record = {**run_one(args.only, folder, args.work, args.warmup, args.steps, args.tiny), "build": build}
        (args.work / f"run-{args.only}.json").write_text(json.dumps(record))
        return
    # this process never touches CUDA: each run's GPUs hold only that run
    result = {"environment": harness.environment(cuda=False), "model": MODEL, "settings": SETTINGS, "runs": []}
    out = args.out / "multi-gpu.json"
    for gpus in [int(n) for n in args.gpus.split(",")]:
        # each N in its own process: no CUDA context or cached memory of the previous run on GPU 0
        subprocess.run([sys.executable, __file__, "--only", str(gpus), "--out", str(args.out), "--work",
                        str(args.work), "--warmup", str(args.warmup), "--steps", str(args.steps),
                        *(["--tiny"] if args.tiny else [])], check=True)
        result["runs"].append(json.loads((args.work / f"run-{gpus}.json").read_text()))
        base = result["runs"][0]
        for run in result["runs"]:
            run["step_speedup"] = base["step_ms_median"] / run["step_ms_median"]
            run["tokens_per_s_speedup"] = run["tokens_per_s"] / base["tokens_per_s"]
        out.write_text(json.dumps(result, indent=2) + "\n")  # after each run: a timeout keeps what finished
        print(json.dumps({k: v for k, v in result["runs"][-1].items() if k != "ranks"}), flush=True)


if __name__ == "__main__":
    main()
