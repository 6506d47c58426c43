"""How long the fine-tune's batches really are: the training rows, tokenized the way TRL does it.

The SFTTrainer's collator pads a batch to its longest row, not to ``finetune.max_length``, so with short rows (the
builtin Text-to-SQL rows are ~60-130 tokens) a step holds far less than ``batch × max_length`` tokens. When the
tokenizer (``tokenizer.json`` in a local ``model.name_or_path`` folder) and the data (``builtin:text2sql`` or a
local .json/.jsonl file) are on this machine, the training split is rebuilt as :func:`kubetune.data.load_splits`
builds it (same generator, same seeded permutation as ``datasets.Dataset.shuffle``), every row is tokenized as
TRL 1.16's ``tokenize_fn`` does for prompt-completion rows (prompt and prompt + completion, the completion ending
with the tokenizer's eos token, special tokens as the tokenizer adds them), and the worst batch is the one holding
the longest rows. Only the ``tokenizers`` library and numpy are imported: a 4000-row set takes ~0.3 s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kubetune.data import (BUILTIN_PREFIX, as_example, column_mapping, example_texts, has_question_and_answer,
                           split_sizes)


@dataclass(frozen=True)
class Rows:
    """Token counts of the training rows (untruncated)."""

    total: tuple[int, ...]
    """prompt + completion tokens per row."""
    completion: tuple[int, ...]
    """completion tokens per row (where the tokenized prompt and prompt + completion part, as in TRL)."""
    source: str
    """Where the rows came from, for the output."""


@dataclass(frozen=True)
class WorstBatch:
    length: int
    """Padded length of the longest batch: min(max_length, longest row), or max_length."""
    labelled: int
    """Positions whose next-token label is not -100 in that batch (upper bound: the ``batch`` rows with most)."""
    why: str


def worst_batch(rows: Rows | None, reason: str, batch: int, max_length: int, completion_only: bool,
                packing: bool) -> WorstBatch:
    """The padded length and labelled positions of the largest batch of ``batch`` rows."""
    if packing:
        return WorstBatch(max_length, batch * (max_length - 1),
                          f"packing: every sequence is max_length {max_length} tokens")
    if rows is None or not rows.total:
        return WorstBatch(max_length, batch * (max_length - 1),
                          f"max_length {max_length} (worst case: {reason})")
    labels = []
    for total, completion in zip(rows.total, rows.completion):
        kept = min(total, max_length)
        prompt = total - completion
        if completion_only:
            n = max(0, kept - prompt)
            if n == 0:
                continue  # TRL drops rows whose prompt alone fills max_length (no label left)
        else:
            n = kept - 1
        labels.append(n)
    longest = min(max_length, max(rows.total))
    labelled = sum(sorted(labels, reverse=True)[:batch])
    cut = sum(1 for t in rows.total if t > max_length)
    why = (f"{longest} tokens: the longest of {len(rows.total)} training rows ({rows.source})"
           + (f", {cut} cut at max_length" if cut else "") + "; batches are padded to their longest row")
    return WorstBatch(longest, labelled, why)


# ---- reading the rows ------------------------------------------------------------------------------------------
def tokenizer_file(recipe) -> Path | None:
    path = Path(recipe.model.name_or_path).expanduser()
    file = path / "tokenizer.json"
    return file if path.is_dir() and file.is_file() else None


def fingerprint(recipe) -> tuple[dict | None, str]:
    """What the row lengths depend on (for the cache), or None and why they cannot be read here."""
    tok = tokenizer_file(recipe)
    if tok is None:
        return None, "no local tokenizer.json in model.name_or_path"
    data = recipe.data
    source = data.source
    if source.startswith(BUILTIN_PREFIX):
        source_key = source
    else:
        file = Path(source).expanduser()
        if not (file.is_file() and file.suffix.lower() in (".json", ".jsonl")):
            return None, f"data.source {source!r} is not builtin:text2sql or a local .json/.jsonl file"
        st = file.stat()
        source_key = f"{file.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in (tok, tok.with_name("tokenizer_config.json"))
             if f.is_file()]
    return {"tokenizer": str(tok.resolve()), "stats": stats, "source": source_key,
            "data": data.model_dump(mode="json"), "template": recipe.prompt.template}, ""


def _eos(tok: Path) -> str:
    config = tok.with_name("tokenizer_config.json")
    if not config.is_file():
        return ""
    eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token") or ""
    return eos.get("content", "") if isinstance(eos, dict) else eos


def _examples(data) -> list[dict]:
    """Rows as context/question/answer strings, empty ones dropped (kubetune.data.load_examples)."""
    if data.source.startswith(BUILTIN_PREFIX):
        from kubetune.text2sql import generate

        raw = generate(data.builtin_examples, seed=data.seed)
    else:
        file = Path(data.source).expanduser()
        text = file.read_text(encoding="utf-8")
        if file.suffix.lower() == ".jsonl":
            raw = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            loaded = json.loads(text)
            raw = loaded if isinstance(loaded, list) else next(v for v in loaded.values() if isinstance(v, list))
    mapping = column_mapping(data)
    return [e for e in (as_example(r, mapping) for r in raw) if has_question_and_answer(e)]


def train_rows(data, examples: list[dict]) -> list[dict]:
    """The training split of kubetune.data.load_splits: seeded permutation, eval rows first, then the rest."""
    import numpy as np

    n = len(examples)
    order = np.random.default_rng(data.seed).permutation(n)
    n_eval, n_train = split_sizes(data, n)
    return [examples[i] for i in order[n_eval:n_eval + n_train]]


def read_rows(recipe) -> Rows:
    """Token counts of every training row (the fingerprint said they can be read here)."""
    from tokenizers import Tokenizer

    from kubetune.prompt import PromptTemplate

    tok_file = tokenizer_file(recipe)
    tok = Tokenizer.from_file(str(tok_file))
    tok.no_truncation()
    tok.no_padding()
    eos = _eos(tok_file)
    template = PromptTemplate(recipe.prompt.template)
    rows = train_rows(recipe.data, _examples(recipe.data))
    texts = [example_texts(r, template, eos) for r in rows]
    prompts = [prompt for prompt, _ in texts]
    whole = [prompt + completion for prompt, completion in texts]
    p_ids = tok.encode_batch(prompts)
    w_ids = tok.encode_batch(whole)
    total, completion = [], []
    for p, w in zip(p_ids, w_ids):
        a, b = p.ids, w.ids
        common = 0  # TRL's common_prefix_length: the completion starts where the two token lists part
        for x, y in zip(a, b):
            if x != y:
                break
            common += 1
        total.append(len(b))
        completion.append(len(b) - common)
    where = recipe.data.source
    return Rows(tuple(total), tuple(completion), f"{where}, tokenized with {tok_file.parent.name}'s tokenizer")
