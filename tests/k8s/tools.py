"""External tools for the Kubernetes tests: helm and kubectl from scripts/install-k8s-tools.sh (.cache/bin),
hadolint from the virtual environment. Missing tools skip the test on a laptop and fail it in CI
(KUBETUNE_REQUIRE_SERVERS=1), through conftest.require_binary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import require_binary

ROOT = Path(__file__).resolve().parents[2]
for extra in (ROOT / ".cache" / "bin", Path(sys.executable).parent):
    if str(extra) not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = f"{extra}{os.pathsep}{os.environ.get('PATH', '')}"


def run(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    path = require_binary(tool)
    result = subprocess.run([path, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"{tool} {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result
