"""The pod path on the GPU: a recipe submitted as a user submits it, every rendered Job executed as a pod.

    python bench/pod_path.py pods --model DIR --data FILE --out DIR [--set key=value ...]
    python bench/pod_path.py run  --model DIR --data FILE --out DIR [--set key=value ...]
    python bench/pod_path.py table pods.json run.json --name NAME      # here: the JSON + markdown in results/

``pods``: the fake API server (tests/k8s/fakeapi.py) and the pod runner (tests/k8s/podrunner.py) on this machine;
``kubetune submit RECIPE`` (default jobs/gemma3-270m-text2sql.yaml) creates the claim, the recipe ConfigMap and the
driver Job; the runner executes the driver pod (the real ``kubetune drive``), which creates each stage Job in turn,
and each stage pod (``kubetune stage NAME``) runs as a fresh process in its own namespaces as the image's user
1001:0 with the pod's fsGroup, on a root-owned claim folder holding the model and the data set (what a user's
``kubetune stage-in`` or a fetch would leave there). ``run``: ``kubetune run`` of the same recipe in one process,
the path the bench used so far. Both write ``<mode>.json`` into --out: per stage the pod's (or stage's) wall time and
the stage's own report.json (duration, peak memory), the evaluate metrics, the card, versions and the command.

Run both in one device call, pods first, so the figures come from one card in one lease (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
RECIPE = ROOT / "jobs" / "gemma3-270m-text2sql.yaml"
MODEL_ON_CLAIM = ".cache/models/gemma-3-270m"
DATA_ON_CLAIM = "data/wikisql_train.jsonl"


def environment(commit: str | None) -> dict:
    """bench/harness.py's record, without initialising CUDA here: this process must hold no context beside the pods'.
    --commit stands for git's answer on a machine that got the tree without .git."""
    from harness import environment as harness_environment

    if commit:
        os.environ.setdefault("BENCH_COMMIT", commit)
    return harness_environment(cuda=False)


def kubetune_launcher(folder: Path) -> Path:
    """The image's entrypoint for this machine: `kubetune` with this interpreter and this checkout (the GPU
    machine's image has no console script, and a pod's environment carries no PYTHONPATH of ours). Neither it nor
    the packages it names may live under /tmp, which is private to each pod."""
    folder.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(p for p in sys.path if p and Path(p).is_dir())
    script = folder / "kubetune"
    script.write_text("#!/bin/sh\n"
                      f"PYTHONPATH='{path}' exec '{sys.executable}' -c "
                      "'import sys; from kubetune.cli import main; sys.argv[0] = \"kubetune\"; main()' \"$@\"\n")
    script.chmod(0o755)
    return folder


def stage_reports(artifacts: Path, stages: list[str]) -> dict:
    out = {}
    for stage in stages:
        report = artifacts / stage / "report.json"
        out[stage] = json.loads(report.read_text()) if report.exists() else None
    return out


def slim(report: dict | None) -> dict | None:
    if report is None:
        return None
    keep = ("duration_s", "peak_memory", "versions", "fingerprint", "metrics", "throughput", "train_loss",
            "resumed_from_step", "block_update", "models")
    return {k: report[k] for k in keep if k in report}


def lay_out_inputs(args, folder: Path, *extra_sets: str):
    """The model and the data set where the recipe finds them, relative to ``folder`` (the claim, or the folder
    `kubetune run` runs in); returns (recipe, its --set overrides). ``args.recipe`` becomes absolute, since the
    commands run inside ``folder``."""
    from kubetune.config import load_recipe

    shutil.rmtree(Path(args.work), ignore_errors=True)
    shutil.copytree(args.model, folder / MODEL_ON_CLAIM)
    (folder / DATA_ON_CLAIM).parent.mkdir(parents=True)
    shutil.copy(args.data, folder / DATA_ON_CLAIM)
    args.recipe = str(Path(args.recipe).resolve())
    sets = [f"data.source={DATA_ON_CLAIM}", *extra_sets, *args.set]
    return load_recipe(args.recipe, sets), sets


def cmd_pods(args) -> dict:
    from k8s.executor import HostExecutor
    from k8s.fakeapi import FakeCluster
    from k8s.podrunner import PodRunner

    work = Path(args.work)
    claim = work / "claim"
    # The host executor runs this checkout, not an image: any name but the unpublished default (exit 15) will do.
    recipe, sets = lay_out_inputs(args, claim, "kubernetes.driver.poll_s=2",
                                  "kubernetes.image=localhost/kubetune:this-checkout")
    for path in [claim, *claim.rglob("*")]:  # as a fresh volume: root's, not the pods' user's
        os.chown(path, 0, 0)
    claim.chmod(0o755)
    bin_dir = kubetune_launcher(ROOT / ".cache" / "pod-path-bin")  # not under /tmp: a pod's /tmp is its own
    started = time.monotonic()
    with FakeCluster("bench") as fake, PodRunner(fake, work / "node", claims={f"{recipe.run.name}-data": claim},
                                                 executor=HostExecutor(bin_dir), poll_s=0.5) as runner:
        kubeconfig = fake.kubeconfig(work / "kubeconfig", namespace="bench")
        env = dict(os.environ, KUBECONFIG=str(kubeconfig))
        cli = [str(bin_dir / "kubetune")]
        submit = subprocess.run(cli + ["submit", str(args.recipe)] + [a for s in sets for a in ("--set", s)],
                                capture_output=True, text=True, env=env, cwd=claim)
        print(submit.stdout + submit.stderr, flush=True)
        driver = f"{recipe.run.name}-driver"
        state = None
        while time.monotonic() - started < args.budget_s:
            job = fake.objects("Job").get(driver) or {}
            conds = [c["type"] for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
            if conds:
                state = conds[0]
                break
            time.sleep(2)
        status = subprocess.run(cli + ["status", recipe.run.name], capture_output=True, text=True, env=env).stdout
        print(status, flush=True)
        pods = {}
        for name, run in runner.runs.items():
            pods[name] = {"job": run.job, "wall_s": run.wall_s, "exit_code": run.process.poll() if run.process else None}
            if run.job.endswith(("finetune", "driver")):  # at most 8 files come back from a device call
                shutil.copy(run.log, Path(args.out) / f"pod-{run.job}.log")
        errors = list(runner.errors)
    artifacts = claim / recipe.run.artifacts_root / recipe.run.name
    return {"mode": "pods", "driver": state, "status": status, "pods": pods, "runner_errors": errors,
            "total_s": round(time.monotonic() - started, 1), "reports": {
                k: slim(v) for k, v in stage_reports(artifacts, list(recipe.stages)).items()}}


def cmd_run(args) -> dict:
    folder = Path(args.work) / "local"
    recipe, sets = lay_out_inputs(args, folder)
    bin_dir = kubetune_launcher(ROOT / ".cache" / "pod-path-bin")
    started = time.monotonic()
    proc = subprocess.run([str(bin_dir / "kubetune"), "run", str(args.recipe)] + [a for s in sets for a in ("--set", s)],
                          cwd=folder, capture_output=True, text=True)
    (Path(args.out) / "run.log").write_text(proc.stdout + proc.stderr)
    artifacts = folder / recipe.run.artifacts_root / recipe.run.name
    return {"mode": "run", "exit_code": proc.returncode, "total_s": round(time.monotonic() - started, 1),
            "reports": {k: slim(v) for k, v in stage_reports(artifacts, list(recipe.stages)).items()}}


def _gib(n) -> str:
    return "—" if n is None else f"{n / 2**30:.2f}"


def _accuracy(reports: dict) -> dict:
    metrics = ((reports.get("evaluate") or {}).get("metrics") or {})
    return {m: v.get("execution_accuracy") for m, v in metrics.items() if isinstance(v, dict)}


def cmd_table(args) -> None:
    pods, run = (json.loads(Path(p).read_text()) for p in (args.pods, args.run))
    rows = ["| stage | pod wall s | pod stage s | `kubetune run` stage s | pod peak alloc GiB | run peak alloc GiB "
            "| pod NVML GiB | run NVML GiB |", "|---|---|---|---|---|---|---|---|"]
    walls = {}
    for p in pods["pods"].values():
        walls[p["job"]] = p["wall_s"]
    for stage, rp in pods["reports"].items():
        rr = run["reports"].get(stage) or {}
        rp = rp or {}
        pp, pr = rp.get("peak_memory") or {}, rr.get("peak_memory") or {}
        name = next((j for j in walls if j.endswith("-" + stage)), None)
        rows.append(f"| {stage} | {walls.get(name, '—')} | {rp.get('duration_s', '—')} | {rr.get('duration_s', '—')} "
                    f"| {_gib(pp.get('torch_allocated_bytes'))} | {_gib(pr.get('torch_allocated_bytes'))} "
                    f"| {_gib(pp.get('nvml_process_bytes'))} | {_gib(pr.get('nvml_process_bytes'))} |")
    acc_p, acc_r = _accuracy(pods["reports"]), _accuracy(run["reports"])
    rows += ["", "| model | execution accuracy, pods | execution accuracy, `kubetune run` |", "|---|---|---|"]
    rows += [f"| {m} | {acc_p.get(m)} | {acc_r.get(m)} |" for m in sorted(set(acc_p) | set(acc_r))]
    env = pods["environment"]
    # the 2026-12-06 record predates this script's use of bench/harness.py's environment (commit, lock_sha256)
    commit = env.get("git_commit") or env.get("commit")
    lock = (env.get("lock") or {}).get("sha256") or env.get("lock_sha256", "")
    head = [f"# Pod path on the GPU: {env.get('nvidia_smi')}, {env['date']}", "",
            f"Commit {commit}, lock sha256 {lock[:12]}; driver Job: {pods['driver']}, "
            f"pods total {pods['total_s']} s, `kubetune run` total {run['total_s']} s (exit {run['exit_code']}).",
            f"Command: `{args.command}`", ""]
    out = ROOT / "bench" / "results"
    (out / f"{args.name}.json").write_text(json.dumps({"pods": pods, "run": run, "command": args.command}, indent=1))
    (out / f"{args.name}.md").write_text("\n".join(head + rows) + "\n")
    print("\n".join(head + rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("pods", "run"):
        s = sub.add_parser(name)
        s.add_argument("--model", required=True)
        s.add_argument("--data", required=True)
        s.add_argument("--out", required=True)
        s.add_argument("--work", default=f"/tmp/kubetune-pod-path-{name}")
        s.add_argument("--recipe", default=str(RECIPE))
        s.add_argument("--set", action="append", default=[])
        s.add_argument("--commit", default=None)
        s.add_argument("--budget-s", type=float, default=560)
    t = sub.add_parser("table")
    t.add_argument("pods")
    t.add_argument("run")
    t.add_argument("--name", required=True)
    t.add_argument("--command", default="")
    args = p.parse_args(argv)
    if args.cmd == "table":
        cmd_table(args)
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    result = (cmd_pods if args.cmd == "pods" else cmd_run)(args)
    result["environment"] = environment(args.commit)
    (Path(args.out) / f"{args.cmd}.json").write_text(json.dumps(result, indent=1))
    ok = result.get("driver") == "Complete" if args.cmd == "pods" else result.get("exit_code") == 0
    print(f"{args.cmd}: {'ok' if ok else 'FAILED'} in {result['total_s']} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
