"""The fine-tune on several processes: the stage's own process starts torchrun and waits; each process torchrun
starts (``python -m kubetune.stages.spread``) runs :func:`kubetune.stages.finetune.run` as one rank.

The stage's own process keeps the artifact contract: it holds the lock, owns the temporary output folder and,
once torchrun has ended well, renames it into place and writes ``report.json`` and ``_SUCCESS``
(kubetune.stages.run_stage). Of the ranks, only global rank 0 writes: checkpoints (sealed as on one process),
the adapter into the temporary folder, and its part of the report into ``.work/finetune/rank0-result.json``,
which the stage's process reads back. Rank 0's error with an exit code of its own (docs/exit-codes.md) travels
the same way, so a bad data set is still exit 4 and not torchrun's 1. SIGTERM to the stage's process (PID 1 of
the pod) is passed on to torchrun, which passes it to every rank: each checkpoints and exits 143.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune import errors
from kubetune.distributed import node_rank, torchrun_command, world

log = logging.getLogger(__name__)

RESULT_FILE = "rank0-result.json"
RELAY_FILE = "rank0-progress.jsonl"
RECIPE_FILE = "recipe.json"
PREEMPTED = 143
RELAY_POLL_S = 1.0  # how often the stage's process replays rank 0's progress


class TrainingProcessesError(errors.KubetuneError):
    """torchrun ended badly without a rank naming a cause (a rank killed, out of memory): retrying may help, so it
    keeps KubetuneError's retryable exit code 1 (not one of its own: tests/test_cli.py)."""


def run_processes(ctx, nproc_per_node: int) -> dict[str, Any]:
    """Run the fine-tune as ``nproc_per_node`` processes on this pod (and as many on each other node of a
    multi-node run); return rank 0's part of the report. Only node 0's stage process commits the artifact."""
    result_file, relay_file = ctx.work / RESULT_FILE, ctx.work / RELAY_FILE
    node = node_rank()
    if node == 0:  # node 0's files (the other nodes share the claim, and may start late or restart)
        result_file.unlink(missing_ok=True)
        relay_file.unlink(missing_ok=True)
    recipe_file = ctx.work / (RECIPE_FILE if node == 0 else f"recipe-node{node}.json")
    # the whole recipe, defaults included: the ranks compute the same fingerprint (checkpoint folder) from it
    # (resources are in no fingerprint), with parallelism: auto decided here, once for every rank
    recipe = ctx.recipe.model_dump(mode="json")
    recipe["resources"]["finetune"]["parallelism"] = chosen_parallelism(ctx.recipe, _gpu_memory_bytes())
    recipe_file.write_text(json.dumps(recipe), encoding="utf-8")
    command = torchrun_command(nproc_per_node, __name__, ["--recipe", str(recipe_file), "--out", str(ctx.out)])
    log.info("finetune: starting %d training process(es) on this node: %s", nproc_per_node, " ".join(command))
    replayed = [0]  # bytes of the relay file already replayed

    def replay() -> None:
        replayed[0] = replay_relay(relay_file, replayed[0], ctx)

    code, terminated = _run_forwarding_sigterm(command, replay)
    # node 0's rank 0 writes it; another node's stage only needs torchrun's code (the file may be a past attempt's)
    outcome = json.loads(result_file.read_text(encoding="utf-8")) if node == 0 and result_file.exists() else {}
    if terminated or code == PREEMPTED:
        # torchrun itself ends with 1 on SIGTERM, after its ranks checkpointed and exited 143 (finetune.Preemption):
        # end as a preempted stage does, and the Job's retry resumes
        raise SystemExit(PREEMPTED)
    if "error" in outcome:
        raise _rebuilt_error(outcome["error"])
    if code != 0 or (node == 0 and "report" not in outcome):
        raise TrainingProcessesError(f"finetune: torchrun ended with exit code {code} and no rank named a cause; "
                                     "the log above shows the rank that failed (out of memory, killed)")
    return outcome.get("report", {})


def chosen_parallelism(recipe, gpu_memory_bytes: int | None) -> str:
    """resources.finetune.parallelism, with auto decided: fsdp where `kubetune estimate` says that a DDP fine-tune
    (the whole model on each GPU) does not fit one of this pod's GPUs and the base can be sharded (16-bit), else
    ddp."""
    choice = recipe.resources.finetune.parallelism
    if choice != "auto":
        return choice
    if gpu_memory_bytes is None or recipe.finetune.base_precision != "none":
        return "ddp"
    from kubetune.config import recipe_from_dict
    from kubetune.estimate import estimate_recipe

    data = recipe.model_dump(mode="json") | {"stages": ["finetune"]}
    data["resources"]["finetune"]["parallelism"] = "ddp"
    try:
        ddp = estimate_recipe(recipe_from_dict(data), suggest=False).stage("finetune")
    except Exception as exc:  # noqa: BLE001 - a model the estimator cannot read: the default (ddp) stands
        log.warning("finetune: parallelism auto: no estimate (%s); using ddp", exc)
        return "ddp"
    choice = "ddp" if ddp.fits(gpu_memory_bytes) else "fsdp"
    log.info("finetune: parallelism auto → %s (estimated %.1f GiB per GPU under DDP, %.1f GiB on each GPU)",
             choice, ddp.total_bytes / 2**30, gpu_memory_bytes / 2**30)
    return choice


def _gpu_memory_bytes() -> int | None:
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def _run_forwarding_sigterm(command: list[str], tick: Callable[[], None]) -> tuple[int, bool]:
    """(torchrun's exit code, whether a SIGTERM came and was passed on to it); ``tick`` about once a second."""
    process = subprocess.Popen(command)
    terminated = []

    def forward(signum, frame):
        terminated.append(signum)
        process.send_signal(signal.SIGTERM)

    try:
        previous = signal.signal(signal.SIGTERM, forward)
    except ValueError:  # not the main thread: the embedding application handles its signals
        previous = None
    try:
        while True:
            try:
                code = process.wait(timeout=RELAY_POLL_S)
            except subprocess.TimeoutExpired:
                tick()
                continue
            tick()
            return code, bool(terminated)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Relay:
    """Rank 0's progress and training metrics as JSON lines, which the stage's process replays onto its own
    progress callback and metrics state: it serves /metrics and pushes to the Pushgateway, the ranks do not.
    Tokens are rank 0's times the processes (each trains as many rows a step)."""

    def __init__(self, path: Path, processes: int):
        self.path, self.processes = path, processes

    def _write(self, method: str, *args: Any, **kwargs: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:  # one whole line per write: the reader skips a partial one
            fh.write(json.dumps({"method": method, "args": args, "kwargs": kwargs}) + "\n")

    def progress(self, stage: str, completed: float, total: float | None, description: str) -> None:
        self._write("progress", stage, completed, total, description)

    def train_step(self, step: int, max_steps: int, tokens: int | None) -> None:
        self._write("train_step", step, max_steps, None if tokens is None else tokens * self.processes)

    def train_log(self, **values: Any) -> None:
        self._write("train_log", **values)


def replay_relay(path: Path, offset: int, ctx) -> int:
    """Call ``ctx.progress`` and ``ctx.extras["metrics"]`` for each complete line after ``offset``; the new offset."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return offset
    complete = data[:data.rfind(b"\n") + 1]
    metrics = ctx.extras.get("metrics")
    for line in complete.splitlines():
        record = json.loads(line)
        if record["method"] == "progress":
            ctx.progress(*record["args"])
        elif metrics is not None:
            getattr(metrics, record["method"])(*record["args"], **record["kwargs"])
    return offset + len(complete)


def _rebuilt_error(error: dict[str, Any]) -> errors.KubetuneError:
    """The rank's error as the same class, hence the same exit code and retry policy."""
    cls = getattr(errors, error.get("class", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.KubetuneError)):
        cls = errors.KubetuneError
    exc = cls.__new__(cls)
    Exception.__init__(exc, error.get("message", "a training process failed"))
    exc.exit_code = int(error.get("exit_code", cls.exit_code))
    return exc


def per_rank(adapter_sha256: str | None) -> list[dict[str, Any]]:
    """Each rank's peak memory (GPU: torch's peak allocation on its device; always: peak host RSS) and the hash of
    the adapter it trained (equal on every rank, or DDP did not keep them in step), gathered in rank order."""
    import resource

    import torch

    mine = {"rank": world().rank, "adapter_sha256": adapter_sha256,
            "peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [mine]
    everyone: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return everyone


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One rank of a multi-process fine-tune (started by torchrun).")
    parser.add_argument("--recipe", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[rank {world().rank}] %(levelname)s %(name)s: %(message)s")

    from kubetune.artifacts import RunLayout, write_atomic
    from kubetune.config import load_recipe
    from kubetune.stages import StageContext, finetune

    me = world()
    result_file = args.recipe.parent / RESULT_FILE
    try:
        recipe = load_recipe(args.recipe)
        _use_local_gpu(me.local_rank)
        ctx = StageContext(recipe=recipe, layout=RunLayout.from_recipe(recipe), stage="finetune", out=args.out)
        if me.main:
            relay = Relay(args.recipe.parent / RELAY_FILE, me.size)
            ctx.progress, ctx.extras["metrics"] = relay.progress, relay
        report = finetune.run(ctx)
        report["ranks"] = per_rank(report.pop("adapter_sha256", None))
    except errors.KubetuneError as exc:
        if me.main:
            write_atomic(result_file, json.dumps({"error": {"class": type(exc).__name__, "message": str(exc),
                                                            "exit_code": exc.exit_code}}))
        log.error("%s", exc)
        sys.exit(exc.exit_code)
    if me.main:
        write_atomic(result_file, json.dumps({"report": report}, default=str))
    _leave_process_group()


def _leave_process_group() -> None:
    """Close the process group before the interpreter exits, every rank together. A gloo group left open at exit
    can abort a rank while its threads are torn down ("terminate called without an active exception", exit -6,
    seen once in CI on rank 1 after its last step), and torchrun then fails the whole stage."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _use_local_gpu(local_rank: int) -> None:
    """Each rank on its own GPU: the model loads onto the current CUDA device (modelio.load_base_model)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)


if __name__ == "__main__":
    main()
