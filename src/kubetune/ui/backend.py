"""What the compare UI does, without the UI: find a run and the models it has, hold the chosen models in memory
(and only those), answer a question with each, and execute and judge each answer's SQL.

Models are loaded with :func:`kubetune.variants.load_variant` and answer through the infer stage's
:func:`~kubetune.stages.infer.generate` (same prompt template, same SQL stop rule, greedy), so an answer here is
the answer the infer stage writes for the same row. Answers are judged with the evaluate stage's settings
(``evaluate.databases``, ``evaluate.timeout_s``, ``data.seed``), so a pass or fail here is the evaluate stage's.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kubetune.artifacts import SUCCESS_MARKER, RunLayout
from kubetune.config import HELDOUT_SET, MODEL_PRODUCERS, STAGE_NAMES, Recipe, load_recipe, recipe_from_dict
from kubetune.errors import ArtifactError, KubetuneError
from kubetune.measure import memory_footprint_bytes
from kubetune.sqlsandbox import SandboxedSuite, shared_pool
from kubetune.stage_report import report_of

log = logging.getLogger(__name__)

MAX_TABLE_ROWS = 20  # rows of a result shown; the pass/fail is computed on all of them


# ---- the run ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunInfo:
    recipe: Recipe
    layout: RunLayout
    models: tuple[str, ...]
    """Variants that can be loaded: base, and each one whose producing stage has finished (pipeline order)."""
    labels: dict[str, str]
    """Variant → what it is, for people: "quantized: GPTQ 4-bit"."""
    served: object | None = None
    """A :class:`~kubetune.serving.ServedModel` (``kubetune ui --endpoint``), offered as the model "served"."""

    @property
    def name(self) -> str:
        return self.layout.run


def _finished(run_dir: Path) -> list[str]:
    return [s for s in STAGE_NAMES if (run_dir / s / SUCCESS_MARKER).is_file()]


def _recipe_of_run(run_dir: Path) -> Recipe:
    """The recipe of the last finished stage (each report.json holds the whole recipe it ran with)."""
    stages = _finished(run_dir)
    if not stages:
        raise ArtifactError(f"{run_dir}: no finished stage (no {SUCCESS_MARKER}); run the fine-tune first, or pass "
                            "the recipe file to compare the base model alone")
    # an evaluation set added later (sets/<set>/<stage>/) finished after the stages and knows of every set
    markers = [run_dir / s / SUCCESS_MARKER for s in stages] + list(run_dir.glob(f"sets/*/*/{SUCCESS_MARKER}"))
    report_path = max(markers, key=lambda p: p.stat().st_mtime_ns).parent / "report.json"
    try:  # ValueError: not JSON, or not a report (pydantic's ValidationError is one)
        data = report_of(report_path.parent.name, json.loads(report_path.read_text(encoding="utf-8"))).recipe
    except (OSError, ValueError, TypeError) as exc:
        raise ArtifactError(f"{report_path}: cannot read the recipe from it ({str(exc).splitlines()[0]})") from None
    if data is None:
        raise ArtifactError(f"{report_path}: cannot read the recipe from it (it has none)")
    return recipe_from_dict(data, str(report_path))


def find_run_dir(run: str | None, artifacts_root: str | Path) -> Path:
    """RUN as a run folder, or a run name under ``artifacts_root``; None: the run that finished a stage last."""
    root = Path(artifacts_root).expanduser()
    if run:
        for candidate in (root / run, Path(run).expanduser()):  # a run name first: "tiny" is not ./tiny
            if candidate.is_dir():
                return candidate.absolute()
        raise ArtifactError(f"run '{run}': neither a folder nor a run under {root}")
    runs = [(max((d / s / SUCCESS_MARKER).stat().st_mtime for s in stages), d)
            for d in (root.iterdir() if root.is_dir() else []) if d.is_dir() and (stages := _finished(d))]
    if not runs:
        raise ArtifactError(f"{root}: no run with a finished stage; name the run, or pass its recipe file")
    return max(runs)[1].absolute()


def open_run(run: str | None, artifacts_root: str | Path = "artifacts") -> RunInfo:
    """A run from its folder, its name under ``artifacts_root``, or its recipe file (.yaml/.yml/.json)."""
    if run and Path(run).suffix.lower() in (".yaml", ".yml", ".json") and Path(run).is_file():
        recipe = load_recipe(run)
        layout = RunLayout.from_recipe(recipe)
    else:
        run_dir = find_run_dir(run, artifacts_root)
        recipe = _recipe_of_run(run_dir)
        # The folder found, not recipe.run.artifacts_root: that may be relative to another working directory.
        layout = RunLayout(run_dir.parent, run_dir.name)
    models = tuple(m for m, producer in MODEL_PRODUCERS.items()
                   if producer is None or layout.marker(producer) is not None)
    return RunInfo(recipe, layout, models, {m: model_label(recipe, layout, m) for m in models})


SERVED = "served"


def with_endpoint(info: RunInfo, url: str) -> RunInfo:
    """``info`` with the model served at ``url`` (OpenAI-compatible) offered beside the run's own."""
    from dataclasses import replace

    from kubetune.serving import ServedModel

    try:
        served = ServedModel(url)
    except (ConnectionError, KeyError, IndexError, TypeError) as exc:
        raise ArtifactError(f"--endpoint {url}: no OpenAI-compatible server with a model there ({exc})") from None
    return replace(info, models=(*info.models, SERVED), served=served,
                   labels={**info.labels, SERVED: f"served: {served.name} at {served.url}"})


def model_label(recipe: Recipe, layout: RunLayout, name: str) -> str:
    if name == "base":
        return f"base: {Path(recipe.model.name_or_path).name or recipe.model.name_or_path}"
    if name == "adapter":
        bits = {"4bit": ", 4-bit base", "8bit": ", 8-bit base"}.get(recipe.finetune.base_precision, "")
        return f"adapter: LoRA r={recipe.finetune.lora.r}{bits}"
    if name == "merged":
        return f"merged: {recipe.merge.dtype}"
    try:  # the checkpoint's own figure: the recipe may have been edited since
        config = json.loads((layout.stage_dir("quantize") / "config.json").read_text())
        bits = config["quantization_config"]["bits"]
    except (OSError, ValueError, KeyError, TypeError):
        bits = recipe.quantize.bits
    return f"quantized: GPTQ {bits}-bit"


# ---- evaluation rows --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    id: int
    context: str
    question: str
    gold: str
    eval_set: str = HELDOUT_SET

    @property
    def title(self) -> str:
        where = "" if self.eval_set == HELDOUT_SET else f"[{self.eval_set}] "
        return f"{where}#{self.id}: {self.question.strip()[:90]}"


def eval_examples(info: RunInfo, limit: int = 200) -> list[Example]:
    """Up to ``limit`` rows of each evaluation set, the held-out split first: read from the infer stage's
    predictions when it ran (no data loading), else loaded the way every stage does. An unloadable data set gives
    no examples, not an error: questions can still be typed."""
    from kubetune.data import eval_rows

    examples = []
    for eval_set in info.recipe.eval_sets():
        infer_dir = info.layout.stage_dir("infer", eval_set)
        files = sorted(infer_dir.glob("predictions-*.jsonl")) if info.layout.marker("infer", eval_set) else []
        if files:
            with open(files[0], encoding="utf-8") as fh:
                rows = [json.loads(line) for line in fh if line.strip()][:limit]
            examples += [Example(int(r["id"]), str(r["context"]), str(r["question"]), str(r["gold"]), eval_set)
                         for r in rows]
            continue
        try:
            split = eval_rows(info.recipe, eval_set)
        except KubetuneError as exc:
            log.warning("no examples of evaluation set %s: %s", eval_set, exc)
            continue
        examples += [Example(i, r["context"], r["question"], r["answer"], eval_set)
                     for i, r in enumerate(split) if i < limit]
    return examples


# ---- loaded models ----------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    name: str
    model: object
    tokenizer: object
    template: object
    footprint_bytes: int
    load_seconds: float


Loader = Callable[[Recipe, RunLayout, str], tuple]


def _default_loader(recipe, layout, name):
    from kubetune.variants import load_variant

    return load_variant(recipe, layout, name)


class ModelPool:
    """The models in memory: exactly those last selected. Selecting frees the others *before* loading new ones,
    so memory never holds more than the selection, and returns to its baseline when a model is dropped.

    One lock serialises loading, freeing and generating: Gradio calls from several threads.
    """

    def __init__(self, info: RunInfo, loader: Loader = _default_loader):
        self.info = info
        self._loader = loader
        self._loaded: dict[str, Loaded] = {}
        self.lock = threading.RLock()

    def names(self) -> list[str]:
        with self.lock:
            return list(self._loaded)

    def loaded(self) -> list[Loaded]:
        # No lock: the memory panel reads this every few seconds and must not wait for a load to finish
        # (copying a dict is atomic under the GIL).
        return list(self._loaded.values())

    def select(self, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in self.info.models]
        if unknown:
            raise ArtifactError(f"run '{self.info.name}' has no model {', '.join(unknown)} "
                                f"(it has {', '.join(self.info.models)})")
        with self.lock:
            for name in [n for n in self._loaded if n not in names]:
                self._free(name)
            for name in [n for n in self.info.models if n in names and n not in self._loaded]:
                started = time.perf_counter()
                if name == SERVED:  # answered by a server: nothing in this process's memory
                    self._loaded[name] = Loaded(name, self.info.served, None, None, 0, time.perf_counter() - started)
                    continue
                model, tokenizer, template = self._loader(self.info.recipe, self.info.layout, name)
                self._loaded[name] = Loaded(name, model, tokenizer, template, memory_footprint_bytes(model),
                                            time.perf_counter() - started)
            return list(self._loaded)

    def _free(self, name: str) -> None:
        from kubetune.ui.memory import trim_heap
        from kubetune.variants import release

        if name == SERVED:
            self._loaded.pop(name)
            return
        entry = self._loaded.pop(name)
        model, entry.model, entry.tokenizer = entry.model, None, None
        release(model)  # empties the weights even if a reference survives (a traceback, a Gradio cache)
        del model
        trim_heap()
        log.info("released %s", name)

    def close(self) -> None:
        self.select([])


# ---- answering and judging --------------------------------------------------------------------------------------
@dataclass
class Execution:
    """One query run on the first test-suite database, and judged on all of them when there is a gold query."""

    columns: list[str] = field(default_factory=list)
    rows: list[tuple] = field(default_factory=list)
    total_rows: int = 0
    error: str | None = None  # why it did not run (not one SELECT, unknown column, timeout, bad schema)
    passed: bool | None = None  # same results as the gold; None when there is no usable gold


@dataclass
class Answer:
    model: str
    label: str
    sql: str
    new_tokens: int
    seconds: float
    execution: Execution

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Comparison:
    context: str
    question: str
    gold: str
    gold_execution: Execution | None  # None when no gold was given
    answers: list[Answer]


def _run(suite: SandboxedSuite, sql: str) -> Execution:
    try:
        shown = suite.table(sql, MAX_TABLE_ROWS)
    except ValueError as exc:
        return Execution(error=str(exc))
    return Execution(shown.columns, shown.rows, shown.total_rows)


def judge(recipe: Recipe, context: str, gold: str, predictions: dict[str, str]) -> tuple[Execution | None,
                                                                                          dict[str, Execution]]:
    """Execute the gold query and each prediction on the context's test-suite databases (built once, as the
    evaluate stage builds them for a row) and say which predictions match the gold. The SQL and the schema run
    in a worker of the process's sandbox pool (:func:`kubetune.sqlsandbox.shared_pool`): bounded in time and
    memory, and up to SHARED_WORKERS requests at once, so one user's hostile schema does not hold another's."""
    gold = gold.strip()
    with SandboxedSuite(shared_pool(), context, gold, databases=recipe.evaluate.databases,
                        timeout_s=recipe.evaluate.timeout_s, seed=recipe.data.seed) as suite:
        gold_exec = None
        if gold:
            gold_exec = _run(suite, gold)
            gold_exec.error = gold_exec.error or suite.gold_error
        out = {}
        for name, sql in predictions.items():
            execution = _run(suite, sql)
            if gold and not suite.gold_error:
                execution.passed = suite.check(sql).match
            out[name] = execution
    return gold_exec, out


def ask(pool: ModelPool, context: str, question: str, gold: str = "",
        max_new_tokens: int | None = None) -> Comparison:
    """Greedy answers of every loaded model, timed, with their SQL executed and judged."""
    if not question.strip():
        raise ValueError("type a question (and the schema it is about), or pick an example")
    recipe = pool.info.recipe
    infer = recipe.infer.model_copy(update={"greedy": True, **({"max_new_tokens": max_new_tokens}
                                                              if max_new_tokens else {})})
    greedy = recipe.model_copy(update={"infer": infer})
    from kubetune.stages.infer import generate

    answered = []
    with pool.lock:
        loaded = pool.loaded()
        if not loaded:
            raise ValueError("pick at least one model first")
        for entry in loaded:
            started = time.perf_counter()
            if entry.name == SERVED:
                from kubetune.stages.infer import cut_sql

                try:
                    text, new_tokens = entry.model.answer(context, question, infer.max_new_tokens)
                except ConnectionError as exc:  # shown on the page like the user's own mistakes
                    raise ValueError(f"the served model did not answer: {exc}") from None
                sql = cut_sql(text)
            else:
                prompt = entry.template.format(context, question)
                [(sql, new_tokens)] = generate(entry.model, entry.tokenizer, [prompt], greedy)
            answered.append((entry.name, sql, new_tokens, time.perf_counter() - started))
    gold_exec, executions = judge(recipe, context, gold, {name: sql for name, sql, _, _ in answered})
    answers = [Answer(name, pool.info.labels[name], sql, n, s, executions[name]) for name, sql, n, s in answered]
    return Comparison(context, question, gold.strip(), gold_exec, answers)
