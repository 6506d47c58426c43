"""What a running stage tells the metrics: its identity, status, progress, training figures and peaks.

Written by the stage's thread (progress callbacks, the Trainer callback) and read by the scrape thread, so every
access holds one lock; no I/O and no imports beyond the standard library, so the stage pays nothing for it.
Times are Unix seconds from an injectable clock (tests move it by hand).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class TrainFigures:
    completed_steps: int | None = None
    planned_steps: int | None = None
    loss: float | None = None
    learning_rate: float | None = None
    tokens: int = 0
    tokens_per_second: float | None = None
    eta_seconds: float | None = None


@dataclass
class Snapshot:
    """A consistent copy of the state, taken under the lock, for one scrape."""

    labels: dict[str, str]
    info: dict[str, str]
    status: str
    started: float
    ended: float | None
    now: float
    progress_ratio: float | None
    last_progress: float
    train: TrainFigures
    layers: tuple[int, int | None] | None
    process_peak: dict[str, int]
    host_peak: int | None


@dataclass
class StageState:
    """One stage's live figures. ``labels`` are run/stage/model/technique; ``info`` extra labels of the info series."""

    labels: dict[str, str]
    info: dict[str, str] = field(default_factory=dict)
    clock: Callable[[], float] = time.time
    window: int = 10
    """Steps over which tokens/s and the ETA are averaged: one step is noisy, the whole run lags after a stall."""

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.status = "running"
        self.started = self.clock()
        self.ended: float | None = None
        self.progress_ratio: float | None = None
        self.last_progress = self.started
        self.train = TrainFigures()
        self.layers: tuple[int, int | None] | None = None
        self.process_peak: dict[str, int] = {}  # NVML index -> bytes
        self.host_peak: int | None = None
        self._steps: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=self.window + 1)

    # ---- written by the stage ----------------------------------------------------------------------------
    def progress(self, stage: str, completed: float, total: float | None, description: str) -> None:
        """A :data:`kubetune.stages.ProgressFn`: every stage's progress, and the quantize stage's layers.

        The quantize stage reports ``(layer, n_layers)`` once its layer loop starts, and ``total=None`` for the
        phases before it (loading, merging the adapter), so a known total there means layers.
        """
        with self._lock:
            self.last_progress = self.clock()
            if total:
                self.progress_ratio = max(0.0, min(1.0, completed / total))
            if stage == "quantize" and total is not None:
                self.layers = (int(completed), int(total))

    def train_step(self, step: int, planned: int | None, tokens: int | None = None) -> None:
        """An optimizer step ended; ``tokens`` is the running count of trained tokens in this process."""
        now = self.clock()
        with self._lock:
            t = self.train
            t.completed_steps, t.planned_steps = int(step), planned
            if tokens is not None:
                t.tokens = int(tokens)
            self._steps.append((now, int(step), t.tokens))
            self.last_progress = now
            if len(self._steps) >= 2:
                (t0, s0, k0), (t1, s1, k1) = self._steps[0], self._steps[-1]
                if t1 > t0 and s1 > s0:
                    t.tokens_per_second = (k1 - k0) / (t1 - t0)
                    seconds_per_step = (t1 - t0) / (s1 - s0)
                    if planned:
                        t.eta_seconds = max(0, planned - s1) * seconds_per_step

    def train_log(self, loss: float | None = None, learning_rate: float | None = None) -> None:
        with self._lock:
            if loss is not None:
                self.train.loss = float(loss)
            if learning_rate is not None:
                self.train.learning_rate = float(learning_rate)

    def observe_process_memory(self, gpu: str, used: int) -> None:
        with self._lock:
            self.process_peak[gpu] = max(self.process_peak.get(gpu, 0), int(used))

    def finish(self, status: str, peak_memory: dict | None = None) -> None:
        """The stage ended (done, interrupted or failed). ``peak_memory`` is the report's (kubetune.measure): its
        NVML sampler looks every 0.25 s, more often than any scrape, so its peaks raise ours."""
        with self._lock:
            self.status = status
            self.ended = self.clock()
            peak_memory = peak_memory or {}
            for gpu, figures in (peak_memory.get("per_gpu") or {}).items():
                sampled = figures.get("nvml_process_bytes")
                if sampled is not None:
                    self.process_peak[str(gpu)] = max(self.process_peak.get(str(gpu), 0), int(sampled))
            if peak_memory.get("host_rss_bytes") is not None:
                self.host_peak = int(peak_memory["host_rss_bytes"])

    # ---- read by the collector ---------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        with self._lock:
            t = self.train
            return Snapshot(labels=dict(self.labels), info=dict(self.info), status=self.status,
                            started=self.started, ended=self.ended, now=self.clock(),
                            progress_ratio=self.progress_ratio, last_progress=self.last_progress,
                            train=TrainFigures(**t.__dict__), layers=self.layers,
                            process_peak=dict(self.process_peak), host_peak=self.host_peak)
