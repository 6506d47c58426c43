"""Loading a Text-to-SQL data set and splitting it the same way in every stage.

Sources: ``builtin:text2sql`` (generated, see :mod:`kubetune.text2sql`), a local .json/.jsonl/.csv/.parquet
file or a folder of them, or a hub data set id. Rows become ``context``/``question``/``answer`` strings via
``data.columns``. The split is a seeded shuffle: the first ``eval_size`` rows are held out for evaluation and
``train_fraction`` of the rest is trained on, so fine-tune, quantize calibration, infer and evaluate agree on
which rows are which.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kubetune.errors import DataError

BUILTIN_PREFIX = "builtin:"
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
FIELDS = ("context", "question", "answer")
# Longest context, question or answer a row may have, in characters: ~250k tokens, beyond any model's context
# window. A longer field is a broken or hostile row; tokenizing one of tens of MB took GBs of memory and minutes.
MAX_FIELD_CHARS = 1_000_000


@dataclass
class Splits:
    train: "datasets.Dataset"  # noqa: F821
    eval: "datasets.Dataset"  # noqa: F821


def _load_raw(data, where: str = "data"):
    import datasets

    datasets.disable_progress_bars()
    source = data.source
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name != "text2sql":
            raise DataError(f"{where}.source: unknown builtin data set '{name}' (have: builtin:text2sql)")
        from kubetune.text2sql import generate

        return datasets.Dataset.from_list(generate(data.builtin_examples, seed=data.seed))
    path = Path(source).expanduser()
    try:
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(f"{path}: unsupported file type '{path.suffix}' (use {', '.join(FILE_BUILDERS)})")
            if path.stat().st_size == 0:  # datasets fails on it with a bare StopIteration
                raise DataError(f"{path}: the file is empty: the data set has no rows")
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        if path.is_dir():
            return datasets.load_dataset(str(path), split=data.split)
        if source.startswith((".", "/", "~")) or path.suffix.lower() in FILE_BUILDERS:
            raise DataError(f"{source}: data file not found")
        return datasets.load_dataset(source, split=data.split)
    except DataError:
        raise
    except UnicodeDecodeError as exc:
        raise DataError(f"{source}: not valid UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except Exception as exc:  # datasets raises many types; the user needs the source and the reason
        cause = exc
        while cause is not None and not isinstance(cause, UnicodeDecodeError):  # wrapped by the CSV builder
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise DataError(f"{source}: not valid UTF-8 text ({cause.reason} at byte {cause.start})") from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "UnicodeDecodeError" in reason or "utf-8" in reason.lower():
            reason = f"not valid UTF-8 text ({reason})"
        raise DataError(f"{source}: cannot load data set: {reason}") from None


def column_mapping(data) -> dict[str, str]:
    """{field: the source's column for it} (data.columns)."""
    return {field: getattr(data.columns, field) for field in FIELDS}


def as_example(row, mapping: dict[str, str]) -> dict[str, str]:
    """One source row as ``context``/``question``/``answer`` strings (a missing value is "")."""
    return {field: "" if row.get(col) is None else str(row[col]) for field, col in mapping.items()}


def checked_example(row, index: int, mapping: dict[str, str], source: str) -> dict[str, str]:
    """:func:`as_example`, refusing a field longer than MAX_FIELD_CHARS (``index``: the row's place in the source)."""
    example = as_example(row, mapping)
    for field, text in example.items():
        if len(text) > MAX_FIELD_CHARS:
            raise DataError(f"{source}: row {index + 1}: {field} (column '{mapping[field]}') has {len(text):,} "
                            f"characters; the limit is {MAX_FIELD_CHARS:,} (far beyond any model's context)")
    return example


def has_question_and_answer(example) -> bool:
    return bool(example["question"].strip()) and bool(example["answer"].strip())


def split_sizes(data, n: int) -> tuple[int, int]:
    """(held-out rows, training rows) of ``n`` shuffled rows: the first ``eval_size`` are held out, then
    ``train_fraction`` of the rest is trained on."""
    n_eval = int(data.eval_size) if data.eval_size >= 1 else max(1, round(n * data.eval_size))
    return n_eval, max(1, int((n - n_eval) * data.train_fraction))


def example_texts(example, prompt, eos_token: str | None) -> tuple[str, str]:
    """(prompt, completion) of one example as the fine-tune learns it; calibration and the estimator's token
    counts use the same text."""
    return prompt.format(example["context"], example["question"]), example["answer"].strip() + (eos_token or "")


def load_examples(data, where: str = "data", columns_hint: str | None = None) -> "datasets.Dataset":  # noqa: F821
    """All rows of the source as ``context``/``question``/``answer`` strings (empty rows dropped); ``where`` is
    the recipe section that names the source and ``columns_hint`` how to map columns, for the messages."""
    raw = _load_raw(data, where)
    if len(raw) == 0:
        raise DataError(f"{data.source}: the data set has no rows")
    mapping = column_mapping(data)
    missing = [f"{field} → '{col}'" for field, col in mapping.items() if col not in raw.column_names]
    if missing:
        raise DataError(f"{data.source}: missing column(s) {', '.join(missing)}; the data has columns "
                        f"{raw.column_names} (set {columns_hint or where + '.columns.<field>'})")
    raw = raw.select_columns(list(dict.fromkeys(mapping.values())))
    try:
        ds = raw.map(checked_example, with_indices=True, remove_columns=raw.column_names,
                     fn_kwargs={"mapping": mapping, "source": data.source})
    except UnicodeDecodeError as exc:  # JSON readers pass invalid UTF-8 through; it breaks here, on first use
        raise DataError(f"{data.source}: not valid UTF-8 text ({exc.reason}: {exc.object[:40]!r})") from None
    ds = ds.filter(has_question_and_answer)
    if len(ds) == 0:
        raise DataError(f"{data.source}: the data set has no rows with a question and an answer")
    return ds


def load_splits(data) -> Splits:
    ds = load_examples(data).shuffle(seed=data.seed)
    n = len(ds)
    n_eval, n_train = split_sizes(data, n)
    if n_eval >= n:
        raise DataError(f"{data.source}: data.eval_size={data.eval_size} leaves no training rows out of {n}")
    eval_ds = ds.select(range(n_eval))
    if data.max_eval_examples:
        eval_ds = eval_ds.select(range(min(n_eval, data.max_eval_examples)))
    return Splits(train=ds.select(range(n_eval, n_eval + n_train)), eval=eval_ds)


def eval_rows(recipe, eval_set: str) -> "datasets.Dataset":  # noqa: F821
    """The rows infer answers and evaluate scores for one evaluation set: the held-out split of data.source, or
    every row of a named set (``evaluate.sets.<name>``) up to its ``max_examples``, in the source's order."""
    from kubetune.config import HELDOUT_SET

    if eval_set == HELDOUT_SET:
        return load_splits(recipe.data).eval
    spec = recipe.evaluate.sets[eval_set]
    ds = load_examples(spec.as_data(), f"evaluate.sets.{eval_set}")
    return ds.select(range(min(len(ds), spec.max_examples))) if spec.max_examples else ds


def prompt_completion(ds, prompt, eos_token: str | None):
    """Rows in TRL's prompt-completion form: the loss can then be taken on the completion alone."""
    def convert(row):
        text, completion = example_texts(row, prompt, eos_token)
        return {"prompt": text, "completion": completion}

    return ds.map(convert, remove_columns=ds.column_names)
