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

What is measured, per case (nothing here is tuned per case, and nothing of kubetune or a library is replaced):

* per stage: wall time, peak GPU memory (torch allocator and NVML, from the stage's own report);
* fine-tune steps, from the fine-tune report's ``step_times`` (kubetune.metrics.callbacks.StepTimes: CUDA events
  at each optimizer step's begin and end, and each step's real tokens, Σ s², rows and padded positions); the
  first ``--warmup`` steps are dropped; the median step time and tokens/s (real, non-padding tokens over the
  measured steps' summed time) come from the rest;
* MFU = model FLOPs / measured time / 989 TFLOP/s (dense bf16, H100 and H200 SXM), with model FLOPs per step
  = 4·N·T (N: weights of every matmul, lm_head included; T: real tokens; LoRA: forward + input gradients)
  plus causal attention 6·L·d·Σ s² (forward 2·s²·d per layer, backward twice that; s: the length each token
  attends over: the row for padded or wrapped rows, the example for packing).

Each record pins the case: its resolved recipe (``settings``, machine paths as names) and that recipe's hash
(``settings_sha256``); the run's ``environment`` holds the git commit, a hash of the source files, the image
lock's hash and every installed distribution's version.

The original's recipe packed with TRL's "wrapped" strategy (rows of 2048 tokens cut mid-example, attention
across examples). kubetune's ``finetune.packing`` keeps examples apart instead (BLOOM through its document
attention, stages/document_attention.py). The baseline cases make the wrapped rows as data (``wrapped_rows``) and train
them unpacked at batch 1: the same tokens per step and the same attention work as the original, with nothing
of kubetune changed.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
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
WRAPPED_LENGTH = 2048  # tokens per row of the original's wrapped packing

MODELS = {
    "bloom-1b1": "bigscience--bloom-1b1.json",
    "bloom-7b1": "bigscience--bloom-7b1.json",
    "falcon-7b": "tiiuae--falcon-7b.json",
    "codegen2-1b": "Salesforce--codegen2-1B.json",
    "gemma3-270m": "google--gemma-3-270m.json",
}
JOBS = {"bloom-1b1": "jobs/bloom-1b1-lora.yaml", "bloom-7b1": "jobs/bloom-7b1-qlora.yaml",
        "falcon-7b": "jobs/falcon-7b-8bit.yaml", "codegen2-1b": "jobs/codegen2-1b-lora.yaml",
        "gemma3-270m": "jobs/gemma3-270m-text2sql.yaml"}

# The original notebook's fine-tune: LoRA r16/alpha32 on peft's default modules for these architectures
# (query_key_value), batch 1, rows of 2048 tokens made by TRL's "wrapped" packing, loss on the whole sequence,
# gradient checkpointing; bloom-1b1 loaded and trained in fp32, bloom-7b1 on a 4-bit nf4 base, falcon-7b on an
# 8-bit base. The wrapped rows are made here as data ("data": "wrapped", see wrapped_rows) and trained unpacked:
# kubetune's finetune.packing keeps examples apart, which is not what the original trained.
ORIGINAL = ["finetune.lora.r=16", "finetune.lora.alpha=32", "finetune.lora.dropout=0.05",
            "finetune.lora.target_modules=[query_key_value]", "finetune.batch_size=1", "finetune.grad_accum=1",
            f"finetune.max_length={WRAPPED_LENGTH}", "finetune.packing=false", "finetune.group_by_length=false",
            "finetune.completion_only_loss=false", "finetune.gradient_checkpointing=true"]
GPTQ = {"set": ["finetune.max_steps=2"], "stages": ["finetune", "merge", "quantize"]}  # the adapter only: 2 steps
# Issue 22's path (bench/packed.py): examples packed into rows of max_length, every micro-batch batch_size rows ×
# max_length tokens, the model's forward and backward compiled once (finetune.packing + finetune.compile).
PACKED = ["finetune.packing=true", "finetune.group_by_length=false"]
COMPILED = PACKED + ["finetune.compile=true"]
# Issue 22, item 3: the 7B k-bit bases packed and compiled, each with bitsandbytes (the shipped default) and torchao
# (finetune.base_quantizer). Sized by `kubetune estimate` on bench/configs, H100: bloom-7b1 6 × 512 checkpointed
# 7.95 GiB allocated, as the estimate of its baseline (7.98; measured 8.88 on the H100), counting BLOOM's eager
# length² scores where the packed rows run FlexAttention; falcon-7b 3 × 512 checkpointed 13.6 GiB with
# bitsandbytes (0.76× its baseline's 17.9: LLM.int8 keeps each layer's input past checkpointing), 8.9 with torchao.
BLOOM_7B1_PACKED = COMPILED + ["finetune.batch_size=6", "finetune.grad_accum=1", "finetune.max_length=512",
                               "finetune.gradient_checkpointing=true"]
FALCON_7B_PACKED = COMPILED + ["finetune.batch_size=3", "finetune.grad_accum=1", "finetune.max_length=512",
                               "finetune.gradient_checkpointing=true"]
TORCHAO = ["finetune.base_quantizer=torchao"]

# A case is a recipe: jobs/<model>.yaml with the settings below, nothing else (no code of kubetune or of a
# library replaced). "env": environment variables of the case's processes (a library's documented switch).
# Each record pins the resolved recipe and its hash (settings_sha256): "<model>/ours" is the shipped recipe as
# it was when the case ran, so two runs of it are the same settings only when their hashes agree.
CASES: dict[str, dict] = {
    # 1. bloom-1b1; each lever case changes one thing from the shipped recipe
    "bloom-1b1/baseline": {"model": "bloom-1b1", "set": ORIGINAL + ["model.dtype=float32", "finetune.precision=fp32"],
                           "data": "wrapped"},
    "bloom-1b1/ours": {"model": "bloom-1b1", "set": []},
    # one lever on the original's recipe: bf16 weights and mixed precision instead of fp32 (nothing else changed)
    "bloom-1b1/baseline-bf16": {"model": "bloom-1b1", "set": ORIGINAL, "data": "wrapped"},
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
    # 2. bloom-7b1 on a 4-bit base
    "bloom-7b1/baseline": {"model": "bloom-7b1", "set": ORIGINAL + ["finetune.base_precision=4bit"],
                           "data": "wrapped"},
    "bloom-7b1/ours": {"model": "bloom-7b1", "set": []},
    "bloom-7b1/ours-bs32": {"model": "bloom-7b1", "set": ["finetune.batch_size=32", "finetune.grad_accum=1"]},
    # measured as bloom-7b1/ours-grouped-bs64-noupcast while kubetune still upcast the k-bit base's rest under bf16
    "bloom-7b1/ours-grouped-bs64": {"model": "bloom-7b1", "set": ["finetune.batch_size=64", "finetune.grad_accum=1",
                                                                   "finetune.group_by_length=true"]},
    # 3. GPTQ 8-bit. The block update GPTQModel runs is in the quantize report (block_update): its compiled kernel
    # where nvcc can build it, else kubetune's CUDA graphs of its torch loop (stages/gptq_block.py)
    "bloom-1b1/gptq8": {"model": "bloom-1b1", **GPTQ},
    # GPTQModel's torch loop, through its own switch (GPTQMODEL_DISABLE_GPTQ_CUDA: no kernel, no graphs)
    "bloom-1b1/gptq8-torch-loop": {"model": "bloom-1b1", **GPTQ, "env": {"GPTQMODEL_DISABLE_GPTQ_CUDA": "1"}},
    "bloom-7b1/gptq8": {"model": "bloom-7b1", **GPTQ},
    # 4. falcon-7b on an 8-bit base (kubetune.modelio builds Falcon's layers as plain nn.Linear so that
    # bitsandbytes quantizes them; before, the "8-bit" falcon was a bf16 model)
    "falcon-7b/baseline": {"model": "falcon-7b", "set": ORIGINAL + ["finetune.base_precision=8bit"],
                           "data": "wrapped"},
    "falcon-7b/ours": {"model": "falcon-7b", "set": []},
    # falcon-7b's shipped recipe packs 2 rows of 512 per step; these are the settings it replaced (8 × 2 unpacked)
    # and packing at those batch settings
    "falcon-7b/ours-unpacked": {"model": "falcon-7b", "set": ["finetune.packing=false", "finetune.batch_size=8",
                                                             "finetune.grad_accum=2"]},
    "falcon-7b/ours-packed": {"model": "falcon-7b", "set": ["finetune.packing=true", "finetune.batch_size=8",
                                                           "finetune.grad_accum=2"]},
    # the same tokens per optimizer step as ours-packed (16 rows of 512), in micro-batches a quarter the size
    "falcon-7b/ours-packed-bs2": {"model": "falcon-7b",
                                  "set": ["finetune.packing=true", "finetune.batch_size=2", "finetune.grad_accum=8"]},
    # the lever measured as falcon-7b/ours-grouped-bs64-noupcast (no fp32 upcast is kubetune's bf16 behaviour since)
    "falcon-7b/ours-grouped-bs64": {"model": "falcon-7b", "set": ["finetune.batch_size=64", "finetune.grad_accum=1",
                                                                 "finetune.group_by_length=true"]},
    "codegen2-1b/ours": {"model": "codegen2-1b", "set": []},
    "codegen2-1b/ours-grouped-bs64-gc": {"model": "codegen2-1b",
                                         "set": ["finetune.batch_size=64", "finetune.group_by_length=true",
                                                 "finetune.gradient_checkpointing=true"]},
    # 5. issue 22: packed, fixed-shape, compiled (bench/packed.py). bloom-1b1: 8 rows × 1024 tokens (~8.2k real
    # tokens a micro-batch), recomputation on to stay under the original's 5.5 GiB; -nogc: 4 × 1024 without it
    "bloom-1b1/packed-compiled": {"model": "bloom-1b1", "set": COMPILED + [
        "finetune.batch_size=8", "finetune.max_length=1024", "finetune.gradient_checkpointing=true"]},
    "bloom-1b1/packed-compiled-nogc": {"model": "bloom-1b1", "set": COMPILED + [
        "finetune.batch_size=4", "finetune.max_length=1024", "finetune.gradient_checkpointing=false"]},
    "bloom-1b1/packed": {"model": "bloom-1b1", "set": PACKED + [  # the same batches, not compiled
        "finetune.batch_size=8", "finetune.max_length=1024", "finetune.gradient_checkpointing=true"]},
    # gemma3-270m: the shipped recipe (32 rows grouped by length) and 4 rows × 1024 packed and compiled (~37 examples a
    # micro-batch, as the recipe's 32; 8 × 1024 × Gemma's 262,144-token vocabulary is 2^31 logits, which finetune.compile
    # refuses since it crashed: bench/results/packed-h100-2026-12-06.json)
    "gemma3-270m/ours": {"model": "gemma3-270m", "set": []},
    "gemma3-270m/packed-compiled": {"model": "gemma3-270m", "set": COMPILED + [
        "finetune.batch_size=4", "finetune.max_length=1024"]},
    # one lever each on the compiled path: CUDA graphs (inductor's documented switch: each compiled graph replayed
    # as one launch) and LoRA dropout off (the dropout's mask and multiply over every LoRA input is gone; quality
    # must show it costs nothing before a recipe drops it)
    "gemma3-270m/packed-compiled-cudagraphs": {"model": "gemma3-270m", "set": COMPILED + [
        "finetune.batch_size=4", "finetune.max_length=1024"], "env": {"TORCHINDUCTOR_CUDAGRAPHS": "1"}},
    "gemma3-270m/packed-compiled-nodropout": {"model": "gemma3-270m", "set": COMPILED + [
        "finetune.batch_size=4", "finetune.max_length=1024", "finetune.lora.dropout=0.0"]},
    # Liger's fused norm, rotary and GeGLU kernels (finetune.liger_kernels), compiled and on the shipped eager recipe
    "gemma3-270m/packed-compiled-liger": {"model": "gemma3-270m", "set": COMPILED + [
        "finetune.batch_size=4", "finetune.max_length=1024", "finetune.liger_kernels=true"]},
    "gemma3-270m/ours-liger": {"model": "gemma3-270m", "set": ["finetune.liger_kernels=true"]},
    "bloom-1b1/packed-compiled-cudagraphs": {"model": "bloom-1b1", "set": COMPILED + [
        "finetune.batch_size=8", "finetune.max_length=1024", "finetune.gradient_checkpointing=true"],
        "env": {"TORCHINDUCTOR_CUDAGRAPHS": "1"}},
    "bloom-1b1/packed-compiled-nodropout": {"model": "bloom-1b1", "set": COMPILED + [
        "finetune.batch_size=8", "finetune.max_length=1024", "finetune.gradient_checkpointing=true",
        "finetune.lora.dropout=0.0"]},
    # bloom-7b1 (4-bit) and falcon-7b (8-bit) packed and compiled, on bitsandbytes' base and on torchao's
    "bloom-7b1/packed-compiled": {"model": "bloom-7b1", "set": BLOOM_7B1_PACKED},
    "bloom-7b1/packed-compiled-torchao": {"model": "bloom-7b1", "set": BLOOM_7B1_PACKED + TORCHAO},
    "falcon-7b/packed-compiled": {"model": "falcon-7b", "set": FALCON_7B_PACKED},
    "falcon-7b/packed-compiled-torchao": {"model": "falcon-7b", "set": FALCON_7B_PACKED + TORCHAO},
    # where the memory of an 8-bit load goes (no training): the base as the fine-tune loads it, then prepared
    "falcon-7b/probe-8bit": {"model": "falcon-7b", "set": ["finetune.base_precision=8bit"], "probe": True},
}
# Dropped since their runs (the JSON files keep them): the code-patch experiments ("patches" in a record:
# no_kbit_upcast, adopted by kubetune; full_logits_loss; trl_flattened_packing; gptq_no_offload;
# calibration_2048; gptq_no_compiled_kernel), TRL SFTConfig overrides ("sft_overrides": torch_compile, and the
# baseline's packing_strategy, now "data": "wrapped") and the torch.profiler step ("profile").


# ---- models ------------------------------------------------------------------------------------------------
def model_config(model: str, tiny: bool):
    from transformers import AutoConfig

    raw = {k: v for k, v in json.loads((CONFIGS / MODELS[model]).read_text()).items()
           if not k.startswith("_") and k != "architectures"}
    if tiny:  # same architecture and vocabulary, 2 small layers: the CPU check of the code path
        shrink = {"bloom": {"hidden_size": 64, "n_layer": 2, "n_head": 4},
                  "falcon": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
                  "codegen": {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8},
                  "gemma3_text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
                                  "layer_types": ["sliding_attention", "full_attention"]}}[raw["model_type"]]
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
def wrapped_data_path(work: Path, model: str, tiny: bool) -> Path:
    return work / "data" / f"wrapped-{model}{'-tiny' if tiny else ''}-{WRAPPED_LENGTH}.jsonl"


def recipe_for(case: str, spec: dict, folder: Path, work: Path, steps: int, warmup: int, tiny: bool,
               profile: bool = False):
    import yaml

    from kubetune.config import recipe_from_dict

    data = yaml.safe_load((ROOT / JOBS[spec["model"]]).read_text())
    stages = case_stages(case)
    common = [f"run.name={case.replace('/', '-')}", f"run.artifacts_root={work / 'artifacts'}",
              f"model.name_or_path={folder}", "model.revision=null", "model.trust_remote_code=false",
              "data.source=builtin:text2sql", "data.builtin_examples=4000", "data.train_fraction=1.0",
              f"finetune.max_steps={warmup + steps + profile}", "finetune.save_steps=100000",
              "finetune.logging_steps=5", "metrics.enabled=false", f"stages={json.dumps(stages)}"]
    if profile:  # one more step after the measured ones, under torch.profiler (finetune.profile_step)
        common.append(f"finetune.profile_step={warmup + steps + 1}")
    if tiny:
        common += ["merge.dtype=float32", "quantize.group_size=32", "quantize.calibration.samples=16"]
    if spec.get("data") == "wrapped":
        # the rows are the prompt (no template around them: {question} alone) and the loss is on every token
        data["prompt"] = {"template": "{question}"}
        # ~118 rows of 2048 tokens from the builtin rows: hold out few (the cases train ~13 steps of one row)
        common += [f"data.source={wrapped_data_path(work, spec['model'], tiny)}", "data.eval_size=8"]
    return recipe_from_dict(data, f"{JOBS[spec['model']]} ({case})", common + spec["set"])


def case_settings(case: str, recipe) -> dict:
    """What a case is, machine-independent: the resolved recipe (the model folder as the model's name; the run's
    name and artifact root left out: where it writes), the case's environment variables and data;
    ``settings_sha256`` in a record is its hash."""
    spec = CASES[case]
    resolved = recipe.model_dump(mode="json")
    resolved["model"]["name_or_path"] = spec["model"]
    resolved["run"].pop("name"), resolved["run"].pop("artifacts_root")
    if spec.get("data") == "wrapped":
        resolved["data"]["source"] = Path(resolved["data"]["source"]).name
    return {"recipe": resolved, "env": spec.get("env", {}), "data": spec.get("data", "recipe")}


def settings_sha256(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def wrapped_rows(texts: list[str], tokenizer, length: int) -> list[dict]:
    """The original's packing (TRL's "wrapped" strategy) as data: the examples' texts joined end to end and cut
    every ``length`` tokens, mid-example, so that each row's tokens attend across examples as they did there.
    Each row is one data row (``question``: up to the example end nearest its middle, so that the prompt's
    tokens stay the same when TRL tokenizes prompt and answer apart; ``answer``: the rest), so that the template
    "{question}" and the end-of-sequence token the fine-tune appends make ``length`` tokens again, give or
    take a merge at the cut; trained unpacked at batch 1, a step sees what a wrapped step saw."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
    per_row = length - 1  # the fine-tune appends the end-of-sequence token
    rows = []
    for start in range(0, len(stream) - per_row + 1, per_row):
        ids = stream[start:start + per_row]
        # the end of an example nearest the middle: the stages strip the question and the answer, and nothing
        # merges across an end-of-sequence token
        ends = [i + 1 for i, token in enumerate(ids[:-1]) if token == tokenizer.eos_token_id]
        cut = min(ends, key=lambda i: abs(i - per_row // 2), default=per_row // 2)
        rows.append({"context": "", "question": tokenizer.decode(ids[:cut]), "answer": tokenizer.decode(ids[cut:])})
    return rows


def write_wrapped_data(data, model_folder: Path, path: Path) -> None:
    """The wrapped rows for the model's tokenizer, from the training split of ``data`` (the builtin rows as every
    other case of the model trains on them: prompt + answer + eos, as the fine-tune sees them)."""
    from transformers import AutoTokenizer

    from kubetune.config import DEFAULT_PROMPT_TEMPLATE
    from kubetune.data import example_texts, load_splits
    from kubetune.prompt import PromptTemplate

    if path.is_file():
        return
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    template = PromptTemplate(DEFAULT_PROMPT_TEMPLATE)
    texts = ["".join(example_texts(row, template, tokenizer.eos_token)) for row in load_splits(data).train]
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    part.write_text("".join(json.dumps(r) + "\n" for r in wrapped_rows(texts, tokenizer, WRAPPED_LENGTH)))
    part.rename(path)


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


def report_steps(finetune_report: dict) -> list[dict]:
    """The fine-tune report's ``step_times`` columns (kubetune.metrics.callbacks.StepTimes) as one dict per step."""
    columns = finetune_report.get("step_times") or {}
    keys = [k for k in ("ms", "tokens", "sum_s2", "rows", "padded_tokens") if k in columns]
    return [dict(zip(keys, values)) for values in zip(*(columns[k] for k in keys))]


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
    """Run the case's stages named by ``args.stage`` (all when None) in this process; the record holds their
    reports, and the fine-tune's step times and tokens (its report's ``step_times``) summed up."""
    import torch

    from kubetune.stages import run_stage

    spec = CASES[case]
    cuda = torch.cuda.is_available()
    work = Path(args.work)
    folder = work / "models" / (spec["model"] + ("-tiny" if args.tiny else ""))
    recipe = recipe_for(case, spec, folder, work, args.steps, args.warmup, args.tiny, args.profile)
    settings = case_settings(case, recipe)
    config = model_config(spec["model"], args.tiny)
    text = config.get_text_config()
    record: dict = {"case": case, "model": spec["model"], "set": spec["set"], "env": spec.get("env", {}),
                    "data": settings["data"], "settings": settings, "settings_sha256": settings_sha256(settings),
                    "stages_run": list(recipe.stages), "n_matmul_params": matmul_params(config),
                    "layers": text.num_hidden_layers, "hidden": text.hidden_size}
    if spec.get("probe"):
        probe_load(recipe, record)
        return record
    if spec.get("data") == "wrapped":
        unwrapped = recipe_for(case, {k: v for k, v in spec.items() if k != "data"}, folder, work, args.steps,
                               args.warmup, args.tiny)
        write_wrapped_data(unwrapped.data, folder, Path(recipe.data.source))
    reports = {}
    for stage in [st for st in recipe.stages if args.stage in (None, st)]:
        if cuda:
            torch.cuda.empty_cache()
        report = dict(run_stage(recipe, stage).report)
        if stage != "finetune":
            report.pop("recipe", None)  # the finetune report keeps the whole recipe (the estimator reads it)
        reports[stage] = report
    record["reports"] = reports
    if "finetune" in reports:
        record["steps"] = report_steps(reports["finetune"])
        record["summary"] = step_summary(record["steps"], args.warmup, record["n_matmul_params"], record["layers"],
                                         record["hidden"], measured_steps=args.steps)  # not the profiled one
    return record


# ---- driver ----------------------------------------------------------------------------------------------
def git_commit() -> str | None:
    """The commit the harness runs from, with "-dirty" when tracked files differ from it; on a machine that got
    the tree without .git, $BENCH_COMMIT (bench/README.md sets it in the device call)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=20)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=20).stdout.strip()
            return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("BENCH_COMMIT") or None


def source_sha256() -> str:
    """One hash of the code a run executes (src/, bench/*.py, jobs/, pyproject.toml), whether or not .git came
    along: two runs with the same hash ran the same code."""
    digest = hashlib.sha256()
    files = sorted([*(ROOT / "src").rglob("*.py"), *(ROOT / "bench").glob("*.py"), *(ROOT / "jobs").glob("*.yaml"),
                    ROOT / "pyproject.toml"])
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def installed_versions() -> dict[str, str]:
    """Every distribution importable here, name → version."""
    return dict(sorted((d.metadata["Name"], d.version) for d in importlib.metadata.distributions()
                       if d.metadata["Name"]))


def environment(cuda: bool = True) -> dict:
    """Where and with what a run ran. cuda=False leaves torch's CUDA alone (the card comes from nvidia-smi), for a
    process that must hold no CUDA context beside the ones it measures (bench/pod_path.py)."""
    lock = ROOT / "images" / "requirements-cuda.lock"  # the CUDA image's set, what the GPU runs approximate
    env: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "host": platform.node(), "python": platform.python_version(), "command": " ".join(sys.argv),
                 "git_commit": git_commit(), "source_sha256": source_sha256(),
                 "lock": {"file": str(lock.relative_to(ROOT)), "sha256": hashlib.sha256(lock.read_bytes()).hexdigest()},
                 "all_versions": installed_versions()}
    try:
        import torch

        from kubetune.measure import library_versions

        env["versions"] = library_versions()
        env["cuda"] = torch.version.cuda
        if cuda and torch.cuda.is_available():
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
        (["--tiny"] if args.tiny else []) + (["--profile"] if args.profile else [])
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
                                      env={**os.environ, **CASES[case].get("env", {})},
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
        q.add_argument("--profile", action="store_true",
                       help="one more fine-tune step after the measured ones, under torch.profiler: the report's "
                            "profile (finetune.profile_step)")
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
