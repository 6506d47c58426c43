"""Infer stage: prediction files for every model, the stop rule, determinism, model release, the prompt contract.

A random tiny model writes garbage, so these tests check structure, counts, stopping and bookkeeping, never
accuracy.
"""

from __future__ import annotations

import gc
import json
import weakref

import pytest

from kubetune.artifacts import RunLayout
from kubetune.data import load_splits
from kubetune.errors import ArtifactError
from kubetune.stages import infer, run_stage
from kubetune.stages.infer import cut_sql, sql_end
from test_merge import commit_adapter
from test_quantize import commit_fake_merge

KEYS = {"id", "context", "question", "gold", "prompt", "prediction", "new_tokens"}


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _assert_cut(text: str) -> None:
    """What the stop rule promises about every prediction."""
    assert text == text.strip()
    assert ";" not in text and "\n\n" not in text
    assert not any(line.lstrip().startswith("#") for line in text.splitlines())


@pytest.mark.parametrize("raw, sql", [
    ("SELECT a FROM t;\nSELECT b FROM u", "SELECT a FROM t"),
    ("SELECT a\nFROM t\nWHERE b = 1\n\nSELECT c", "SELECT a\nFROM t\nWHERE b = 1"),  # multi-line SQL is kept
    ("SELECT a FROM t\n  \t\nmore", "SELECT a FROM t"),  # a line of spaces is blank too
    ("SELECT a FROM t\n# context:\nCREATE TABLE", "SELECT a FROM t"),
    ("SELECT a FROM t\n   # result:", "SELECT a FROM t"),
    ("\n\n  SELECT a FROM t\n\n", "SELECT a FROM t"),  # leading blank lines are not the end
    ("# result:\nSELECT a", ""),  # a model that starts the next section has answered nothing
    ("SELECT '#1' FROM t WHERE x = 'a#b'", "SELECT '#1' FROM t WHERE x = 'a#b'"),  # '#' mid-line is SQL
    ("SELECT COUNT(*) FROM t", "SELECT COUNT(*) FROM t"),
])
def test_the_stop_rule(raw, sql):
    assert cut_sql(raw) == sql


def test_sql_end_says_when_generation_may_stop():
    assert sql_end("SELECT a FROM t") is None  # not yet: the next token may continue it
    assert sql_end("SELECT a\nFROM t\n") is None
    assert sql_end("\n\n") is None  # whitespace only: the answer has not started
    assert sql_end("SELECT a FROM t;") == len("SELECT a FROM t")
    assert sql_end("SELECT a\n\n") == len("SELECT a")
    assert sql_end("  # result") == 2


def test_generation_stops_at_the_end_of_the_sql_and_counts_tokens_exactly(tiny_recipe):
    """Force the tiny model to write known text (a logits processor) and watch the real generate() stop."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from kubetune import modelio

    recipe = tiny_recipe(infer={"max_new_tokens": 40})
    model, tok = modelio.load_base_model(recipe.model), modelio.load_tokenizer(recipe.model)
    texts = ["SELECT a FROM t; SELECT b FROM u WHERE c = 1 AND d = 2 AND e = 3",
             "SELECT name\nFROM t\n\n# context:\nCREATE TABLE u (a VARCHAR, b VARCHAR, c INTEGER)",
             "SELECT 1 FROM t WHERE x = 5"]
    forced = [tok.encode(t, add_special_tokens=False) for t in texts]
    forced[2] = forced[2] + [tok.eos_token_id] + tok.encode(" AND y = 6 AND z = 7 OR w = 8", add_special_tokens=False)

    class Force(LogitsProcessor):
        prompt_len = None

        def __call__(self, input_ids, scores):
            self.prompt_len = self.prompt_len or input_ids.shape[1]
            step = input_ids.shape[1] - self.prompt_len
            for row, seq in enumerate(forced):
                scores[row] = -float("inf")
                scores[row, seq[step] if step < len(seq) else tok.pad_token_id] = 0
            return scores

    original = model.generate
    lengths = []

    def generate(**kwargs):
        out = original(**kwargs, logits_processor=LogitsProcessorList([Force()]))
        lengths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    model.generate = generate
    prompts = ["# result:\n", "a longer prompt so that padding is needed\n# result:\n", "x\n"]
    answers = infer.generate(model, tok, prompts, recipe)

    def tokens_to_end(seq):  # the first prefix whose text ends the SQL
        return next(n for n in range(1, len(seq) + 1) if sql_end(tok.decode(seq[:n])) is not None)

    assert answers == [("SELECT a FROM t", tokens_to_end(forced[0])),
                       ("SELECT name\nFROM t", tokens_to_end(forced[1])),
                       ("SELECT 1 FROM t WHERE x = 5", len(tok.encode(texts[2], add_special_tokens=False)) + 1)]
    assert lengths == [max(n for _, n in answers)]  # generation itself stopped, long before 40 tokens


def test_every_model_answers_the_eval_split_and_is_released_before_the_next(tiny_recipe, tiny_model_dir,
                                                                           monkeypatch):
    recipe = tiny_recipe(infer={"prompts": ["# context:\nCREATE TABLE t (a VARCHAR). Show a.\n# result:\n",
                                            "What is 1 + 1?"]})
    adapter_dir = commit_adapter(recipe)
    _, merged = commit_fake_merge(recipe, tiny_model_dir, adapter_dir)
    del merged
    run_stage(recipe, "quantize")

    events, models = [], []
    load, release = infer.load_variant, infer.release

    def spy_load(recipe, layout, name):
        events.append(("load", name))
        model, tok, template = load(recipe, layout, name)
        models.append((name, weakref.ref(model), next(model.parameters())))
        return model, tok, template

    def spy_release(model):
        events.append(("release", next(n for n, ref, _ in models if ref() is model)))
        release(model)

    monkeypatch.setattr(infer, "load_variant", spy_load)
    monkeypatch.setattr(infer, "release", spy_release)
    progress = []
    result = run_stage(recipe, "infer", progress=lambda *a: progress.append(a))

    names = ["base", "adapter", "merged", "quantized"]
    assert events == [(kind, n) for n in names for kind in ("load", "release")]
    gc.collect()
    for name, ref, param in models:  # memory is back: weights freed, and nothing else holds the model
        assert param.numel() == 0, name
        assert ref() is None, name

    rows = load_splits(recipe.data).eval
    template = recipe.prompt.template
    report = result.report
    for name in names:
        predictions = _read(result.path / f"predictions-{name}.jsonl")
        assert len(predictions) == len(rows) == 8
        for i, (p, row) in enumerate(zip(predictions, rows)):
            assert set(p) == KEYS
            assert (p["id"], p["context"], p["question"], p["gold"]) == (i, row["context"], row["question"],
                                                                         row["answer"])
            assert p["prompt"] == template.format(context=row["context"].strip(), question=row["question"].strip())
            assert isinstance(p["new_tokens"], int) and 1 <= p["new_tokens"] <= recipe.infer.max_new_tokens
            _assert_cut(p["prediction"])
        extra = _read(result.path / f"prompts-{name}.jsonl")
        assert [e["prompt"] for e in extra] == recipe.infer.prompts
        for e in extra:
            _assert_cut(e["output"])
        t = report["throughput"][name]
        assert t["examples"] == 8 and t["new_tokens"] == sum(p["new_tokens"] for p in predictions)
        # both figures are rounded to 3 decimals in the report: tokens/s must lie within what that rounding allows
        assert t["seconds"] > 0
        low, high = t["new_tokens"] / (t["seconds"] + 5e-4), t["new_tokens"] / max(t["seconds"] - 5e-4, 1e-9)
        assert low - 5e-4 <= t["tokens_per_s"] <= high + 5e-4
        assert report["memory_footprint_bytes"][name] > 0
    params = report["parameters"]
    assert params["base"]["total"] == params["merged"]["total"] == params["quantized"]["total"]
    assert params["adapter"]["total"] > params["base"]["total"]  # + the LoRA matrices
    assert "gptq-int4" in params["quantized"]["by_dtype"]
    assert report["memory_footprint_bytes"]["quantized"] < report["memory_footprint_bytes"]["merged"]
    assert progress[-1][1:3] == (4 * 10, 4 * 10)  # 4 models × (8 rows + 2 prompts)


def test_greedy_predictions_repeat_and_do_not_depend_on_the_batch(tiny_recipe):
    runs = []
    for name, batch_size in (("first", 4), ("again", 4), ("single", 1)):
        recipe = tiny_recipe(stages=["infer"], run={"name": name},
                             infer={"models": ["base"], "batch_size": batch_size, "max_new_tokens": 16})
        result = run_stage(recipe, "infer")
        runs.append([(p["prediction"], p["new_tokens"]) for p in _read(result.path / "predictions-base.jsonl")])
    assert runs[0] == runs[1]
    # Left padding with an attention mask: a row's answer is the same alone or next to longer prompts.
    assert runs[0] == runs[2]


def test_an_adapter_trained_with_another_template_is_refused_unless_allowed(tiny_recipe):
    other = "Q: {question}\nTables: {context}\nSQL: "
    recipe = tiny_recipe(stages=["finetune", "infer"], infer={"models": ["adapter"], "max_new_tokens": 4})
    commit_adapter(recipe, template=other)
    with pytest.raises(ArtifactError, match="another prompt template"):
        run_stage(recipe, "infer")
    assert RunLayout.from_recipe(recipe).marker("infer") is None

    allowed = tiny_recipe(stages=["finetune", "infer"], prompt={"allow_mismatch": True},
                          infer={"models": ["adapter"], "max_new_tokens": 4})
    result = run_stage(allowed, "infer")
    prompts = [p["prompt"] for p in _read(result.path / "predictions-adapter.jsonl")]
    assert prompts and all(p.startswith("# Instruction:") for p in prompts)  # the recipe's template, as asked
