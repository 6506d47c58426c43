"""What kubetune prints: model, data, recipe and cluster text is shown as it is, never as rich console markup,
and never as terminal control sequences (issue 17, class 5)."""

from __future__ import annotations

import io
import json

from click.testing import CliRunner
from rich.console import Console

from kubetune.artifacts import RunLayout
from kubetune.cli import cli
from kubetune.config import recipe_from_dict
from kubetune.runner import accuracy_table, answers_table

# What chat models and hostile data write: a chat tag that closes no markup, markup that would restyle the table,
# an OSC sequence that retitles the terminal, a CSI that clears it, a carriage return that overwrites the line,
# and a right-to-left override that reorders what a reader sees.
PREDICTION = "SELECT a FROM t [/INST] [bold]x\x1b]0;owned\x07\x1b[2J"
QUESTION = "what [red]is[/red] a?\rZZ"
GOLD = "SELECT a FROM t \u202eWHERE"


def printed(*renderables) -> str:
    console = Console(file=io.StringIO(), width=400, color_system=None)
    for r in renderables:
        console.print(r)
    return console.file.getvalue()


def test_predictions_questions_and_gold_print_literally_in_the_run_summary(tmp_path):
    """`kubetune run` ends with these tables on every later run of the recipe: a prediction with [/INST] made it
    exit 1 (MarkupError) after all its stages had finished."""
    recipe = recipe_from_dict({"run": {"name": "out", "artifacts_root": str(tmp_path)},
                               "model": {"name_or_path": "org/m"}, "infer": {"models": ["base"]},
                               "stages": ["infer", "evaluate"]})
    layout = RunLayout.from_recipe(recipe)
    evaluate = layout.stage_dir("evaluate")
    evaluate.mkdir(parents=True)
    row = {"question": QUESTION, "gold": GOLD, "prediction": PREDICTION, "execution_match": False}
    (evaluate / "outcomes-base.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    (evaluate / "metrics.json").write_text(json.dumps({"models": {"base": {"execution_accuracy": 0.0}}}))

    text = printed(answers_table(layout, ["base"], samples=3), accuracy_table(layout))
    assert "SELECT a FROM t [/INST] [bold]x\\x1b]0;owned\\x07\\x1b[2J" in text, text
    assert "what [red]is[/red] a?\\x0dZZ" in text and "SELECT a FROM t \\u202eWHERE" in text, text
    assert not {"\x1b", "\x07", "\r", "\u202e"} & set(text), repr(text)


def test_error_lines_show_control_characters_as_escapes(tmp_path):
    """A file name (or a value) in an error line is user text too."""
    name = tmp_path / "recipe\x1b]0;owned\x07\u202e[bold].yaml"
    result = CliRunner().invoke(cli, ["stage", "finetune", "--recipe", str(name)])
    assert result.exit_code == 3, result.output
    assert "recipe\\x1b]0;owned\\x07\\u202e[bold].yaml: file not found" in result.output, result.output
    assert not {"\x1b", "\x07", "\u202e"} & set(result.output), repr(result.output)
