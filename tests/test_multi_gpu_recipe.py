"""Several GPUs in a recipe: the fine-tune runs one process per GPU with the recipe's global batch, every other
stage refuses more than one GPU before anything is submitted, and what cannot work is said in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kubetune.cli import cli
from kubetune.config import recipe_from_dict
from kubetune.distributed import World, node_rank, split_global_batch, torchrun_command, world
from kubetune.errors import RecipeError

BASE = {"model": {"name_or_path": "some/model"}}


def problems(data: dict) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data, "r.yaml")
    assert info.value.exit_code == 3
    return info.value.problems


@pytest.mark.parametrize("batch, accum, processes, split", [
    (8, 1, 1, (8, 1)),
    (8, 4, 4, (8, 1)),   # the processes take over the accumulation steps: same micro-batch, same memory
    (8, 2, 4, (4, 1)),   # then share the micro-batch
    (8, 1, 2, (4, 1)),
    (6, 1, 4, None),     # 6 rows do not divide among 4 processes
    (3, 4, 8, None),
])
def test_global_batch_is_kept_across_processes(batch, accum, processes, split):
    assert split_global_batch(batch, accum, processes) == split
    if split:
        rows, accumulation = split
        assert rows * accumulation * processes == batch * accum


def test_four_gpus_are_four_processes_with_the_same_global_batch():
    recipe = recipe_from_dict({**BASE, "resources": {"finetune": {"gpus": 4, "nodes": 2}},
                               "finetune": {"batch_size": 4, "grad_accum": 4}})
    assert recipe.resources.finetune.processes == 8
    assert split_global_batch(4, 4, 8) == (2, 1)


@pytest.mark.parametrize("stage", ["merge", "quantize", "infer"])
def test_single_gpu_stages_refuse_more_than_one(stage):
    found = problems({**BASE, "resources": {stage: {"gpus": 4}}})
    assert found == [f"resources.{stage}.gpus: {stage} runs on one GPU (it loads the model onto a single device), "
                     "so more would sit idle; set 1, or 0 for the CPU"]


def test_a_stage_left_out_of_the_recipe_may_keep_any_gpus():
    recipe_from_dict({**BASE, "stages": ["finetune"], "resources": {"merge": {"gpus": 4}}})


@pytest.mark.parametrize("settings, field", [
    ({"resources": {"finetune": {"gpus": 4}}, "finetune": {"batch_size": 6}}, "finetune.batch_size"),
    ({"resources": {"finetune": {"gpus": 0, "nodes": 2}}}, "resources.finetune.nodes"),
    ({"resources": {"finetune": {"gpus": 2, "parallelism": "fsdp"}}, "finetune": {"base_precision": "4bit"}},
     "resources.finetune.parallelism"),
    ({"resources": {"finetune": {"multi_node": "mpijob"}}}, "resources.finetune.multi_node"),
])
def test_impossible_multi_gpu_settings_are_refused_by_field(settings, field):
    found = problems({**BASE, **settings})
    assert len(found) == 1 and found[0].startswith(field), found


def test_validate_refuses_four_gpus_for_merge_before_submit(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({**BASE, "resources": {"merge": {"gpus": 4}}}))
    result = CliRunner().invoke(cli, ["validate", str(recipe)])
    assert result.exit_code == 3
    assert "resources.merge.gpus: merge runs on one GPU" in result.output
    assert "Traceback" not in result.output


def test_world_and_node_rank_come_from_the_launchers_environment():
    assert world({}) == World(rank=0, size=1, local_rank=0) and world({}).main
    w = world({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (w.rank, w.size, w.local_rank, w.main, w.distributed) == (3, 4, 1, False, True)
    assert node_rank({"PET_NODE_RANK": "2"}) == 2 and node_rank({}) == 0


def test_torchrun_command_is_standalone_on_one_pod_and_follows_pet_on_several(monkeypatch):
    monkeypatch.delenv("PET_NNODES", raising=False)
    single = torchrun_command(4, "kubetune.stages.spread", ["--out", "x"])
    assert single[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=4", "--standalone",
                          "-m", "kubetune.stages.spread", "--out", "x"]
    monkeypatch.setenv("PET_NNODES", "2")
    assert "--standalone" not in torchrun_command(4, "m", [])
    # the arguments parse as torchrun's own (a typo in an option name would end it with exit 2)
    help_text = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    assert "--nproc-per-node" in help_text and "--standalone" in help_text


def test_a_four_gpu_finetune_starts_torchrun_with_four_processes(tiny_recipe, monkeypatch):
    """The stage entrypoint's choice, short of starting torch (no GPU here): the command it runs."""
    from kubetune.stages import _stage_function, spread

    started = []

    class FinishedTorchrun:
        def __init__(self, command):
            started.append(command)
            out = Path(command[command.index("--recipe") + 1]).parent / spread.RESULT_FILE
            out.write_text(json.dumps({"report": {"metrics": {"processes": 4}}}))

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(spread.subprocess, "Popen", FinishedTorchrun)
    recipe = tiny_recipe(resources={"finetune": {"gpus": 4, "cpu": "2", "memory": "4Gi"}})
    from kubetune.artifacts import RunLayout
    from kubetune.stages import StageContext

    layout = RunLayout.from_recipe(recipe)
    ctx = StageContext(recipe=recipe, layout=layout, stage="finetune", out=layout.new_temp_dir("finetune"))
    assert _stage_function(recipe, "finetune")(ctx) == {"metrics": {"processes": 4}}
    assert "--nproc-per-node=4" in started[0]
    assert started[0][started[0].index("-m", 3) + 1] == "kubetune.stages.spread"
    single = tiny_recipe()
    assert _stage_function(single, "finetune").__module__ == "kubetune.stages.finetune"


def test_the_estimate_is_per_gpu_with_the_micro_batch_and_the_parallelism():
    """bloom-7b1 LoRA on a bf16 base, global batch 8: on 4 GPUs each process trains 2 rows; DDP keeps the whole
    model per GPU (plus its gradient buckets), FSDP a quarter of it (plus the layers it gathers)."""
    from kubetune.estimate import estimate_recipe

    config = Path(__file__).parent.parent / "bench" / "configs" / "bigscience--bloom-7b1.json"
    settings = ["finetune.base_precision=none", "finetune.batch_size=8", "finetune.grad_accum=1",
                "finetune.gradient_checkpointing=true"]

    def finetune_estimate(*more):
        from kubetune.config import load_recipe

        recipe = load_recipe(Path(__file__).parent.parent / "jobs" / "bloom-7b1-qlora.yaml", [*settings, *more])
        return estimate_recipe(recipe, model_config=config, suggest=False).stage("finetune")

    one = finetune_estimate()
    ddp = finetune_estimate("resources.finetune.gpus=4", "resources.finetune.parallelism=ddp")
    fsdp = finetune_estimate("resources.finetune.gpus=4", "resources.finetune.parallelism=fsdp")
    parts = {name: {c.name.split(" (")[0]: c.bytes for c in e.components} for name, e in
             (("one", one), ("ddp", ddp), ("fsdp", fsdp))}
    assert (one.settings["batch_size"], ddp.settings["batch_size"]) == (8, 2)
    assert ddp.settings["processes"] == 4
    assert parts["ddp"]["base weights"] == parts["one"]["base weights"]
    assert parts["ddp"]["DDP gradient buckets"] == parts["one"]["LoRA gradients"]
    assert parts["fsdp"]["base weights"] == -(-parts["one"]["base weights"] // 4)
    assert parts["fsdp"]["FSDP gathered layers"] == 2 * (parts["one"]["base weights"] // 30)  # 30 layers
    assert parts["ddp"]["activations"] < parts["one"]["activations"]  # a quarter of the rows per process
    assert fsdp.total_bytes < ddp.total_bytes < one.total_bytes


@pytest.mark.parametrize("outcome, code, expected, exit_code", [
    ({"error": {"class": "DataError", "message": "data.source: no rows", "exit_code": 4}}, 1, "data.source: no rows",
     4),
    ({}, 1, "torchrun ended with exit code 1 and no rank named a cause", 1),
])
def test_a_ranks_error_keeps_its_exit_code_through_torchrun(tiny_recipe, monkeypatch, outcome, code, expected,
                                                             exit_code):
    """torchrun ends with 1 whatever failed; rank 0's own error (written next to the recipe) is raised instead,
    so the Job's podFailurePolicy still sees a permanent 4 for bad data, and a retryable 1 otherwise."""
    from kubetune.artifacts import RunLayout
    from kubetune.errors import KubetuneError
    from kubetune.stages import StageContext, spread

    class FailedTorchrun:
        def __init__(self, command):
            if outcome:
                result = Path(command[command.index("--recipe") + 1]).parent / spread.RESULT_FILE
                result.write_text(json.dumps(outcome))

        def wait(self, timeout=None):
            return code

    monkeypatch.setattr(spread.subprocess, "Popen", FailedTorchrun)
    recipe = tiny_recipe(resources={"finetune": {"gpus": 2, "cpu": "2", "memory": "4Gi"}})
    layout = RunLayout.from_recipe(recipe)
    ctx = StageContext(recipe=recipe, layout=layout, stage="finetune", out=layout.new_temp_dir("finetune"))
    with pytest.raises(KubetuneError) as info:
        spread.run_processes(ctx, 2)
    assert expected in str(info.value) and info.value.exit_code == exit_code
    assert type(info.value).__name__ == ("DataError" if exit_code == 4 else "TrainingProcessesError")


def test_sigterm_is_passed_to_torchrun_and_ends_the_stage_as_preempted(tiny_recipe, monkeypatch):
    """The pod's SIGTERM reaches the stage's process (PID 1); torchrun gets it, lets its ranks checkpoint, and
    itself exits 1: the stage still ends with 143, a preemption the Job retries without counting it."""
    import os
    import signal

    from kubetune.artifacts import RunLayout
    from kubetune.stages import StageContext, spread

    passed_on = []

    class Torchrun:
        def __init__(self, command):
            pass

        def send_signal(self, signum):
            passed_on.append(signum)

        def wait(self, timeout=None):
            os.kill(os.getpid(), signal.SIGTERM)  # the kubelet, while training runs
            return 1  # what torchrun exits with after a SIGTERM (SignalException)

    monkeypatch.setattr(spread.subprocess, "Popen", Torchrun)
    recipe = tiny_recipe(resources={"finetune": {"gpus": 2, "cpu": "2", "memory": "4Gi"}})
    layout = RunLayout.from_recipe(recipe)
    ctx = StageContext(recipe=recipe, layout=layout, stage="finetune", out=layout.new_temp_dir("finetune"))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info:
        spread.run_processes(ctx, 2)
    assert info.value.code == 143 and passed_on == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) == before  # the stage's own handler is back


def test_rank_zeros_progress_and_metrics_are_replayed_in_the_stage_process(tmp_path):
    """The ranks cannot serve /metrics (the stage's process does): rank 0 writes what its trainer callbacks
    report, the stage's process replays it onto its own StageState and progress callback, line by whole line."""
    from types import SimpleNamespace

    from kubetune.metrics.state import StageState
    from kubetune.stages.spread import Relay, replay_relay

    path = tmp_path / "relay.jsonl"
    seen, state = [], StageState(labels={"run": "r", "stage": "finetune"})
    ctx = SimpleNamespace(progress=lambda *args: seen.append(args), extras={"metrics": state})
    relay = Relay(path, processes=4)
    relay.train_step(3, 10, 1000)
    relay.train_log(loss=1.5, learning_rate=1e-4)
    relay.progress("finetune", 3, 10, "loss 1.500")
    with open(path, "a") as fh:
        fh.write('{"method": "progress", "args": ["finetune", 4')  # rank 0 still writing this line
    offset = replay_relay(path, 0, ctx)
    assert seen == [("finetune", 3, 10, "loss 1.500")]
    assert (state.train.completed_steps, state.train.planned_steps, state.train.tokens) == (3, 10, 4000)
    assert (state.train.loss, state.train.learning_rate) == (1.5, 1e-4)
    assert replay_relay(path, offset, ctx) == offset and len(seen) == 1  # the partial line waits for its end


def test_a_pod_other_than_node_0_trains_without_the_lock_or_the_artifact(tiny_recipe, monkeypatch):
    """Node 1 of a multi-node fine-tune: its ranks train, node 0 commits; this pod takes no lock (node 0 holds
    it) and leaves the artifact layout as it found it."""
    from kubetune.artifacts import RunLayout
    from kubetune.stages import run_stage, spread

    started = []

    class Torchrun:
        def __init__(self, command):
            started.append(command)

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(spread.subprocess, "Popen", Torchrun)
    monkeypatch.setenv("PET_NODE_RANK", "1")
    monkeypatch.setenv("PET_NNODES", "2")
    recipe = tiny_recipe(resources={"finetune": {"gpus": 2, "nodes": 2, "cpu": "2", "memory": "4Gi"}})
    layout = RunLayout.from_recipe(recipe)
    node_0_result = layout.work_dir("finetune") / spread.RESULT_FILE
    node_0_result.parent.mkdir(parents=True)
    node_0_result.write_text("{}")  # node 0's rank 0 may be writing its files on the shared claim
    with layout.lock("finetune"):  # node 0 holds it
        result = run_stage(recipe, "finetune")
    assert node_0_result.read_text() == "{}"
    assert result.report == {"node_rank": 1} and "--standalone" not in started[0]
    assert "--nproc-per-node=2" in started[0]
    assert layout.marker("finetune") is None and not layout.stage_dir("finetune").exists()


def test_auto_parallelism_is_fsdp_only_where_ddp_would_not_fit_a_gpu(tiny_recipe):
    """The stage decides auto once, from the estimate of a DDP fine-tune on this pod's GPU (the tiny model needs
    a few MiB: a 1 MiB card is too small, an 80 GiB one is not); a 4-bit base stays on DDP (FSDP cannot shard it)."""
    from kubetune.stages.spread import chosen_parallelism

    two = {"finetune": {"gpus": 2, "cpu": "2", "memory": "4Gi"}}
    recipe = tiny_recipe(resources=two)
    assert chosen_parallelism(recipe, 80 * 2**30) == "ddp"
    assert chosen_parallelism(recipe, 2**20) == "fsdp"
    assert chosen_parallelism(recipe, None) == "ddp"  # no GPU: nothing to fit
    assert chosen_parallelism(tiny_recipe(resources=two, finetune={"base_precision": "4bit"}), 2**20) == "ddp"
    chosen = tiny_recipe(resources={"finetune": {**two["finetune"], "parallelism": "ddp"}})
    assert chosen_parallelism(chosen, 2**20) == "ddp"  # a choice in the recipe stands
