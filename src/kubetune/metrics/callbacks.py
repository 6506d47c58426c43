"""The fine-tune's Trainer callbacks: step, planned steps, loss, learning rate and trained tokens into the stage's
metrics (kubetune.metrics.state.StageState), from which the collector derives tokens/s and the ETA; and each
optimizer step's time and tokens into the stage report (``StepTimes``), which bench/harness.py reads."""

from __future__ import annotations

from typing import Any


def metrics_callback(ctx, trainer) -> Any | None:
    """A TrainerCallback feeding ``ctx.extras["metrics"]``, or None when the stage's metrics are off.

    ``trainer`` is read for its running token count (``tokens_seen``, kept by kubetune's counting trainer):
    TrainerState counts input tokens only when ``include_num_input_tokens_seen`` is set, and then with padding.
    """
    state = ctx.extras.get("metrics")
    if state is None:
        return None
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        def on_train_begin(self, args, s, control, **kwargs):
            # the planned steps are known from here on (a resumed run also starts at its checkpoint's step)
            state.train_step(s.global_step, s.max_steps, getattr(trainer, "tokens_seen", None))

        def on_step_end(self, args, s, control, **kwargs):
            state.train_step(s.global_step, s.max_steps, getattr(trainer, "tokens_seen", None))

        def on_log(self, args, s, control, logs=None, **kwargs):
            if logs:
                state.train_log(loss=logs.get("loss"), learning_rate=logs.get("learning_rate"))

    return MetricsCallback()


class StepTimes:
    """Each optimizer step's time and the work in it, for the fine-tune report's ``step_times`` (and bench/).

    Per step: ``ms`` (between the step's begin and end, CUDA events on a GPU so that the device's queue is
    timed, else the host clock), ``tokens`` (real, non-padding), ``sum_s2`` (Σ s² over the spans that attend
    together: a padded row's example, a packed example; the attention work of the step), ``rows`` and
    ``padded_tokens`` (every position computed). The counting trainer calls :meth:`note_batch` for each
    micro-batch; the events are read once, after training, so timing costs no synchronisation per step.
    """

    COLUMNS = ("ms", "tokens", "sum_s2", "rows", "padded_tokens")

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self._steps: list[dict] = []
        self._pending: dict | None = None

    def note_batch(self, lengths: list[int], rows: int, positions: int) -> None:
        if self._pending is None:  # an evaluation batch, or one outside a step
            return
        self._pending["tokens"] += sum(lengths)
        self._pending["sum_s2"] += sum(s * s for s in lengths)
        self._pending["rows"] += rows
        self._pending["padded_tokens"] += positions

    def _mark(self):
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        import time

        return time.perf_counter()

    def begin(self) -> None:
        self._pending = {"start": self._mark(), "tokens": 0, "sum_s2": 0, "rows": 0, "padded_tokens": 0}

    def end(self) -> None:
        if self._pending is not None:
            self._pending["end"] = self._mark()
            self._steps.append(self._pending)
            self._pending = None

    def columns(self) -> dict[str, Any]:
        """{column: one value per step} and the clock that timed them."""
        if self.cuda and self._steps:
            import torch

            torch.cuda.synchronize()
        ms = [s["start"].elapsed_time(s["end"]) if self.cuda else (s["end"] - s["start"]) * 1e3 for s in self._steps]
        out: dict[str, Any] = {"clock": "cuda-events" if self.cuda else "host", "ms": [round(m, 3) for m in ms]}
        out.update({key: [s[key] for s in self._steps] for key in self.COLUMNS[1:]})
        return out

    def callback(self):
        return step_callback(self.begin, self.end)


def step_callback(on_begin, on_end):
    """A TrainerCallback that calls ``on_begin()`` and ``on_end()`` around every optimizer step (transformers is
    imported here, not at module load: the CLI imports this package)."""
    from transformers import TrainerCallback

    class StepCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            on_begin()

        def on_step_end(self, args, state, control, **kwargs):
            on_end()

    return StepCallback()
