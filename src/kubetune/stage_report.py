"""``report.json``: what every stage writes beside its artifact, as pydantic models.

The stage entrypoint (:func:`kubetune.stages.run_stage`) writes it through :class:`StageReport` (or the stage's
own subclass, named by the registry), and every reader (the local summary, `kubetune status`, `kubetune report`,
the UI, bench) reads it back through :func:`report_of`. :class:`PeakMemory` owns the one definition of "the GPU
peak". Fields a stage adds beyond its model are kept (``extra="allow"``): old reports and new figures both load.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from kubetune import registry


class PeakMemory(BaseModel):
    """Peaks over one stage. Bytes throughout; None where the figure cannot be had (no GPU, no NVML)."""

    model_config = ConfigDict(extra="allow")

    torch_allocated_bytes: int | None = None
    torch_reserved_bytes: int | None = None
    nvml_process_bytes: int | None = None
    nvml_device_used_bytes: int | None = None
    gpu_total_bytes: int | None = None
    host_rss_bytes: int | None = None
    torch_allocated_at_start_bytes: int | None = None
    """Still held when the stage began (0 in a fresh process)."""
    per_gpu: dict[str, dict[str, int]] = Field(default_factory=dict)

    @property
    def gpu_bytes(self) -> int | None:
        """The GPU peak: what the process held as nvidia-smi shows it (NVML's per-process figure, CUDA context
        included); without NVML, what torch's allocator reserved, else what it allocated; None on a CPU run (a
        figure of 0 means no GPU was used, not an empty one)."""
        return self.nvml_process_bytes or self.torch_reserved_bytes or self.torch_allocated_bytes or None


class StageReport(BaseModel):
    """The part of report.json every stage has; a stage's own figures follow as further fields."""

    model_config = ConfigDict(extra="allow")

    stage: str
    run: str | None = None
    model: str | None = None
    fingerprint: str | None = None
    recipe_hash: str | None = None
    started_at: str | None = None
    duration_s: float | None = None
    peak_memory: PeakMemory = Field(default_factory=PeakMemory)
    versions: dict[str, Any] = Field(default_factory=dict)
    recipe: dict[str, Any] | None = None
    """The whole recipe: reports and estimates need no other file."""
    eval_set: str | None = None
    """Infer and evaluate: the evaluation set this report is of."""

    counts_trainable: ClassVar[bool] = False
    """Whether the trainable parameter count means something (a model loaded for inference leaves requires_grad
    on: only the fine-tune's count is real)."""

    def headline(self) -> str:
        """The one figure a user looks for first in this stage's report ("" when it has none)."""
        return ""

    def throughput_text(self) -> str:
        """How fast the stage worked, for `kubetune report`'s stage tables ("—" when it does not say)."""
        return "—"


class FinetuneReport(StageReport):
    counts_trainable: ClassVar[bool] = True
    metrics: dict[str, Any] = Field(default_factory=dict)
    throughput: dict[str, Any] = Field(default_factory=dict)

    def throughput_text(self) -> str:
        parts = []
        if isinstance(self.throughput.get("train_tokens_per_s"), (int, float)):
            parts.append(f"{self.throughput['train_tokens_per_s']:.0f} tokens/s")
        if isinstance(self.throughput.get("samples_per_s"), (int, float)):
            parts.append(f"{self.throughput['samples_per_s']:.2f} rows/s")
        return ", ".join(parts) or "—"

    def headline(self) -> str:
        if not self.metrics:
            return ""
        loss = self.metrics.get("train_loss")
        steps = f"{self.metrics.get('steps_run')}/{self.metrics.get('planned_steps')} steps"
        return f"loss {loss:.3f}, {steps}" if isinstance(loss, (int, float)) else steps


class MergeReport(StageReport):
    metrics: dict[str, Any] = Field(default_factory=dict)

    def headline(self) -> str:
        diff = self.metrics.get("verify_max_abs_logit_diff")
        return f"max |Δlogit| {diff:.2g}" if isinstance(diff, (int, float)) else ""

    def throughput_text(self) -> str:
        diff = self.metrics.get("verify_max_abs_logit_diff")
        return f"verified, max |Δlogit| {diff:.2g}" if isinstance(diff, (int, float)) else "—"


class QuantizeReport(StageReport):
    bits: int | None = None
    memory_footprint_bytes: int | None = None
    seconds: float | None = None
    """The GPTQ pass alone (the stage's duration_s also loads and saves)."""

    def throughput_text(self) -> str:
        if self.seconds is None:
            return "—"
        return f"GPTQ {self.bits if self.bits is not None else '?'}-bit in {human_duration(self.seconds)}"

    def headline(self) -> str:
        size = self.memory_footprint_bytes
        size_text = f", {size / 2**20:.0f} MiB" if size is not None else ""
        return f"GPTQ {self.bits if self.bits is not None else '?'}-bit{size_text}"


class InferReport(StageReport):
    throughput: dict[str, Any] = Field(default_factory=dict)

    def headline(self) -> str:
        return ", ".join(f"{m} {v.get('tokens_per_s', 0):.0f} tok/s" for m, v in self.throughput.items()
                         if isinstance(v, dict))

    def throughput_text(self) -> str:
        return "; ".join(f"{m}: {v.get('tokens_per_s', 0):.1f} tokens/s" for m, v in self.throughput.items()
                         if isinstance(v, dict)) or "—"


class EvaluateReport(StageReport):
    metrics: dict[str, Any] = Field(default_factory=dict)

    def headline(self) -> str:
        return ", ".join(f"{m} {v.get('execution_accuracy', 0):.1f}%" for m, v in self.metrics.items()
                         if isinstance(v, dict))


def human_duration(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def report_model(stage: str) -> type[StageReport]:
    """The registry's report model of ``stage`` (the base model for a name no stage has: an old run's folder)."""
    try:
        return registry.resolve(registry.spec(stage).report)
    except KeyError:
        return StageReport


def report_of(stage: str, data: dict[str, Any] | StageReport | None) -> StageReport:
    """A report.json's content (or an empty one) as the stage's report model."""
    if isinstance(data, StageReport):
        return data
    return report_model(stage).model_validate({**(data or {}), "stage": (data or {}).get("stage") or stage})


def peak_of(data: dict[str, Any] | None) -> PeakMemory:
    """The peak_memory part of a report.json's content (empty when it has none)."""
    return PeakMemory.model_validate((data or {}).get("peak_memory") or {})
