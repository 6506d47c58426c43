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


def check_examples_kept_apart(model, model_name: str) -> None:
    """Refuse packing (a RecipeError, before any data is read) for a model whose attention mask ignores
    ``position_ids`` (modelio.mask_reads_position_ids); a varlen flash kernel keeps examples apart by itself."""
    from kubetune import modelio

    if uses_varlen_attention(model) or modelio.mask_reads_position_ids(model):
        return
    raise modelio.packing_refused(model_name, type(model).__name__, model.config._attn_implementation)


@dataclass
class RowPackedCollator:
    """TRL's collator for packed sequences, but one row per sequence: right padding, ``position_ids`` restarting
    at 0 per example and no ``attention_mask`` (so transformers builds the block-diagonal mask from them).
    The first token of each example gets no label: it would be predicted from the end of the previous example."""

    packed: Any  # trl's DataCollatorForLanguageModeling, as SFTTrainer built it for padding-free packing

    def __post_init__(self):
        self.packed = replace(self.packed, padding_free=False, return_position_ids=True)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.packed(examples)
        batch.pop("attention_mask")
        batch["labels"][batch["position_ids"] == 0] = -100
        return batch


def use_row_packing(trainer) -> None:
    trainer.data_collator = RowPackedCollator(trainer.data_collator)


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
