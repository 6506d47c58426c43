"""The fine-tune stage: LoRA (or QLoRA on a 4/8-bit base) with TRL's SFTTrainer on prompt-completion rows.

Flow: load the base and the data → build the trainer → train (resuming from the latest *complete* checkpoint in
``<run>/.work/finetune/checkpoints``) → save the adapter, the tokenizer and the prompt template into ``ctx.out``.

Artifact (``<run>/finetune/``): ``adapter_model.safetensors``, ``adapter_config.json``, the tokenizer files,
``kubetune_prompt.json`` and ``training_log.json`` (the trainer's log history: loss, learning rate per step).

The learning-rate schedule is planned from the length of the data the trainer really iterates (after packing),
and the report records planned vs run steps and the last learning rate. The project this replaces planned
~23.6k steps from an estimated length while 771 ran, so its cosine schedule never decayed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kubetune import modelio
from kubetune.precision import kept as float32_precision_kept
from kubetune.data import load_splits, prompt_completion
from kubetune.distributed import resolved_parallelism, split_global_batch, world
from kubetune.errors import DataError, ModelError, RecipeError
from kubetune.measure import Stopwatch, count_parameters, memory_footprint_bytes
from kubetune.metrics.callbacks import StepTimes, metrics_callback
from kubetune.prompt import PromptTemplate
from kubetune.stages import compiled, packing, profiled

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
# Written last into each checkpoint, after every file in it was fsynced, by a write to a temporary file, fsync and
# rename: the trainer's own saves are not atomic, so a checkpoint without this marker (a pod killed mid-save, a
# node lost before the page cache reached the disk) is incomplete by definition. It lists each file's size.
CHECKPOINT_MARKER = "kubetune-checkpoint.json"
# What a checkpoint needs to resume exactly; folders lacking any of them are moved aside, not resumed.
CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json",
                    CHECKPOINT_MARKER)
FINGERPRINT_FILE = "fingerprint"
# torch.compile's backend under finetune.compile. Dynamo's guards, which decide every recompile, are the same for
# any backend; tests swap in "aot_eager" (forward and backward traced, no code generated) where inductor's C++
# code generation would take minutes on 2 shared cores.
COMPILE_BACKEND = "inductor"
LOG_FILE = "training_log.json"


def run(ctx) -> dict[str, Any]:
    # transformers turns TF32 on process-wide under torch_compile; the stages after this one in the same process
    # (kubetune run) get the float32 precision they would have had in their own pod
    with float32_precision_kept():
        return _run(ctx)


def _run(ctx) -> dict[str, Any]:
    recipe, ft = ctx.recipe, ctx.recipe.finetune
    dev = modelio.device()
    precision = training_precision(ft.precision, dev)

    tokenizer = modelio.load_tokenizer(recipe.model)
    model = load_model(recipe, precision)
    if ft.packing:
        packing.check_examples_kept_apart(model, recipe.model.name_or_path)
    if ft.compile:
        check_compiled_logits(model, split_global_batch(ft.batch_size, ft.grad_accum, world().size)[0], ft.max_length)
    splits = load_splits(recipe.data)
    prompt = PromptTemplate(recipe.prompt.template)
    train = prompt_completion(splits.train, prompt, tokenizer.eos_token)
    evaluation = prompt_completion(splits.eval, prompt, tokenizer.eos_token) if ft.eval_steps else None

    with main_process_first():  # rank 0 alone moves incomplete or foreign checkpoints aside; the others then look
        checkpoints = checkpoint_dir(ctx) if world().main else ctx.work / "checkpoints"
        resume = latest_complete_checkpoint(checkpoints, ctx.layout)
    trainer = build_trainer(recipe, model, tokenizer, train, evaluation, checkpoints, precision, dev, ctx)
    check_truncation(trainer, len(train), ft)
    preemption = Preemption()
    trainer.add_callback(_checkpoint_callback(preemption))

    watch = Stopwatch()
    if resume is not None and checkpoint_finished(resume):
        log.info("the fine-tune already reached its planned steps in %s; saving that", resume)
        final_lr = finish_from_checkpoint(trainer, resume)
        train_loss = None  # no step ran in this process
    else:
        if resume is not None:
            log.info("resuming the fine-tune from %s", resume)
        with preemption:  # SIGTERM: checkpoint at the next step boundary, then exit 143 (see Preemption)
            train_loss = trainer.train(resume_from_checkpoint=str(resume) if resume else None).training_loss
        if preemption.requested and trainer.state.global_step < trainer.state.max_steps:
            log.warning("stopped by SIGTERM at step %d/%d after checkpointing; exiting 143 so the Job retries and "
                        "resumes", trainer.state.global_step, trainer.state.max_steps)
            raise SystemExit(143)
        final_lr = trainer.lr_scheduler.get_last_lr()[0]
    train_seconds = watch.seconds
    eval_loss = final_eval_loss(trainer) if evaluation is not None else None

    if world().main:  # every rank holds the same adapter (DDP keeps them equal); one writes it
        trainer.model.save_pretrained(ctx.out, safe_serialization=True)
        tokenizer.save_pretrained(ctx.out)
        prompt.save(ctx.out)
        (ctx.out / LOG_FILE).write_text(json.dumps(trainer.state.log_history, indent=1) + "\n", encoding="utf-8")

    state = trainer.state
    return {
        "metrics": {
            "train_loss": train_loss,  # mean over the steps this process ran
            "eval_loss": eval_loss,
            "planned_steps": state.max_steps,
            "steps_run": state.global_step,
            "warmup_steps": trainer.args.get_warmup_steps(state.max_steps),
            "final_learning_rate": final_lr,
            "resumed_from_step": checkpoint_step(resume) if resume else None,
            "train_examples": len(train),
            "train_sequences": len(trainer.train_dataset),  # fewer than examples when packed
            "packing": packing.packing_layout(trainer.model) if ft.packing else None,
            "processes": trainer.args.world_size,
            "parallelism": resolved_parallelism(recipe.resources.finetune.parallelism)
            if trainer.args.world_size > 1 else None,
            # rows per optimizer step = per-process micro-batch × accumulation × processes (distributed.py)
            "global_batch": trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
            * trainer.args.world_size,
            # "flex-document": BLOOM's packed rows through stages/document_attention.py
            "attention": "flex-document" if ft.packing and packing.document_attention_needed(trainer.model)
            else trainer.model.config._attn_implementation,
        },
        # finetune.compile: frames torch.compile compiled in training steps; frames_after_warmup must be 0
        "compile": trainer.compile_count.report() if trainer.compile_count else None,
        # finetune.profile_step: that step's wall and GPU-busy time, kernel launches, costliest kernels (profiled.py)
        "profile": trainer.step_profile.report() if trainer.step_profile else None,
        "throughput": {
            # This process only (rank 0: its share of each global batch): after a resume, the steps run before the
            # restart are not in these figures.
            "train_tokens": trainer.tokens_seen,
            "train_tokens_per_s": trainer.tokens_seen / train_seconds,
            "samples_per_s": trainer.examples_seen / train_seconds,  # training examples, not packed sequences
            "train_seconds": round(train_seconds, 3),
            # Share of the computed positions that were padding (0 when packed): what group_by_length cuts.
            "padding_fraction": round(1 - trainer.tokens_seen / trainer.positions_seen, 4)
            if trainer.positions_seen else None,
        },
        # Per optimizer step of this process: time, real tokens, Σ s² (attention work), rows, padded positions.
        "step_times": trainer.step_times.columns(),
        "parameters": count_parameters(trainer.model),
        "memory_footprint_bytes": memory_footprint_bytes(trainer.model),
        "precision": precision,
        "base_precision": ft.base_precision,
        "base_quantizer": ft.base_quantizer if ft.base_precision != "none" else None,
        **({"adapter_sha256": adapter_sha256(trainer.model)} if world().distributed else {}),
        "device": dev,
    }


# ---- setup ---------------------------------------------------------------------------------------------------
def training_precision(choice: str, dev: str) -> str:
    """``auto`` → bf16 on a GPU that has it, else fp32 (fp16 mixed precision is opt-in: it needs loss scaling)."""
    import torch

    if choice == "auto":
        return "bf16" if dev == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if choice == "fp16" and dev != "cuda":
        raise RecipeError("recipe", ["finetune.precision: fp16 needs a CUDA GPU and this machine has none; "
                                     "use auto, bf16 or fp32"])
    return choice


def distributed_arguments(recipe, processes: int) -> dict[str, Any]:
    """The trainer's settings for several processes: DDP (LoRA touches every adapter weight, so no search for
    unused parameters each step) or FSDP2 (torch.distributed.fsdp.fully_shard through accelerate)."""
    if processes <= 1:
        return {}
    if resolved_parallelism(recipe.resources.finetune.parallelism) == "fsdp":
        return {"fsdp": "full_shard auto_wrap", "fsdp_config": {"version": 2, "reshard_after_forward": True}}
    return {"ddp_find_unused_parameters": False}


def adapter_sha256(model) -> str:
    """Hash of the trainable (adapter) weights this process holds: the ranks of a run compare theirs."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@contextmanager
def main_process_first():
    """Rank 0 runs the block first and the other ranks after it (one process: just the block)."""
    if not world().distributed:
        yield
        return
    from accelerate import PartialState

    with PartialState().main_process_first():
        yield


def load_model(recipe, precision: str):
    """The frozen base, in the model dtype or (QLoRA) in 4/8 bits, ready for a LoRA adapter."""
    ft = recipe.finetune
    # FSDP shards the model as it moves it to the GPUs: loaded whole onto each GPU first, one too large for a
    # single GPU would not get that far
    sharded = world().distributed and resolved_parallelism(recipe.resources.finetune.parallelism) == "fsdp"
    model = modelio.load_finetune_base(recipe.model, ft, dtype=modelio.resolve_dtype(recipe.model.dtype),
                                       on="cpu" if sharded else None)
    if ft.base_precision != "none":
        prepare_kbit_base(model, ft.gradient_checkpointing, upcast=modelio.upcasts_kbit_rest(precision))
    check_target_modules(model, ft.lora.target_modules, recipe.model.name_or_path)
    if ft.liger_kernels:
        check_liger_kernels(model, recipe.model.name_or_path)
    return model


def prepare_kbit_base(model, gradient_checkpointing: bool, upcast: bool) -> None:
    """Freeze a 4/8-bit base for LoRA; with ``upcast`` (modelio.upcasts_kbit_rest), also turn its 16-bit rest
    (norms, embeddings, lm_head) into fp32 (peft's prepare_model_for_kbit_training, the QLoRA recipe). Measured
    without it: bench/results, cases *-noupcast. On a torchao base peft's cast leaves the NF4/int8 weights
    quantized (an NF4 weight then dequantizes to fp32, the dtype its matmul casts to anyway)."""
    if upcast:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        return
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        # the checkpointed blocks' inputs must carry gradients, or no gradient reaches the LoRA weights in them
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable()


def check_target_modules(model, targets, model_name: str) -> None:
    """peft fails late and vaguely on a module name the model lacks; say which one, and what there is."""
    if targets == "all-linear":
        return
    import torch

    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__} - {"lm_head"})
        raise ModelError(f"finetune.lora.target_modules: {missing} not found in {model_name}; "
                         f"its linear layers are {linear} (or use all-linear)")


def check_liger_kernels(model, model_name: str) -> None:
    """finetune.liger_kernels needs liger-kernel (and Triton, hence a CUDA GPU) and an architecture it patches;
    transformers would otherwise log a warning and train without them."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as exc:
        raise ModelError(f"finetune.liger_kernels: liger-kernel cannot be imported here ({exc}); it needs "
                         "`pip install liger-kernel` and Triton, which ships with CUDA builds of torch") from None
    model_type = model.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ModelError(f"finetune.liger_kernels: Liger has no kernels for {model_name} ({model_type}); "
                         "set it to false")


def lora_config(lora):
    from peft import LoraConfig

    # "all-linear" is every linear layer but the output head (peft leaves lm_head out by itself).
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, bias="none", task_type="CAUSAL_LM")


def build_trainer(recipe, model, tokenizer, train, evaluation, checkpoints: Path, precision: str, dev: str, ctx):
    from transformers import PrinterCallback
    from trl import SFTConfig

    ft = recipe.finetune
    processes = world().size
    micro_batch, accumulation = split_global_batch(ft.batch_size, ft.grad_accum, processes)  # validated in config
    args = SFTConfig(
        output_dir=str(checkpoints),
        max_length=ft.max_length,
        packing=ft.packing,
        completion_only_loss=ft.completion_only_loss,
        train_sampling_strategy="group_by_length" if ft.group_by_length else "random",
        # transformers 5 renamed gradient_checkpointing (TRL defaults that one to True): set the new name.
        activation_checkpointing=ft.gradient_checkpointing,
        bf16=precision == "bf16",  # SFTConfig defaults bf16 to True: always set both
        fp16=precision == "fp16",
        use_cpu=dev == "cpu",
        per_device_train_batch_size=micro_batch,
        per_device_eval_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation,
        **distributed_arguments(recipe, processes),
        learning_rate=ft.learning_rate,
        lr_scheduler_type=ft.lr_scheduler,
        # A float in [0, 1) is a ratio: the trainer turns it into ceil(ratio × planned steps) once it knows the
        # planned steps from the (packed) data, which transformers 5 prefers to the removed warmup_ratio.
        warmup_steps=ft.warmup_ratio,
        weight_decay=ft.weight_decay,
        num_train_epochs=ft.epochs,
        max_steps=ft.max_steps or -1,
        save_strategy="steps",
        save_steps=ft.save_steps,
        save_total_limit=ft.save_total_limit,
        logging_steps=ft.logging_steps,
        eval_strategy="steps" if evaluation is not None else "no",
        eval_steps=ft.eval_steps,
        seed=ft.seed,
        # norms, rotary embedding, gated MLP; never Liger's fused cross-entropy, which TRL refuses (its own
        # chunked LM head does that job)
        use_liger_kernel=ft.liger_kernels,
        torch_compile=ft.compile,  # the model's forward and backward; the optimizer step stays eager
        torch_compile_backend=COMPILE_BACKEND if ft.compile else None,
        report_to="none",
        disable_tqdm=True,  # progress goes through ctx.progress; tqdm bars garble pod logs
    )
    _choose_scored_positions(compact=not ft.compile)
    trainer_class = _counting_trainer_class()
    step_times = StepTimes(cuda=dev == "cuda")
    trainer = trainer_class(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                            processing_class=tokenizer, peft_config=lora_config(ft.lora),
                            callbacks=[_progress_callback(ctx), step_times.callback()])
    trainer.step_times = step_times
    trainer.step_profile = (profiled.StepProfile(ft.profile_step, Path(ctx.out), cuda=dev == "cuda")
                            if ft.profile_step and world().main else None)
    if trainer.step_profile:
        trainer.add_callback(trainer.step_profile.callback(trainer))
    if ft.base_precision != "none" and ft.base_quantizer == "torchao":
        adapters_in_bf16(trainer.model)
    trainer.compile_count = compiled.CompileCount() if ft.compile else None
    if trainer.compile_count:
        trainer.add_callback(trainer.compile_count.callback())
    if ft.packing and packing.packing_layout(model) == packing.ROWS:
        packing.use_row_packing(trainer, static=(micro_batch, ft.max_length) if ft.compile else None)
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts; the progress callback logs the same figures
    metrics = metrics_callback(ctx, trainer)  # loss, learning rate, tokens/s, ETA for Prometheus (docs/monitoring.md)
    if metrics is not None:
        trainer.add_callback(metrics)
    return trainer


def adapters_in_bf16(model) -> None:
    """The LoRA weights in bf16, as TRL's SFTTrainer makes them on a bitsandbytes base (the QLoRA paper's choice;
    TRL recognises only bitsandbytes' is_loaded_in_4bit/8bit): both quantizers then train the same adapter, and
    bench/packed.py compares the libraries alone."""
    import torch

    for name, param in model.named_parameters():
        if param.requires_grad and "lora_magnitude_vector" not in name:  # TRL leaves DoRA's vector in fp32
            param.data = param.data.to(torch.bfloat16)


def final_eval_loss(trainer) -> float:
    """The evaluation loss of the final weights: the last periodic one if it was at the last step, else a new one."""
    last = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return last["eval_loss"]
    return trainer.evaluate()["eval_loss"]


# ---- checkpoints ---------------------------------------------------------------------------------------------
def checkpoint_dir(ctx) -> Path:
    """``.work/finetune/checkpoints``, emptied (moved aside) if its checkpoints belong to another recipe.

    The work folder is per run and stage, not per recipe: resuming a changed recipe (another LoRA rank, other
    data) from old checkpoints would fail to load or, worse, quietly mix two trainings.
    """
    folder = ctx.work / "checkpoints"
    marker = ctx.work / FINGERPRINT_FILE
    fingerprint = ctx.recipe.fingerprint("finetune")
    recorded = marker.read_text().strip() if marker.exists() else None
    if folder.exists() and any(folder.iterdir()) and recorded != fingerprint:
        moved = ctx.layout.move_aside(folder)
        log.warning("checkpoints in %s come from another recipe (fingerprint %s ≠ %s); moved to %s",
                    folder, recorded, fingerprint, moved)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint + "\n")
    return folder


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix(CHECKPOINT_PREFIX))


def checkpoint_state(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))


def checkpoint_finished(path: Path) -> bool:
    state = checkpoint_state(path)
    return state["global_step"] >= state["max_steps"]


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint in ``path`` cannot be resumed from, or None if it is complete."""
    missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        state = checkpoint_state(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"trainer_state.json unreadable ({exc})"
    if state.get("global_step") != checkpoint_step(path) or not isinstance(state.get("max_steps"), int):
        return f"trainer_state.json says step {state.get('global_step')} of {state.get('max_steps')}"
    try:
        sizes = json.loads((path / CHECKPOINT_MARKER).read_text(encoding="utf-8")).get("files", {})
        changed = [name for name, size in sizes.items() if (path / name).stat().st_size != size]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{CHECKPOINT_MARKER} unreadable or names a missing file ({exc})"
    if changed:
        return f"{', '.join(changed)} changed size after the checkpoint was written"
    return None


def latest_complete_checkpoint(folder: Path, layout) -> Path | None:
    """The newest checkpoint that can be resumed from; incomplete ones (a kill mid-save) are moved aside so
    that the trainer neither resumes from them nor counts them when it rotates old checkpoints."""
    candidates = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*")
                  if p.is_dir() and p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()]
    best = None
    for path in sorted(candidates, key=checkpoint_step, reverse=True):
        problem = checkpoint_problem(path)
        if problem is not None:
            moved = layout.move_aside(path)
            log.warning("skipping incomplete checkpoint %s (%s); moved to %s", path.name, problem, moved)
        elif best is None:
            best = path
    return best


def finish_from_checkpoint(trainer, checkpoint: Path) -> float:
    """Take the adapter and the trainer state from a checkpoint at the end of the plan; return its last learning
    rate. (Resumed there, transformers 5.24 runs one step past the plan, with the schedule past its end: a pod
    killed after the final checkpoint, while saving the artifact, would otherwise come back with 1 extra step.)"""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    set_peft_model_state_dict(trainer.model, load_file(checkpoint / "adapter_model.safetensors"))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    return torch.load(checkpoint / "scheduler.pt", weights_only=True)["_last_lr"][0]


def seal_checkpoint(path: Path) -> None:
    """Make a checkpoint the trainer has just written durable, then mark it complete: fsync each file and the
    folder, then write the marker (temporary file, fsync, rename). Resuming accepts only marked checkpoints."""
    from kubetune.artifacts import fsync_dir, write_atomic

    sizes = {}
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.name != CHECKPOINT_MARKER:
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
            sizes[str(file.relative_to(path))] = file.stat().st_size
    for folder in {f.parent for f in path.rglob("*")} | {path}:
        fsync_dir(folder)
    write_atomic(path / CHECKPOINT_MARKER, json.dumps({"step": checkpoint_step(path), "files": sizes}) + "\n")


# Positions × vocabulary of one compiled micro-batch, from which it fails. Gemma 3 (262,144 tokens) at 8 × 1024
# positions, exactly 2^31, stopped its first compiled step with "CUDA error: an illegal memory access" in a kernel
# inductor generated for TRL's chunked log-probabilities (H100, bench/results/packed-h100-2026-12-06.json); BLOOM's
# 8 × 1024 × 250,880 (2.06e9) ran. Most likely 32-bit index arithmetic over the logits; below it nothing failed.
COMPILED_LOGITS_LIMIT = 2**31


def check_compiled_logits(model, micro_batch: int, max_length: int) -> None:
    """Refuse, before training, a compiled micro-batch whose logits reach COMPILED_LOGITS_LIMIT elements."""
    vocab = model.get_output_embeddings().weight.shape[0]
    logits = micro_batch * max_length * vocab
    if logits >= COMPILED_LOGITS_LIMIT:
        fits = (COMPILED_LOGITS_LIMIT - 1) // (max_length * vocab)
        fix = (f"batch_size ≤ {fits} per GPU (grad_accum for more) or a shorter max_length" if fits else
               f"max_length ≤ {(COMPILED_LOGITS_LIMIT - 1) // vocab:,}")
        raise RecipeError("recipe", [f"finetune.compile: a micro-batch of {micro_batch} × {max_length} positions × "
                                     f"{vocab:,} vocabulary = {logits:,} logits reaches 2^31, where torch.compile's "
                                     f"code failed with an illegal memory access; use {fix}"])


def check_truncation(trainer, rows: int, ft) -> None:
    """Rows longer than finetune.max_length are cut to it (the end of the answer is not learned), with a warning;
    rows whose prompt alone fills it teach nothing and TRL drops them. None left: a DataError, not a crash."""
    if ft.packing:  # packed sequences are max_length long by design; rows are not seen one by one
        return
    kept = len(trainer.train_dataset)
    if kept == 0:
        raise DataError(f"every training row's prompt is at least finetune.max_length={ft.max_length} tokens long, "
                        "so no answer token is left to learn from; raise finetune.max_length")
    import pyarrow.compute as pc

    cut = sum(pc.sum(pc.greater_equal(pc.list_value_length(batch["input_ids"]), ft.max_length)).as_py() or 0
              for batch in trainer.train_dataset.with_format("arrow").iter(batch_size=10_000))
    if cut or kept < rows:
        log.warning("finetune.max_length=%d: %d of %d training rows reach it and are truncated there (the end of "
                    "their answer is not learned); %d whose prompt alone fills it are dropped. Raise max_length to "
                    "keep them whole", ft.max_length, cut, rows, rows - kept)


class Preemption:
    """SIGTERM while training (an eviction, a preemption, `kubectl delete`): finish the current step, save a
    checkpoint, and exit 143, all within the pod's terminationGracePeriodSeconds (kubernetes.termination_grace_s);
    the Job then retries and the new pod resumes from that checkpoint. Outside ``with``, SIGTERM keeps its
    default action: before training nothing is lost, after it the final checkpoint is already written."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "Preemption":
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (an embedding application): leave its handlers alone
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def _checkpoint_callback(preemption: Preemption):
    from transformers import TrainerCallback

    class Checkpoints(TrainerCallback):
        """Seals every checkpoint the trainer saves; asks for a checkpoint and a stop once SIGTERM came."""

        def on_step_end(self, args, state, control, **kwargs):
            if preemption.requested:
                log.warning("SIGTERM: checkpointing at step %d, then stopping", state.global_step)
                control.should_save = True
                control.should_training_stop = True

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:  # the process that wrote it (transformers saves on rank 0)
                seal_checkpoint(Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}")

    return Checkpoints()


# ---- trainer pieces ------------------------------------------------------------------------------------------
def _choose_scored_positions(compact: bool) -> None:
    """Which positions TRL's chunked LM head scores: only those that carry a label (``compact``), or every one.

    TRL 1.16 scores only the labelled positions (the answer, with completion-only loss) on Triton devices, and
    every position elsewhere, so that the tile shapes stay fixed for compiling backends such as Neuron. On a CPU
    nothing is compiled unless finetune.compile, and there the head over Gemma 3's 262k-token vocabulary is ~2/3 of
    a demo step, mostly spent on prompt positions whose loss is zero anyway: compact. Under finetune.compile the
    number of labelled positions changes every batch and recompiled the loss at each step (3 of 4 steps on the
    tiny Llama): every position, on every device, one shape. The loss and the gradients are the same either way.
    Only the compact/full choice changes: the kernels keep choosing Triton or torch for themselves (their own
    ``_use_triton`` in trl.kernels.chunked_logprob)."""
    import trl.trainer.utils as trl_utils

    if not callable(getattr(trl_utils, "_use_triton", None)):
        return

    def scored_positions(device) -> bool:
        return compact

    trl_utils._use_triton = scored_positions


def example_lengths(inputs) -> list[int]:
    """Token count of each training example in a micro-batch: a padded batch has one row per example (its
    ``attention_mask``); a packed one restarts ``position_ids`` at 0 for each example (stages/packing.py). Each
    is also the span its tokens attend over."""
    if "attention_mask" in inputs:
        return [int(n) for n in inputs["attention_mask"].sum(dim=1).tolist()]
    return [int(n) for n in packing.packed_example_lengths(inputs["position_ids"]).tolist()]


# Built inside functions: importing trl takes ~10 s, and run_stage imports this module even for a skipped stage.
def _counting_trainer_class():
    from trl import SFTTrainer

    class CountingSFTTrainer(SFTTrainer):
        """SFTTrainer that counts the real (non-padding) tokens and the examples it trains on, for throughput,
        and hands each micro-batch's example lengths to ``step_times`` (StepTimes, set by build_trainer)."""

        tokens_seen = 0
        examples_seen = 0
        positions_seen = 0  # tokens + padding: what the GPU computed on
        step_times: StepTimes | None = None

        def training_step(self, model, inputs, *args, **kwargs):
            lengths = example_lengths(inputs)
            positions = int(inputs["input_ids"].numel())
            self.positions_seen += positions
            self.tokens_seen += sum(lengths)
            self.examples_seen += len(lengths)
            if self.step_times is not None:
                self.step_times.note_batch(lengths, int(inputs["input_ids"].shape[0]), positions)
            return super().training_step(model, inputs, *args, **kwargs)

    return CountingSFTTrainer


def _progress_callback(ctx):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Reports each optimizer step to ``ctx.progress`` (progress bars, metrics) and logs each logged loss."""

        loss: float | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = logs["loss"]
                log.info("finetune step %d/%d loss %.4f lr %.3g", state.global_step, state.max_steps,
                         logs["loss"], logs.get("learning_rate", math.nan))

        def on_step_end(self, args, state, control, **kwargs):
            text = f"loss {self.loss:.3f}" if self.loss is not None else "training"
            ctx.progress("finetune", state.global_step, state.max_steps, text)

    return Progress()
