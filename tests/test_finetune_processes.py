"""The fine-tune on two processes (torchrun, gloo on the CPU), started by the stage itself as it is on a pod with
``resources.finetune.gpus: 2``: same loss curve as one process at the same global batch, the same adapter on both
ranks, rank 0 alone writing, and a kill of one rank followed by a rerun that resumes from the sealed checkpoint.

Tolerance: DDP averages the two ranks' gradients of half a batch each, which equals one process's gradient of the
whole batch up to float32 summation order; with completion-only loss the mean over a micro-batch weighs each
row by its answer tokens, so halves of unequal answer length move the mean slightly. 0.5 % of the loss per logged
step holds that with a wide margin (seen: at most 0.013 %)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tiny import tiny_recipe_dict

from kubetune.artifacts import RunLayout
from kubetune.config import recipe_from_dict
from kubetune.stages import finetune, run_stage

LOSS_TOLERANCE = 0.005  # relative, per logged step (see the module docstring)


@pytest.fixture(scope="module")
def sql_rows(tmp_path_factory) -> Path:
    rng = random.Random(1)
    rows = [{"context": "CREATE TABLE t (name VARCHAR, age INTEGER)",
             "question": f"age of {rng.choice(['ann', 'bob', 'cyd'])} {i}",
             "answer": f"SELECT age FROM t WHERE name = '{rng.choice(['ann', 'bob'])}'"} for i in range(64)]
    path = tmp_path_factory.mktemp("data") / "sql.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _recipe_dict(model_dir: Path, root: Path, data: Path, gpus: int, **finetune_settings) -> dict:
    ft = {"max_steps": 6, "batch_size": 4, "grad_accum": 1, "save_steps": 3, "logging_steps": 1,
          "learning_rate": 1e-3, "lr_scheduler": "linear", "warmup_ratio": 0.0, **finetune_settings}
    return tiny_recipe_dict(model_dir, root, data={"source": str(data), "eval_size": 8, "max_eval_examples": 4},
                            finetune=ft, resources={"finetune": {"gpus": gpus, "cpu": "2", "memory": "4Gi"}})


def _losses(stage_dir: Path) -> list[float]:
    log = json.loads((stage_dir / finetune.LOG_FILE).read_text())
    return [entry["loss"] for entry in log if "loss" in entry]


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory, sql_rows):
    return run_stage(recipe_from_dict(_recipe_dict(tiny_model_dir, tmp_path_factory.mktemp("one"), sql_rows,
                                                   gpus=0)), "finetune")


def _assert_same_curve(one, two) -> None:
    curve1, curve2 = _losses(one.path), _losses(two.path)
    assert len(curve1) == len(curve2) == 6
    for step, (a, b) in enumerate(zip(curve1, curve2), start=1):
        assert abs(a - b) <= LOSS_TOLERANCE * a, f"step {step}: one process {a:.4f}, two {b:.4f}"


@pytest.mark.multiprocess
def test_two_processes_follow_the_single_process_loss_curve(one_process, tiny_model_dir, tmp_path, sql_rows):
    """gpus: 2 → two ranks (no GPU here: gloo), each with half of each global batch of 4 rows."""
    from safetensors.torch import load_file

    one, progress = one_process, []
    two = run_stage(recipe_from_dict(_recipe_dict(tiny_model_dir, tmp_path / "two", sql_rows, gpus=2)), "finetune",
                    progress=lambda stage, done, total, text: progress.append((done, total)))

    m1, m2 = one.report["metrics"], two.report["metrics"]
    assert (m1["processes"], m2["processes"]) == (1, 2)
    assert m1["global_batch"] == m2["global_batch"] == 4
    assert m2["steps_run"] == m2["planned_steps"] == m1["planned_steps"] == 6
    assert m2["parallelism"] == "ddp"
    _assert_same_curve(one, two)
    assert progress[-1] == (6, 6) and len(progress) >= 6  # rank 0's steps, replayed by the stage's process
    assert [r["rank"] for r in two.report["ranks"]] == [0, 1]  # per-rank memory, gathered on rank 0
    assert all(r["peak_host_rss_bytes"] > 0 for r in two.report["ranks"])

    # both ranks hold the same adapter (each hashed its own trainable weights after training); rank 0 wrote it
    digests = [r["adapter_sha256"] for r in two.report["ranks"]]
    assert digests[0] == digests[1] and len(digests[0]) == 64
    saved = load_file(two.path / "adapter_model.safetensors")
    checkpoint = load_file(RunLayout.from_recipe(recipe_from_dict(two.report["recipe"])).work_dir("finetune")
                           / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors")
    assert saved.keys() == checkpoint.keys() and all(saved[k].equal(checkpoint[k]) for k in saved)




@pytest.mark.multiprocess
def test_fsdp_shards_the_same_training_and_saves_the_whole_adapter(one_process, tiny_model_dir, tmp_path, sql_rows):
    """parallelism: fsdp (FSDP2's fully_shard over 2 ranks): the same curve, and the adapter rank 0 saves holds
    every weight at its full shape, not rank 0's shard."""
    from safetensors.torch import load_file

    data = _recipe_dict(tiny_model_dir, tmp_path / "fsdp", sql_rows, gpus=2)
    data["resources"]["finetune"]["parallelism"] = "fsdp"
    two = run_stage(recipe_from_dict(data), "finetune")
    assert two.report["metrics"]["parallelism"] == "fsdp"
    _assert_same_curve(one_process, two)
    sharded, whole = (load_file(r.path / "adapter_model.safetensors") for r in (two, one_process))
    assert {k: v.shape for k, v in sharded.items()} == {k: v.shape for k, v in whole.items()}


@pytest.mark.multiprocess
def test_killed_rank_then_rerun_resumes_from_the_sealed_checkpoint(tiny_model_dir, tmp_path, sql_rows):
    """SIGKILL to one rank mid-run (an OOM kill): torchrun ends the other, the stage fails without an artifact;
    the rerun resumes from the last sealed checkpoint and ends at the planned step."""
    data = _recipe_dict(tiny_model_dir, tmp_path / "k", sql_rows, gpus=2, max_steps=16, save_steps=2)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    r = recipe_from_dict(data)
    # what `kubetune stage finetune` runs after its GPU check (which a CPU machine would fail with gpus: 2)
    stage = ("import sys; from kubetune.config import load_recipe; from kubetune.stages import run_stage; "
             "run_stage(load_recipe(sys.argv[1]), 'finetune')")
    layout = RunLayout.from_recipe(r)
    checkpoints = layout.work_dir("finetune") / "checkpoints"

    proc = subprocess.Popen([sys.executable, "-c", stage, str(recipe_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(checkpoints.glob(f"checkpoint-*/{finetune.CHECKPOINT_MARKER}")):
            assert proc.poll() is None, f"the stage ended before a checkpoint: {proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "no sealed checkpoint within 240 s"
            time.sleep(0.05)
        os.kill(_rank_pid(proc.pid, rank=1), signal.SIGKILL)  # no checkpoint on the way out: only sealed ones count
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode not in (0, None), output[-3000:]
    assert "TrainingProcessesError" in output and "torchrun ended with exit code" in output
    assert not (layout.stage_dir("finetune") / "_SUCCESS").exists()

    result = run_stage(r, "finetune")
    m = result.report["metrics"]
    assert m["resumed_from_step"] and m["resumed_from_step"] % 2 == 0
    assert m["steps_run"] == m["planned_steps"] == 16 and m["processes"] == 2


def _rank_pid(stage_pid: int, rank: int) -> int:
    """The pid of the process torchrun started for ``rank`` (its environment names it), below ``stage_pid``."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                env = dict(item.split("=", 1) for item in environ.read_bytes().decode().split("\0") if "=" in item)
            except OSError:
                continue
            if env.get("RANK") == str(rank) and env.get("TORCHELASTIC_RUN_ID") and _descends(int(environ.parent.name),
                                                                                             stage_pid):
                return int(environ.parent.name)
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} process under {stage_pid}")


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False

