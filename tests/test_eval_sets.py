"""Named evaluation sets (evaluate.sets): added to a finished run, they are inferred and scored without touching
the fine-tune, the merge or the held-out split's results; each has its own metrics and gates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kubetune.cli import cli
from kubetune.config import recipe_from_dict
from kubetune.errors import GateError, RecipeError
from tiny import tiny_recipe_dict

# adapter and merged only: quantize is the slow stage and adds nothing to what is tested here
SECTIONS = {"stages": ["finetune", "merge", "infer", "evaluate"], "infer": {"models": ["adapter", "merged"],
                                                                           "max_new_tokens": 8, "batch_size": 4}}


def write_own_test_file(path: Path) -> Path:
    """A user's test file with its own column names (the tiny model's answers are wrong; the gold runs)."""
    rows = [{"q": f"How many heads has pet {i}?", "ddl": "CREATE TABLE pets (name TEXT, heads INTEGER)",
             "sql": f"SELECT heads FROM pets WHERE name = 'p{i}'"} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe_yaml(tmp_path, model_dir, **evaluate) -> Path:
    data = tiny_recipe_dict(model_dir, tmp_path / "artifacts", **SECTIONS, evaluate=evaluate)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def mtimes(run_dir: Path, stages) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for s in stages for p in (run_dir / s).rglob("*") if p.is_file()}


def test_two_sets_added_to_a_finished_run_are_scored_without_retraining(tiny_model_dir, tmp_path):
    first = CliRunner().invoke(cli, ["run", str(recipe_yaml(tmp_path, tiny_model_dir))], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    run_dir = tmp_path / "artifacts" / "tiny"
    before = mtimes(run_dir, ["finetune", "merge", "infer", "evaluate"])
    own = write_own_test_file(tmp_path / "own-test.jsonl")
    sets = {"generated": {"source": "builtin:text2sql", "seed": 7, "builtin_examples": 20, "max_examples": 4,
                          "gates": {"merged_min_execution_accuracy": 0}},
            "ours": {"source": str(own), "columns": {"question": "q", "context": "ddl", "answer": "sql"},
                     "max_examples": 3, "gates": {"adapter_min_execution_accuracy": 100}}}
    second = CliRunner().invoke(cli, ["run", str(recipe_yaml(tmp_path, tiny_model_dir, sets=sets))])

    # the gate on set 'ours' fails the run (exit 8), naming the set, after both sets were scored
    assert second.exit_code == GateError.exit_code, second.output
    assert "adapter_min_execution_accuracy on set ours" in second.output
    assert mtimes(run_dir, ["finetune", "merge", "infer", "evaluate"]) == before  # nothing retrained or rescored
    for name, examples in (("generated", 4), ("ours", 3)):
        predictions = (run_dir / "sets" / name / "infer" / "predictions-merged.jsonl").read_text().splitlines()
        assert len(predictions) == examples
        metrics = json.loads((run_dir / "sets" / name / "evaluate" / "metrics.json").read_text())
        assert metrics["eval_set"] == name
        assert {m: v["examples"] for m, v in metrics["models"].items()} == {"adapter": examples, "merged": examples}
    ours = json.loads((run_dir / "sets" / "ours" / "infer" / "predictions-adapter.jsonl").read_text().splitlines()[0])
    assert ours["question"] == "How many heads has pet 0?" and ours["gold"].startswith("SELECT heads")
    gates = json.loads((run_dir / "sets" / "ours" / "evaluate" / "metrics.json").read_text())["gates"]
    assert [(g["gate"], g["passed"]) for g in gates] == [("adapter_min_execution_accuracy", False)]
    heldout = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert heldout["gates"] == [] and heldout["models"]["merged"]["examples"] == 8  # the default set, as before

    # the report and the UI show each set
    from kubetune.report import build_report
    from kubetune.ui.backend import eval_examples, open_run

    table = next(t for t in build_report([run_dir], estimates=False).tables if t.title == "evaluation")
    assert sorted({(row[1], row[2]) for row in table.rows}) == [
        (s, m) for s in ("generated", "heldout", "ours") for m in ("adapter", "merged")]
    assert [row[-1] for row in table.rows if row[1] == "ours"][0] == "adapter_min_execution_accuracy"
    titles = [e.title for e in eval_examples(open_run(str(run_dir)))]
    assert len(titles) == 8 + 4 + 3 and titles[-1].startswith("[ours] #2: How many heads has pet 2?")

    third = CliRunner().invoke(cli, ["run", str(recipe_yaml(tmp_path, tiny_model_dir, sets=sets))])
    assert third.exit_code == GateError.exit_code and "done in" not in third.output  # every set already scored


def test_set_settings_are_validated_with_their_field_paths(tiny_model_dir, tmp_path):
    def problems(sets) -> str:
        with pytest.raises(RecipeError) as err:
            recipe_from_dict(tiny_recipe_dict(tiny_model_dir, tmp_path, **SECTIONS, evaluate={"sets": sets}))
        return str(err.value)

    assert "evaluate.sets: 'heldout' is the held-out split" in problems({"heldout": {"source": "x.jsonl"}})
    assert "evaluate.sets.g.gates: unknown gate(s) nonsense" in problems(
        {"g": {"source": "y.csv", "gates": {"nonsense": 2}}})
    text = problems({"same": {"source": "builtin:text2sql", "seed": 42},
                     "g": {"source": "y.csv", "gates": {"quantized_max_drop": 1}}})
    assert "evaluate.sets.same.seed: equals data.seed" in text
    assert "evaluate.sets.g.gates.quantized_max_drop: needs 'quantized'" in text


def test_a_set_is_outside_every_other_fingerprint(tiny_model_dir, tmp_path):
    plain = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, tmp_path))
    with_set = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, tmp_path, evaluate={"sets": {
        "extra": {"source": "t.jsonl", "gates": {"merged_min_execution_accuracy": 50}}}}))
    for stage in plain.stages:
        assert plain.fingerprint(stage) == with_set.fingerprint(stage), stage
    assert with_set.fingerprint("infer", "extra") != with_set.fingerprint("infer")
    assert with_set.job_fingerprint("evaluate") != plain.job_fingerprint("evaluate")  # the Job runs the new set


def test_a_stage_is_done_for_the_driver_only_when_every_set_is(tiny_model_dir, tmp_path):
    """What the in-cluster driver reads from the claim: infer with a new set is not done, so its Job is made."""
    from kubetune.artifacts import RunLayout

    recipe = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, tmp_path, evaluate={"sets": {
        "extra": {"source": "t.jsonl"}}}))
    layout = RunLayout.from_recipe(recipe)
    held = layout.stage_dir("infer")
    held.mkdir(parents=True)
    (held / "_SUCCESS").write_text(json.dumps({"fingerprint": recipe.fingerprint("infer")}))
    assert layout.state("infer", recipe.fingerprint("infer")) == "done"
    assert layout.recipe_state(recipe, "infer") == "missing"
    extra = layout.stage_dir("infer", "extra")
    extra.mkdir(parents=True)
    (extra / "_SUCCESS").write_text(json.dumps({"fingerprint": "from-another-recipe"}))
    assert layout.recipe_state(recipe, "infer") == "stale"
    (extra / "_SUCCESS").write_text(json.dumps({"fingerprint": recipe.fingerprint("infer", "extra")}))
    assert layout.recipe_state(recipe, "infer") == "done" and extra == tmp_path / "tiny" / "sets" / "extra" / "infer"
