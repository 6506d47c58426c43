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


def _mpt_config(tmp_path) -> str:
    """A small MPT config (ALiBi, like BLOOM): its attention mask ignores position_ids and kubetune has no document
    attention for it, so packed examples would see each other."""
    from transformers import MptConfig

    path = tmp_path / "mpt.json"
    MptConfig(d_model=256, n_layers=2, n_heads=4, vocab_size=1000).to_json_file(path)
    return str(path)


def test_packing_a_model_that_would_mix_examples_is_refused_before_anything_is_submitted_even_with_force(tmp_path):
    # the pod would refuse it too, after the image pull and the model load
    result = CliRunner().invoke(cli, ["submit", RECIPE, "--dry-run", "client", "--model-config", _mpt_config(tmp_path),
                                      "--set", "model.name_or_path=mosaicml/mpt-7b", "--set", "finetune.packing=true",
                                      "--force"], catch_exceptions=False)
    assert result.exit_code == 3, result.output
    assert ("finetune.packing: mosaicml/mpt-7b (MptForCausalLM, eager attention) would attend across packed "
            "examples") in result.output
    assert "kind: Job" not in result.output


def test_estimate_accepts_packing_bloom_and_falcon():
    """BLOOM packs through kubetune's document attention (stages/document_attention.py); Falcon's mask reads
    position_ids."""
    runner = CliRunner()
    bloom = runner.invoke(cli, ["estimate", RECIPE, "--model-config", CONFIG, "--set", "finetune.packing=true"])
    assert bloom.exit_code == 0, bloom.output
    falcon = runner.invoke(cli, ["estimate", str(ROOT / "jobs" / "falcon-7b-8bit.yaml"), "--model-config",
                                 str(ROOT / "bench" / "configs" / "tiiuae--falcon-7b.json")])
    assert falcon.exit_code == 0, falcon.output  # the shipped falcon recipe packs
