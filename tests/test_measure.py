"""Peak-memory tracking of a stage (kubetune.measure)."""

from __future__ import annotations

import gc
import weakref

from kubetune.measure import track_peak_memory


def test_a_stage_starts_without_the_garbage_of_the_one_before():
    """A Trainer and its callbacks form reference cycles that hold the model; in one process (`kubetune run`)
    they must be gone before the next stage's memory is measured, not whenever the collector next runs."""

    class Holder:  # stands for a model kept alive only by a cycle
        pass

    gc.disable()  # as if the collector's threshold had not been reached yet
    try:
        model, trainer = Holder(), Holder()
        model.trainer, trainer.model = trainer, model
        alive = weakref.ref(model)
        del model, trainer
        assert alive() is not None
        with track_peak_memory() as peak:
            assert alive() is None
    finally:
        gc.enable()
    assert peak.torch_allocated_at_start_bytes is None  # no GPU here: not measured rather than 0
