"""Metric names, labels and help texts: ``kubetune_<subsystem>_<name>_<unit>``, base units (bytes, seconds,
ratios 0–1), and ``_total`` on counters only. Every series carries the stage labels below, so one
``{run="x", stage="finetune"}`` selects a stage everywhere, whichever source (pod scrape or Pushgateway) it
came from.
"""

from __future__ import annotations

# Labels on every kubetune series. ``technique`` says how the stage works on the model (see technique()).
STAGE_LABELS = ("run", "stage", "model", "technique")
# Per-GPU series add the NVML index and UUID; the UUID is also on DCGM's series (label ``UUID``), for joins.
GPU_LABELS = ("gpu", "uuid")
# torch's allocator counts per CUDA device as this process numbers them (after CUDA_VISIBLE_DEVICES), which
# is not NVML's numbering: a separate label, so nobody joins the two by accident.
TORCH_LABELS = ("device",)
# interrupted: SIGTERM or SIGINT (a preemption, a deleted pod); the Job retries, and the fine-tune resumes.
STATUSES = ("running", "done", "interrupted", "failed")  # a skipped stage (already done) starts no monitor

# (name, type, help). Types: gauge, counter. prometheus_client appends _total to a counter family's sample.
METRICS: dict[str, tuple[str, str]] = {
    # ---- stage ------------------------------------------------------------------------------------------
    "kubetune_stage_info": ("gauge", "Always 1; labels say which run, stage, model and technique, and the "
                                     "kubetune version and fingerprint."),
    "kubetune_stage_status": ("gauge", "1 for the stage's current status (label status: running, done, "
                                       "interrupted, failed), 0 for the others."),
    "kubetune_stage_start_time_seconds": ("gauge", "Unix time the stage started."),
    "kubetune_stage_end_time_seconds": ("gauge", "Unix time the stage ended (absent while it runs)."),
    "kubetune_stage_duration_seconds": ("gauge", "Seconds the stage has run (final once it ended)."),
    "kubetune_stage_progress_ratio": ("gauge", "Fraction of the stage's work done, 0-1 (absent while unknown)."),
    "kubetune_stage_last_progress_timestamp_seconds": ("gauge", "Unix time of the stage's last progress report "
                                                                "(its start, before the first)."),
    "kubetune_stage_host_memory_peak_bytes": ("gauge", "Peak resident host memory of the stage process."),
    # ---- GPU (NVML, at scrape time) -----------------------------------------------------------------------
    "kubetune_gpu_info": ("gauge", "Always 1 per GPU the stage sees; label name is the product name."),
    "kubetune_gpu_memory_used_bytes": ("gauge", "GPU memory in use on the device, by every process (NVML)."),
    "kubetune_gpu_memory_total_bytes": ("gauge", "GPU memory capacity of the device (NVML)."),
    "kubetune_gpu_utilization_ratio": ("gauge", "Fraction of the last sample period in which a kernel ran (NVML), "
                                                "0-1."),
    "kubetune_gpu_process_memory_used_bytes": ("gauge", "GPU memory used by this pod's processes on the device "
                                                        "(NVML, includes the CUDA context)."),
    "kubetune_gpu_process_memory_peak_bytes": ("gauge", "Highest kubetune_gpu_process_memory_used_bytes seen in "
                                                        "this stage (at scrapes, and by the stage's own sampler)."),
    "kubetune_gpu_nvml_available": ("gauge", "1 if NVML answered (a driver and a GPU), else 0."),
    # ---- torch allocator (this process) -------------------------------------------------------------------
    "kubetune_torch_memory_allocated_bytes": ("gauge", "Bytes held by live tensors (torch.cuda.memory_allocated)."),
    "kubetune_torch_memory_reserved_bytes": ("gauge", "Bytes reserved by torch's caching allocator."),
    "kubetune_torch_memory_peak_allocated_bytes": ("gauge", "Peak of allocated bytes since the stage started."),
    "kubetune_torch_memory_peak_reserved_bytes": ("gauge", "Peak of reserved bytes since the stage started."),
    # ---- training (Trainer callback) ----------------------------------------------------------------------
    "kubetune_train_completed_steps": ("gauge", "Optimizer steps done (global step: counts steps before a resume)."),
    "kubetune_train_planned_steps": ("gauge", "Optimizer steps the schedule is planned for."),
    "kubetune_train_loss": ("gauge", "Training loss of the last logged step."),
    "kubetune_train_learning_rate": ("gauge", "Learning rate of the last logged step."),
    "kubetune_train_tokens_per_second": ("gauge", "Trained (non-padding) tokens per second over the last steps."),
    "kubetune_train_eta_seconds": ("gauge", "Estimated seconds to the planned last step, at the recent step rate."),
    "kubetune_train_tokens": ("counter", "Trained (non-padding) tokens in this process."),
    # ---- quantization --------------------------------------------------------------------------------------
    "kubetune_quantize_completed_layers": ("gauge", "Decoder layers quantized and packed so far."),
    "kubetune_quantize_planned_layers": ("gauge", "Decoder layers to quantize."),
}


def technique(recipe, stage: str) -> str:
    """How ``stage`` works on the model, as a short label: lora, qlora-4bit, merge, gptq-int4, generate, sql-eval."""
    if stage == "finetune":
        precision = recipe.finetune.base_precision
        return "lora" if precision == "none" else f"qlora-{precision}"
    if stage == "merge":
        return "merge"
    if stage == "quantize":
        return f"{recipe.quantize.method}-int{recipe.quantize.bits}"
    if stage == "infer":
        return "generate-greedy" if recipe.infer.greedy else "generate-sample"
    if stage == "evaluate":
        return "sql-execution"
    return stage
