"""GPU benchmark of kubetune's real stages on random-weight models of the original's architectures.

    # on the GPU machine (see bench/README.md for the wheels to carry):
    PYTHONPATH=src python bench/harness.py run --out $OUT --cases bloom-1b1/baseline,bloom-1b1/ours
    # here, on the CPU, the same code path on shrunken models (2 layers, hidden 64; vocabularies kept):
    .venv/bin/python bench/harness.py run --tiny --out /tmp/bench --cases bloom-1b1/baseline,bloom-1b1/ours
    # after a run: add the estimator's prediction and write bench/results/<name>.{json,md}
    .venv/bin/python bench/harness.py report /path/to/results.json --name gpu-2026-11-28

Each case is one recipe run through :func:`kubetune.stages.run_stage` (the stage code a pod runs), each stage in its own
process, as each stage is its own pod in the cluster (a clean CUDA context: the peaks and NVML's per-process figure
are that stage's alone). The model folder is built from
``bench/configs/<org>--<name>.json`` (the published config.json shape fields) with random bf16 weights and a
byte-level BPE tokenizer trained on the builtin Text-to-SQL rows; the weights' values change neither time nor
memory. Data: ``builtin:text2sql``.

What is measured, per case (nothing here is tuned per case):

* per stage: wall time, peak GPU memory (torch allocator and NVML, from the stage's own report);
* fine-tune steps: a callback records CUDA events at each optimizer step's begin and end; the first
  ``--warmup`` steps are dropped; the median step time and tokens/s (real, non-padding tokens over the measured
  steps' summed time) come from the rest;
* MFU = model FLOPs / measured time / 989 TFLOP/s (dense bf16, H100 and H200 SXM), with model FLOPs per step
  = 4·N·T (N: weights of every matmul, lm_head included; T: real tokens; LoRA: forward + input gradients)
  plus causal attention 6·L·d·Σ s² (forward 2·s²·d per layer, backward twice that; s: the length each token
  attends over: the row for padded or wrapped-packed rows, the example for padding-free packing);
* memory right after the base model loads and after the trainer is built, with the parameters' bytes by dtype
  (what stays in 16/32 bit next to 4/8-bit weights).

The original's recipe differs from what a kubetune recipe can say in one place only, TRL's packing strategy
("wrapped" at 2048 tokens: rows cut mid-example, attention across examples); cases pass it as an SFTConfig
override, recorded in the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bench" / "configs"
RESULTS = ROOT / "bench" / "results"
PEAK_BF16_FLOPS = 989e12  # dense bf16 tensor-core peak, H100 SXM and H200 (datasheets)

MODELS = {
    "bloom-1b1": "bigscience--bloom-1b1.json",
    "bloom-7b1": "bigscience--bloom-7b1.json",
    "falcon-7b": "tiiuae--falcon-7b.json",
    "codegen2-1b": "Salesforce--codegen2-1B.json",
}
JOBS = {"bloom-1b1": "jobs/bloom-1b1-lora.yaml", "bloom-7b1": "jobs/bloom-7b1-qlora.yaml",
        "falcon-7b": "jobs/falcon-7b-8bit.yaml", "codegen2-1b": "jobs/codegen2-1b-lora.yaml"}

# The original notebook's fine-tune: LoRA r16/alpha32 on peft's default modules for these architectures
# (query_key_value), batch 1, TRL packing wrapped at 2048 tokens, loss on the whole sequence, gradient
# checkpointing; bloom-1b1 loaded and trained in fp32, bloom-7b1 on a 4-bit nf4 base, falcon-7b on an 8-bit base.
ORIGINAL = ["finetune.lora.r=16", "finetune.lora.alpha=32", "finetune.lora.dropout=0.05",
            "finetune.lora.target_modules=[query_key_value]", "finetune.batch_size=1", "finetune.grad_accum=1",
            "finetune.max_length=2048", "finetune.packing=true", "finetune.completion_only_loss=false",
            "finetune.gradient_checkpointing=true"]
WRAPPED = {"packing_strategy": "wrapped"}

CASES: dict[str, dict] = {
    # 1. bloom-1b1. "ours" is jobs/bloom-1b1-lora.yaml as shipped when the case runs (each JSON records the resolved
    # recipe); each lever case changes one thing from it. The shipped defaults were then set from these runs.
    "bloom-1b1/baseline": {"model": "bloom-1b1", "set": ORIGINAL + ["model.dtype=float32", "finetune.precision=fp32"],
                           "sft": WRAPPED},
    "bloom-1b1/ours": {"model": "bloom-1b1", "set": []},
    # one lever on the original's recipe: bf16 weights and mixed precision instead of fp32 (nothing else changed)
    # the loss from full logits (bf16 logits of every position over the 250,880-token vocabulary, then
    # cross-entropy), instead of TRL 1.16's chunked LM head that scores only the labelled positions
    "bloom-1b1/ours-full-logits": {"model": "bloom-1b1", "set": [], "patch": ["full_logits_loss"]},
    "bloom-1b1/baseline-bf16": {"model": "bloom-1b1", "set": ORIGINAL, "sft": WRAPPED},
    "bloom-1b1/ours-bs8-nogc": {"model": "bloom-1b1",
                                "set": ["finetune.batch_size=8", "finetune.gradient_checkpointing=false"]},
    "bloom-1b1/ours-bs32": {"model": "bloom-1b1", "set": ["finetune.batch_size=32"]},
    "bloom-1b1/ours-bs64-gc": {"model": "bloom-1b1",
                               "set": ["finetune.batch_size=64", "finetune.gradient_checkpointing=true"]},
    "bloom-1b1/ours-bs32-gc": {"model": "bloom-1b1",
                               "set": ["finetune.batch_size=32", "finetune.gradient_checkpointing=true"]},
    "bloom-1b1/ours-grouped": {"model": "bloom-1b1", "set": ["finetune.group_by_length=true"]},
    "bloom-1b1/ours-grouped-bs128": {"model": "bloom-1b1",
                                     "set": ["finetune.group_by_length=true", "finetune.batch_size=128"]},
    "bloom-1b1/ours-grouped-bs256": {"model": "bloom-1b1",
                                     "set": ["finetune.group_by_length=true", "finetune.batch_size=256"]},
    "bloom-1b1/ours-grouped-bs128-nogc": {"model": "bloom-1b1",
                                          "set": ["finetune.group_by_length=true", "finetune.batch_size=128",
                                                  "finetune.gradient_checkpointing=false"]},
    "bloom-1b1/ours-nodropout": {"model": "bloom-1b1", "set": ["finetune.lora.dropout=0.0"]},
    "bloom-1b1/ours-wholeloss": {"model": "bloom-1b1", "set": ["finetune.completion_only_loss=false"]},
    # the shipped recipe again, with one more step run under torch.profiler (left out of the figures): where a
    # step's time goes
    "bloom-1b1/ours-profile": {"model": "bloom-1b1", "set": [], "profile": True},
    # torch.compile through TRL's SFTConfig: on the H200 the first steps had not finished compiling after 103 s and
    # 184 s (two runs; batches grouped by length change shape at every step, and each new shape recompiles)
    "bloom-1b1/ours-compile": {"model": "bloom-1b1", "set": ["finetune.group_by_length=true"],
                               "sft": {"torch_compile": True}},
    # 2. bloom-7b1 on a 4-bit base
    "bloom-7b1/baseline": {"model": "bloom-7b1", "set": ORIGINAL + ["finetune.base_precision=4bit"], "sft": WRAPPED},
    "bloom-7b1/ours": {"model": "bloom-7b1", "set": []},
    "bloom-7b1/ours-bs32": {"model": "bloom-7b1", "set": ["finetune.batch_size=32", "finetune.grad_accum=1"]},
    "bloom-7b1/ours-grouped-bs64": {"model": "bloom-7b1", "set": ["finetune.batch_size=64", "finetune.grad_accum=1",
                                                                   "finetune.group_by_length=true"]},
    # the frozen embeddings/lm_head/norms stay bf16 (no fp32 upcast): measured as a patch, then adopted by
    # kubetune.stages.finetune.prepare_kbit_base for bf16 training (the patch is a no-op since)
    "bloom-7b1/ours-noupcast": {"model": "bloom-7b1", "set": [], "patch": ["no_kbit_upcast"]},
    "bloom-7b1/ours-bs32-noupcast": {"model": "bloom-7b1", "set": ["finetune.batch_size=32", "finetune.grad_accum=1"],
                                     "patch": ["no_kbit_upcast"]},
    "bloom-7b1/ours-grouped-bs64-noupcast": {"model": "bloom-7b1",
                                             "set": ["finetune.batch_size=64", "finetune.grad_accum=1",
                                                     "finetune.group_by_length=true"], "patch": ["no_kbit_upcast"]},
    # 3. GPTQ 8-bit (the fine-tune only makes the adapter: 2 steps). The builtin rows are ~64 tokens; the
    # "-cal2048" cases calibrate on 128 sequences of 2048 tokens (rows joined: see PATCHES["calibration_2048"]).
    "bloom-1b1/gptq8": {"model": "bloom-1b1", "set": ["finetune.max_steps=2"],
                        "stages": ["finetune", "merge", "quantize"]},
    # GPTQModel's torch loop instead of its JIT-compiled CUDA block update: what a pod of the shipped image runs
    # (it has no nvcc, so the JIT build fails there and GPTQModel falls back)
    "bloom-1b1/gptq8-torch-loop": {"model": "bloom-1b1", "set": ["finetune.max_steps=2"],
                                   "stages": ["finetune", "merge", "quantize"], "patch": ["gptq_torch_block_update"]},
    # kubetune's image as it now runs: no compiled kernel, so the torch loop replayed as CUDA graphs
    # (stages/gptq_block.py); the patch hides GPTQModel's kernel on a machine that could build it
    "bloom-1b1/gptq8-graphed": {"model": "bloom-1b1", "set": ["finetune.max_steps=2"],
                                "stages": ["finetune", "merge", "quantize"], "patch": ["gptq_no_compiled_kernel"]},
    "bloom-1b1/gptq8-nooffload": {"model": "bloom-1b1", "set": ["finetune.max_steps=2"],
                                  "stages": ["finetune", "merge", "quantize"], "patch": ["gptq_no_offload"]},
    "bloom-1b1/gptq8-cal2048": {"model": "bloom-1b1", "set": ["finetune.max_steps=2",
                                                              "quantize.calibration.max_length=2048",
                                                              "data.builtin_examples=8000"],
                                "stages": ["finetune", "merge", "quantize"], "patch": ["calibration_2048"]},
    "bloom-7b1/gptq8": {"model": "bloom-7b1", "set": ["finetune.max_steps=2"],
                        "stages": ["finetune", "merge", "quantize"]},
    "bloom-7b1/gptq8-graphed": {"model": "bloom-7b1", "set": ["finetune.max_steps=2"],
                                "stages": ["finetune", "merge", "quantize"], "patch": ["gptq_no_compiled_kernel"]},
    "bloom-7b1/gptq8-cal2048": {"model": "bloom-7b1", "set": ["finetune.max_steps=2",
                                                              "quantize.calibration.max_length=2048",
                                                              "data.builtin_examples=8000"],
                                "stages": ["finetune", "merge", "quantize"], "patch": ["calibration_2048"]},
    # 4. falcon-7b on an 8-bit base (kubetune.modelio builds Falcon's layers as plain nn.Linear so that
    # bitsandbytes quantizes them; before, the "8-bit" falcon was a bf16 model)
    "falcon-7b/baseline": {"model": "falcon-7b", "set": ORIGINAL + ["finetune.base_precision=8bit"], "sft": WRAPPED},
    "falcon-7b/ours": {"model": "falcon-7b", "set": []},
    # falcon-7b's shipped recipe packs 2 rows of 512 per step; these are the settings it replaced (8 × 2 unpacked)
    # and packing at those batch settings, as rows and as TRL's one flattened row
    "falcon-7b/ours-unpacked": {"model": "falcon-7b", "set": ["finetune.packing=false", "finetune.batch_size=8",
                                                             "finetune.grad_accum=2"]},
    "falcon-7b/ours-packed": {"model": "falcon-7b", "set": ["finetune.packing=true", "finetune.batch_size=8",
                                                           "finetune.grad_accum=2"]},
    "falcon-7b/ours-packed-flat": {"model": "falcon-7b", "set": ["finetune.packing=true", "finetune.batch_size=8",
                                                                "finetune.grad_accum=2"],
                                   "patch": ["trl_flattened_packing"]},
    # the same tokens per optimizer step as ours-packed (16 rows of 512), in micro-batches a quarter the size
    "falcon-7b/ours-packed-bs2": {"model": "falcon-7b",
                                  "set": ["finetune.packing=true", "finetune.batch_size=2", "finetune.grad_accum=8"]},
    "falcon-7b/ours-grouped-bs64-noupcast": {"model": "falcon-7b",
                                             "set": ["finetune.batch_size=64", "finetune.grad_accum=1",
                                                     "finetune.group_by_length=true"], "patch": ["no_kbit_upcast"]},
    "codegen2-1b/ours": {"model": "codegen2-1b", "set": []},
    "codegen2-1b/ours-grouped-bs64-gc": {"model": "codegen2-1b",
                                         "set": ["finetune.batch_size=64", "finetune.group_by_length=true",
                                                 "finetune.gradient_checkpointing=true"]},
    # where the memory of an 8-bit load goes (no training): the base as the fine-tune loads it, then prepared
    "falcon-7b/probe-8bit": {"model": "falcon-7b", "set": ["finetune.base_precision=8bit"], "probe": True},
}


# ---- models ------------------------------------------------------------------------------------------------
def model_config(model: str, tiny: bool):
    from transformers import AutoConfig

    raw = {k: v for k, v in json.loads((CONFIGS / MODELS[model]).read_text()).items()
           if not k.startswith("_") and k != "architectures"}
    if tiny:  # same architecture and vocabulary, 2 small layers: the CPU check of the code path
        shrink = {"bloom": {"hidden_size": 64, "n_layer": 2, "n_head": 4},
                  "falcon": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
                  "codegen": {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8}}[raw["model_type"]]
        raw.update(shrink)
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def matmul_params(config) -> int:
    """Weights of every Linear (lm_head included, tied or not): the N of 4·N·T."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def train_tokenizer(vocab_size: int = 8000):
    """Byte-level BPE trained on builtin Text-to-SQL rows (another seed than the training data); special tokens
    <unk> <s> </s> <pad> get ids 0-3, as in BLOOM's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kubetune.config import DEFAULT_PROMPT_TEMPLATE
    from kubetune.text2sql import generate

    rows = generate(5000, seed=7)
    texts = [DEFAULT_PROMPT_TEMPLATE.format(context=r["context"], question=r["question"]) + r["answer"] for r in rows]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size,
                                                       special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def build_model(model: str, folder: Path, tiny: bool) -> dict:
    """Random bf16 weights from the config, saved with the tokenizer; skipped if the folder is complete."""
    import torch
    from transformers import AutoModelForCausalLM

    if (folder / "tokenizer.json").is_file():
        return {"model": model, "folder": str(folder), "built_s": 0.0, "reused": True}
    started = time.perf_counter()
    config = model_config(model, tiny)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(dev):
        m = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    m.save_pretrained(folder, max_shard_size="5GB")
    params = sum(p.numel() for p in m.parameters())
    del m
    train_tokenizer().save_pretrained(folder)  # last: its presence marks the folder complete
    return {"model": model, "folder": str(folder), "parameters": params,
            "built_s": round(time.perf_counter() - started, 1), "reused": False}


# ---- one case, in its own process -------------------------------------------------------------------------
def recipe_for(case: str, spec: dict, folder: Path, work: Path, steps: int, warmup: int, tiny: bool):
    import yaml

    from kubetune.config import recipe_from_dict

    data = yaml.safe_load((ROOT / JOBS[spec["model"]]).read_text())
    stages = case_stages(case)
    common = [f"run.name={case.replace('/', '-')}", f"run.artifacts_root={work / 'artifacts'}",
              f"model.name_or_path={folder}", "model.revision=null", "model.trust_remote_code=false",
              "data.source=builtin:text2sql", "data.builtin_examples=4000", "data.train_fraction=1.0",
              f"finetune.max_steps={warmup + steps}", "finetune.save_steps=100000", "finetune.logging_steps=5",
              "metrics.enabled=false", f"stages={json.dumps(stages)}"]
    if tiny:
        common += ["merge.dtype=float32", "quantize.group_size=32", "quantize.calibration.samples=16"]
    return recipe_from_dict(data, f"{JOBS[spec['model']]} ({case})", common + spec["set"])


def dtype_bytes(model) -> dict:
    """Bytes of parameters and buffers by dtype, and the largest tensors that are not 8/4-bit."""
    by_dtype: dict[str, int] = {}
    large = []
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        n = t.numel() * t.element_size()
        key = str(t.dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0) + n
        if t.dtype not in _low_bit_dtypes():
            large.append((n, name, key, list(t.shape)))
    large.sort(reverse=True)
    return {"by_dtype_bytes": by_dtype,
            "largest_16_32_bit": [{"name": nm, "dtype": dt, "shape": sh, "bytes": n} for n, nm, dt, sh in large[:6]]}


def _low_bit_dtypes():
    import torch

    return {torch.int8, torch.uint8}


class StepTimer:
    """Trainer callback: device time of each optimizer step (CUDA events), its real tokens and attention work."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.steps: list[dict] = []
        self._pending: dict | None = None

    def note_batch(self, inputs) -> None:
        """Called for every micro-batch: real tokens T and Σ s² (per attending span)."""
        if self._pending is None:
            return
        if "attention_mask" in inputs:
            lengths = inputs["attention_mask"].sum(dim=1).tolist()
        else:  # packed: position_ids restart at 0 for each example, flattened or in rows
            from kubetune.stages.packing import packed_example_lengths

            lengths = packed_example_lengths(inputs["position_ids"]).tolist()
        self._pending["tokens"] += int(sum(lengths))
        self._pending["sum_s2"] += int(sum(s * s for s in lengths))
        self._pending["rows"] += int(inputs["input_ids"].shape[0])
        self._pending["padded_tokens"] += int(inputs["input_ids"].numel())

    def _mark(self):
        if self.cuda:
            import torch

            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class _Cb(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer._pending = {"start": timer._mark(), "tokens": 0, "sum_s2": 0, "rows": 0, "padded_tokens": 0}

            def on_step_end(self, args, state, control, **kwargs):
                if timer._pending is not None:
                    timer._pending["end"] = timer._mark()
                    timer.steps.append(timer._pending)
                    timer._pending = None

        return _Cb()

    def results(self) -> list[dict]:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        out = []
        for s in self.steps:
            ms = s["start"].elapsed_time(s["end"]) if self.cuda else (s["end"] - s["start"]) * 1e3
            out.append({"ms": ms, **{k: s[k] for k in ("tokens", "sum_s2", "rows", "padded_tokens")}})
        return out


def _patch_no_kbit_upcast() -> None:
    """The frozen 16-bit rest of a k-bit base (BLOOM-7B1's tied 250880×4096 embedding: 1.9 GiB in bf16, 3.8 in
    fp32) stays 16-bit whatever the training precision. Measured as a patch first; since then
    kubetune.stages.finetune.prepare_kbit_base does it under bf16 itself (the patch changes nothing there)."""
    from kubetune.stages import finetune

    prepare = finetune.prepare_kbit_base
    finetune.prepare_kbit_base = lambda model, gradient_checkpointing, upcast: prepare(
        model, gradient_checkpointing, upcast=False)


def _patch_gptq_no_offload() -> None:
    """GPTQModel without its disk offload of finished layers (kubetune sets offload_to_disk_path for machines whose
    memory the model does not fit): what the offload costs in time when the model fits anyway."""
    import gptqmodel

    original = gptqmodel.QuantizeConfig

    def no_offload(*args, **kwargs):
        kwargs.pop("offload_to_disk_path", None)
        kwargs["offload_to_disk"] = False  # also when GPTQModel rebuilds the config from a saved checkpoint
        return original(*args, **kwargs)

    gptqmodel.QuantizeConfig = no_offload


def _patch_calibration_2048() -> None:
    """Calibrate on ``calibration.samples`` sequences of ``calibration.max_length`` tokens made by joining training
    rows (prompt + answer + eos, as the fine-tune sees them) end to end: the long-sequence calibration the issue asks
    about, which a recipe cannot express (the quantize stage takes one row per sample)."""
    from kubetune.data import example_texts, load_splits
    from kubetune.stages import quantize

    def joined(recipe, template, tokenizer):
        cal = recipe.quantize.calibration
        stream: list[int] = []
        need = cal.samples * cal.max_length
        for row in load_splits(recipe.data).train:
            text = "".join(example_texts(row, template, tokenizer.eos_token))
            stream += tokenizer(text)["input_ids"]
            if len(stream) >= need:
                break
        chunks = [stream[i:i + cal.max_length] for i in range(0, need, cal.max_length)]
        chunks = [c for c in chunks if len(c) == cal.max_length]
        return [{"input_ids": c, "attention_mask": [1] * len(c)} for c in chunks]

    quantize.calibration_examples = joined


def _patch_trl_flattened_packing() -> None:
    """Packing as TRL 1.16 does it by itself: each batch flattened into one padding-free row under sdpa's dense
    block mask, instead of kubetune's rows of max_length (kubetune.stages.packing)."""
    from kubetune.stages import packing

    packing.packing_layout = lambda model: packing.FLATTENED


def _patch_gptq_torch_block_update() -> None:
    """GPTQModel without its CUDA block-update extension (GPTQMODEL_DISABLE_GPTQ_CUDA): the column loop in torch,
    as in an image without a CUDA compiler."""
    os.environ["GPTQMODEL_DISABLE_GPTQ_CUDA"] = "1"


def _patch_gptq_no_compiled_kernel() -> None:
    """GPTQModel's compiled CUDA block update reported unavailable, as in an image without nvcc: kubetune's CUDA
    graphs (stages/gptq_block.py) run the blocks."""
    from gptqmodel.quantization import gptq_cuda

    gptq_cuda.block_update_available = lambda: False


def _patch_full_logits_loss() -> None:
    """SFTTrainer's loss as transformers' Trainer computes it: the model's own forward with labels, which builds
    the logits of every position (TRL 1.16 otherwise scores only labelled positions in chunks)."""
    import transformers
    import trl

    trl.SFTTrainer.compute_loss = transformers.Trainer.compute_loss


PATCHES = {"no_kbit_upcast": _patch_no_kbit_upcast, "full_logits_loss": _patch_full_logits_loss,
           "trl_flattened_packing": _patch_trl_flattened_packing, "gptq_no_offload": _patch_gptq_no_offload,
           "calibration_2048": _patch_calibration_2048, "gptq_torch_block_update": _patch_gptq_torch_block_update,
           "gptq_no_compiled_kernel": _patch_gptq_no_compiled_kernel}


def profile_micro_batch(run, into: dict, cuda: bool):
    """Run one micro-batch (forward + backward) under torch.profiler: its wall time, the GPU's busy time (sum of
    kernel times) and the kernels that take it. Busy time far below wall time means the host (Python, kernel
    launches) limits the step, not the GPU."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        out = run()
        if cuda:
            torch.cuda.synchronize()
    into["wall_ms"] = (time.perf_counter() - started) * 1e3
    events = [e for e in prof.key_averages() if e.device_type.name == ("CUDA" if cuda else "CPU")]
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    total_us = sum(getattr(e, key) for e in events)
    into["device_busy_ms"] = total_us / 1e3
    into["kernels"] = sum(e.count for e in events)
    into["top"] = [{"name": e.key[:120], "ms": getattr(e, key) / 1e3, "count": e.count}
                   for e in sorted(events, key=lambda e: -getattr(e, key))[:20]]
    return out


def instrument(record: dict, sft_overrides: dict, cuda: bool, profile_step: int | None = None) -> StepTimer:
    """Wrap the fine-tune stage's building blocks (load, SFTConfig, trainer) to observe, not to change them
    (apart from the recorded SFTConfig overrides of the baseline). With ``profile_step``, the first micro-batch
    of that optimizer step (0-based) runs under the profiler; the step summary leaves that step out."""
    import torch
    import trl

    from kubetune import modelio
    from kubetune.stages import finetune

    timer = StepTimer(cuda)
    mem = (lambda: torch.cuda.memory_allocated()) if cuda else (lambda: None)

    original_config = trl.SFTConfig

    def sft_config(*args, **kwargs):
        kwargs.update(sft_overrides)
        return original_config(*args, **kwargs)

    trl.SFTConfig = sft_config

    original_load_base = modelio.load_base_model

    def load_base_model(*args, **kwargs):
        model = original_load_base(*args, **kwargs)
        if "after_load" not in record:  # the fine-tune's base (merge/quantize load later, recorded by their stage)
            record["after_load"] = {"allocated_bytes": mem(), **dtype_bytes(model)}
        return model

    modelio.load_base_model = load_base_model

    original_load_model = finetune.load_model

    def load_model(recipe, *args, **kwargs):
        model = original_load_model(recipe, *args, **kwargs)
        record["after_prepare"] = {"allocated_bytes": mem(), **dtype_bytes(model)}
        return model

    finetune.load_model = load_model

    original_build = finetune.build_trainer

    def build_trainer(*args, **kwargs):
        trainer = original_build(*args, **kwargs)
        record["after_build_allocated_bytes"] = mem()
        record["sft"] = {k: getattr(trainer.args, k, None) for k in
                         ("packing", "packing_strategy", "padding_free", "completion_only_loss", "max_length",
                          "per_device_train_batch_size", "gradient_accumulation_steps", "bf16", "fp16",
                          "gradient_checkpointing", "loss_type")}
        record["attn_implementation"] = getattr(trainer.model.config, "_attn_implementation", None)
        trainer.add_callback(timer.callback())
        step = trainer.training_step

        def training_step(model, inputs, *a, **kw):
            timer.note_batch(inputs)
            if profile_step is not None and trainer.state.global_step == profile_step and "profile" not in record:
                record["profile"] = {}  # the first micro-batch of that step only
                return profile_micro_batch(lambda: step(model, inputs, *a, **kw), record["profile"], cuda)
            return step(model, inputs, *a, **kw)

        trainer.training_step = training_step
        return trainer

    finetune.build_trainer = build_trainer
    return timer


def step_summary(steps: list[dict], warmup: int, n_matmul: int, layers: int, hidden: int,
                 measured_steps: int | None = None) -> dict:
    measured = steps[warmup:None if measured_steps is None else warmup + measured_steps]
    if not measured:
        return {"steps_total": len(steps), "steps_measured": 0}
    ms = [s["ms"] for s in measured]
    seconds = sum(ms) / 1e3
    tokens = sum(s["tokens"] for s in measured)
    linear = sum(4 * n_matmul * s["tokens"] for s in measured)
    attention = sum(6 * layers * hidden * s["sum_s2"] for s in measured)
    return {
        "steps_total": len(steps), "steps_warmup": warmup, "steps_measured": len(measured),
        "step_ms_median": statistics.median(ms), "step_ms_min": min(ms), "step_ms_max": max(ms),
        "tokens_per_step_mean": tokens / len(measured),
        "rows_per_step_mean": sum(s["rows"] for s in measured) / len(measured),
        "padding_fraction": 1 - tokens / max(1, sum(s["padded_tokens"] for s in measured)),
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_at_median_step": (tokens / len(measured)) / (statistics.median(ms) / 1e3),
        "model_tflops_per_step": (linear + attention) / len(measured) / 1e12,
        "mfu_4nt": linear / seconds / PEAK_BF16_FLOPS,
        "mfu_4nt_attention": (linear + attention) / seconds / PEAK_BF16_FLOPS,
    }


def probe_load(recipe, record: dict) -> None:
    """Load the fine-tune's base exactly as the stage does, and account for the GPU memory it holds."""
    import gc

    import torch
    from peft import prepare_model_for_kbit_training

    from kubetune import modelio

    cuda = torch.cuda.is_available()

    def snapshot(model) -> dict:
        held = dtype_bytes(model)
        out = {"tensors_bytes": sum(held["by_dtype_bytes"].values()), **held}
        if cuda:
            out["allocated_bytes"] = torch.cuda.memory_allocated()
            gc.collect()
            torch.cuda.empty_cache()
            out["allocated_after_gc_bytes"] = torch.cuda.memory_allocated()
            out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        return out

    dtype = modelio.resolve_dtype(recipe.model.dtype)
    started = time.perf_counter()
    model = modelio.load_base_model(recipe.model, dtype=dtype,
                                    quantization_config=modelio.bnb_config(recipe.finetune, dtype))
    record["probe_load_s"] = round(time.perf_counter() - started, 1)
    record["probe_after_load"] = snapshot(model)
    linear = next((m for m in model.modules() if "Linear8bit" in type(m).__name__ or "Linear4bit" in type(m).__name__),
                  None)
    if linear is not None:
        w = linear.weight
        extra = {k: (str(getattr(w, k).dtype), list(getattr(w, k).shape), getattr(w, k).data_ptr() == w.data_ptr())
                 for k in ("CB", "SCB") if isinstance(getattr(w, k, None), torch.Tensor)}
        record["probe_quantized_linear"] = {"class": type(linear).__name__, "weight_class": type(w).__name__,
                                            "weight_dtype": str(w.dtype), "weight_shape": list(w.shape),
                                            "extra (dtype, shape, shares weight storage)": extra}
    record["probe_linear_not_quantized"] = sorted(n for n, m in model.named_modules()
                                                  if isinstance(m, torch.nn.Linear) and "bit" not in type(m).__name__)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.finetune.gradient_checkpointing)
    record["probe_after_prepare"] = snapshot(model)


def case_stages(case: str) -> list[str]:
    return CASES[case].get("stages", ["finetune"])


def run_case(case: str, args) -> dict:
    """Run the case's stages named by ``args.stage`` (all when None) in this process."""
    import torch

    from kubetune.stages import run_stage

    spec = CASES[case]
    cuda = torch.cuda.is_available()
    work = Path(args.work)
    folder = work / "models" / (spec["model"] + ("-tiny" if args.tiny else ""))
    recipe = recipe_for(case, spec, folder, work, args.steps + (1 if spec.get("profile") else 0), args.warmup,
                        args.tiny)
    config = model_config(spec["model"], args.tiny)
    text = config.get_text_config()
    record: dict = {"case": case, "model": spec["model"], "set": spec["set"], "sft_overrides": spec.get("sft", {}),
                    "stages_run": list(recipe.stages), "n_matmul_params": matmul_params(config),
                    "layers": text.num_hidden_layers, "hidden": text.hidden_size}
    for patch in spec.get("patch", []):  # proposed code changes, measured (recorded in the JSON)
        PATCHES[patch]()
    record["patches"] = spec.get("patch", [])
    if spec.get("probe"):
        probe_load(recipe, record)
        return record
    profile_step = args.warmup + args.steps if spec.get("profile") else None  # one step after the measured ones
    timer = instrument(record, spec.get("sft", {}), cuda, profile_step)
    reports = {}
    for stage in [st for st in recipe.stages if args.stage in (None, st)]:
        if cuda:
            torch.cuda.empty_cache()
        result = run_stage(recipe, stage)
        report = dict(result.report)
        if stage != "finetune":
            report.pop("recipe", None)  # the finetune report keeps the whole recipe (the estimator reads it)
        reports[stage] = report
    record["reports"] = reports
    steps = timer.results()
    record["steps"] = steps
    if "finetune" in reports:
        record["summary"] = step_summary(steps, args.warmup, record["n_matmul_params"], record["layers"],
                                         record["hidden"], measured_steps=args.steps)
    return record


# ---- driver ----------------------------------------------------------------------------------------------
def environment() -> dict:
    env: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "host": platform.node(), "python": platform.python_version(), "command": " ".join(sys.argv)}
    try:
        import torch

        from kubetune.measure import library_versions

        env["versions"] = library_versions()
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["card"] = torch.cuda.get_device_name(0)
            env["card_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    except Exception as exc:  # noqa: BLE001 - the run goes on; the JSON says what is missing
        env["versions_error"] = repr(exc)
    try:
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["nvidia_smi"] = None
    return env


def cmd_run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    (work / "models").mkdir(parents=True, exist_ok=True)
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        print(f"unknown case(s) {unknown}; known: {list(CASES)}", file=sys.stderr)
        return 2
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": []}
    results["environment"] = environment()
    results["tiny"] = args.tiny
    results.setdefault("builds", [])
    log = open(out / "log.txt", "a", buffering=1)
    deadline = time.monotonic() + args.budget_s
    base = [sys.executable, str(Path(__file__).resolve())]
    common = ["--work", str(work), "--steps", str(args.steps), "--warmup", str(args.warmup)] + \
        (["--tiny"] if args.tiny else [])
    for case in cases:
        left = deadline - time.monotonic()
        if left < (120 if "7b" in CASES[case]["model"] else 45):  # a case cut short by the deadline measures nothing
            results["runs"].append({"case": case, "error": "not run: out of time budget"})
            print(f"== {case}: not run (time budget)", flush=True)
            continue
        model = CASES[case]["model"]
        started = time.perf_counter()
        print(f"== {case} (time left {left:.0f} s)", flush=True)
        log.write(f"\n===== {case} =====\n")
        folder = work / "models" / (model + ("-tiny" if args.tiny else ""))
        # One process per stage, as one pod per stage in the cluster: a stage's peaks never include what the
        # stage before it left allocated, and NVML's per-process figure is that stage's alone.
        parts = [work / f"case-{case.replace('/', '-')}.{stage}.json" for stage in case_stages(case)]
        steps = ([] if (folder / "tokenizer.json").is_file() else [["build", model]]) + \
            [["one", case, "--stage", stage, "--json", str(part)] for stage, part in zip(case_stages(case), parts)]
        rc = 0
        for part in parts:
            part.unlink(missing_ok=True)
        for step in steps:
            try:
                proc = subprocess.run(base + step + common, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=max(10, deadline - time.monotonic()))
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            if rc != 0:
                break
        record = merge_stage_records([json.loads(p.read_text()) for p in parts if p.exists()])
        if record is None or rc != 0:
            record = dict(record or {"case": case}, error=f"exit {rc} (see log.txt)")
        record["wall_s"] = round(time.perf_counter() - started, 1)
        results["runs"] = [r for r in results["runs"] if r.get("case") != case] + [record]
        results_path.write_text(json.dumps(results, indent=1, default=str))
        print(brief(record), flush=True)
        # The reports are in the JSON; a 7B case leaves ~30 GB (merged + GPTQ) that the next case's disk needs.
        shutil.rmtree(work / "artifacts" / case.replace("/", "-"), ignore_errors=True)
        if args.drop_models and all(CASES[c]["model"] != model for c in cases[cases.index(case) + 1:]):
            shutil.rmtree(folder, ignore_errors=True)
    builds = work / "builds.jsonl"
    if builds.exists():
        results["builds"] = [json.loads(line) for line in builds.read_text().splitlines() if line.strip()]
    results_path.write_text(json.dumps(results, indent=1, default=str))
    return 0


def merge_stage_records(records: list[dict]) -> dict | None:
    """One case's record from its per-stage processes' records (stage reports side by side; the fine-tune's
    steps and summary)."""
    if not records:
        return None
    merged = dict(records[0])
    merged["reports"] = {}
    merged["stage_processes"] = len(records)
    for rec in records:
        merged["reports"].update(rec.get("reports", {}))
        if rec.get("steps"):
            merged["steps"], merged["summary"] = rec["steps"], rec.get("summary")
    return merged


def brief(r: dict) -> str:
    if "error" in r:
        return f"   {r['case']}: ERROR {r['error']}"
    s = r.get("summary", {})
    parts = [f"   {r['case']}:"]
    if "probe_after_load" in r:
        a, b = r["probe_after_load"], r["probe_after_prepare"]
        gb = lambda x: f"{(x or 0) / 2**30:.2f}G"  # noqa: E731
        return (f"   {r['case']}: load {r.get('probe_load_s')} s, tensors {gb(a['tensors_bytes'])} "
                f"alloc {gb(a.get('allocated_bytes'))} (after gc {gb(a.get('allocated_after_gc_bytes'))}, "
                f"peak {gb(a.get('peak_allocated_bytes'))}); prepared: tensors {gb(b['tensors_bytes'])} "
                f"alloc {gb(b.get('allocated_bytes'))}; by dtype {a['by_dtype_bytes']} -> {b['by_dtype_bytes']}")
    for stage, rep in r.get("reports", {}).items():
        pm = rep.get("peak_memory", {})
        parts.append(f"{stage} {rep['duration_s']:.1f}s alloc {(pm.get('torch_allocated_bytes') or 0) / 2**30:.2f}G "
                     f"nvml {(pm.get('nvml_process_bytes') or 0) / 2**30:.2f}G")
    if s.get("steps_measured"):
        parts.append(f"| {s['tokens_per_s']:.0f} tok/s, step {s['step_ms_median']:.1f} ms, "
                     f"{s['tokens_per_step_mean']:.0f} tok/step, MFU {100 * s['mfu_4nt']:.1f}% "
                     f"(+attn {100 * s['mfu_4nt_attention']:.1f}%)")
    if "quantize" in r["reports"]:
        parts.append(f"| gptq {r['reports']['quantize'].get('seconds')} s")
    return " ".join(parts)


def cmd_build(args) -> int:
    folder = Path(args.work) / "models" / (args.model + ("-tiny" if args.tiny else ""))
    info = build_model(args.model, folder, args.tiny)
    if not info["reused"]:
        with open(Path(args.work) / "builds.jsonl", "a") as fh:
            fh.write(json.dumps(info) + "\n")
    print(json.dumps(info), flush=True)
    return 0


def cmd_one(args) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    record = run_case(args.case, args)
    Path(args.json).write_text(json.dumps(record, indent=1, default=str))
    return 0


def cmd_report(args) -> int:
    from bench_report import write_report  # bench/bench_report.py

    return write_report(Path(args.results), args.name, args.command or "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "build", "one"):
        q = sub.add_parser(name)
        q.add_argument("--work", default=os.environ.get("BENCH_WORK", "/tmp/kubetune-bench"),
                       help="models, artifacts (large: 30 GB for the 7B models)")
        q.add_argument("--tiny", action="store_true", help="2-layer, hidden-64 models: the CPU check")
        q.add_argument("--steps", type=int, default=10, help="optimizer steps measured")
        q.add_argument("--warmup", type=int, default=3, help="optimizer steps dropped first")
        if name == "run":
            q.add_argument("--out", required=True)
            q.add_argument("--cases", required=True, help=f"comma-separated, of: {', '.join(CASES)}")
            q.add_argument("--budget-s", type=float, default=540, help="stop starting cases after this")
            q.add_argument("--drop-models", action="store_true",
                           help="delete each model folder after its last case (disk: a 7B model is 14 GB)")
        elif name == "build":
            q.add_argument("model", choices=list(MODELS))
        else:
            q.add_argument("case", choices=list(CASES))
            q.add_argument("--stage", help="run only this stage of the case (the stages before it ran already)")
            q.add_argument("--json", required=True)
    q = sub.add_parser("report")
    q.add_argument("results")
    q.add_argument("--name", required=True)
    q.add_argument("--command", help="the device command that made the results (recorded in the .md)")
    args = p.parse_args(argv)
    if args.cmd == "report":
        sys.path.insert(0, str(Path(__file__).parent))
    return {"run": cmd_run, "build": cmd_build, "one": cmd_one, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
