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


class CudaAsInAFreshProcess:
    """torch.cuda as a pod's fresh process sees it: a GPU is there, but the allocator does not exist until something
    initialises CUDA. Any memory-statistics call before that raises, as torch 2.11-2.13's reset_peak_memory_stats
    does ("Invalid device argument"); the real is_available() does not initialise either."""

    def __init__(self):
        self.initialized = False
        self.peak = 0

    def is_available(self):
        return True

    def is_initialized(self):
        return self.initialized

    def init(self):
        self.initialized = True

    def device_count(self):
        return 1

    def _stats(self):
        if not self.initialized:
            raise RuntimeError("Invalid device argument")

    def empty_cache(self):
        self._stats()

    def memory_allocated(self, i=0):
        self._stats()
        return 0

    def reset_peak_memory_stats(self, i=0):
        self._stats()
        self.peak = 0

    def max_memory_allocated(self, i=0):
        self._stats()
        return self.peak

    def max_memory_reserved(self, i=0):
        self._stats()
        return self.peak

    def allocate(self, n):  # what loading a model does: initialise, then allocate
        self.initialized = True
        self.peak = max(self.peak, n)


def test_peak_tracking_in_a_fresh_process_does_not_touch_an_uninitialised_allocator(monkeypatch):
    import types

    from kubetune import measure

    cuda = CudaAsInAFreshProcess()
    monkeypatch.setattr(measure, "_torch_if_loaded_or_importable", lambda: types.SimpleNamespace(cuda=cuda))
    with track_peak_memory() as peak:
        cuda.allocate(3 * 2**30)  # the stage loads its model: CUDA initialises inside the block
    assert peak.torch_allocated_bytes == 3 * 2**30
    assert peak.torch_allocated_at_start_bytes == 0


def test_peak_tracking_of_a_stage_that_never_uses_the_gpu_reports_no_gpu_peak(monkeypatch):
    import types

    from kubetune import measure

    cuda = CudaAsInAFreshProcess()
    monkeypatch.setattr(measure, "_torch_if_loaded_or_importable", lambda: types.SimpleNamespace(cuda=cuda))
    with track_peak_memory() as peak:
        pass
    assert peak.torch_allocated_bytes is None and not cuda.initialized  # no GPU context made for nothing


def test_peak_tracking_after_an_earlier_stage_resets_that_stages_peak(monkeypatch):
    import types

    from kubetune import measure

    cuda = CudaAsInAFreshProcess()
    cuda.allocate(5 * 2**30)  # `kubetune run`: the fine-tune ran before in this process
    monkeypatch.setattr(measure, "_torch_if_loaded_or_importable", lambda: types.SimpleNamespace(cuda=cuda))
    with track_peak_memory() as peak:
        cuda.allocate(2**30)
    assert peak.torch_allocated_bytes == 2**30
