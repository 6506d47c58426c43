"""Packing several training examples into each sequence (``finetune.packing``) without letting one attend to another.

TRL 1.16 bins the examples into sequences of at most ``max_length`` tokens (best-fit decreasing) and then, by
default, flattens each batch into one padding-free row whose ``position_ids`` restart at 0 for every example.
Two things follow, and this module handles both:

* Examples stay apart only if the attention reads those restarts: a varlen flash-attention kernel (from the
  collator's ``cu_seq_lens``), or transformers' mask builders, which turn restarting ``position_ids`` into a
  block-diagonal mask when no ``attention_mask`` is passed. BLOOM's mask builder gets no ``position_ids``, so a
  packed BLOOM batch would silently attend across examples: ``check_examples_kept_apart`` refuses it (and
  ``kubetune estimate`` / ``submit`` before anything runs).
* Without a varlen kernel (sdpa, eager: every image we ship), the flattened row is *one* sequence of
  batch_size × max_length tokens under a dense block mask, so attention work and mask memory grow with
  (batch_size × max_length)². There the stage keeps TRL's bins as rows instead (``RowPackedCollator``):
  right-padded rows of at most max_length, ``position_ids`` restarting per example, no ``attention_mask``;
  attention per row is max_length², the shape ``kubetune estimate`` assumes for packing. On falcon-7b (8 rows of
  512 tokens, H200, bench/results/gpu-h200-2026-11-28-falcon-packing.md): one flattened row 37.7 GiB and 8.2 s
  per step, rows 23.0 GiB and 4.0 s.

BLOOM's mask never sees ``position_ids``; ``document_attention`` gives it a FlexAttention path that reads them
(a block mask per example, ALiBi as a score_mod), so it packs like the others.

With ``finetune.compile`` every micro-batch has one shape, batch_size rows × max_length tokens (``static``):
short batches get empty rows (all padding, no label) and every row is padded to max_length, so the compiled
step never meets a new shape and never recompiles. Padding positions are lone 0s in ``position_ids``: each is an
"example" of one token that attends to itself only and carries no label.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

FLATTENED = "padding-free"  # TRL's one flat row per batch, for varlen flash kernels
ROWS = "rows"  # one row per packed sequence, block-diagonal mask from position_ids


def uses_varlen_attention(model) -> bool:
    """Flash-attention kernels read the flattened row's sequence boundaries (cu_seq_lens) directly."""
    return "flash" in str(getattr(model.config, "_attn_implementation", None) or "")


def packing_layout(model) -> str:
    return FLATTENED if uses_varlen_attention(model) else ROWS


def keeps_examples_apart(model) -> bool:
    """Whether packed examples stay apart in this model (loaded, or on the meta device for the estimator): a varlen
    flash kernel, transformers' mask built from ``position_ids`` (modelio.mask_reads_position_ids), or kubetune's
    document attention (BLOOM)."""
    from kubetune import modelio
    from kubetune.stages import document_attention

    return (uses_varlen_attention(model) or document_attention.supports(model)
            or modelio.mask_reads_position_ids(model))


def check_examples_kept_apart(model, model_name: str) -> None:
    """Refuse packing (a RecipeError, before any data is read) for a model that would attend across examples."""
    from kubetune import modelio

    if not keeps_examples_apart(model):
        raise modelio.packing_refused(model_name, type(model).__name__, model.config._attn_implementation)


@dataclass
class RowPackedCollator:
    """TRL's collator for packed sequences, but one row per sequence: right padding, ``position_ids`` restarting
    at 0 per example and no ``attention_mask`` (so transformers builds the block-diagonal mask from them).
    The first token of each example gets no label: it would be predicted from the end of the previous example."""

    packed: Any  # trl's DataCollatorForLanguageModeling, as SFTTrainer built it for padding-free packing
    static: tuple[int, int] | None = None
    """(rows, tokens): pad every batch to exactly this shape (finetune.compile); None: to the longest row."""

    def __post_init__(self):
        self.packed = replace(self.packed, padding_free=False, return_position_ids=True,
                              pad_to_multiple_of=self.static[1] if self.static else self.packed.pad_to_multiple_of)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.packed(examples)
        batch.pop("attention_mask")
        batch["labels"][batch["position_ids"] == 0] = -100
        if self.static:
            batch = _pad_rows(batch, self.static[0], self.packed.pad_token_id)
        return batch


def _pad_rows(batch: dict[str, Any], rows: int, pad_token_id: int) -> dict[str, Any]:
    """Add empty rows (padding tokens, position 0, no label) up to ``rows``: the last batch of an epoch."""
    import torch

    missing = rows - batch["input_ids"].shape[0]
    if missing <= 0:
        return batch
    fill = {"input_ids": pad_token_id, "position_ids": 0, "labels": -100}
    for key, value in fill.items():
        extra = torch.full((missing, batch[key].shape[1]), value, dtype=batch[key].dtype)
        batch[key] = torch.cat([batch[key], extra])
    return batch


def use_row_packing(trainer, static: tuple[int, int] | None = None) -> None:
    trainer.data_collator = RowPackedCollator(trainer.data_collator, static)
    if document_attention_needed(trainer.model):
        from kubetune.stages import document_attention

        document_attention.use_document_attention(trainer.model)


def document_attention_needed(model) -> bool:
    from kubetune.stages import document_attention

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return document_attention.supports(inner) and not uses_varlen_attention(inner)


def packed_example_lengths(position_ids):
    """Token count of each example in a packed batch without ``attention_mask``, flattened or in rows (a 1-D tensor).

    Inside an example ``position_ids`` rise by 1, so an example ends where the next position is 0 (the next example,
    or right padding) or at the row's end, and its length is its last position + 1. Right padding is a run of lone
    0s: a one-token example would count as padding, and it has nothing to learn."""
    import torch

    ends = torch.ones_like(position_ids, dtype=torch.bool)
    ends[:, :-1] = position_ids[:, 1:] == 0
    last = position_ids[ends]
    return last[last > 0] + 1
