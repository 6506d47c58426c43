"""The chart README's values table (kubetune.k8s.valuestable): one row per value, from the values schema, with
the prose around it kept; tests/test_k8s_chart.py checks that the committed README is current."""

from __future__ import annotations

import re

import pytest

from kubetune.k8s import generate, valuestable

SCHEMA = {
    "properties": {
        "recipe": {"type": "object", "description": "The recipe.", "properties": {
            "resources": {"$ref": "#/$defs/Resources", "default": {"gpus": 0}, "description": "A stage's pod."},
            "secret": {"anyOf": [{"$ref": "#/$defs/Secret"}, {"type": "null"}], "default": None,
                       "description": "A | B."},
        }},
        "ui": {"type": "object", "properties": {"port": {"type": "integer", "minimum": 1024}}},
    },
    "$defs": {
        "Resources": {"type": "object", "properties": {
            "gpus": {"type": "integer", "minimum": 0, "default": 1, "description": "GPUs\n    of ``the`` pod."}}},
        "Secret": {"type": "object", "properties": {"key": {"enum": ["a", "b"], "default": "a"}}},
    },
}


def test_one_row_per_value_with_the_enclosing_default_and_one_line_descriptions():
    text = valuestable.table(SCHEMA, {"ui": {"port": 7860}})
    assert text.splitlines() == [
        "| Key | Type | Default | Description |",
        "|---|---|---|---|",
        "| `recipe` | section |  | The recipe. |",
        "| `recipe.resources` | section |  | A stage's pod. |",
        "| `recipe.resources.gpus` | integer (≥ 0) | `0` | GPUs of `the` pod. |",  # the section's 0, not 1
        "| `recipe.secret` | section or null |  | A \\| B. |",
        '| `recipe.secret.key` | "a" \\| "b" | `"a"` |  |',
        "| `ui` | section |  |  |",
        "| `ui.port` | integer (≥ 1024) | `7860` |  |",
    ]


def test_the_prose_around_the_table_is_kept_and_a_readme_without_markers_is_refused():
    readme = f"# Chart\nprose before\n{valuestable.BEGIN}\nstale rows\n{valuestable.END}\nprose after\n"
    out = valuestable.readme(readme, SCHEMA, {})
    assert out.startswith("# Chart\nprose before\n") and out.endswith(f"{valuestable.END}\nprose after\n")
    assert "stale rows" not in out and "| `ui.port` |" in out
    with pytest.raises(valuestable.MarkersMissing, match="values table needs"):
        valuestable.readme("# Chart\nno markers\n", SCHEMA, {})


def test_the_chart_readme_explains_every_value():
    from kubetune.k8s.generate import CHART

    readme = generate.files()[str(CHART / "README.md")]
    rows = {cells[1].strip(" `"): cells[4].strip() for line in readme.splitlines() if line.startswith("| `")
            for cells in [re.split(r"(?<!\\)\|", line)]}
    assert rows["recipe.finetune.batch_size"].startswith("Sequences per device")
    assert [key for key, text in rows.items() if not text] == []
