"""Score any model folder on any test file with the evaluate stage's evaluator: ``kubetune evaluate MODEL_DIR
--data FILE`` and, for notebooks, one call::

    from kubetune.score import evaluate_model
    result = evaluate_model("artifacts/demo/merge", "our-test.jsonl", out="evals/merged-ours")
    result["models"]["merged"]["execution_accuracy"]

The folder may be a run's merged or GPTQ output, a LoRA adapter folder (its base is read from
``adapter_config.json``), or any transformers causal LM folder or hub id. Answers come from the infer stage's
:func:`~kubetune.stages.infer.answer_rows` (same SQL stop rule, greedy) with the prompt template saved in the
folder (``kubetune_prompt.json``) unless ``template`` is given; they are scored by the evaluate stage's
:func:`~kubetune.stages.evaluate.score`. The output folder holds what the infer and evaluate stages write
(``predictions-<model>.jsonl``, ``outcomes-<model>.jsonl``, ``metrics.json``) and a ``report.json``; it is
written in a temporary folder and renamed into place, and an existing one is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from kubetune.errors import ArtifactError, DataError, ModelError

ADAPTER_CONFIG = "adapter_config.json"


def folder_kind(model_dir: Path) -> str:
    """What a model folder holds: ``adapter`` (LoRA), ``quantized`` (GPTQ) or ``merged`` (plain weights)."""
    if (model_dir / ADAPTER_CONFIG).is_file():
        return "adapter"
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "merged"
    return "quantized" if isinstance(config, dict) and "quantization_config" in config else "merged"


def _adapter_base(model_dir: Path) -> str:
    try:
        base = json.loads((model_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{model_dir / ADAPTER_CONFIG}: cannot read base_model_name_or_path ({exc})") from None
    if not base:
        raise ModelError(f"{model_dir / ADAPTER_CONFIG}: base_model_name_or_path is empty")
    return str(base)


def _recipe(model: str, template: str, dtype: str, trust_remote_code: bool, max_new_tokens: int, batch_size: int,
            databases: int, timeout_s: float, seed: int):
    from kubetune.config import recipe_from_dict

    return recipe_from_dict({
        "model": {"name_or_path": model, "dtype": dtype, "trust_remote_code": trust_remote_code},
        "prompt": {"template": template},
        "data": {"seed": seed},
        "infer": {"models": ["base"], "max_new_tokens": max_new_tokens, "batch_size": batch_size},
        "evaluate": {"databases": databases, "timeout_s": timeout_s},
        "stages": ["infer", "evaluate"]}, "kubetune evaluate")


def load_model_folder(recipe, model_dir: Path, kind: str):
    """``(model, tokenizer)`` of a folder of the given :func:`folder_kind`, in eval mode."""
    from kubetune import modelio
    from kubetune.variants import apply_adapter, load_quantized, load_tokenizer_of

    tokenizer = load_tokenizer_of(recipe, model_dir if (model_dir / "tokenizer_config.json").is_file() else None)
    if kind == "adapter":
        model = apply_adapter(modelio.load_base_model(recipe.model), model_dir, tokenizer)
    elif kind == "quantized":
        model = load_quantized(recipe, model_dir)
    else:
        model = modelio.load_base_model(recipe.model)
    model.eval()
    return model, tokenizer


def evaluate_model(model: str | Path, data: str | Path, out: str | Path | None = None, *,
                   template: str | None = None, columns: dict[str, str] | None = None, split: str = "train",
                   max_examples: int | None = None, name: str | None = None, dtype: str = "auto",
                   trust_remote_code: bool = False, max_new_tokens: int = 128, batch_size: int = 8,
                   databases: int = 3, timeout_s: float = 2.0, seed: int = 42) -> dict[str, Any]:
    """Answer every row of ``data`` with ``model`` and score the answers; returns ``metrics.json``'s content.

    ``columns`` maps context/question/answer to the file's column names; ``name`` is the model's name in the
    files (default: the folder's kind, ``merged``/``quantized``/``adapter``); ``out`` defaults to
    ``evaluations/<folder>-<data>``.
    """
    from kubetune.config import DEFAULT_PROMPT_TEMPLATE, DataSection
    from kubetune.data import load_examples
    from kubetune.prompt import PromptTemplate
    from kubetune.stages.evaluate import METRICS_FILE, score
    from kubetune.stages.infer import answer_rows
    from kubetune.variants import release

    model_dir = Path(model).expanduser()
    local = model_dir.is_dir()
    if not local and (str(model).startswith((".", "/", "~")) or model_dir.suffix):
        raise ModelError(f"{model}: model folder not found")
    kind = folder_kind(model_dir) if local else "merged"
    name = name or kind
    out = Path(out) if out is not None else Path("evaluations") / f"{model_dir.name}-{Path(str(data)).stem}"
    if out.exists():
        raise ArtifactError(f"{out}: already exists; results are never overwritten (choose another --out)")
    saved = PromptTemplate.load(model_dir) if local else None
    template_text = template if template is not None else saved.template if saved else DEFAULT_PROMPT_TEMPLATE
    recipe = _recipe(_adapter_base(model_dir) if kind == "adapter" else str(model), template_text, dtype, trust_remote_code, max_new_tokens, batch_size, databases,
                     timeout_s, seed)
    try:
        section = DataSection(source=str(data), split=split, **({"columns": columns} if columns else {}))
    except ValueError as exc:  # pydantic's ValidationError: a column map naming an unknown field
        raise DataError(f"--column: {str(exc).splitlines()[-1].strip()}") from None
    rows = load_examples(section, "--data", "--column FIELD=NAME, or columns=")
    if max_examples:
        rows = rows.select(range(min(len(rows), max_examples)))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        started = time.perf_counter()
        loaded, tokenizer = load_model_folder(recipe, model_dir, kind)  # a hub id: kind merged, its own tokenizer
        load_seconds = time.perf_counter() - started
        new_tokens, seconds = answer_rows(loaded, tokenizer, PromptTemplate(recipe.prompt.template), rows, recipe,
                                          tmp / f"predictions-{name}.jsonl")
        release(loaded)
        del loaded
        score(recipe, [name], tmp, tmp, {}, Path(str(data)).stem)
        report = {"model": str(model), "kind": kind, "data": str(data), "examples": len(rows),
                  "template_source": "--template" if template is not None else "saved" if saved else "default",
                  "prompt_template": recipe.prompt.template, "load_seconds": round(load_seconds, 3),
                  "throughput": {name: {"new_tokens": new_tokens, "seconds": round(seconds, 3),
                                        "tokens_per_s": round(new_tokens / seconds, 3) if seconds > 0 else 0.0}},
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return json.loads((out / METRICS_FILE).read_text(encoding="utf-8"))
