"""`kubetune submit` estimates memory first and refuses a recipe that cannot fit its GPU type, unless --force."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from kubetune.cli import cli

ROOT = Path(__file__).parent.parent
RECIPE = str(ROOT / "jobs" / "bloom-7b1-qlora.yaml")  # finetune asks for an A100-40GB
CONFIG = str(ROOT / "bench" / "configs" / "bigscience--bloom-7b1.json")
TOO_BIG = ["--set", "finetune.base_precision=none", "--set", "finetune.batch_size=64",
           "--set", "finetune.gradient_checkpointing=false"]


def submit(*args):
    return CliRunner().invoke(cli, ["submit", RECIPE, "--dry-run", "client", "--model-config", CONFIG, *args],
                              catch_exceptions=False)


def test_a_recipe_that_fits_is_submitted():
    result = submit()
    assert result.exit_code == 0, result.output
    assert "kind: Job" in result.output


def test_a_recipe_that_cannot_fit_is_refused_with_exit_12():
    result = submit(*TOO_BIG)
    assert result.exit_code == 12, result.output
    assert "finetune needs" in result.output and "A100" in result.output and "--force" in result.output
    assert "kind: Job" not in result.output


def test_force_submits_anyway_with_a_warning():
    result = submit(*TOO_BIG, "--force")
    assert result.exit_code == 0, result.output
    assert "--force: submitting although finetune needs" in result.output
    assert "kind: Job" in result.output
