"""The recipe schema: every shipped recipe validates, every problem is reported at once with its path."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.config import Recipe, load_recipe, recipe_from_dict
from kubetune.errors import RecipeError

JOBS = sorted((Path(__file__).parent.parent / "jobs").glob("*.yaml"))
BASE = {"model": {"name_or_path": "some/model"}}


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.stages
    assert path.read_text().startswith("# "), "a recipe starts with the command that runs it"
    header = path.read_text().splitlines()[:3]
    assert any("kubetune run" in line for line in header), "the first lines name the command that runs it"


def problems(data, overrides=()):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data, "r.yaml", overrides)
    assert info.value.exit_code == 3
    return info.value.problems


def test_all_errors_reported_at_once_with_paths():
    found = problems({"model": {"name_or_path": "m", "colour": "red"}, "finetune": {"lora": {"r": 0}},
                      "quantize": {"bits": 3}, "data": {"train_fraction": 2}})
    assert len(found) == 4
    joined = "\n".join(found)
    for path in ("model.colour", "finetune.lora.r", "quantize.bits", "data.train_fraction"):
        assert path in joined


@pytest.mark.parametrize("data, where", [
    ({}, "model"),                                                     # missing required section
    ({**BASE, "finetune": {"learning_rate": -1}}, "finetune.learning_rate"),  # out of range
    ({**BASE, "finetune": {"batch_size": "big"}}, "finetune.batch_size"),  # wrong type
    ({**BASE, "finetun": {}}, "finetun"),                              # unknown section (typo)
    ({**BASE, "prompt": {"template": "{context} only"}}, "prompt.template"),  # question placeholder missing
    ({**BASE, "prompt": {"template": "{question} {answer}"}}, "prompt.template"),  # unknown placeholder
    ({**BASE, "run": {"name": "Bad_Name"}}, "run.name"),              # not a DNS label
    ({**BASE, "quantize": {"group_size": 0}}, "quantize.group_size"),
    ({**BASE, "stages": ["merge", "finetune"]}, "stages"),            # out of order
    ({**BASE, "stages": ["infer"], "infer": {"models": ["merged"]}}, "infer.models"),  # producer missing
])
def test_each_kind_of_error_names_its_field(data, where):
    found = problems(data)
    assert any(where in p for p in found), found


def test_overrides_are_typed_and_create_sections():
    recipe = recipe_from_dict(dict(BASE), overrides=["finetune.lora.r=8", "finetune.packing=true",
                                                     "infer.models=[base]", "run.name=x1"])
    assert recipe.finetune.lora.r == 8 and recipe.finetune.packing is True
    assert recipe.infer.models == ["base"] and recipe.run.name == "x1"


def test_bad_override_syntax_is_a_recipe_error():
    assert "expected KEY.PATH=VALUE" in problems(dict(BASE), ["no-equals-sign"])[0]


def test_not_yaml_and_not_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match=r"line \d+, column \d+: not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a list\n")
    with pytest.raises(RecipeError, match="expected a mapping"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_fingerprints_change_only_downstream_of_an_edit():
    a = recipe_from_dict(dict(BASE))
    b = recipe_from_dict(dict(BASE), overrides=["infer.max_new_tokens=7"])
    c = recipe_from_dict(dict(BASE), overrides=["finetune.lora.r=4"])
    assert a.fingerprint("finetune") == b.fingerprint("finetune")
    assert a.fingerprint("quantize") == b.fingerprint("quantize")
    assert a.fingerprint("infer") != b.fingerprint("infer")
    assert a.fingerprint("evaluate") != b.fingerprint("evaluate")  # evaluate reads infer's output
    for stage in ("finetune", "merge", "quantize", "infer", "evaluate"):
        assert a.fingerprint(stage) != c.fingerprint(stage)


def test_profiling_a_step_changes_no_fingerprint():
    """finetune.profile_step only watches a step; a finished run whose recipe gains it is still finished."""
    a = recipe_from_dict(dict(BASE))
    b = recipe_from_dict(dict(BASE), overrides=["finetune.profile_step=3"])
    assert all(a.fingerprint(stage) == b.fingerprint(stage) for stage in a.stages)


def test_json_schema_rejects_unknown_keys():
    schema = Recipe.model_json_schema()
    assert schema["additionalProperties"] is False
    assert "model" in schema["required"]


def test_every_recipe_field_has_a_description():
    """Docstrings are the one place a setting is explained: the chart's values.schema.json (and its README table)
    take them from this schema, so a field without one reaches users unexplained."""
    schema = Recipe.model_json_schema()
    undocumented = [f"{where}.{name}" for where, model in [("Recipe", schema), *schema["$defs"].items()]
                    for name, spec in model.get("properties", {}).items() if not spec.get("description")]
    assert undocumented == []
