"""`kubetune explain`: a recipe setting's meaning, type and default, from its docstring in the recipe model."""

from __future__ import annotations

from click.testing import CliRunner

from kubetune.cli import cli


def explain(*args: str):
    return CliRunner().invoke(cli, ["explain", *args], catch_exceptions=False)


def test_a_setting_prints_its_type_default_and_docstring():
    result = explain("finetune.batch_size")
    assert result.exit_code == 0
    head, *text = result.output.splitlines()
    assert head == "finetune.batch_size: integer (≥ 1), default 8"
    assert " ".join(text).split() == ("Sequences per device per forward/backward. Activation memory grows linearly "
                                      "with it; the effective batch per optimizer step is batch_size × grad_accum "
                                      "(× GPUs).").split()


def test_a_section_prints_itself_and_each_setting_under_it_with_the_sections_own_defaults():
    result = explain("resources.fetch")
    assert result.exit_code == 0
    heads = [line for line in result.output.splitlines() if not line.startswith(" ")]
    assert heads == ["resources.fetch: section", "resources.fetch.gpus: integer (≥ 0, ≤ 16), default 0",
                     "resources.fetch.gpu_type: string or null, default null",
                     'resources.fetch.cpu: string, default "1"', 'resources.fetch.memory: string, default "2Gi"']


def test_an_unknown_setting_is_a_usage_error_naming_it():
    result = CliRunner().invoke(cli, ["explain", "finetune.lora.rr"])
    assert result.exit_code == 2
    assert "finetune.lora.rr: no such recipe setting" in result.output
    assert "Traceback" not in result.output
