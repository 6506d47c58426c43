"""Layering: stages never reach for the CLI or Kubernetes, and the CLI starts without torch."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), str(ROOT / ".importlinter")], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


def test_cli_starts_without_heavy_imports():
    code = ("import sys, kubetune.cli; heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets', "
            "'kubernetes', 'gradio') if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


LAYERS = "importlinter:contract:layers-by-where-code-runs"
# Packages whose modules sit in different layers; their __init__ must then import nothing of ours.
SPLIT_PACKAGES = {"kubetune", "kubetune.k8s", "kubetune.metrics"}


def _layer_modules(config: Path) -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(config)
    return [m.strip() for line in parser[LAYERS]["layers"].strip().splitlines() for m in re.split(r"[|:]", line)]


def _modules(src: Path) -> dict[str, Path]:
    found = {}
    for path in (src / "kubetune").rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def test_every_module_sits_in_a_layer():
    listed = _layer_modules(ROOT / ".importlinter")
    outside = [name for name, path in _modules(ROOT / "src").items()
               if not any(name == m or name.startswith(m + ".") for m in listed)
               and (name not in SPLIT_PACKAGES or re.search(r"^\s*(from|import) kubetune", path.read_text(), re.M))]
    assert not outside, f"modules in no layer of .importlinter's {LAYERS}: {outside}"


def test_the_layers_contract_refuses_an_import_from_a_higher_layer(tmp_path):
    shutil.copytree(ROOT / "src" / "kubetune", tmp_path / "kubetune", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    lint = [str(Path(sys.executable).with_name("lint-imports")), str(tmp_path / ".importlinter")]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    assert subprocess.run(lint, cwd=tmp_path, env=env, capture_output=True).returncode == 0
    # what a pod imports reaching for the client: the stage entrypoint importing the report writer
    with open(tmp_path / "kubetune" / "stages" / "fetch.py", "a") as fh:
        fh.write("\nimport kubetune.report  # noqa\n")
    broken = subprocess.run(lint, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert broken.returncode != 0 and "kubetune.stages.fetch -> kubetune.report" in broken.stdout
