"""Evaluate stage: score each inferred model's SQL against the gold answers, then apply the recipe's gates.

Input: ``<run>/infer/predictions-<model>.jsonl`` for each model in ``infer.models`` (see the infer stage).
Output (``<run>/evaluate/``; for a named evaluation set, ``<run>/sets/<set>/evaluate/`` from its own
``sets/<set>/infer/``, with the set's own gates):

* ``metrics.json`` — ``{"models": {m: {...}}, "gates": [...], "scoring": {...}}``. Per model, in percent of the
  evaluation rows (0–100, 2 decimals): ``execution_accuracy`` (test-suite execution match, see
  :mod:`kubetune.sqlcheck`), ``exact_match`` (normalized text), ``parse_rate`` (one SELECT that compiles on the
  context); and ``examples``, ``gold_errors`` (rows whose gold query does not run: they count as misses for
  every model), ``mean_new_tokens``, and ``delta_vs_base`` (points gained over the base model).
* ``outcomes-<model>.jsonl`` — one line per row: ``id, question, gold, prediction, parsed, exact,
  execution_match, error``.

Gates (``evaluate.gates``, points of execution accuracy; each is checked by :func:`check`):

* ``quantized_max_drop`` — how much the quantized model may lose against the merged one (against the adapter
  when merge did not run);
* ``merged_vs_adapter_max_drop`` — how much merging may lose against adapter-on-base (should be ~0);
* ``adapter_min_gain_over_base`` — how much fine-tuning must gain over the base model;
* ``<model>_min_execution_accuracy`` — a floor for one model's execution accuracy (percent).

A failed gate does not lose the results: the artifact is committed first, then :func:`check` raises
:class:`~kubetune.errors.GateError`, so the pipeline fails with the metrics on disk for inspection.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from kubetune.config import GATES, HELDOUT_SET, gate_models, gate_problems
from kubetune.errors import ArtifactError, GateError, RecipeError
from kubetune.sqlcheck import exact_match
from kubetune.sqlsandbox import SandboxedSuite, SandboxPool

log = logging.getLogger("kubetune")

METRICS_FILE = "metrics.json"
_REQUIRED_KEYS = ("id", "context", "gold", "prediction")


# ---- gates ---------------------------------------------------------------------------------------------------
def _pts(value: float) -> str:
    return f"{abs(value):g} point{'' if abs(value) == 1 else 's'}"


def evaluate_gates(gates: dict[str, float], metrics: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """``[{"gate", "limit", "value", "passed", "detail"}]`` for each gate (values in points or percent)."""
    problems = gate_problems(gates, list(metrics))
    if problems:
        raise RecipeError("recipe", problems)
    acc = {m: metrics[m]["execution_accuracy"] for m in metrics}
    results = []
    for name, limit in gates.items():
        kind, models = GATES[name].kind, gate_models(name, list(metrics))[0]
        if kind == "max_drop":
            low, ref = models
            value = round(acc[ref] - acc[low], 2)  # points lost; negative = gained
            passed = value <= limit
            detail = f"{low} {'lost' if value >= 0 else 'gained'} {_pts(value)} vs {ref} (limit {limit:g})"
        elif kind == "min_gain":
            model, ref = models
            value = round(acc[model] - acc[ref], 2)
            passed = value >= limit
            detail = f"{model} {'gained' if value >= 0 else 'lost'} {_pts(value)} over {ref} (needs +{limit:g})"
        else:
            model = models[0]
            value = acc[model]
            passed = value >= limit
            detail = f"{model} execution accuracy {value:g}% (needs at least {limit:g}%)"
        results.append({"gate": name, "limit": limit, "value": value, "passed": passed, "detail": detail})
    return results


def set_gates(recipe, eval_set: str = HELDOUT_SET) -> dict[str, float]:
    """The gates of one evaluation set: evaluate.gates for the held-out split, else the set's own."""
    return recipe.evaluate.gates if eval_set == HELDOUT_SET else recipe.evaluate.sets[eval_set].gates


def check(recipe, report: dict[str, Any], eval_set: str = HELDOUT_SET) -> None:
    """Raise GateError naming every failed gate; run after the artifact is committed (and when skipped)."""
    gates = set_gates(recipe, eval_set)
    if not gates:
        return
    metrics = report.get("metrics")
    if not isinstance(metrics, dict):
        raise ArtifactError("evaluate report.json: no metrics to check the gates against (move the evaluate "
                            "folder away and run the stage again)")
    failed = [g for g in evaluate_gates(gates, metrics) if not g["passed"]]
    if failed:
        on = "" if eval_set == HELDOUT_SET else f" on set {eval_set}"
        raise GateError("; ".join(f"gate {g['gate']}{on}: {g['detail']}" for g in failed))


# ---- scoring -------------------------------------------------------------------------------------------------
def read_predictions(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; the infer artifact has no predictions for this model")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ArtifactError(f"{path}:{lineno}: not a JSON object ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ArtifactError(f"{path}:{lineno}: not a JSON object")
            missing = [k for k in _REQUIRED_KEYS if k not in row]
            if missing:
                raise ArtifactError(f"{path}:{lineno}: missing key(s) {', '.join(missing)}")
            rows.append(row)
    if not rows:
        raise ArtifactError(f"{path}: no predictions")
    return rows


def _pct(count: int, total: int) -> float:
    return round(100.0 * count / total, 2) if total else 0.0


def _score_row(pool: SandboxPool, recipe, models: list[str], by_id: dict, i, outcomes: dict) -> int:
    """Judge every model's prediction for row ``i`` (appended to ``outcomes``); 1 if its gold cannot be scored."""
    first = by_id[models[0]][i]
    # One suite per row, shared by the models: the databases are built once, and every model is judged on the
    # same ones.
    with SandboxedSuite(pool, str(first["context"]), str(first["gold"]), databases=recipe.evaluate.databases,
                        timeout_s=recipe.evaluate.timeout_s, seed=recipe.data.seed) as suite:
        if suite.gold_error:
            log.warning("evaluation row %s: the gold query cannot be scored (%s)", i, suite.gold_error)
        predictions = [str(by_id[m][i].get("prediction") or "") for m in models]
        for m, prediction, outcome in zip(models, predictions, suite.check_many(predictions)):
            row = by_id[m][i]
            outcomes[m].append({
                "id": i, "question": row.get("question"), "gold": row["gold"], "prediction": prediction,
                "parsed": outcome.parsed, "exact": exact_match(str(row["gold"]), prediction),
                "execution_match": outcome.match, "error": outcome.error,
                "new_tokens": row.get("new_tokens")})
    return 1 if suite.gold_error else 0


def run(ctx) -> dict:
    recipe = ctx.recipe
    gates = set_gates(recipe, ctx.eval_set)
    problems = gate_problems(gates, list(recipe.infer.models))
    if problems:  # before any work: the recipe cannot pass these gates whatever the scores
        raise RecipeError("recipe", problems)
    return score(recipe, list(recipe.infer.models), ctx.input("infer"), ctx.out, gates, ctx.eval_set,
                 lambda done, total: ctx.progress("evaluate", done, total, "scoring"))


def score(recipe, models: list[str], infer_dir: Path, out: Path, gates: dict[str, float], eval_set: str,
          progress=lambda done, total: None) -> dict:
    """Score ``predictions-<model>.jsonl`` in ``infer_dir`` and write ``metrics.json`` and the outcomes into
    ``out``; the stage and ``kubetune evaluate MODEL_DIR`` (:mod:`kubetune.score`) both come here."""
    predictions = {m: read_predictions(infer_dir / f"predictions-{m}.jsonl") for m in models}
    by_id = {m: {row["id"]: row for row in rows} for m, rows in predictions.items()}
    for m in models:
        if len(by_id[m]) != len(predictions[m]):
            raise ArtifactError(f"{infer_dir / f'predictions-{m}.jsonl'}: the same id appears more than once")
    ids = list(by_id[models[0]])
    for m in models[1:]:
        if set(by_id[m]) != set(ids):
            raise ArtifactError(f"{infer_dir / f'predictions-{m}.jsonl'}: answers other rows than "
                                f"predictions-{models[0]}.jsonl; the models cannot be compared")

    outcomes: dict[str, list[dict[str, Any]]] = {m: [] for m in models}
    gold_errors = 0
    # The SQL (model output, and the data's contexts and gold queries) runs in a worker process with a memory
    # limit, killed at a hard deadline: see kubetune.sqlsandbox.
    with SandboxPool(workers=1) as pool:
        for done, i in enumerate(ids):
            gold_errors += _score_row(pool, recipe, models, by_id, i, outcomes)
            progress(done + 1, len(ids))

    metrics: dict[str, dict[str, Any]] = {}
    for m in models:
        rows = outcomes[m]
        n = len(rows)
        tokens = [r["new_tokens"] for r in rows if isinstance(r["new_tokens"], int)]
        metrics[m] = {
            "examples": n,
            "execution_accuracy": _pct(sum(r["execution_match"] for r in rows), n),
            "exact_match": _pct(sum(r["exact"] for r in rows), n),
            "parse_rate": _pct(sum(r["parsed"] for r in rows), n),
            "gold_errors": gold_errors,
            "mean_new_tokens": round(sum(tokens) / len(tokens), 2) if tokens else None,
        }
    if "base" in metrics:
        for m in models:
            if m != "base":
                metrics[m]["delta_vs_base"] = {k: round(metrics[m][k] - metrics["base"][k], 2)
                                               for k in ("execution_accuracy", "exact_match", "parse_rate")}
    gate_results = evaluate_gates(gates, metrics)

    for m in models:
        with open(out / f"outcomes-{m}.jsonl", "w", encoding="utf-8") as fh:
            for r in outcomes[m]:
                r = {k: v for k, v in r.items() if k != "new_tokens"}
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    scoring = {"method": "test-suite execution match (Zhong, Yu & Klein 2020) on generated SQLite databases",
               "databases": recipe.evaluate.databases, "timeout_s": recipe.evaluate.timeout_s}
    (out / METRICS_FILE).write_text(
        json.dumps({"models": metrics, "gates": gate_results, "scoring": scoring, "eval_set": eval_set},
                   indent=2) + "\n", encoding="utf-8")
    for m in models:
        log.info("%s: execution accuracy %.2f%%, exact match %.2f%%, parses %.2f%% (%d rows)", m,
                 metrics[m]["execution_accuracy"], metrics[m]["exact_match"], metrics[m]["parse_rate"], len(ids))
    return {"metrics": metrics, "gates": gate_results}


# ---- reading back --------------------------------------------------------------------------------------------
def load_metrics(path: str | Path) -> dict[str, Any]:
    """``metrics.json`` from an evaluate artifact folder (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: not found; has the evaluate stage run?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: cannot read metrics ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise ArtifactError(f"{path}: not an evaluate metrics file (no 'models')")
    return data


def format_summary(metrics: dict[str, Any]) -> str:
    """A plain-text table of ``load_metrics``'s result: one line per model, then one per gate."""
    lines = [f"{'model':<10} {'exec acc':>9} {'exact':>8} {'parses':>8} {'Δ exec vs base':>15}"]
    for m, v in metrics["models"].items():
        delta = v.get("delta_vs_base", {}).get("execution_accuracy")
        lines.append(f"{m:<10} {v['execution_accuracy']:>8.2f}% {v['exact_match']:>7.2f}% {v['parse_rate']:>7.2f}% "
                     f"{'' if delta is None else f'{delta:+.2f}':>15}")
    for g in metrics.get("gates", []):
        lines.append(f"gate {g['gate']}: {'PASS' if g['passed'] else 'FAIL'} — {g.get('detail', '')}")
    return "\n".join(lines)
