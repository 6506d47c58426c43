"""How long `kubetune estimate` takes per shipped recipe, as a user runs it (a fresh process each time).

    python bench/estimate_speed.py            # writes bench/results/estimate_speed.{json,md}

Each recipe runs `repeat` times; the median wall time is reported, with the import cost of torch + transformers
measured the same way as the baseline (what no estimate can go below in a fresh process).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
KUBETUNE = str(Path(sys.executable).with_name("kubetune"))
# Hub models need their config.json offline: bench/configs holds the published ones.
RECIPES = {
    "bloom-1b1-lora": "bigscience--bloom-1b1", "bloom-7b1-qlora": "bigscience--bloom-7b1",
    "falcon-7b-8bit": "tiiuae--falcon-7b", "codegen2-1b-lora": "Salesforce--codegen2-1B",
    "demo-cpu": None, "tiny-test": None,
}


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main(repeat: int = 3) -> None:
    rows = []
    baseline = [timed([sys.executable, "-c", "import torch, transformers, pydantic"]) for _ in range(repeat)]
    for name, config in RECIPES.items():
        cmd = [KUBETUNE, "estimate", f"jobs/{name}.yaml"]
        if config:
            cmd += ["--model-config", f"bench/configs/{config}.json"]
        if not config and not (ROOT / ".cache/models" / ("gemma-3-270m" if name == "demo-cpu" else "tiny-llama")).exists():
            continue  # local model folder not made on this machine (make demo / python tests/tiny.py)
        times = [timed(cmd) for _ in range(repeat)]
        rows.append({"recipe": name, "median_s": round(statistics.median(times), 2), "runs_s": [round(t, 2) for t in times]})
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (no GPU)",
        "command": "python bench/estimate_speed.py",
        "baseline_import_torch_transformers_s": round(statistics.median(baseline), 2),
        "recipes": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "estimate_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# `kubetune estimate` wall time ({result['date']}, {result['machine']})", "",
             f"Command: `{result['command']}`. Baseline, `import torch, transformers, pydantic` in a fresh process: "
             f"{result['baseline_import_torch_transformers_s']} s (median of {repeat}).", "",
             "| recipe | median s | runs s |", "|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['median_s']} | {', '.join(map(str, r['runs_s']))} |" for r in rows]
    (RESULTS / "estimate_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
