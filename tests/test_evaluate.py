"""The evaluate stage end to end on hand-written predictions placed as a finished infer artifact, and its gates."""

from __future__ import annotations

import json

import pytest

from kubetune.artifacts import RunLayout
from kubetune.errors import ArtifactError, GateError, RecipeError
from kubetune.stages import run_stage
from kubetune.stages.evaluate import format_summary, load_metrics

EMP = "CREATE TABLE employees (name VARCHAR, city VARCHAR, salary INTEGER)"
FILMS = "CREATE TABLE films (title VARCHAR, genre VARCHAR, release_year INTEGER)"
# (context, question, gold, {kind: prediction}); kinds: E exact, Q equivalent but written otherwise, W wrong
# result, I does not parse (unknown column)
ROWS = [
    (EMP, "Who lives in Oslo?", "SELECT name FROM employees WHERE city = 'Oslo'",
     {"Q": 'select name from employees as e where e.city = "Oslo";',
      "W": "SELECT name FROM employees WHERE city = 'Lima'", "I": "SELECT nam FROM employees WHERE city = 'Oslo'"}),
    (EMP, "Highest salary in Lima?", "SELECT MAX(salary) FROM employees WHERE city = 'Lima'",
     {"Q": "SELECT salary FROM employees WHERE city = 'Lima' ORDER BY salary DESC LIMIT 1",
      "W": "SELECT MIN(salary) FROM employees WHERE city = 'Lima'", "I": "SELECT MAX(pay) FROM employees"}),
    (FILMS, "How many films per genre?", "SELECT genre, COUNT(*) FROM films GROUP BY genre",
     {"Q": "SELECT COUNT(title), genre FROM films GROUP BY genre", "W": "SELECT genre, COUNT(*) FROM films",
      "I": "SELECT genre, COUNT(*) FROM film GROUP BY genre"}),
    (FILMS, "Films after 1999?", "SELECT title FROM films WHERE release_year > 1999",
     {"Q": "SELECT title FROM films WHERE release_year >= 2000",
      "W": "SELECT title FROM films WHERE release_year > 2009", "I": "DROP TABLE films"}),
]


def write_infer(recipe, kinds: dict[str, str]) -> None:
    """Commit a finished infer artifact whose model ``m`` answered row i with kind ``kinds[m][i]``."""
    layout = RunLayout.from_recipe(recipe)
    tmp = layout.new_temp_dir("infer")
    for model, pattern in kinds.items():
        with open(tmp / f"predictions-{model}.jsonl", "w", encoding="utf-8") as fh:
            for i, ((context, question, gold, variants), kind) in enumerate(zip(ROWS, pattern)):
                prediction = gold if kind == "E" else variants[kind]
                fh.write(json.dumps({"id": i, "context": context, "question": question, "gold": gold,
                                     "prompt": f"{context}. {question}", "prediction": prediction,
                                     "new_tokens": 10 + i}) + "\n")
    layout.commit("infer", tmp, recipe.fingerprint("infer"), {"stage": "infer"})


ALL = ["finetune", "merge", "quantize", "infer", "evaluate"]
FOUR = ["base", "adapter", "merged", "quantized"]


def test_scores_one_model_end_to_end(tiny_recipe):
    recipe = tiny_recipe(stages=["infer", "evaluate"], infer={"models": ["base"]})
    write_infer(recipe, {"base": "EQWI"})
    result = run_stage(recipe, "evaluate")
    assert result.status == "done"
    base = result.report["metrics"]["base"]
    assert base == {"examples": 4, "execution_accuracy": 50.0, "exact_match": 25.0, "parse_rate": 75.0,
                    "gold_errors": 0, "mean_new_tokens": 11.5}
    assert result.report["gates"] == []

    on_disk = load_metrics(result.path)
    assert on_disk["models"] == result.report["metrics"]
    assert on_disk == load_metrics(result.path / "metrics.json")
    outcomes = [json.loads(line) for line in (result.path / "outcomes-base.jsonl").read_text().splitlines()]
    assert [(o["id"], o["parsed"], o["exact"], o["execution_match"]) for o in outcomes] == [
        (0, True, True, True), (1, True, False, True), (2, True, False, False), (3, False, False, False)]
    assert set(outcomes[0]) == {"id", "question", "gold", "prediction", "parsed", "exact", "execution_match", "error"}
    assert outcomes[3]["error"] and "not a SELECT" in outcomes[3]["error"]
    assert outcomes[0]["question"] == ROWS[0][1]

    again = run_stage(recipe, "evaluate")
    assert again.status == "skipped" and again.report["metrics"] == result.report["metrics"]


def test_deltas_against_base_and_passing_gates(tiny_recipe):
    gates = {"quantized_max_drop": 25.0, "merged_vs_adapter_max_drop": 0.0, "adapter_min_gain_over_base": 50.0,
             "quantized_min_execution_accuracy": 75.0}
    recipe = tiny_recipe(stages=ALL, infer={"models": FOUR}, evaluate={"gates": gates})
    write_infer(recipe, {"base": "IWWE", "adapter": "EEEQ", "merged": "EQEE", "quantized": "EEWE"})
    result = run_stage(recipe, "evaluate")
    metrics = result.report["metrics"]
    assert [metrics[m]["execution_accuracy"] for m in FOUR] == [25.0, 100.0, 100.0, 75.0]
    assert "delta_vs_base" not in metrics["base"]
    assert metrics["adapter"]["delta_vs_base"] == {"execution_accuracy": 75.0, "exact_match": 50.0,
                                                   "parse_rate": 25.0}
    assert metrics["quantized"]["delta_vs_base"]["execution_accuracy"] == 50.0
    assert {g["gate"]: (g["value"], g["passed"]) for g in result.report["gates"]} == {
        "quantized_max_drop": (25.0, True), "merged_vs_adapter_max_drop": (0.0, True),
        "adapter_min_gain_over_base": (75.0, True), "quantized_min_execution_accuracy": (75.0, True)}
    assert set(result.report["gates"][0]) >= {"gate", "limit", "value", "passed"}
    assert load_metrics(result.path)["gates"] == result.report["gates"]
    summary = format_summary(load_metrics(result.path))
    assert "quantized" in summary and "+75.00" in summary and "FAIL" not in summary


def test_failing_gates_raise_after_the_results_are_kept(tiny_recipe):
    gates = {"quantized_max_drop": 2.0, "adapter_min_gain_over_base": 80.0, "merged_min_execution_accuracy": 50.0}
    recipe = tiny_recipe(stages=ALL, infer={"models": FOUR}, evaluate={"gates": gates})
    write_infer(recipe, {"base": "IWWE", "adapter": "EEEQ", "merged": "EQEE", "quantized": "EEWE"})
    with pytest.raises(GateError) as info:
        run_stage(recipe, "evaluate")
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 8
    assert "gate quantized_max_drop: quantized lost 25 points vs merged (limit 2)" in message
    assert "gate adapter_min_gain_over_base: adapter gained 75 points over base (needs +80)" in message
    assert "merged_min_execution_accuracy" not in message  # it passed
    layout = RunLayout.from_recipe(recipe)
    assert layout.marker("evaluate") is not None  # committed: the metrics are there to inspect
    assert load_metrics(layout.stage_dir("evaluate"))["models"]["quantized"]["execution_accuracy"] == 75.0
    with pytest.raises(GateError, match="quantized_max_drop"):  # a rerun skips the work and still fails
        run_stage(recipe, "evaluate")


def test_quantized_drop_is_measured_against_the_adapter_without_merge(tiny_recipe):
    recipe = tiny_recipe(stages=["finetune", "quantize", "infer", "evaluate"],
                         infer={"models": ["adapter", "quantized"]}, evaluate={"gates": {"quantized_max_drop": 10.0}})
    write_infer(recipe, {"adapter": "EEEE", "quantized": "EEEW"})
    with pytest.raises(GateError, match="quantized lost 25 points vs adapter"):
        run_stage(recipe, "evaluate")


def test_unknown_gate_is_a_recipe_error(tiny_recipe):
    with pytest.raises(RecipeError) as info:
        tiny_recipe(evaluate={"gates": {"quantised_max_drop": 2.0}})
    assert "evaluate.gates" in info.value.problems[0] and "quantised_max_drop" in info.value.problems[0]
    with pytest.raises(RecipeError, match="between 0 and 100"):
        tiny_recipe(evaluate={"gates": {"base_min_execution_accuracy": 150}})


def test_gate_on_a_model_that_was_not_inferred_is_a_recipe_error(tiny_recipe):
    # caught when the recipe is validated, before any stage runs
    with pytest.raises(RecipeError) as info:
        tiny_recipe(stages=["infer", "evaluate"], infer={"models": ["base"]},
                    evaluate={"gates": {"quantized_max_drop": 1.0, "adapter_min_execution_accuracy": 5.0}})
    assert "evaluate.gates.quantized_max_drop: needs 'quantized'" in info.value.problems[0]
    assert "evaluate.gates.adapter_min_execution_accuracy: needs 'adapter' in infer.models" in info.value.problems[1]


def test_missing_or_broken_predictions_name_the_file(tiny_recipe):
    recipe = tiny_recipe(stages=["infer", "evaluate"], infer={"models": ["base"]})
    layout = RunLayout.from_recipe(recipe)
    tmp = layout.new_temp_dir("infer")
    (tmp / "predictions-other.jsonl").write_text("")
    layout.commit("infer", tmp, recipe.fingerprint("infer"), {})
    with pytest.raises(ArtifactError, match=r"predictions-base\.jsonl: missing"):
        run_stage(recipe, "evaluate")
    (layout.stage_dir("infer") / "predictions-base.jsonl").write_text('{"id": 0, "context": "x"}\n')
    with pytest.raises(ArtifactError, match=r"predictions-base\.jsonl:1: missing key\(s\) gold, prediction"):
        run_stage(recipe, "evaluate")


def test_evaluate_needs_a_finished_infer(tiny_recipe):
    recipe = tiny_recipe(stages=["infer", "evaluate"], infer={"models": ["base"]})
    with pytest.raises(ArtifactError, match="stage 'infer'"):
        run_stage(recipe, "evaluate")


def test_load_metrics_reports_a_missing_file(tmp_path):
    with pytest.raises(ArtifactError, match="has the evaluate stage run"):
        load_metrics(tmp_path)
