"""GPTQ's column-by-column block update replayed as CUDA graphs, for images without a CUDA compiler.

GPTQ quantizes a weight one input column at a time and pushes each column's rounding error onto the columns
still to come, 128 columns (one block) at a time. GPTQModel does a block either with a CUDA kernel that it
JIT-compiles with nvcc at first use, or, where that build fails (kubetune's image has no nvcc), with a loop in
torch that launches a dozen tiny kernels per column. On the bench's H200 that loop took 52.2 s of bloom-1b1's
66.9 s quantize() against 4.3 s with the kernel (bench/results/gpu-h200-2026-11-28-loss-and-gptq-loop.json): the
host's launch rate, not the GPU, set its time.

Here the same torch operations, in the same order, are captured once per block shape into a CUDA graph and
replayed for every block: one launch per block instead of ~1,500, and the same numbers as the torch loop (each
operation is the one the loop runs, so each rounding is too). It plugs into GPTQModel's own seam for its
compiled kernel (``gptqmodel.quantization.gptq_cuda``) and is used only when that kernel cannot be loaded.
"""

from __future__ import annotations

import contextlib
import logging
import threading

log = logging.getLogger(__name__)

WIDTH = 128  # columns per block: GPTQModel hands its kernel only full 128-column blocks


def block_update(work, hinv, scale, zero, column_group, quantized, errors, losses, maxq: int,
                 scratch=None) -> None:
    """One GPTQ block, in place, as GPTQModel's torch loop computes it (the reference and the captured body).

    ``work`` (rows × 128, float32): the block's weights, updated as columns are quantized; ``hinv`` (128 × 128):
    the block of the upper Cholesky factor of the inverse Hessian; ``scale`` / ``zero`` (groups × rows) with
    ``column_group`` (128, int) naming each column's group; outputs (rows × 128): ``quantized`` weights,
    ``errors`` (rounding error over the pivot), ``losses`` (squared error over the squared pivot; GPTQModel
    halves them afterwards). ``scratch`` (rows × 128) holds each column's error update before it is subtracted:
    inside a graph capture a fresh temporary per column would stay reserved (~rows × 128 × 64 × 4 bytes a graph).
    """
    import torch

    if scratch is None:
        scratch = torch.empty_like(work)
    column_group = column_group.long()
    scales = scale.index_select(0, column_group)  # 128 × rows: the scales of each column's group
    zeros = zero.index_select(0, column_group)
    pivots = hinv.diagonal()
    pivots_squared = pivots.square()
    for i in range(work.shape[1]):
        w, q, err = work[:, i], quantized[:, i], errors[:, i]
        # scale * (clamp(round(w / scale) + zero, 0, maxq) - zero): GPTQModel's Quantizer.quantize
        torch.div(w, scales[i], out=q)
        q.round_().add_(zeros[i]).clamp_(0, maxq).sub_(zeros[i]).mul_(scales[i])
        torch.sub(w, q, out=err)
        torch.square(err, out=losses[:, i])
        losses[:, i].div_(pivots_squared[i])
        err.div_(pivots[i])
        torch.mul(err.unsqueeze(1), hinv[i, i:], out=scratch[:, i:])
        work[:, i:].sub_(scratch[:, i:])


class _CapturedBlock:
    """One block shape's graph and the static tensors it reads and writes."""

    def __init__(self, rows: int, groups: int, maxq: int, device):
        import torch

        f32 = {"dtype": torch.float32, "device": device}
        self.work = torch.zeros(rows, WIDTH, **f32)
        self.hinv = torch.eye(WIDTH, **f32)
        self.scale = torch.ones(groups, rows, **f32)
        self.zero = torch.zeros(groups, rows, **f32)
        self.column_group = torch.zeros(WIDTH, dtype=torch.int32, device=device)
        # Every tensor the graph reads or writes lives as long as the graph: a freed one would be written to
        # after its memory went to someone else.
        self.quantized, self.errors, self.losses, self.scratch = (torch.zeros(rows, WIDTH, **f32) for _ in range(4))
        args = (self.work, self.hinv, self.scale, self.zero, self.column_group, self.quantized, self.errors,
                self.losses, maxq, self.scratch)
        # Run once outside the capture on a side stream (the pattern torch.cuda.graphs documents): lazy
        # initialisation must not happen inside the graph.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            block_update(*args)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: GPTQModel's other worker threads may use the GPU while this thread captures.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            block_update(*args)

    def __call__(self, work, hinv, scale, zero, column_group, quantized, errors, losses) -> None:
        self.work.copy_(work)
        self.hinv.copy_(hinv)
        self.scale.copy_(scale)
        self.zero.copy_(zero)
        self.column_group.copy_(column_group)
        self.graph.replay()  # on the current stream, after the copies and before the ones below
        work.copy_(self.work)
        quantized.copy_(self.quantized)
        errors.copy_(self.errors)
        losses.copy_(self.losses)


class GraphedBlockUpdate:
    """``gptq_block_update``'s signature, one CUDA graph per (device, rows, groups, maxq).

    A graph costs one eager run plus the capture (~the torch loop's time for one block) and a few static
    rows × 128 float32 tensors (3 MiB each at 6,144 rows); a layer has 3-4 distinct shapes. Blocks that are not
    128 float32 columns on a CUDA device, or a capture that fails, run :func:`block_update` eagerly.
    """

    def __init__(self):
        self._graphs: dict[tuple, _CapturedBlock | None] = {}
        # GPTQModel may solve modules from several worker threads: the static tensors are shared, so a block's
        # copy-in, replay and copy-out hold the lock, and the stream is synchronised before it is let go.
        self._lock = threading.Lock()
        self.replays = 0
        self.eager_blocks = 0
        self.native: bool | None = None  # set at the first block: did GPTQModel's compiled kernel load?

    def __call__(self, work, hinv, scale, zero, column_group, quantized, errors, losses, maxq) -> None:
        import torch

        key = (work.device, work.shape[0], scale.shape[0], int(maxq))
        graphable = (work.device.type == "cuda" and work.dtype == torch.float32 and work.shape[1] == WIDTH
                     and tuple(hinv.shape) == (WIDTH, WIDTH))
        with self._lock:
            captured = self._capture(key) if graphable else None
            if captured is None:
                self.eager_blocks += 1
                block_update(work, hinv, scale, zero, column_group, quantized, errors, losses, int(maxq))
                return
            with torch.cuda.device(work.device):
                captured(work, hinv, scale, zero, column_group, quantized, errors, losses)
                torch.cuda.current_stream().synchronize()
            self.replays += 1

    def _capture(self, key) -> _CapturedBlock | None:
        if key not in self._graphs:
            import torch

            device, rows, groups, maxq = key
            try:
                with torch.cuda.device(device):
                    self._graphs[key] = _CapturedBlock(rows, groups, maxq, device)
            except RuntimeError as exc:  # e.g. an allocator setting that capture does not support
                log.warning("GPTQ block update: CUDA graph capture failed for %d rows (%s); running the torch "
                            "loop for this shape", rows, exc)
                self._graphs[key] = None
        return self._graphs[key]

    def kind(self) -> str:
        """What ran the blocks, for the stage report: GPTQModel's compiled kernel, these graphs, or a torch loop
        (on the CPU, with GPTQMODEL_DISABLE_GPTQ_CUDA=1, or after a failed capture)."""
        if self.native:
            return "cuda-kernel"
        if self.replays:
            return "cuda-graphs" if not self.eager_blocks else "cuda-graphs+torch-loop"
        return "torch-loop"


@contextlib.contextmanager
def graphed_when_uncompiled():
    """While inside, GPTQModel's CUDA block update is its own compiled kernel when that loads, and
    :class:`GraphedBlockUpdate` when it does not (no nvcc). Yields the graphed update (``kind()`` says what ran).
    ``GPTQMODEL_DISABLE_GPTQ_CUDA=1`` still turns both off: GPTQModel then runs its torch loop."""
    from gptqmodel.quantization import gptq_cuda

    native_available, native_update = gptq_cuda.block_update_available, gptq_cuda.gptq_block_update
    graphed = GraphedBlockUpdate()

    def available() -> bool:
        if graphed.native is None:  # decided once: loading the kernel may mean building it (29 s with nvcc)
            graphed.native = bool(native_available())
            log.info("GPTQ block update: %s", "GPTQModel's compiled CUDA kernel" if graphed.native
                     else "no compiled kernel (no nvcc?); the torch loop replayed as CUDA graphs")
        return True

    def update(*args) -> None:
        (native_update if graphed.native else graphed)(*args)

    gptq_cuda.block_update_available, gptq_cuda.gptq_block_update = available, update
    try:
        yield graphed
    finally:
        gptq_cuda.block_update_available, gptq_cuda.gptq_block_update = native_available, native_update
