"""kubetune estimate vs a real LoRA fine-tune step on a GPU.

    PYTORCH_ALLOC_CONF=expandable_segments:True python bench/estimator_gpu_check.py --out results.json

For each case: build the model from its config on the GPU (random weights, bf16), add peft's LoRA (r=16, all
linear layers, dropout 0.05), run three optimizer steps under bf16 autocast with TRL's chunked log-prob head
(the loss the fine-tune stage uses; ``--trl-kernel`` points at trl/kernels/chunked_logprob.py when trl itself is
not installed), and compare with the estimate of the same recipe:

* saved activations: ``saved_tensors_hooks`` in one real forward vs the meta-device trace (exact check of the
  CUDA autocast and SDPA-backend emulation);
* peak allocated (torch.cuda.max_memory_allocated) vs the estimate's allocated total;
* what the process holds (device used memory at the end, context included) vs the estimate's nvidia-smi total.

GPTQModel sets PYTORCH_ALLOC_CONF=expandable_segments:True in every kubetune stage (peft imports it); set it
here too, before CUDA starts, or the reserved figures are not comparable.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEW_TOKENS = 128
TINYLLAMA = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
             "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
             "max_position_embeddings": 2048, "tie_word_embeddings": False}
CASES = [
    {"name": "tinyllama-1.1b", "config": TINYLLAMA, "batch": 8, "length": 512, "gc": False},
    {"name": "tinyllama-1.1b +gc", "config": TINYLLAMA, "batch": 8, "length": 512, "gc": True},
    {"name": "bloom-1b1", "config": "bench/configs/bigscience--bloom-1b1.json", "batch": 8, "length": 512,
     "gc": False},
    {"name": "bloom-1b1 +gc", "config": "bench/configs/bigscience--bloom-1b1.json", "batch": 8, "length": 512,
     "gc": True},
    {"name": "falcon-7b (8 layers)", "config": "bench/configs/tiiuae--falcon-7b.json", "layers": 8, "batch": 4,
     "length": 512, "gc": False},
    {"name": "falcon-7b (8 layers) +gc", "config": "bench/configs/tiiuae--falcon-7b.json", "layers": 8,
     "batch": 8, "length": 512, "gc": True},
    {"name": "tinyllama-1.1b qlora", "config": TINYLLAMA, "batch": 8, "length": 512, "gc": False,
     "precision": "4bit"},
    {"name": "bloom-1b1 qlora +gc", "config": "bench/configs/bigscience--bloom-1b1.json", "batch": 8,
     "length": 512, "gc": True, "precision": "4bit"},
    {"name": "tinyllama-1.1b 8bit +gc", "config": TINYLLAMA, "batch": 8, "length": 512, "gc": True,
     "precision": "8bit"},
    {"name": "tinyllama-1.1b 8bit batch 2", "config": TINYLLAMA, "batch": 2, "length": 512, "gc": False,
     "precision": "8bit"},
]


def load_trl_head(path: str | None):
    if path is None:
        from trl.kernels import ChunkedLogProbFunction

        return ChunkedLogProbFunction
    spec = importlib.util.spec_from_file_location("chunked_logprob", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ChunkedLogProbFunction


def case_config(case):
    from kubetune.estimate.modelshape import _config_from_dict
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    raw = case["config"] if isinstance(case["config"], dict) else json.loads((ROOT / case["config"]).read_text())
    config = _config_from_dict(copy.deepcopy(raw), CONFIG_MAPPING, case["name"])
    if "layers" in case:
        config.num_hidden_layers = case["layers"]
    return config


def estimate(case, config, folder: Path):
    from kubetune.config import recipe_from_dict
    from kubetune.estimate.modelshape import load_config
    from kubetune.estimate.estimator import Estimator
    from kubetune.estimate.infer import model_memory

    config.save_pretrained(folder)
    recipe = recipe_from_dict({"model": {"name_or_path": str(folder)}, "finetune": {
        "base_precision": case.get("precision", "none"),
        "batch_size": case["batch"], "max_length": case["length"], "gradient_checkpointing": case["gc"],
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}},
        "infer": {"batch_size": case["batch"], "max_new_tokens": NEW_TOKENS}})
    est = Estimator(recipe, load_config(recipe.model))
    stage = est.estimate("finetune")
    trace = est.train_trace(recipe.finetune, case["batch"], case["length"])
    return stage, trace, est.estimate("merge"), model_memory(est, recipe, "merged", case["batch"])


def real(case, config, head_fn):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    precision = case.get("precision", "none")
    if precision == "none":
        start = torch.cuda.memory_allocated()
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    else:  # as the fine-tune loads it: bitsandbytes from a checkpoint, then peft's k-bit preparation
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        with tempfile.TemporaryDirectory() as folder:
            AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
            q = (BitsAndBytesConfig(load_in_8bit=True) if precision == "8bit" else BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16))
            start = torch.cuda.memory_allocated()
            model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, dtype=torch.bfloat16,
                                                         device_map={"": "cuda"})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=case["gc"])
    weights = torch.cuda.memory_allocated() - start
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             bias="none", task_type="CAUSAL_LM"))
    if case["gc"]:  # TRL: non-reentrant checkpointing, and input gradients for a PEFT model
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if precision != "none":  # TRL's SFTTrainer casts the adapter of a quantized model to bf16
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    model.train()
    b, s = case["batch"], case["length"]
    ids = torch.randint(0, config.vocab_size, (b, s), device="cuda")
    inner = model.base_model.model
    backbone = inner.base_model

    # 1. three training steps the way the fine-tune runs them
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    head = inner.get_output_embeddings()
    phases: dict[str, int] = {}

    def mark(name: str) -> None:
        # Peak since the last mark, then start a new window: where in the step the memory goes.
        torch.cuda.synchronize()
        phases[name] = max(phases.get(name, 0), torch.cuda.max_memory_allocated())
        phases[name + "_end"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    torch.cuda.reset_peak_memory_stats()
    phases["before_steps"] = torch.cuda.memory_allocated()
    peak = 0
    for step in range(3):
        with torch.autocast("cuda", torch.bfloat16):
            hidden = backbone(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
            mark("forward")
            labels = ids[:, 1:]
            mask = labels != -100
            logp, *_ = head_fn.apply(hidden[mask], head.weight, None, labels[mask], 1.0, 32768, None, 1.0,
                                     ("log_probs", "entropy", "is_top1"))
            loss = -logp.sum() / mask.sum()
        mark("head")
        loss.backward()
        mark("backward")
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("step")
        del hidden, logp, loss
        phases[f"after_step{step}_end"] = torch.cuda.memory_allocated()
    peak = max(v for k, v in phases.items() if not k.endswith("_end"))
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    reserved_end = torch.cuda.memory_reserved()
    del opt, trainable
    # 2. what autograd saves in one forward (no checkpointing, to compare with the trace itself)
    saved = 0
    if not case["gc"]:
        params = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        seen: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t.detach()  # t itself, when an op saves its own output, is a cycle through grad_fn

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cuda", torch.bfloat16):
            out = backbone(input_ids=ids, use_cache=False)
        saved = sum(seen.values())
        del out, seen

    # 3. the merge stage's work (adapter logits, merge_and_unload, merged logits) and generation with the merged
    # model; only where the fine-tune ran without checkpointing (the model is the same either way)
    merge_peak = infer_peak = None
    if not case["gc"] and precision == "none":
        model.eval()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            ref = model(input_ids=ids[:1]).logits.float().cpu()
            merged = model.merge_and_unload()
            again = merged(input_ids=ids[:1]).logits.float().cpu()
        torch.cuda.synchronize()
        merge_peak = torch.cuda.max_memory_allocated()
        del ref, again
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            merged.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                            pad_token_id=0)
        torch.cuda.synchronize()
        infer_peak = torch.cuda.max_memory_allocated()

    return {"weights": weights, "saved": saved, "peak_allocated": peak, "phases": phases,
            "merge_peak_allocated": merge_peak, "infer_peak_allocated": infer_peak,
            "device_used_end": total - free, "reserved_end": reserved_end, "start_allocated": start,
            "gc_active": bool(getattr(inner, "is_gradient_checkpointing", False))}


def compare(row: dict, stage, trace, merge, infer) -> dict:
    """The estimate columns of one case, and estimate / measured ratios."""
    precision = any(c.name.startswith("base linears") for c in stage.components)
    row.update(est_components={c.name: c.bytes for c in stage.components},
               est_weights=sum(c.bytes for c in stage.components[:2 if precision else 1]), est_saved=trace.saved,
               est_allocated=stage.allocated_bytes, est_total=stage.total_bytes,
               est_merge_allocated=merge.allocated_bytes, est_infer_allocated=infer.allocated_bytes)
    row["allocated_ratio"] = round(row["est_allocated"] / row["peak_allocated"], 3)
    # nvidia-smi's view at the end of the steps: context + what the allocator reserved (nothing freed yet)
    row["process_bytes"] = row["context_bytes"] + row["reserved_end"]
    row["total_ratio"] = round(row["est_total"] / row["process_bytes"], 3)
    if row.get("saved"):
        row["saved_ratio"] = round(row["est_saved"] / row["saved"], 4)
    if row.get("merge_peak_allocated"):
        row["merge_ratio"] = round(merge.allocated_bytes / row["merge_peak_allocated"], 3)
        row["infer_ratio"] = round(infer.allocated_bytes / row["infer_peak_allocated"], 3)
    return row


def reestimate(path: Path) -> None:
    data = json.loads(path.read_text())
    by_name = {c["name"]: c for c in CASES}
    for row in data["cases"]:
        case = by_name[row["case"]]
        with tempfile.TemporaryDirectory() as folder:
            compare(row, *estimate(case, case_config(case), Path(folder)))
    data["reestimated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path.write_text(json.dumps(data, indent=2) + "\n")
    print("| case | batch × length | peak allocated: measured | estimated | ratio | nvidia-smi ratio | "
          "merge ratio | infer ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in data["cases"]:
        print(f"| {r['case']} | {r['batch']} × {r['length']} | {r['peak_allocated'] / 2**30:.2f} GiB | "
              f"{r['est_allocated'] / 2**30:.2f} GiB | {r['allocated_ratio']:.3f} | {r['total_ratio']:.3f} | "
              f"{r.get('merge_ratio', '—')} | {r.get('infer_ratio', '—')} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="estimator_gpu_check.json")
    parser.add_argument("--trl-kernel", default=None, help="path of trl/kernels/chunked_logprob.py")
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    parser.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--reestimate", default=None, metavar="RESULTS",
                        help="no GPU: recompute the estimate columns of a results file with the current code")
    args = parser.parse_args()
    if args.reestimate:
        reestimate(Path(args.reestimate))
        return
    import torch

    head_fn = load_trl_head(args.trl_kernel)
    if args.case is None:  # one fresh process per case: nothing of one case stays allocated in the next
        import subprocess

        rows = []
        for i, case in enumerate(CASES):
            if args.only and args.only not in case["name"]:
                continue
            part = Path(args.out).with_suffix(f".case{i}.json")
            cmd = [sys.executable, __file__, "--case", str(i), "--out", str(part)]
            if args.trl_kernel:
                cmd += ["--trl-kernel", args.trl_kernel]
            subprocess.run(cmd, check=True)
            rows.append(json.loads(part.read_text()))
            part.unlink()
        info = {"device": rows[0]["device"] if rows else None, "torch": torch.__version__,
                "transformers": __import__("transformers").__version__, "peft": __import__("peft").__version__,
                "cases": rows}
        Path(args.out).write_text(json.dumps(info, indent=2) + "\n")
        return
    # The parent never touches CUDA, so the device's used memory is this process's alone.
    a = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()  # CUDA context and the cuBLAS handle, as in any stage
    free, total = torch.cuda.mem_get_info()
    context = total - free - torch.cuda.memory_reserved()
    for case in [CASES[args.case]]:
        config = case_config(case)
        with tempfile.TemporaryDirectory() as folder:
            t = time.perf_counter()
            stage, trace, merge, infer = estimate(case, config, Path(folder))
            est_s = time.perf_counter() - t
        measured = real(case, config, head_fn)
        row = {"case": case["name"], "batch": case["batch"], "length": case["length"], "gc": case["gc"],
               "estimate_seconds": round(est_s, 2), **measured, "context_bytes": context,
               "device": torch.cuda.get_device_name()}
        compare(row, stage, trace, merge, infer)
        print(json.dumps({k: v for k, v in row.items() if k not in ("est_components", "phases")}), flush=True)
        Path(args.out).write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
