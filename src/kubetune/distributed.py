"""Several processes for one fine-tune: the arithmetic of the global batch, who this process is, and torchrun.

One fine-tune runs as ``processes = max(gpus, 1) × nodes`` processes (one per GPU), started by torchrun
(``python -m torch.distributed.run``) from the stage entrypoint. The recipe's global batch stays what it is on
one GPU, ``finetune.batch_size × finetune.grad_accum`` rows per optimizer step, so a run on 4 GPUs follows the
same schedule (steps, warm-up, learning rate) as on one and only finishes sooner:

    batch_size 8 × grad_accum 4 = 32 rows/step  →  on 4 processes: 8 rows × 1 accumulation × 4 processes

Only the process of global rank 0 writes anything shared (checkpoints, the artifact, the report); the others
train and exit. Nothing here imports torch: the recipe schema and the CLI use it at start-up.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

# torchrun sets these in each process it starts (torch.distributed.run); the Training Operator and Kubeflow
# Trainer set PET_* (torchrun's own option variables) in each pod, which torchrun reads as its defaults.
WORLD_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def split_global_batch(batch_size: int, grad_accum: int, processes: int) -> tuple[int, int] | None:
    """(rows per process per micro-step, accumulation steps per process) such that
    ``rows × accumulation × processes == batch_size × grad_accum``, keeping micro-batches as large as the recipe
    asks; None when the global batch does not divide among the processes."""
    if processes <= 1:
        return batch_size, grad_accum
    shared = math.gcd(grad_accum, processes)  # processes take over accumulation steps first: same memory per step
    rest = processes // shared
    if batch_size % rest:
        return None
    return batch_size // rest, grad_accum // shared


def resolved_parallelism(choice: str) -> str:
    """ddp or fsdp for ``resources.finetune.parallelism`` where auto is still undecided (the estimator's table;
    a rank given a recipe by hand): ddp. The stage decides auto before starting the ranks
    (stages.spread.chosen_parallelism)."""
    return "ddp" if choice == "auto" else choice


@dataclass(frozen=True)
class World:
    """This process's place among the fine-tune's processes (rank 0 of 1 when not started by torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that writes checkpoints, the artifact and the report."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world(environ: dict[str, str] | None = None) -> World:
    env = os.environ if environ is None else environ
    if not all(name in env for name in WORLD_ENV):
        return World()
    return World(rank=int(env["RANK"]), size=int(env["WORLD_SIZE"]), local_rank=int(env["LOCAL_RANK"]))


def node_rank(environ: dict[str, str] | None = None) -> int:
    """Which pod of a multi-node fine-tune this is (0 on a single pod): PET_NODE_RANK from Kubeflow Trainer or the
    Training Operator, else the JOB_COMPLETION_INDEX of an indexed Job."""
    env = os.environ if environ is None else environ
    return int(env.get("PET_NODE_RANK") or env.get("JOB_COMPLETION_INDEX") or 0)


def torchrun_command(nproc_per_node: int, module: str, args: list[str]) -> list[str]:
    """``python -m torch.distributed.run`` starting ``nproc_per_node`` copies of ``python -m module args``.

    On one pod, ``--standalone`` picks a free local rendezvous; on several, the operators set PET_NNODES,
    PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT in each pod, which torchrun takes as its options."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    if int(os.environ.get("PET_NNODES", "1").split(":")[-1]) <= 1:
        command.append("--standalone")
    return command + ["-m", module, *args]
