"""The console of a stage, as a pod's log shows it: kubetune's progress lines and one summary line; the libraries'
INFO tables, warnings and notices (GPTQModel's LogBar lines, transformers' UserWarnings, FutureWarnings, torchao)
only with -v. The quantize stage runs in a subprocess, as `kubetune stage` runs in a pod: it is the loudest one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
KUBETUNE = Path(sys.executable).parent / "kubetune"
RECIPE = ROOT / "jobs" / "tiny-test.yaml"
pytestmark = pytest.mark.timeout(400)
LIBRARY_NOISE = ("INFO  ", "WARN  ", "UserWarning", "FutureWarning", "torchao", "Content of saved", "[transformers]")


def stage(cwd: Path, *args: str) -> str:
    proc = subprocess.run([str(KUBETUNE), *args, "--recipe", str(RECIPE), "--set", "metrics.enabled=false"], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "120"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("console")
    build_tiny_model(work / ".cache" / "models" / "tiny-llama")
    stage(work, "stage", "finetune")
    stage(work, "stage", "merge")
    return work


def test_a_stage_prints_its_progress_and_one_summary_line_and_no_library_noise(merged):
    console = stage(merged, "stage", "quantize")
    lines = console.splitlines()
    assert any("kubetune.progress: quantize" in line and "layer" in line for line in lines), console
    assert [line for line in lines if line.startswith("quantize: ")] == [
        next(line for line in lines if line.startswith("quantize: done in"))]
    noise = [line for line in lines if any(word in line for word in LIBRARY_NOISE)]
    assert noise == [], "\n".join(noise)


def test_verbose_shows_the_libraries_again(merged):
    shutil.rmtree(merged / "artifacts" / "tiny-test" / "quantize")
    console = stage(merged, "-v", "stage", "quantize")
    assert "INFO  " in console or "WARN  " in console, console  # GPTQModel's own lines: hidden above, not absent
    assert "quantize: done in" in console
