"""Pre-tokenized ParaThinker rows: the form the authors released (``Leslie04/parathinker-math-6K``).

Each row holds ``input_ids`` and ``labels`` (and maybe ``attention_mask``), already tokenized
with the control tokens as ids; the official ``train/train_script.py`` never tokenizes it. Blocks,
positions and the mask come from the control-token ids (:func:`protocol.split_sequence`, the
reader the engine's protocol module owns), exactly as the official collator
(``train/custom_data_collator.py``) derives them:

* prompt: everything before the first ``<think k>`` (the official instruction spells
  ``<summary> </summary>``, which the collator skips as its first "start" hit);
* path k: ``<think k>`` up to the next path's opener or ``<summary>``, closer and any
  ``<vllm_pad>`` included; all paths start at the prompt's end;
* summary: from the ``<summary>`` after the paths to the end, after the longest path (the
  ``compat`` decides where: :meth:`protocol.Compat.summary_position`; ``paper`` is the collator's);
* extrapolation: with probability ``prob`` two random paths (any of them, which needs P <= K - 2)
  are renamed to the tokenizer's last two control tokens (``<think7>``/``<think8>`` for the
  released 8) in random order, opener and closer, and the closer's label follows (the opener's
  label is left as it is, as the collator does).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lm_eval_parathinker import protocol
from lm_eval_parathinker.protocol import PAPER, Compat, ControlTokenIds

from .sequence import IGNORE_INDEX, TrainingExample, extrapolation_indices, fit_paths

#: the control-token ids of the released data: DeepSeek-R1-Distill-Qwen's vocabulary plus the control
#: tokens in the official order (<think1> = 151665, </think1> = 151666, ...)
OFFICIAL_THINK1_ID = 151665


@dataclass(frozen=True)
class TokenizedRow:
    """A validated pre-tokenized row cut into its blocks (ids and labels as stored)."""

    prompt: np.ndarray
    paths: tuple[np.ndarray, ...]  # <think k> ... </think k> [whatever follows the closer]
    path_labels: tuple[np.ndarray, ...]
    closers: tuple[int, ...]  # offset of </think k> in each path block
    summary: np.ndarray  # <summary> ... to the end of the row
    summary_labels: np.ndarray

    def first_paths(self, n: int | None) -> TokenizedRow:
        return TokenizedRow(self.prompt, self.paths[:n], self.path_labels[:n], self.closers[:n], self.summary,
                            self.summary_labels)


def _block_values(split: protocol.SequenceSplit, length: int) -> np.ndarray:
    """Block id of each position (prompt 0, path k, summary -1), as the protocol numbers blocks."""
    blocks = np.full(length, protocol.PROMPT_BLOCK)
    for span in split.paths:
        blocks[span.start:span.end] = span.index
    blocks[split.summary_start:] = protocol.SUMMARY_BLOCK
    return blocks


def _check_attention_mask(mask: np.ndarray, blocks: np.ndarray) -> None:
    """A stored ``attention_mask``: no padding inside a row, and when index-valued (the official
    data's 1 = prompt, 10 = summary, one value per path) the same partition as the control tokens."""
    if (mask == 0).any():
        raise ValueError(f"attention_mask is 0 at position {int(np.flatnonzero(mask == 0)[0])} (padding inside a row)")
    if (mask == 1).all():
        return
    for block in np.unique(blocks):
        values = np.unique(mask[blocks == block])
        others = np.unique(mask[blocks != block])
        if len(values) != 1 or np.isin(values, others).any():
            where = {protocol.PROMPT_BLOCK: "the prompt", protocol.SUMMARY_BLOCK: "the summary"}.get(int(block), f"path {block}")
            raise ValueError(f"attention_mask does not mark {where} as one block of its own (values {values.tolist()})")


def parse_row(row: Mapping, ids: ControlTokenIds, vocab_size: int) -> TokenizedRow:
    """Validate one row and cut it into blocks; ``ValueError`` names the defect."""
    input_ids = np.asarray(row["input_ids"], dtype=np.int64)
    labels = np.asarray(row["labels"], dtype=np.int64)
    if input_ids.ndim != 1 or labels.shape != input_ids.shape:
        raise ValueError(f"labels has {labels.size} entries for {input_ids.size} input_ids")
    outside = np.flatnonzero((input_ids < 0) | (input_ids >= vocab_size))
    if outside.size:
        i = int(outside[0])
        raise ValueError(f"input_ids[{i}] = {input_ids[i]} is outside the tokenizer's vocabulary (size {vocab_size})")
    wrong = np.flatnonzero((labels != IGNORE_INDEX) & (labels != input_ids))
    if wrong.size:
        i = int(wrong[0])
        raise ValueError(f"labels[{i}] = {labels[i]} is neither {IGNORE_INDEX} nor input_ids[{i}] = {input_ids[i]}")
    control = [*ids.think_open, *ids.think_close, ids.summary_open]
    positions = np.flatnonzero(np.isin(input_ids, control))
    hits = [(int(i), int(input_ids[i])) for i in positions]
    split = protocol.split_sequence(hits, ids.think_open, ids.think_close, ids.summary_open)
    trained_prompt = np.flatnonzero(labels[:split.prompt_end] != IGNORE_INDEX)
    if trained_prompt.size:
        raise ValueError(f"labels[{int(trained_prompt[0])}] trains the prompt (the prompt's labels must be {IGNORE_INDEX})")
    if row.get("attention_mask") is not None:
        mask = np.asarray(row["attention_mask"], dtype=np.int64)
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has {mask.size} entries for {input_ids.size} input_ids")
        _check_attention_mask(mask, _block_values(split, input_ids.size))
    spans = split.paths
    return TokenizedRow(
        prompt=input_ids[:split.prompt_end],
        paths=tuple(input_ids[s.start:s.end] for s in spans),
        path_labels=tuple(labels[s.start:s.end] for s in spans),
        closers=tuple(s.close - s.start for s in spans),
        summary=input_ids[split.summary_start:],
        summary_labels=labels[split.summary_start:],
    )


def check_control_ids(rows: Sequence[Mapping], ids: ControlTokenIds, model: str) -> None:
    """Fail (before training) when the data's control-token ids are not ``model``'s: no row holds
    the tokenizer's ``<think1>``. Names the official ids when the rows hold those instead."""
    think1 = ids.think_open[0]
    if any(np.any(np.asarray(r["input_ids"]) == think1) for r in rows):
        return
    official = any(np.any(np.asarray(r["input_ids"]) == OFFICIAL_THINK1_ID) for r in rows)
    hint = (f"; the rows hold {OFFICIAL_THINK1_ID}, <think1> of DeepSeek-R1-Distill-Qwen with the control tokens "
            "added (the released data's base model): give --model that model or one built on its tokenizer"
            if official and think1 != OFFICIAL_THINK1_ID else
            ": the data was tokenized for another tokenizer")
    raise ValueError(f"the data's control-token ids do not match --model {model}: its tokenizer has "
                     f"{protocol.think_open(1)} = {think1}, {protocol.SUMMARY_OPEN} = {ids.summary_open}, "
                     f"but no row holds {think1}{hint}")


class TokenizedBuilder:
    """Training units from :class:`TokenizedRow` rows, with the interface of
    :class:`~training.sequence.SequenceBuilder` (``units``, ``length``, ``sample``, ``build``)."""

    def __init__(self, tokenizer, *, compat: Compat = PAPER, max_length: int | None = None,
                 max_paths: int | None = None, extrapolate_prob: float = 0.0):
        self.ids = ControlTokenIds.from_tokenizer(tokenizer)
        self.compat = compat
        self.max_length = max_length
        self.max_paths = max_paths
        self.extrapolate_prob = extrapolate_prob

    def units(self, row: TokenizedRow) -> list[TokenizedRow | None]:
        """The row itself, cut to ``max_paths`` and fitted to ``max_length`` (None: does not fit)."""
        return [fit_paths(row.first_paths(self.max_paths), self.length, self.max_length)]

    def length(self, row: TokenizedRow) -> int:
        return row.prompt.size + sum(p.size for p in row.paths) + row.summary.size

    def sample(self, row: TokenizedRow, rng: random.Random) -> TrainingExample:
        """The row for one epoch: paths renamed for extrapolation as ``rng`` draws."""
        return self.build(row, extrapolation_indices(len(row.paths), self.ids.num_control_paths, self.extrapolate_prob, rng))

    def build(self, row: TokenizedRow, path_indices: Sequence[int] | None = None) -> TrainingExample:
        """The row with each path under its control index (default 1..P, as stored)."""
        indices = tuple(path_indices) if path_indices is not None else tuple(range(1, len(row.paths) + 1))
        blocks, labels = [], []
        for j, (k, block, block_labels, close) in enumerate(zip(indices, row.paths, row.path_labels, row.closers), 1):
            if k != j:  # renamed: opener and closer ids, and the closer's label
                block, block_labels = block.copy(), block_labels.copy()
                block[0] = self.ids.think_open[k - 1]
                block[close] = block_labels[close] = self.ids.think_close[k - 1]
            blocks.append(block)
            labels.append(block_labels)
        layout = protocol.sequence_layout(row.prompt.size, [b.size for b in blocks], row.summary.size,
                                          path_indices=indices, compat=self.compat)
        return TrainingExample(
            input_ids=torch.from_numpy(np.concatenate([row.prompt, *blocks, row.summary])),
            labels=torch.from_numpy(np.concatenate([np.full(row.prompt.size, IGNORE_INDEX), *labels, row.summary_labels])),
            layout=layout,
            path_indices=indices,
        )
