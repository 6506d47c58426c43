"""vLLM serving the Gemma recipe's exports on the GPU (issue 20, item 4): accuracy and tokens/s against HF generate.

    # on the GPU machine, after bench/quality.py made the runs (same --recipe/--data/--work/--set):
    python bench/serve_vllm.py --data PATH/wikisql_train.jsonl --work /tmp/kubetune-quality --out $OUT

For each model (``merged`` and ``gptq8``: run ``<run>-gptq8``'s ``merge/`` and ``quantize/``; ``gptq4``: run
``<run>-gptq4``'s ``quantize/``), on the held-out split of the recipe's data (``kubetune.data.eval_rows``):

* **HF generate**: :func:`kubetune.score.evaluate_model` on the folder, with the infer stage's batch size and
  ``max_new_tokens`` (what the infer stage runs: ``answer_rows``, greedy, the SQL stop rule), in this process;
* **vLLM**: ``vllm.LLM`` on the same folder, in a child process of its own (vLLM keeps the card until its process
  ends), every prompt made by the folder's saved template (``kubetune_prompt.json``), greedy, at most
  ``infer.max_new_tokens`` new tokens, stop strings ``kubetune.serving.SQL_STOP``, each answer cut by the infer
  stage's ``cut_sql``; the answers written as ``predictions-<model>.jsonl`` and scored by the evaluate stage's
  :func:`~kubetune.stages.evaluate.score`. vLLM is timed twice: all prompts in one ``generate`` call (its own
  scheduling), and in chunks of ``infer.batch_size`` (the HF path's batching);
* the run's own evaluate stage's accuracy for the model (``<run>/evaluate/metrics.json``), when it is there.

Tokens/s = generated tokens / generation seconds (model load excluded), each path counting its own tokens.
``$OUT/serve_vllm.json``: bench/harness.py's environment, the recipe, per model the three accuracies, their
differences (the issue asks vLLM within 0.5 point of the infer stage's) and the tokens/s; the predictions and
outcomes files beside it. Exit 0 when every model ran, else 1 (a model that failed is recorded with its error).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]

RESULT_FILE = "serve_vllm.json"
TARGET_MAX_DIFF = 0.5  # points of execution accuracy between vLLM and the infer stage (issue 20)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the recipe's data.source, as given to bench/quality.py")
    p.add_argument("--out", required=True)
    p.add_argument("--recipe", default=str(ROOT / "jobs" / "gemma3-270m-text2sql.yaml"))
    p.add_argument("--work", default="/tmp/kubetune-quality", help="bench/quality.py's --work")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--models", default="merged,gptq8,gptq4")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--skip-hf", action="store_true", help="vLLM only (HF numbers from an earlier call)")
    return p.parse_args(argv)


def recipe_for(args, bits: int):
    """The recipe of bench/quality.py's run for ``bits`` (its name and artifact root)."""
    from kubetune.config import load_recipe

    base = [f"data.source={Path(args.data).absolute()}", f"run.artifacts_root={Path(args.work).absolute()}",
            *args.overrides]
    name = load_recipe(args.recipe, base).run.name
    return load_recipe(args.recipe, base + [f"quantize.bits={bits}", f"run.name={name}-gptq{bits}"])


def model_folders(args) -> dict[str, tuple[Path, Path, str]]:
    """{model: (folder, the run's folder, the run's name for it)}."""
    from kubetune.artifacts import RunLayout

    run8, run4 = (RunLayout.from_recipe(recipe_for(args, b)) for b in (8, 4))
    every = {"merged": (run8.stage_dir("merge"), run8.run_dir, "merged"),
             "gptq8": (run8.stage_dir("quantize"), run8.run_dir, "quantized"),
             "gptq4": (run4.stage_dir("quantize"), run4.run_dir, "quantized")}
    return {m: every[m] for m in args.models.split(",") if m}


# ---------------------------------------------------------------- vLLM, in a child process per model

def vllm_answers(folder: Path, rows_file: Path, out: Path, name: str, max_new_tokens: int, batch_size: int,
                 max_model_len: int, dtype: str, gpu_memory_utilization: float) -> dict:
    from vllm import LLM, SamplingParams

    from kubetune.prompt import PromptTemplate
    from kubetune.serving import SQL_STOP
    from kubetune.stages.infer import cut_sql

    template = PromptTemplate.load(folder)
    if template is None:
        raise SystemExit(f"{folder}: no kubetune_prompt.json")
    rows = [json.loads(line) for line in rows_file.read_text(encoding="utf-8").splitlines()]
    prompts = [template.format(r["context"], r["question"]) for r in rows]
    t0 = time.perf_counter()
    llm = LLM(model=str(folder), dtype=dtype, max_model_len=max_model_len, seed=0,
              gpu_memory_utilization=gpu_memory_utilization)
    load_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=SQL_STOP)
    llm.generate(prompts[:batch_size], params, use_tqdm=False)  # warm-up: CUDA graphs, first kernels
    timings = {}
    for mode, chunk in (("all_at_once", len(prompts)), (f"batch_{batch_size}", batch_size)):
        outputs, seconds = [], 0.0
        for first in range(0, len(prompts), chunk):
            t0 = time.perf_counter()
            outputs += llm.generate(prompts[first:first + chunk], params, use_tqdm=False)
            seconds += time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        timings[mode] = {"seconds": round(seconds, 3), "new_tokens": tokens,
                         "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0}
    with open(out / f"predictions-{name}.jsonl", "w", encoding="utf-8") as fh:  # the infer stage's format
        for i, (r, prompt, o) in enumerate(zip(rows, prompts, outputs)):
            fh.write(json.dumps({"id": i, "context": r["context"], "question": r["question"], "gold": r["answer"],
                                 "prompt": prompt, "prediction": cut_sql(o.outputs[0].text),
                                 "new_tokens": len(o.outputs[0].token_ids)}, ensure_ascii=False) + "\n")
    return {"load_s": round(load_s, 1), "timings": timings}


def run_vllm_child(args, folder: Path, rows_file: Path, out: Path, name: str, recipe, dtype: str) -> dict:
    from kubetune.serve import max_model_len

    spec = {"folder": str(folder), "rows_file": str(rows_file), "out": str(out), "name": name,
            "max_new_tokens": recipe.infer.max_new_tokens, "batch_size": recipe.infer.batch_size,
            "max_model_len": max_model_len(recipe), "dtype": dtype,
            "gpu_memory_utilization": args.gpu_memory_utilization}
    proc = subprocess.run([sys.executable, __file__, "vllm-child", json.dumps(spec)], capture_output=True,
                          text=True, timeout=1800)
    (out / f"vllm-{name}.log").write_text(proc.stdout[-200_000:] + proc.stderr[-200_000:], encoding="utf-8")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"load_s"')]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM on {folder} failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------- the parent

def find_throughput(report: dict, name: str):
    """The infer stage's ``throughput[name]`` (tokens/s, seconds, batch size), wherever the report nests it."""
    if isinstance(report, dict):
        if isinstance(report.get("throughput"), dict) and name in report["throughput"]:
            return report["throughput"][name]
        for value in report.values():
            if (found := find_throughput(value, name)) is not None:
                return found
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["vllm-child"]:
        print(json.dumps(vllm_answers(**{k: Path(v) if k in ("folder", "rows_file", "out") else v
                                         for k, v in json.loads(argv[1]).items()})))
        return 0
    args = parse_args(argv)
    from harness import environment

    from kubetune.config import HELDOUT_SET
    from kubetune.data import eval_rows
    from kubetune.score import evaluate_model
    from kubetune.stages.evaluate import load_metrics, score

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = recipe_for(args, 8)
    rows_file = out / "heldout.jsonl"
    with open(rows_file, "w", encoding="utf-8") as fh:
        for r in eval_rows(recipe, HELDOUT_SET):
            fh.write(json.dumps({k: r[k] for k in ("context", "question", "answer")}, ensure_ascii=False) + "\n")
    doc: dict = {"environment": environment(), "recipe": recipe.model_dump(mode="json"), "target_max_diff":
                 TARGET_MAX_DIFF, "heldout_rows": sum(1 for _ in open(rows_file, encoding="utf-8")), "models": {}}
    failed = False
    for model, (folder, run_dir, run_name) in model_folders(args).items():
        entry = doc["models"][model] = {"folder": str(folder)}
        dtype = recipe.merge.dtype if model == "merged" else "auto"  # as kubetune serve passes it
        try:
            try:
                stage = load_metrics(run_dir / "evaluate")["models"][run_name]
                report = json.loads((run_dir / "infer" / "report.json").read_text(encoding="utf-8"))
                entry["infer_stage"] = {"execution_accuracy": stage["execution_accuracy"],
                                        "throughput": find_throughput(report, run_name)}
            except Exception as exc:  # noqa: BLE001 - the run's evaluate may not be there; HF below still is
                entry["infer_stage"] = {"error": str(exc)}
            if not args.skip_hf:
                t0 = time.perf_counter()
                hf = evaluate_model(folder, rows_file, out / f"hf-{model}", name=model, dtype=dtype,
                                    max_new_tokens=recipe.infer.max_new_tokens,
                                    batch_size=recipe.infer.batch_size)["models"][model]
                report = json.loads((out / f"hf-{model}" / "report.json").read_text(encoding="utf-8"))
                entry["hf_generate"] = {"execution_accuracy": hf["execution_accuracy"],
                                        "throughput": report["throughput"][model],
                                        "wall_s": round(time.perf_counter() - t0, 1)}
            vllm_dir = out / f"vllm-{model}"
            vllm_dir.mkdir(exist_ok=True)
            entry["vllm"] = run_vllm_child(args, folder, rows_file, vllm_dir, model, recipe, dtype)
            metrics = score(recipe, [model], vllm_dir, vllm_dir, {}, HELDOUT_SET)["metrics"][model]
            entry["vllm"]["execution_accuracy"] = metrics["execution_accuracy"]
            for ref in ("infer_stage", "hf_generate"):
                if "execution_accuracy" in entry.get(ref, {}):
                    diff = round(metrics["execution_accuracy"] - entry[ref]["execution_accuracy"], 2)
                    entry[f"vllm_minus_{ref}_points"] = diff
                    entry[f"within_target_of_{ref}"] = abs(diff) <= TARGET_MAX_DIFF
        except Exception as exc:  # noqa: BLE001 - recorded; the next model still runs
            failed = True
            entry["error"] = {"type": type(exc).__name__, "message": str(exc)[-3000:],
                              "where": traceback.format_exc().strip().splitlines()[-4:]}
        (out / RESULT_FILE).write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"{model}: {json.dumps({k: v for k, v in entry.items() if k != 'folder'}, default=str)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # the GPU machine has no network; vLLM need not try
    sys.exit(main())
