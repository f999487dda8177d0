"""Training sequences built from the shared protocol, exactly as the engine lays them out.

A record becomes one packed row ``prompt | <think k> path </think k> ... | summary`` whose block
ids, segment ids, positions and two-phase mask all come from
:func:`lm_eval_parathinker.protocol.sequence_layout`, in the layout the engine uses for the same
``compat`` (``official``: the released engine's prompt ids, ``<vllm_pad>`` after each path's closer
up to a multiple of 16, summary at 2 Lp + max len). Labels (the tokens that carry loss):

* path body tokens and the path's ``</think k>`` (not for a path cut by the token budget: at
  inference a cut path emits no closing token, so learning one mid-sentence would be wrong);
* the summary text after the template, and ``</summary>``.

Not trained: the prompt, every ``<think k>`` (force-fed by the engine, and masked in the official
data), the pads after a closer (force-fed too) and the summary template (force-fed by the engine
in one forward). Because every trained
token follows a token of its own block in packed order, the usual shift-by-one loss is right.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lm_eval_parathinker import protocol
from lm_eval_parathinker.protocol import PAPER, Compat, ControlTokenIds, SequenceLayout

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TrainingExample:
    """One packed row: tokens, labels (IGNORE_INDEX where untrained) and its layout."""

    input_ids: torch.Tensor  # [L]
    labels: torch.Tensor  # [L]
    layout: SequenceLayout
    path_indices: tuple[int, ...]


@dataclass(frozen=True)
class EncodedRecord:
    """A tokenized record: path bodies already cut to the budget (``truncated`` says which)."""

    prompt: list[int]
    paths: list[list[int]]
    truncated: list[bool]
    summary: list[int]  # the text after the template, without </summary>


def pack(
    prompt_ids: Sequence[int],
    paths: Sequence[Sequence[int]],
    summary: Sequence[int],
    *,
    path_indices: Sequence[int] | None = None,
    trained: Sequence[bool] | None = None,
    compat: Compat = PAPER,
) -> TrainingExample:
    """Pack complete blocks (paths with their control tokens, summary with its template: the token
    ids the engine produces) into one row laid out as ``compat``. ``trained`` flags each path and
    summary token, in packed order, that carries a label (default: none)."""
    body = [t for p in paths for t in p] + list(summary)
    trained = [False] * len(body) if trained is None else list(trained)
    if len(trained) != len(body):
        raise ValueError(f"trained has {len(trained)} flags for {len(body)} path and summary tokens")
    indices = tuple(path_indices) if path_indices is not None else tuple(range(1, len(paths) + 1))
    layout = protocol.sequence_layout(
        len(prompt_ids), [len(p) for p in paths], len(summary), path_indices=indices, compat=compat
    )
    input_ids = torch.tensor([*prompt_ids, *body], dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    flags = torch.tensor([False] * len(prompt_ids) + trained, dtype=torch.bool)
    labels[flags] = input_ids[flags]
    return TrainingExample(input_ids=input_ids, labels=labels, layout=layout, path_indices=indices)


def extrapolation_indices(num_paths: int, num_control_paths: int, prob: float, rng: random.Random) -> list[int]:
    """Control index of each path: 1..P, except that with probability ``prob`` two random paths
    are renamed to the two highest indices (in random order), so their tokens and thought
    embeddings are trained although the data has fewer paths. Needs P <= N - 2 (no clash)."""
    indices = list(range(1, num_paths + 1))
    if num_paths < 2 or num_paths > num_control_paths - 2 or rng.random() >= prob:
        return indices
    chosen = rng.sample(range(num_paths), 2)
    targets = rng.sample([num_control_paths - 1, num_control_paths], 2)
    for i, k in zip(chosen, targets):
        indices[i] = k
    return indices


class SequenceBuilder:
    """Tokenizes records and assembles training rows for one tokenizer (with control tokens)."""

    def __init__(
        self,
        tokenizer,
        *,
        compat: Compat = PAPER,
        max_path_tokens: int | None = None,
        max_length: int | None = None,
        max_paths: int | None = None,
    ):
        if max_path_tokens is not None and max_path_tokens < 3:
            raise ValueError(f"max_path_tokens={max_path_tokens} must leave room for <think k>, a token and </think k>")
        if max_path_tokens is not None and compat.padded(max_path_tokens) != max_path_tokens:
            raise ValueError(f"max_path_tokens={max_path_tokens} must be a multiple of {compat.block_size} "
                             f"with compat={compat.name}, as the engine's budget")
        if max_paths is not None and max_paths < 1:
            raise ValueError(f"max_paths={max_paths} must be at least 1")
        self.tokenizer = tokenizer
        self.compat = compat
        self.pad_id = tokenizer.convert_tokens_to_ids(protocol.PAD) if compat.block_size else None
        self.ids = ControlTokenIds.from_tokenizer(tokenizer)
        self.template = self._tokens(protocol.SUMMARY_TEMPLATE)  # tokenized alone, as the engine does
        self.max_path_tokens = max_path_tokens
        self.max_length = max_length
        self.max_paths = max_paths

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, record: dict) -> EncodedRecord | None:
        """Tokenize a record; None when even its first two paths exceed ``max_length``."""
        text = protocol.build_prompt(self.compat.question(record["problem"]), self.tokenizer)
        prompt = self.compat.prompt_ids(text, self.tokenizer)
        paths, truncated = [], []
        for text in record["paths"][: self.max_paths]:
            body = self._tokens(text)
            keep = len(body) if self.max_path_tokens is None else self.max_path_tokens - 2
            paths.append(body[:keep])
            truncated.append(len(body) > keep)
        summary_text = record.get("summary") or f" \\boxed{{{record['answer']}}}"
        enc = EncodedRecord(prompt, paths, truncated, self._tokens(summary_text))
        return self._fit(enc)

    def length(self, enc: EncodedRecord) -> int:
        """Packed length of an encoded record."""
        paths = sum(self.compat.padded(len(p) + 2) for p in enc.paths)
        return len(enc.prompt) + paths + len(self.template) + len(enc.summary) + 1

    def _fit(self, enc: EncodedRecord) -> EncodedRecord | None:
        """Drop trailing paths (keeping two) until the row fits ``max_length``."""
        while self.max_length is not None and self.length(enc) > self.max_length:
            if len(enc.paths) <= 2:
                return None
            enc = EncodedRecord(enc.prompt, enc.paths[:-1], enc.truncated[:-1], enc.summary)
        return enc

    def build(self, enc: EncodedRecord, path_indices: Sequence[int] | None = None) -> TrainingExample:
        """The packed row with each path under its control index (default 1..P)."""
        indices = list(path_indices) if path_indices is not None else list(range(1, len(enc.paths) + 1))
        blocks, trained = [], []
        for k, body, cut in zip(indices, enc.paths, enc.truncated):
            pads = self.compat.padded(len(body) + 2) - len(body) - 2
            blocks.append([self.ids.think_open[k - 1], *body, self.ids.think_close[k - 1], *[self.pad_id] * pads])
            trained += [False] + [True] * len(body) + [not cut] + [False] * pads
        summary = [*self.template, *enc.summary, self.ids.summary_close]
        trained += [False] * len(self.template) + [True] * (len(enc.summary) + 1)
        return pack(enc.prompt, blocks, summary, path_indices=indices, trained=trained, compat=self.compat)


class MultiPathDataset(torch.utils.data.Dataset):
    """Encoded records, shuffled per epoch and renamed for extrapolation deterministically from
    (seed, epoch, index), so a resumed run sees exactly the batches it would have seen."""

    def __init__(self, records: Sequence[dict], builder: SequenceBuilder, *, extrapolate_prob: float = 0.3, seed: int = 0):
        encoded = [builder.encode(r) for r in records]
        self.items = [e for e in encoded if e is not None]
        self.skipped = len(encoded) - len(self.items)
        if not self.items:
            raise ValueError(f"no record fits max_length={builder.max_length}")
        self.builder = builder
        self.extrapolate_prob = extrapolate_prob
        self.seed = seed
        self.start_epoch(0)

    def start_epoch(self, epoch: int) -> None:
        """Not named set_epoch: accelerate would call that itself with its own iteration count."""
        self.epoch = epoch
        self.order = list(range(len(self.items)))
        random.Random(f"{self.seed}-order-{epoch}").shuffle(self.order)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> TrainingExample:
        enc = self.items[self.order[i]]
        rng = random.Random(f"{self.seed}-rename-{self.epoch}-{i}")
        n = self.builder.ids.num_control_paths
        return self.builder.build(enc, extrapolation_indices(len(enc.paths), n, self.extrapolate_prob, rng))


@dataclass
class Collator:
    """Right-pads a batch; pad tokens are masked out of attention and labels. Returns the model
    inputs plus ``labels``; ``attention_mask`` is the [B, 1, L, L] additive mask in ``dtype``."""

    pad_token_id: int
    dtype: torch.dtype = torch.float32

    def __call__(self, batch: Sequence[TrainingExample]) -> dict[str, torch.Tensor]:
        width = max(ex.input_ids.numel() for ex in batch)
        B = len(batch)
        input_ids = torch.full((B, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros(B, width, dtype=torch.long)
        segments = torch.zeros(B, width, dtype=torch.long)
        allowed = torch.zeros(B, width, width, dtype=torch.bool)
        for b, ex in enumerate(batch):
            n = ex.input_ids.numel()
            input_ids[b, :n], labels[b, :n] = ex.input_ids, ex.labels
            positions[b, :n], segments[b, :n] = ex.layout.position_ids, ex.layout.segment_ids
            allowed[b, :n, :n] = ex.layout.attention_mask()
        # A pad query sees only itself: its row stays finite (no NaN) and it affects nothing.
        allowed |= torch.eye(width, dtype=torch.bool)
        mask = protocol.additive_mask(allowed, self.dtype)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": positions,
            "segment_ids": segments,
            "attention_mask": mask[:, None],
        }
