"""Fault injection: kill a stage pod's process at 20 seeded random points of finetune, merge and quantize, rerun
the pipeline after each kill, and prove that nothing is lost and the results are those of an uninterrupted run.

Each fault starts ``kubetune -vv stage NAME`` (what a stage Job's pod runs) on the tiny model, waits for the
stage's first progress report (the work has begun: the imports are done), sleeps a seeded fraction of the time
that stage took in the uninterrupted run, and then

- SIGKILL: kills the whole process group, as the OOM killer or a lost node does;
- SIGTERM: signals the main process, as the kubelet does on an eviction, then waits up to the
  ``terminationGracePeriodSeconds`` that the rendered Job gives the pod before it SIGKILLs the group.

Then the pipeline is run again (the same ``run_stage`` that ``kubetune run`` and every pod call) and checked:
finished artifacts upstream are byte-identical; no stage was marked done with partial output; a fine-tune resumes
from its newest *sealed* checkpoint (a SIGTERM'd one from the checkpoint written at the step it stopped, exit 143);
the adapter, the merged and the quantized weights, every prediction and metrics.json equal the uninterrupted run.

Run it with ``make test-faults`` (about 12 minutes on 2 cores). With KUBETUNE_RELIABILITY_DOC=docs/reliability.md
it rewrites that file's fault table with what this run measured (``make reliability``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
import yaml

from kubetune.artifacts import SUCCESS_MARKER, RunLayout
from kubetune.config import recipe_from_dict
from kubetune.k8s.render import stage_job
from kubetune.stages import finetune, run_stage
from tiny import tiny_recipe_dict

SEED = 20261128
FAULTS = 20
KILLED_STAGES = {"finetune": 8, "merge": 6, "quantize": 6}  # how many of the 20 faults hit each stage
KUBETUNE = Path(sys.executable).parent / "kubetune"
ANCHOR = "kubetune.progress"  # the first progress line of a stage (logged at -vv): its work has begun
COMMITTED = re.compile(r"kubetune: stage \w+ done in")  # the stage's log line after its artifact is final
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Fault:
    index: int
    stage: str
    signal: str  # "SIGKILL" or "SIGTERM"
    fraction: float  # of the stage's uninterrupted duration, after its first progress report
    delay_s: float = 0.0
    returncode: int | None = None
    seen: str = ""  # what the kill left on the volume, before the rerun
    resumed_from_step: int | None = None
    problems: list[str] = field(default_factory=list)
    rerun_s: float = 0.0
    redrawn: int = 0  # kills that came after the process had ended (it ran faster than in the baseline)
    weight_diff: float | None = None  # largest |difference| of any adapter/merged/quantized weight vs the baseline

    @property
    def survived(self) -> bool:
        return not self.problems


def plan(seed: int = SEED) -> list[Fault]:
    """20 faults: each stage gets its share, half SIGKILL and half SIGTERM, in a seeded order at seeded points."""
    rng = random.Random(seed)
    faults = []
    for stage, n in KILLED_STAGES.items():
        faults += [(stage, "SIGKILL" if i % 2 == 0 else "SIGTERM") for i in range(n)]
    rng.shuffle(faults)
    return [Fault(i + 1, stage, sig, round(rng.uniform(0.02, 0.98), 3)) for i, (stage, sig) in enumerate(faults)]


def test_plan_is_seeded_and_spread():
    faults = plan()
    assert len(faults) == FAULTS and plan() == faults and plan(SEED + 1) != faults
    for stage, n in KILLED_STAGES.items():
        mine = [f for f in faults if f.stage == stage]
        assert len(mine) == n and {f.signal for f in mine} == {"SIGKILL", "SIGTERM"}
    assert min(f.fraction for f in faults) < 0.25 and max(f.fraction for f in faults) > 0.75


# ---- running a stage as a pod would ----------------------------------------------------------------------------
class StageProcess:
    """``kubetune -vv stage NAME`` in its own process group, with its output timestamped line by line."""

    def __init__(self, stage: str, recipe_file: Path):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([str(KUBETUNE), "-vv", "stage", stage, "--recipe", str(recipe_file)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.anchor_at: float | None = None
        self.committed_at: float | None = None  # when the stage logged its commit ("stage NAME done in …")
        self.anchored = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if self.anchor_at is None and ANCHOR in line:
                self.anchor_at = time.monotonic()
                self.anchored.set()
            if self.committed_at is None and COMMITTED.search(line):
                self.committed_at = time.monotonic()
        self.anchored.set()  # ended without reporting progress: nothing to wait for

    def wait_anchor(self, timeout: float = 600) -> None:
        assert self.anchored.wait(timeout), f"no progress report within {timeout} s:\n{self.tail()}"

    def signal(self, name: str, grace_s: float) -> bool:
        """Send the signal; False if the process had already ended (nothing was injected)."""
        if self.proc.poll() is not None:
            return False
        if name == "SIGKILL":
            os.killpg(self.proc.pid, signal.SIGKILL)
            return True
        self.proc.send_signal(signal.SIGTERM)  # the kubelet signals the container's main process
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:  # the grace period is over: the kubelet kills everything
            os.killpg(self.proc.pid, signal.SIGKILL)
        return True

    def finish(self, timeout: float = 600) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        with_children_gone(self.proc.pid)
        return rc

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])


def with_children_gone(pgid: int) -> None:
    """A pod's containers die whole: leave no process of the group behind (GPTQModel starts helpers)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---- what is compared --------------------------------------------------------------------------------------------
def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update({f"{file.name}:{k}": v for k, v in load_file(file).items()})
    return out


def max_difference(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max((float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0) for k in a)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def results_of(run_dir: Path) -> dict[str, str]:
    """Everything the evaluation produced, as text: metrics.json, every prediction and every outcome."""
    files = [run_dir / "evaluate" / "metrics.json", *sorted((run_dir / "infer").glob("predictions-*.jsonl")),
             *sorted((run_dir / "evaluate").glob("outcomes-*.jsonl"))]
    return {f.name: f.read_text() for f in files}


def sealed_steps(run_dir: Path) -> list[int]:
    folder = run_dir / ".work" / "finetune" / "checkpoints"
    return sorted(finetune.checkpoint_step(p) for p in folder.glob("checkpoint-*")
                  if finetune.checkpoint_problem(p) is None)


def describe(fault: Fault, run_dir: Path) -> str:
    """What the kill left behind, in words (for the report)."""
    stage_dir = run_dir / fault.stage
    if (stage_dir / SUCCESS_MARKER).exists():
        return "after the commit: artifact complete"
    tmp = [p for p in (run_dir / ".tmp").glob(f"{fault.stage}-*") if p.is_dir()]
    written = sorted(p.name for t in tmp for p in t.iterdir())
    if fault.stage == "finetune":
        folder = run_dir / ".work" / "finetune" / "checkpoints"
        all_steps = sorted(finetune.checkpoint_step(p) for p in folder.glob("checkpoint-*"))
        sealed = sealed_steps(run_dir)
        text = f"checkpoints sealed {sealed or 'none'}"
        if set(all_steps) - set(sealed):
            text += f", unsealed {sorted(set(all_steps) - set(sealed))}"
        return text + (", artifact half-written" if written else "")
    if stage_dir.exists():
        return "between the rename and _SUCCESS"
    return f"output half-written ({', '.join(written)})" if written else "before any output"


FAULT_MAX_STEPS = 12


# ---- the suite -----------------------------------------------------------------------------------------------------
def fault_recipe(model_dir: Path, artifacts: Path) -> dict:
    # 12 steps with a checkpoint every 4: kills land before, between and after checkpoints (save_total_limit 2)
    return tiny_recipe_dict(model_dir, artifacts, finetune={"max_steps": FAULT_MAX_STEPS, "save_steps": 4,
                                                           "save_total_limit": 2})


def write_recipe(data: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.faults
@pytest.mark.timeout(2400)
def test_faults_survived(tiny_model_dir, tmp_path):
    started = time.monotonic()
    base_data = fault_recipe(tiny_model_dir, tmp_path / "baseline")
    base_file = write_recipe(base_data, tmp_path / "baseline.yaml")
    recipe = recipe_from_dict(base_data)
    in_pod = recipe_from_dict({**base_data, "run": {"name": "tiny"}})  # artifacts on the claim, as in a cluster
    grace_s = stage_job(in_pod, "finetune", "ml")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace_s == recipe.kubernetes.termination_grace_s

    # The uninterrupted run: the killed stages as pods would run them (timing each one's work), the rest here.
    base_dir = RunLayout.from_recipe(recipe).run_dir
    work_s = {}
    for stage in KILLED_STAGES:
        proc = StageProcess(stage, base_file)
        proc.wait_anchor()
        assert proc.finish() == 0, proc.tail()
        # Up to the commit, not the process's end: the interpreter's exit (torch, GPTQModel's helpers) takes longer
        # than the tiny stage's work, and kills drawn over it would nearly all land after the commit.
        work_s[stage] = (proc.committed_at or time.monotonic()) - proc.anchor_at
    for stage in ("infer", "evaluate"):
        run_stage(recipe, stage)
    baseline = {"adapter": tensors(base_dir / "finetune"), "merged": tensors(base_dir / "merge"),
                "quantized": tensors(base_dir / "quantize"), "results": results_of(base_dir),
                "digests": {s: digest(base_dir / s) for s in KILLED_STAGES},
                "files": {s: sorted(p.name for p in (base_dir / s).iterdir()) for s in KILLED_STAGES}}
    baseline_s = time.monotonic() - started

    faults = plan()
    order = list(recipe.stages)
    for fault in faults:
        data = fault_recipe(tiny_model_dir, tmp_path / f"fault-{fault.index:02d}")
        run_dir = RunLayout.from_recipe(recipe_from_dict(data)).run_dir
        upstream = order[:order.index(fault.stage)]
        recipe_file = write_recipe(data, tmp_path / f"fault-{fault.index:02d}.yaml")
        while True:
            shutil.rmtree(run_dir, ignore_errors=True)
            for stage in upstream:  # finished stages as the pipeline left them before this stage's pod started
                shutil.copytree(base_dir / stage, run_dir / stage)
            proc = StageProcess(fault.stage, recipe_file)
            proc.wait_anchor()
            fault.delay_s = round(fault.fraction * work_s[fault.stage], 3)
            time.sleep(max(0.0, proc.anchor_at + fault.delay_s - time.monotonic()))
            injected = proc.signal(fault.signal, grace_s)
            fault.returncode = rc = proc.finish()
            if injected:
                break
            # The stage ended before the kill (it ran faster than in the baseline): draw an earlier point, seeded.
            fault.redrawn += 1
            assert fault.redrawn <= 3, f"fault {fault.index}: the stage always ended before the kill"
            fault.fraction = round(random.Random(f"{SEED}-{fault.index}-{fault.redrawn}").uniform(0.02, 0.5), 3)
        fault.seen = describe(fault, run_dir)
        sealed_before = sealed_steps(run_dir)
        check_kill(fault, rc, run_dir, proc, baseline["files"], sealed_before)

        t0 = time.monotonic()
        r = recipe_from_dict(data)
        results = {stage: run_stage(r, stage) for stage in order}  # the rerun: done stages are skipped
        fault.rerun_s = round(time.monotonic() - t0, 1)
        if fault.stage == "finetune" and results["finetune"].status == "done":
            fault.resumed_from_step = results["finetune"].report["metrics"]["resumed_from_step"]
            expected = sealed_before[-1] if sealed_before else None
            if fault.resumed_from_step != expected:
                fault.problems.append(f"resumed from step {fault.resumed_from_step}, newest sealed was {expected}")
        check_rerun(fault, run_dir, upstream, baseline)
        print(f"fault {fault.index:2d} {fault.stage:8s} {fault.signal} +{fault.delay_s:5.2f}s rc={rc} "
              f"redrawn={fault.redrawn} "
              f"[{fault.seen}] resumed={fault.resumed_from_step} rerun {fault.rerun_s}s Δ={fault.weight_diff} "
              f"{'ok' if fault.survived else fault.problems}", flush=True)
        shutil.rmtree(run_dir.parent, ignore_errors=True)

    survived = sum(f.survived for f in faults)
    summary = {"seed": SEED, "faults": len(faults), "survived": survived, "grace_s": grace_s,
               "work_s": {k: round(v, 2) for k, v in work_s.items()}, "baseline_s": round(baseline_s, 1),
               "total_s": round(time.monotonic() - started, 1), "details": [asdict(f) for f in faults]}
    (tmp_path / "faults.json").write_text(json.dumps(summary, indent=1))
    if os.environ.get("KUBETUNE_RELIABILITY_DOC"):
        write_report(Path(os.environ["KUBETUNE_RELIABILITY_DOC"]), summary, faults)
    assert survived == len(faults), [(f.index, f.stage, f.signal, f.problems) for f in faults if f.problems]


def check_kill(fault: Fault, rc: int, run_dir: Path, proc: StageProcess, files: dict, sealed: list[int]) -> None:
    """Right after the kill, before any rerun: the exit was the signal's (or the stage's own 143, or it was done
    already), and a stage with _SUCCESS holds its whole artifact."""
    done = (run_dir / fault.stage / SUCCESS_MARKER).exists()
    if done and sorted(p.name for p in (run_dir / fault.stage).iterdir()) != files[fault.stage]:
        fault.problems.append(f"marked done with files {sorted(p.name for p in (run_dir / fault.stage).iterdir())}")
    allowed = {0} if done else set()
    if fault.signal == "SIGKILL":
        allowed.add(-signal.SIGKILL)
    else:
        # `kubetune stage` ends with 143 on SIGTERM, as the default action would, also as a container's PID 1 (which
        # ignores signals it has no handler for); during training the fine-tune checkpoints first, then 143. A
        # library that puts SIGTERM back to its default (seen once in quantize) gives the default action's -15,
        # which the kubelet also reports as 143.
        allowed |= {143, -signal.SIGTERM}
    if rc not in allowed:
        fault.problems.append(f"exit code {rc}, expected one of {sorted(allowed)}: {proc.tail(5)}")
    if fault.stage == "finetune" and rc == 143:
        stopped = [int(m.group(1)) for line in proc.lines if (m := re.search(r"stopped by SIGTERM at step (\d+)", line))]
        # During training the fine-tune's own handler checkpoints the step it stopped at. After the last step (its
        # checkpoint sealed) the stage's handler is back and ends with 143 at once: nothing to checkpoint.
        after_training = not stopped and sealed and sealed[-1] == FAULT_MAX_STEPS
        if not after_training and (not stopped or not sealed or sealed[-1] != stopped[-1]):
            fault.problems.append(f"SIGTERM at step {stopped} left sealed checkpoints {sealed}")


def check_rerun(fault: Fault, run_dir: Path, upstream: list[str], baseline: dict) -> None:
    for stage in upstream:
        if digest(run_dir / stage) != baseline["digests"][stage]:
            fault.problems.append(f"finished stage {stage} changed")
    fault.weight_diff = 0.0
    for name, stage, tolerance in (("adapter", "finetune", 1e-6), ("merged", "merge", 1e-6),
                                   ("quantized", "quantize", 0.0)):
        diff = max_difference(tensors(run_dir / stage), baseline[name])
        fault.weight_diff = max(fault.weight_diff, diff)
        if not diff <= tolerance:
            fault.problems.append(f"{name} weights differ from the uninterrupted run by {diff:.3g}")
    mine = results_of(run_dir)
    different = sorted(k for k in baseline["results"] if mine.get(k) != baseline["results"][k])
    if different:
        fault.problems.append(f"evaluation differs from the uninterrupted run: {different}")


# ---- the report ----------------------------------------------------------------------------------------------------
BEGIN, END = "<!-- faults:begin (written by tests/test_faults.py) -->", "<!-- faults:end -->"


def write_report(doc: Path, summary: dict, faults: list[Fault]) -> None:
    lines = [BEGIN, "",
             f"**{summary['survived']}/{summary['faults']} faults survived** (seed {summary['seed']}; grace period "
             f"{summary['grace_s']} s; whole suite {summary['total_s'] / 60:.1f} min on this machine, of which the "
             f"uninterrupted baseline {summary['baseline_s']:.0f} s). Stage work from the first progress report to the commit, "
             "uninterrupted: " + ", ".join(f"{k} {v:.1f} s" for k, v in summary["work_s"].items()) + ".", "",
             "| # | stage | signal | kill at | exit | what the kill left | resumed from step | rerun | max weight Δ | "
             "result |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    redrawn = sum(f.redrawn for f in faults)
    for f in faults:
        lines.append(f"| {f.index} | {f.stage} | {f.signal} | +{f.delay_s:.2f} s | {f.returncode} | {f.seen} | "
                     f"{'–' if f.stage != 'finetune' else f.resumed_from_step if f.resumed_from_step is not None else 'start'} | "
                     f"{f.rerun_s:.0f} s | {f.weight_diff:.3g} | {'survived' if f.survived else '; '.join(f.problems)} |")
    lines += ["", f"`kill at`: seconds after the stage's first progress report. {redrawn} drawn point(s) came after "
              "the stage had already ended (it ran faster than in the baseline) and were drawn again, earlier, from "
              "the same seed: every fault in the table hit a running process.", "", END]
    text = doc.read_text(encoding="utf-8") if doc.exists() else f"{BEGIN}\n{END}\n"
    start, end = text.index(BEGIN), text.index(END) + len(END)
    doc.write_text(text[:start] + "\n".join(lines) + text[end:], encoding="utf-8")


# ---- the windows a random kill rarely hits on a tiny model, hit on purpose (fast; part of `make test`) -------------
def _trainer_files(path: Path, step: int) -> Path:
    path.mkdir(parents=True)
    for name in finetune.CHECKPOINT_FILES:
        if name != finetune.CHECKPOINT_MARKER:
            content = json.dumps({"global_step": step, "max_steps": 12}) if name == "trainer_state.json" else "x" * 64
            (path / name).write_text(content)
    return path


def test_a_checkpoint_counts_only_once_sealed_and_unchanged(tmp_path):
    layout = RunLayout(tmp_path, "r")
    folder = layout.work_dir("finetune") / "checkpoints"
    old = _trainer_files(folder / "checkpoint-4", 4)
    finetune.seal_checkpoint(old)
    assert finetune.checkpoint_problem(old) is None
    marker = json.loads((old / finetune.CHECKPOINT_MARKER).read_text())
    assert marker["step"] == 4 and marker["files"]["optimizer.pt"] == 64
    assert not list(old.glob(".*.tmp"))  # the marker went through a temporary file and a rename

    unsealed = _trainer_files(folder / "checkpoint-8", 8)  # killed after the trainer's save, before the seal
    assert "missing kubetune-checkpoint.json" in finetune.checkpoint_problem(unsealed)
    torn = _trainer_files(folder / "checkpoint-12", 12)  # sealed, then a file lost its tail (a node crash)
    finetune.seal_checkpoint(torn)
    (torn / "optimizer.pt").write_text("x" * 10)
    assert "optimizer.pt changed size" in finetune.checkpoint_problem(torn)

    assert finetune.latest_complete_checkpoint(folder, layout) == old
    assert sorted(p.name.rsplit("-", 2)[0] for p in (layout.run_dir / ".trash").iterdir()) == [
        "checkpoint-12", "checkpoint-8"]  # moved aside, not deleted


def test_sigterm_sets_a_flag_only_while_training():
    preemption = finetune.Preemption()
    before = signal.getsignal(signal.SIGTERM)
    with preemption:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between two bytecodes of the main thread
        assert preemption.requested
    assert signal.getsignal(signal.SIGTERM) is before
