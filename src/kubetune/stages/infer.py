"""Infer: each model in ``infer.models`` answers the evaluation split (and ``infer.prompts``), one model at a time.

For every model: load it (:func:`kubetune.variants.load_variant`, which also brings the prompt template it was
trained with), generate in batches with left padding, write the answers, release the model, then load the next.

Where the SQL ends (:func:`sql_end`): leading whitespace is skipped, then the answer ends at the first

    * end-of-sequence token,
    * blank line (``\\n\\n``, or a line of only spaces),
    * line starting with ``#`` (the template's ``# context:`` / ``# result:`` markers: a model writing the next
      example), or
    * ``;`` (the end of the statement; the ``;`` itself is dropped. It counts even inside a quoted literal, which
      is rare in Text-to-SQL and keeps the rule a plain text search).

A fine-tuned model emits eos right after the SQL; a base model rambles on, so the same rule also stops
generation early (:class:`StopAtEndOfSql`), and cuts the text afterwards. ``new_tokens`` counts the tokens
generated up to and including the one that ended the answer (eos included), not the padding after it.

Each evaluation set (the held-out split, then each of ``evaluate.sets``) is one run of this stage with its own
folder; ``infer.prompts`` are answered with the held-out split only.

Artifact (``<run>/infer/``, ``<run>/sets/<set>/infer/``): ``predictions-<model>.jsonl``, one line per evaluation row:
``{"id", "context", "question", "gold", "prompt", "prediction", "new_tokens"}`` (``id`` = index in the evaluation
split), and ``prompts-<model>.jsonl`` (``{"prompt", "output", "new_tokens"}``) when ``infer.prompts`` is set.
"""

from __future__ import annotations

import json
import logging
import re
import time

from kubetune.config import HELDOUT_SET
from kubetune.measure import count_parameters, memory_footprint_bytes
from kubetune.stages import StageContext
from kubetune.variants import load_variant, release

log = logging.getLogger(__name__)

_END = re.compile(r"\n[ \t]*\n|\n[ \t]*#|;")


def sql_end(text: str) -> int | None:
    """Index in ``text`` where the SQL answer ends by the rule in the module docstring, or None if not yet."""
    start = len(text) - len(text.lstrip())
    if text.startswith("#", start):
        return start
    match = _END.search(text, start)
    return match.start() if match else None


def cut_sql(text: str) -> str:
    """The answer part of generated text: everything before :func:`sql_end`, stripped."""
    end = sql_end(text)
    return (text if end is None else text[:end]).strip()


def _stopping_criteria(tokenizer, prompt_len: int, eos_ids: set[int]):
    """A StoppingCriteria that ends each row at the end of its SQL and records how many tokens that took."""
    import torch
    from transformers import StoppingCriteria

    class StopAtEndOfSql(StoppingCriteria):
        def __init__(self):
            self.lengths: dict[int, int] = {}  # row → new tokens when it finished

        def __call__(self, input_ids, scores, **kwargs):
            generated = input_ids[:, prompt_len:]
            done = []
            for row, ids in enumerate(generated):
                if row in self.lengths:
                    done.append(True)
                    continue
                text = tokenizer.decode(ids, skip_special_tokens=True)
                finished = int(ids[-1]) in eos_ids or sql_end(text) is not None
                if finished:
                    self.lengths[row] = len(ids)
                done.append(finished)
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StopAtEndOfSql()


def generate(model, tokenizer, prompts: list[str], recipe) -> list[tuple[str, int]]:
    """``(answer, new_tokens)`` for each prompt in one batch (greedy unless ``infer.greedy`` is false)."""
    import torch
    from transformers import GenerationConfig, StoppingCriteriaList

    infer = recipe.infer
    # Both the model's end tokens (some models have several, e.g. end-of-turn) and the tokenizer's (the one the
    # fine-tune appended to every answer).
    eos = model.generation_config.eos_token_id
    eos_ids = (set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}) - {None}
    config = GenerationConfig(max_new_tokens=infer.max_new_tokens, do_sample=not infer.greedy,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos_ids) or None,
                              **({} if infer.greedy else {"temperature": infer.temperature}))
    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow each prompt directly
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    prompt_len = batch["input_ids"].shape[1]
    stop = _stopping_criteria(tokenizer, prompt_len, eos_ids)
    with torch.no_grad():
        output = model.generate(**batch, generation_config=config, stopping_criteria=StoppingCriteriaList([stop]))
    results = []
    for row, ids in enumerate(output[:, prompt_len:]):
        n = stop.lengths.get(row, len(ids))
        results.append((cut_sql(tokenizer.decode(ids[:n], skip_special_tokens=True)), n))
    return results


def answer_rows(model, tokenizer, template, rows, recipe, path, progress=lambda rows_done: None) -> tuple[int, float]:
    """Answer every row (``context``/``question``/``answer``) in batches of ``infer.batch_size`` and write
    ``path`` (one prediction a line, as in the module docstring); returns (new tokens, generation seconds)."""
    n_rows, batch_size = len(rows), recipe.infer.batch_size
    generated_tokens, gen_seconds = 0, 0.0
    with open(path, "w", encoding="utf-8") as fh:
        for first in range(0, n_rows, batch_size):
            chunk = rows.select(range(first, min(first + batch_size, n_rows)))
            prompts = [template.format(r["context"], r["question"]) for r in chunk]
            t0 = time.perf_counter()
            answers = generate(model, tokenizer, prompts, recipe)
            gen_seconds += time.perf_counter() - t0
            for i, (r, prompt, (prediction, n_new)) in enumerate(zip(chunk, prompts, answers)):
                generated_tokens += n_new
                fh.write(json.dumps({"id": first + i, "context": r["context"], "question": r["question"],
                                     "gold": r["answer"], "prompt": prompt, "prediction": prediction,
                                     "new_tokens": n_new}, ensure_ascii=False) + "\n")
            progress(first + len(chunk))
    return generated_tokens, gen_seconds


def run(ctx: StageContext) -> dict:
    import torch

    from kubetune.data import eval_rows

    recipe, infer = ctx.recipe, ctx.recipe.infer
    layout = ctx.layout
    rows = eval_rows(recipe, ctx.eval_set)
    extra_prompts = infer.prompts if ctx.eval_set == HELDOUT_SET else []
    n_rows, n_prompts = len(rows), len(extra_prompts)
    total = len(infer.models) * (n_rows + n_prompts)
    done = 0
    throughput, parameters, footprint = {}, {}, {}
    for name in infer.models:
        ctx.progress("infer", done, total, f"{name}: loading")
        started = time.perf_counter()
        model, tokenizer, template = load_variant(recipe, layout, name)
        load_seconds = time.perf_counter() - started
        parameters[name] = count_parameters(model)
        footprint[name] = memory_footprint_bytes(model)
        torch.manual_seed(recipe.data.seed)  # sampled answers (infer.greedy false) repeat from run to run

        def progress(rows_done: int, name=name, start=done) -> None:
            ctx.progress("infer", start + rows_done, total, f"{name}: {rows_done}/{n_rows}")

        generated_tokens, gen_seconds = answer_rows(model, tokenizer, template, rows, recipe,
                                                    ctx.out / f"predictions-{name}.jsonl", progress)
        done += n_rows
        if extra_prompts:
            with open(ctx.out / f"prompts-{name}.jsonl", "w", encoding="utf-8") as fh:
                for first in range(0, n_prompts, infer.batch_size):
                    prompts = extra_prompts[first:first + infer.batch_size]
                    for prompt, (output, n_new) in zip(prompts, generate(model, tokenizer, prompts, recipe)):
                        fh.write(json.dumps({"prompt": prompt, "output": output, "new_tokens": n_new},
                                            ensure_ascii=False) + "\n")
                    done += len(prompts)
                    ctx.progress("infer", done, total, f"{name}: prompts")
        throughput[name] = {
            "tokens_per_s": round(generated_tokens / gen_seconds, 3) if gen_seconds > 0 else 0.0,
            "examples": n_rows,
            "seconds": round(gen_seconds, 3),  # generation only; loading is load_seconds
            "new_tokens": generated_tokens,
            "load_seconds": round(load_seconds, 3),
            "batch_size": infer.batch_size,
        }
        log.info("%s: %d examples, %d new tokens in %.1f s", name, n_rows, generated_tokens, gen_seconds)
        release(model)  # before the next load: two models need not fit at once
        del model
    return {"throughput": throughput, "parameters": parameters, "memory_footprint_bytes": footprint,
            "generation": {"greedy": infer.greedy, "max_new_tokens": infer.max_new_tokens,
                           "temperature": None if infer.greedy else infer.temperature}}
