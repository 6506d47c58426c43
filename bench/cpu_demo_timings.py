"""How long each part of the CPU demo takes with the real Gemma 3 270M, to size jobs/demo-cpu.yaml.

    .venv/bin/python bench/cpu_demo_timings.py                       # everything (~15 min on 2 cores)
    .venv/bin/python bench/cpu_demo_timings.py --only train,generate  # a subset
    scripts/demo.sh && .venv/bin/python bench/cpu_demo_timings.py --only pipeline   # record a demo run

Measures, with ``torch.set_num_threads(--threads)``:
  convert   ``kubetune import-gguf`` of the GGUF into a fresh folder (wall time, peak RSS of a child process)
  tokens    prompt + answer token lengths of the builtin Text-to-SQL rows (default template, Gemma tokenizer)
  train     one LoRA optimizer step (forward, backward, AdamW) per batch × sequence length, per dtype
  generate  greedy batched generation, tokens/s, per batch size and dtype (end-of-sequence suppressed, so
            every row makes max_new_tokens tokens)
  gptq      GPTQ quantization of the whole model (gptqmodel), per bits × calibration samples
  pipeline  read back a finished run of jobs/demo-cpu.yaml (--run-dir): each stage's time and peak RSS, the
            fine-tune's real tokens/s, infer's per-model speed and the execution accuracies (run
            ``scripts/demo.sh`` first; nothing is run here)

Writes ``bench/results/cpu_demo_timings.json`` and ``.md`` (machine, date, versions, command). Sections not run
this time are kept from the previous JSON. On a shared machine the numbers are noisy: run twice and compare.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SECTIONS = ("convert", "tokens", "train", "generate", "gptq", "pipeline")


# ---- helpers ---------------------------------------------------------------------------------------------
def machine() -> dict:
    flags = ""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1]
    except OSError:
        pass
    import torch

    return {
        "cpu": model, "cores": os.cpu_count(), "amx_bf16": "amx_bf16" in flags.split(),
        "avx512_bf16": "avx512_bf16" in flags.split(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(), "platform": platform.platform(),
    }


def versions() -> dict:
    from kubetune.measure import library_versions

    return library_versions()


def timed(fn, repeat: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def rows(args) -> list[dict]:
    """Rows of the builtin data set (or of --data, a .jsonl, while the builtin generator does not exist)."""
    if args.data:
        with open(args.data, encoding="utf-8") as fh:
            return [json.loads(line) for line, _ in zip(fh, range(args.rows))]
    from kubetune.config import DataSection
    from kubetune.data import load_examples

    return list(load_examples(DataSection(builtin_examples=max(args.rows, 10))))[: args.rows]


def texts(args, tokenizer) -> tuple[list[str], list[str]]:
    from kubetune.config import DEFAULT_PROMPT_TEMPLATE
    from kubetune.prompt import PromptTemplate

    template = PromptTemplate(DEFAULT_PROMPT_TEMPLATE)
    data = rows(args)
    prompts = [template.format(r["context"], r["question"]) for r in data]
    full = [p + r["answer"].strip() + tokenizer.eos_token for p, r in zip(prompts, data)]
    return prompts, full


def load_model(path: str, dtype_name: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype_name), device_map={"": "cpu"})


# ---- sections --------------------------------------------------------------------------------------------
def bench_convert(args) -> dict:
    from kubetune.gguf_import import fetch_gemma3_270m

    gguf = fetch_gemma3_270m(args.cache_dir)
    with tempfile.TemporaryDirectory(dir=args.cache_dir) as tmp:
        code = ("import sys, torch; torch.set_num_threads(int(sys.argv[3])); from kubetune.gguf_import import "
                "import_gguf; r = import_gguf(sys.argv[1], sys.argv[2]); print(r.seconds)")
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, str(gguf), str(Path(tmp) / "model"), str(args.threads)],
                       check=True, capture_output=True)
        wall = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        size = sum(f.stat().st_size for f in (Path(tmp) / "model").iterdir())
    return {"gguf_mb": round(gguf.stat().st_size / 1e6), "wall_s": round(wall, 1),
            "peak_rss_gib": round(max(peak, before) / 2**20, 2), "output_mb": round(size / 1e6)}


def bench_tokens(args) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    prompts, full = texts(args, tok)
    plen = [len(tok(p).input_ids) for p in prompts]
    flen = [len(tok(f).input_ids) for f in full]

    def stats(xs):
        xs = sorted(xs)
        return {"min": xs[0], "median": statistics.median(xs), "p90": xs[int(0.9 * (len(xs) - 1))],
                "max": xs[-1], "mean": round(statistics.fmean(xs), 1)}

    return {"source": args.data or "builtin:text2sql", "rows": len(prompts), "prompt_tokens": stats(plen),
            "prompt_plus_answer_tokens": stats(flen), "answer_tokens": stats([f - p for f, p in zip(flen, plen)])}


def bench_train(args) -> list[dict]:
    import torch
    from peft import LoraConfig, get_peft_model

    results = []
    for dtype_name in args.dtypes:
        model = load_model(args.model, dtype_name)
        model.config.use_cache = False
        lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=args.lora_dropout,
                          task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"])
        peft_model = get_peft_model(model, lora)
        peft_model.train()
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-4)
        vocab = model.config.vocab_size
        for batch, seq in args.train_shapes:
            gen = torch.Generator().manual_seed(0)
            ids = torch.randint(10, vocab, (batch, seq), generator=gen)
            labels = ids.clone()
            labels[:, : seq * 2 // 3] = -100  # completion-only: the prompt is about 2/3 of each row

            def step():
                out = peft_model(input_ids=ids, labels=labels)
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            times = timed(step, args.train_repeat)
            sec = min(times)  # the least disturbed by other processes on a shared machine
            results.append({"dtype": dtype_name, "lora_r": args.lora_r, "batch": batch, "seq": seq,
                            "step_s": round(sec, 3), "median_step_s": round(statistics.median(times), 3),
                            "tokens_per_s": round(batch * seq / sec), "all_step_s": [round(t, 3) for t in times]})
            print(f"train {dtype_name} batch {batch} seq {seq}: {sec:.2f} s/step (min of {len(times)})", flush=True)
        del peft_model, model, opt
    return results


def bench_generate(args) -> list[dict]:
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    prompts, _ = texts(args, tok)
    results = []
    for dtype_name in args.dtypes:
        model = load_model(args.model, dtype_name).eval()
        for batch in args.gen_batches:
            enc = tok(prompts[:batch], return_tensors="pt", padding=True)

            def gen():
                with torch.inference_mode():
                    model.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   do_sample=False, pad_token_id=tok.pad_token_id)

            times = timed(gen, args.gen_repeat)
            sec = min(times)
            results.append({"dtype": dtype_name, "batch": batch, "prompt_tokens_padded": enc.input_ids.shape[1],
                            "new_tokens": args.new_tokens, "seconds": round(sec, 2),
                            "tokens_per_s": round(batch * args.new_tokens / sec, 1)})
            print(f"generate {dtype_name} batch {batch}: {batch * args.new_tokens / sec:.1f} tok/s", flush=True)
        del model
    return results


def bench_gptq(args) -> list[dict]:
    """GPTQ as the quantize stage runs it (gptqmodel, model loaded in --gptq-dtype, like merge.dtype), then the
    quantized checkpoint's greedy generation speed through transformers with the torch kernel (as infer loads it)."""
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    prompts, full = texts(args, tok)
    results = []
    for bits, samples in args.gptq_runs:
        calib = [tok(t) for t in full[:samples]]
        calib = [{"input_ids": e.input_ids, "attention_mask": e.attention_mask} for e in calib]
        with tempfile.TemporaryDirectory(dir=args.cache_dir) as tmp:
            start = time.perf_counter()
            config = QuantizeConfig(bits=bits, group_size=128, desc_act=False, sym=True, damp_percent=0.05)
            model = GPTQModel.load(args.model, config, device="cpu", dtype=getattr(torch, args.gptq_dtype))
            loaded = time.perf_counter()
            model.quantize(calib, batch_size=8)
            quantized = time.perf_counter()
            model.save(tmp)
            saved = time.perf_counter()
            del model
            size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
            qmodel = AutoModelForCausalLM.from_pretrained(tmp, dtype="auto", device_map={"": "cpu"},
                                                          quantization_config=GPTQConfig(bits=bits, backend="torch"))
            enc = tok(prompts[:8], return_tensors="pt", padding=True)

            def gen():
                with torch.inference_mode():
                    qmodel.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                    do_sample=False, pad_token_id=tok.pad_token_id)

            gen_s = min(timed(gen, args.gen_repeat))
            del qmodel
        results.append({"bits": bits, "group_size": 128, "samples": samples, "dtype": args.gptq_dtype,
                        "load_s": round(loaded - start, 1), "quantize_s": round(quantized - loaded, 1),
                        "save_s": round(saved - quantized, 1), "total_s": round(saved - start, 1),
                        "output_mb": round(size / 1e6),
                        "generate_batch8_tokens_per_s": round(8 * args.new_tokens / gen_s, 1)})
        print(f"gptq {bits}-bit {samples} samples: {saved - start:.0f} s; generation "
              f"{results[-1]['generate_batch8_tokens_per_s']} tok/s", flush=True)
    return results


def bench_pipeline(args) -> dict:
    run_dir = Path(args.run_dir)
    reports = {}
    from kubetune.config import STAGE_NAMES  # the registry's recipe stages, in pipeline order
    from kubetune.stage_report import peak_of

    for stage in STAGE_NAMES:
        path = run_dir / stage / "report.json"
        if not path.is_file():
            raise SystemExit(f"{path}: not found; run scripts/demo.sh (or kubetune run jobs/demo-cpu.yaml) first")
        reports[stage] = json.loads(path.read_text())
    ft, infer = reports["finetune"], reports["infer"]
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    return {
        "run_dir": str(run_dir),
        "started_at": ft.get("started_at"),
        "stages": {s: {"seconds": r.get("duration_s"),
                       "peak_rss_gib": round((peak_of(r).host_rss_bytes or 0) / 2**30, 2)}
                   for s, r in reports.items()},
        "total_stage_seconds": round(sum(r.get("duration_s") or 0 for r in reports.values()), 1),
        "finetune": {"steps": ft["metrics"].get("steps_run"), "train_loss": ft["metrics"].get("train_loss"),
                     "train_tokens": ft["throughput"].get("train_tokens"),
                     "tokens_per_s": round(ft["throughput"].get("train_tokens_per_s", 0), 1),
                     "seconds_per_step": round(ft["throughput"]["train_seconds"] / ft["metrics"]["steps_run"], 2)},
        "infer": {m: {"seconds": t.get("seconds"), "load_seconds": t.get("load_seconds"),
                      "new_tokens": t.get("new_tokens"), "tokens_per_s": round(t.get("tokens_per_s", 0), 1)}
                  for m, t in infer.get("throughput", {}).items()},
        "accuracy": {m: {k: v.get(k) for k in ("execution_accuracy", "exact_match", "parse_rate", "examples")}
                     for m, v in metrics.get("models", {}).items()},
        "gates": [{k: g.get(k) for k in ("gate", "limit", "value", "passed")} for g in metrics.get("gates", [])],
    }


# ---- report ----------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    m, lines = result["machine"], []
    lines += ["# CPU demo timings (Gemma 3 270M)", "",
              f"- date: {result['date']}", f"- command: `{result['command']}`",
              f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, AMX-BF16 {m['amx_bf16']}, "
              f"torch CPU capability {m['torch_cpu_capability']}; torch threads {result['threads']}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v),
              "- shared machine: other jobs ran at the same time (load average 1-7 on 2 cores), so times are the",
              "  best of several repeats where a section repeats, and whole runs vary by ±30% (10x under heavy load)"]
    lines += [f"- {name}: measured {m['date']} by `{m['command']}`" for name, m in result.get("measured", {}).items()]
    lines.append("")
    if c := result.get("convert"):
        lines += ["## GGUF → safetensors (`kubetune import-gguf`)", "",
                  f"{c['gguf_mb']} MB GGUF → {c['output_mb']} MB folder in **{c['wall_s']} s** "
                  f"(peak RSS {c['peak_rss_gib']} GiB)", ""]
    if t := result.get("tokens"):
        lines += [f"## Token lengths ({t['source']}, {t['rows']} rows, default template)", "",
                  "| | min | median | p90 | max |", "|---|---|---|---|---|"]
        for key in ("prompt_tokens", "answer_tokens", "prompt_plus_answer_tokens"):
            s = t[key]
            lines.append(f"| {key} | {s['min']} | {s['median']} | {s['p90']} | {s['max']} |")
        lines.append("")
    if tr := result.get("train"):
        lines += ["## LoRA step (forward + backward + AdamW), all attention+MLP projections", "",
                  "| dtype | r | batch | seq | s/step (min) | s/step (median) | tokens/s |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['dtype']} | {r['lora_r']} | {r['batch']} | {r['seq']} | {r['step_s']} | "
                  f"{r.get('median_step_s', '')} | {r['tokens_per_s']} |" for r in tr]
        lines += ["", "Random tokens, plain peft + `loss.backward()` with transformers' full-logits loss. The "
                  "fine-tune stage's real step (TRL's chunked LM head, fp32 over the 262k vocabulary, on every "
                  "position) is ~3x slower: see the pipeline section.", ""]
    if g := result.get("generate"):
        lines += ["## Greedy generation", "", "| dtype | batch | prompt (padded) | new tokens | s | tokens/s |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['dtype']} | {r['batch']} | {r['prompt_tokens_padded']} | {r['new_tokens']} | {r['seconds']} "
                  f"| {r['tokens_per_s']} |" for r in g]
        lines.append("")
    if q := result.get("gptq"):
        lines += ["## GPTQ (gptqmodel, group 128; embedding/lm_head stay 16-bit)", "",
                  "| bits | samples | dtype | load s | quantize s | save s | total s | output MB "
                  "| generate tok/s (batch 8) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['bits']} | {r['samples']} | {r.get('dtype', '')} | {r['load_s']} | {r['quantize_s']} | "
                  f"{r['save_s']} | {r['total_s']} | {r['output_mb']} | {r.get('generate_batch8_tokens_per_s', '')} |"
                  for r in q]
        lines.append("")
    if p := result.get("pipeline"):
        lines += [f"## The demo recipe end to end ({p['run_dir']}, started {p['started_at']})", "",
                  "| stage | seconds | peak RSS GiB |", "|---|---|---|"]
        lines += [f"| {s} | {v['seconds']} | {v['peak_rss_gib']} |" for s, v in p["stages"].items()]
        f = p["finetune"]
        lines += [f"| total | {p['total_stage_seconds']} | |", "",
                  f"Fine-tune: {f['steps']} steps, {f['train_tokens']} real tokens, {f['seconds_per_step']} s/step, "
                  f"{f['tokens_per_s']} tokens/s, train loss {f['train_loss']:.3f}.", "",
                  "| model | generation s | load s | new tokens | tokens/s | execution accuracy % | exact % "
                  "| parses % |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, a in p["accuracy"].items():
            i = p["infer"].get(m, {})
            lines.append(f"| {m} | {i.get('seconds')} | {i.get('load_seconds')} | {i.get('new_tokens')} | "
                         f"{i.get('tokens_per_s')} | {a['execution_accuracy']} | {a['exact_match']} | "
                         f"{a['parse_rate']} |")
        lines += ["", "Gates: " + "; ".join(f"{g['gate']} {g['value']} (limit {g['limit']}) "
                                            f"{'pass' if g['passed'] else 'FAIL'}" for g in p["gates"]), ""]
    return "\n".join(lines)


def pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in item.split("x")) for item in text.split(",") if item]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=".cache/models/gemma-3-270m", help="imported model folder")
    parser.add_argument("--run-dir", default="artifacts/demo-cpu", help="finished demo run (pipeline section)")
    parser.add_argument("--cache-dir", default=".cache/models")
    parser.add_argument("--data", default=None, help=".jsonl of context/question/answer instead of the builtin data")
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--only", default=",".join(SECTIONS[:-1]),
                        help=f"comma-separated sections of {', '.join(SECTIONS)} (default: all but pipeline)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="0 skips peft's dropout pass (as the demo does)")
    parser.add_argument("--train-shapes", type=pairs, default=pairs("4x96,8x96,4x128,8x128,16x96"),
                        help="BATCHxSEQ,...")
    parser.add_argument("--train-repeat", type=int, default=3)
    parser.add_argument("--gen-batches", default="8,16")
    parser.add_argument("--gen-repeat", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--gptq-dtype", default="bfloat16", help="dtype GPTQModel loads the model in (merge.dtype)")
    parser.add_argument("--gptq-runs", type=pairs, default=pairs("4x16,8x16,4x32"), help="BITSxSAMPLES,...")
    args = parser.parse_args(argv)
    args.dtypes = args.dtypes.split(",")
    args.gen_batches = [int(b) for b in args.gen_batches.split(",")]

    # GPTQModel's CPU worker settings, as the quantize stage sets them (before peft or gptqmodel is imported).
    from kubetune.stages.quantize import _gptqmodel_env

    _gptqmodel_env()
    import torch

    torch.set_num_threads(args.threads)
    os.chdir(ROOT)
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / "cpu_demo_timings.json"
    result = json.loads(json_path.read_text()) if json_path.exists() else {}
    result.update({"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                   "command": " ".join([Path(sys.executable).name, *sys.argv]), "threads": args.threads,
                   "machine": machine(), "versions": versions()})
    runners = {"convert": bench_convert, "tokens": bench_tokens, "train": bench_train, "generate": bench_generate,
               "gptq": bench_gptq, "pipeline": bench_pipeline}
    measured = result.setdefault("measured", {})
    for section in SECTIONS:
        if section in only:
            start = time.perf_counter()
            result[section] = runners[section](args)
            measured[section] = {"date": result["date"], "command": result["command"],
                                 "seconds": round(time.perf_counter() - start)}
            print(f"{section}: {time.perf_counter() - start:.0f} s", flush=True)
            json_path.write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "cpu_demo_timings.md").write_text(markdown(result) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
