"""What torch.compile did during a fine-tune (``finetune.compile``): frames compiled, and how many of them after
the first optimizer step. A static-shape step compiles in its first step and never again; a frame compiled later
is a recompile (a new shape, dtype or mode reached the compiled code) and costs seconds to minutes each.

Dynamo counts every frame it compiles (``torch._dynamo.utils.counters["frames"]["ok"]``, process-wide: a first
compile, a recompile, or the code after a graph break). Only the frames compiled *inside* training steps are
counted here, so that an evaluation pass (eval mode: a recompile by design) is not mistaken for one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def frames_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def cache_counts() -> dict[str, int]:
    """Compiled graphs inductor's FX-graph cache and AOTAutograd's cache served (hits) or had to build (misses),
    process-wide. In a pod the caches live on the claim ($TORCHINDUCTOR_CACHE_DIR, k8s/render.py), so a fine-tune
    that restarts (preempted, retried, or rerun with the same shapes) reads its compiled code back instead of
    generating it again."""
    from torch._dynamo.utils import counters

    return {"fx_graph_hits": int(counters["inductor"]["fxgraph_cache_hit"]),
            "fx_graph_misses": int(counters["inductor"]["fxgraph_cache_miss"]),
            "aot_autograd_hits": int(counters["aot_autograd"]["autograd_cache_hit"]),
            "aot_autograd_misses": int(counters["aot_autograd"]["autograd_cache_miss"])}


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


@dataclass
class CompileCount:
    """Frames compiled per optimizer step of this process; ``report()`` is the finetune report's ``compile``."""

    per_step: list[int] = field(default_factory=list)
    _at_begin: int = 0
    _breaks_at_start: int | None = None
    _cache_at_start: dict[str, int] = field(default_factory=dict)

    def step_begins(self) -> None:
        if self._breaks_at_start is None:
            self._breaks_at_start = graph_breaks()
            self._cache_at_start = cache_counts()
        self._at_begin = frames_compiled()

    def step_ends(self) -> None:
        self.per_step.append(frames_compiled() - self._at_begin)

    def report(self) -> dict[str, Any]:
        return {
            "frames_first_step": self.per_step[0] if self.per_step else None,
            # the figure that must stay 0: frames compiled by training steps after the first (warm-up) one
            "frames_after_warmup": sum(self.per_step[1:]),
            "steps_with_compiles": [i + 1 for i, n in enumerate(self.per_step) if n],
            "graph_breaks": graph_breaks() - (self._breaks_at_start or 0),
            # where the compiled code came from: generated (misses) or read from the cache (hits)
            "cache": {k: n - self._cache_at_start.get(k, 0) for k, n in cache_counts().items()},
        }

    def callback(self):
        from kubetune.metrics.callbacks import step_callback

        return step_callback(self.step_begins, self.step_ends)
