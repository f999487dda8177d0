"""Training rows and batches: the dataset the Trainer samples, packing, and the collator.

A row is one training unit (a ParaThinker record, or one path of the sequential layout) or, with
packing, several units back to back in at most ``max_length`` tokens, each its own document:
its positions restart, and the attention mask (``protocol.two_phase_mask_mod``) keeps every
document to itself. The collator hands the model's inputs to the trainer together with the block
and document ids from which the trainer builds the mask on the model's device.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lm_eval_parathinker import protocol

from .sequence import IGNORE_INDEX, TrainingExample

Row = tuple[TrainingExample, ...]


def pack_lengths(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``max_length`` tokens: first fit over the
    units longest first (deterministic; each row's units in index order)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > max_length:
            raise ValueError(f"unit {i} has {lengths[i]} tokens, more than max_length={max_length}")
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(max_length)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return [sorted(r) for r in rows]


class SFTDataset(torch.utils.data.Dataset):
    """The training units of ``records`` as rows (one unit each, or packed). The Trainer's sampler
    shuffles the rows; a unit's extrapolation renaming is drawn from (seed, epoch, unit), so a
    resumed run sees exactly the rows it would have seen (``set_epoch`` is called by a callback)."""

    def __init__(self, records: Sequence[dict], builder, *, packing: bool = False, seed: int = 0):
        self.records = records
        units = [u for r in records for u in builder.units(r)]
        self.units = [u for u in units if u is not None]
        self.num_candidates = len(units)
        self.skipped = len(units) - len(self.units)
        if not self.units:
            raise ValueError(f"no training sample fits max_length={builder.max_length}")
        if packing and builder.max_length is None:
            raise ValueError("packing needs max_length (the row size)")
        lengths = [builder.length(u) for u in self.units]
        self.rows = pack_lengths(lengths, builder.max_length) if packing else [[i] for i in range(len(self.units))]
        self.num_tokens = sum(lengths)
        self.builder = builder
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Row:
        return tuple(
            self.builder.sample(self.units[u], random.Random(f"{self.seed}-rename-{self.epoch}-{u}")) for u in self.rows[i]
        )


@dataclass
class Collator:
    """Right-pads a batch of rows to its longest (rounded up to ``pad_to_multiple_of``: a few
    shapes for compiled FlexAttention). Returns ``input_ids``, ``labels``, ``position_ids``,
    ``segment_ids`` (unless ``segment_ids=False``) and the ``block_ids`` / ``document_ids`` of the
    mask. Padding is labelled IGNORE_INDEX and forms document ``protocol.PAD_DOCUMENT``."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    segment_ids: bool = True

    def __call__(self, batch: Sequence[Row]) -> dict[str, torch.Tensor]:
        lengths = [sum(ex.input_ids.numel() for ex in row) for row in batch]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(batch), width)
        out = {
            "input_ids": torch.full(shape, self.pad_token_id, dtype=torch.long),
            "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
            "position_ids": torch.zeros(shape, dtype=torch.long),
            "segment_ids": torch.zeros(shape, dtype=torch.long),
            "block_ids": torch.full(shape, protocol.PROMPT_BLOCK, dtype=torch.long),
            "document_ids": torch.full(shape, protocol.PAD_DOCUMENT, dtype=torch.long),
        }
        for b, row in enumerate(batch):
            start = 0
            for doc, ex in enumerate(row):
                span = slice(start, start + ex.input_ids.numel())
                out["input_ids"][b, span], out["labels"][b, span] = ex.input_ids, ex.labels
                out["position_ids"][b, span], out["segment_ids"][b, span] = ex.layout.position_ids, ex.layout.segment_ids
                out["block_ids"][b, span], out["document_ids"][b, span] = ex.layout.block_ids, doc
                start = span.stop
        if not self.segment_ids:
            del out["segment_ids"]
        return out
