"""The fine-tune's Trainer callback: step, planned steps, loss, learning rate and trained tokens into the stage's
metrics (kubetune.metrics.state.StageState), from which the collector derives tokens/s and the ETA."""

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
