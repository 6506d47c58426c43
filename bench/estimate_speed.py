"""How long `kubetune estimate` takes per shipped recipe, as a user runs it (a fresh process each time).

    python bench/estimate_speed.py            # writes bench/results/estimate_speed.{json,md}

Each recipe runs `repeat` times with a warm estimate cache (what a user sees from the second estimate of a model
on: kubetune.estimate.cache) and `repeat` times cold (an empty cache each time: torch and transformers' model
class are imported and the meta model is built and traced); the medians of both are reported, with the import cost
of torch + transformers measured the same way as the baseline (what a cold estimate cannot go below).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
KUBETUNE = str(Path(sys.executable).with_name("kubetune"))
# Hub models need their config.json offline: bench/configs holds the published ones.
RECIPES = {
    "bloom-1b1-lora": "bigscience--bloom-1b1", "bloom-7b1-qlora": "bigscience--bloom-7b1",
    "falcon-7b-8bit": "tiiuae--falcon-7b", "codegen2-1b-lora": "Salesforce--codegen2-1B",
    "demo-cpu": None, "tiny-test": None, "gemma3-270m-text2sql": None,
}


# (and, like `kubetune estimate`, ends without the interpreter's teardown: kubetune.cli.skip_interpreter_teardown)
FLOOR = "import os, torch, pydantic, transformers.models.llama.modeling_llama; os._exit(0)"


def timed(cmd: list[str], cache: str | None = None) -> float:
    env = {**os.environ, **({"KUBETUNE_ESTIMATE_CACHE": cache} if cache else {})}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main(repeat: int = 3) -> None:
    rows = []
    # What a cold estimate cannot go below: the imports of torch and of a transformers model class (the class
    # pulls in torch._dynamo, torch.distributed.tensor and the quantizer registry), timed the same way.
    baseline = [timed([sys.executable, "-c", FLOOR]) for _ in range(repeat)]
    for name, config in RECIPES.items():
        cmd = [KUBETUNE, "estimate", f"jobs/{name}.yaml"]
        if config:
            cmd += ["--model-config", f"bench/configs/{config}.json"]
        if not config and not (ROOT / ".cache/models" / ("gemma-3-270m" if name == "demo-cpu" else "tiny-llama")).exists():
            continue  # local model folder not made on this machine (make demo / python tests/tiny.py)
        with tempfile.TemporaryDirectory() as warm_dir:
            timed(cmd, warm_dir)  # fills the cache
            times = [timed(cmd, warm_dir) for _ in range(repeat)]
        cold = []
        for _ in range(repeat):
            with tempfile.TemporaryDirectory() as cold_dir:
                cold.append(timed(cmd, cold_dir))
        rows.append({"recipe": name, "median_s": round(statistics.median(times), 2), "runs_s": [round(t, 2) for t in times],
                     "cold_median_s": round(statistics.median(cold), 2), "cold_runs_s": [round(t, 2) for t in cold]})
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (no GPU)",
        "command": "python bench/estimate_speed.py",
        "baseline_import_s": round(statistics.median(baseline), 2),
        "baseline_command": FLOOR,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],  # other work on the machine inflates both
        "recipes": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "estimate_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# `kubetune estimate` wall time ({result['date']}, {result['machine']})", "",
             f"Command: `{result['command']}`. Baseline, `{FLOOR}` in a fresh process (the imports a cold estimate "
             f"cannot avoid): {result['baseline_import_s']} s (median of {repeat}); load average at the end "
             f"{result['load_average_1_5_15']}.", "",
             "Warm: the estimate cache holds this model (every estimate after the first of a model); cold: an empty "
             "cache (imports torch and the model class, builds and traces on the meta device).", "",
             "| recipe | warm median s | warm runs s | cold median s | cold runs s | cold − baseline s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['median_s']} | {', '.join(map(str, r['runs_s']))} | {r['cold_median_s']} | "
              f"{', '.join(map(str, r['cold_runs_s']))} | {r['cold_median_s'] - result['baseline_import_s']:.2f} |"
              for r in rows]
    (RESULTS / "estimate_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
