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

:class:`SequentialBuilder` makes the baseline's plain samples from the same records (one per path,
no control tokens). Both builders give training units (``units``), their length and the
:class:`TrainingExample` of a unit for one epoch (``sample``), which :mod:`training.batching` turns
into rows and batches.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lm_eval_parathinker import protocol
from lm_eval_parathinker.protocol import PAPER, Compat, ControlTokenIds, SequenceLayout
from lm_eval_parathinker.scoring.answer import last_box

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

    def first_paths(self, n: int | None) -> EncodedRecord:
        return EncodedRecord(self.prompt, self.paths[:n], self.truncated[:n], self.summary)


def fit_paths(unit, length, max_length: int | None):
    """``unit`` (with ``paths`` and ``first_paths(n)``) with trailing paths dropped (keeping two)
    until ``length(unit)`` fits ``max_length``; None when even two paths do not fit."""
    while max_length is not None and length(unit) > max_length:
        if len(unit.paths) <= 2:
            return None
        unit = unit.first_paths(len(unit.paths) - 1)
    return unit


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


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
        extrapolate_prob: float = 0.0,
    ):
        if max_path_tokens is not None and max_path_tokens < 3:
            raise ValueError(f"max_path_tokens={max_path_tokens} must leave room for <think k>, a token and </think k>")
        if max_path_tokens is not None and compat.padded(max_path_tokens) != max_path_tokens:
            raise ValueError(f"max_path_tokens={max_path_tokens} must be a multiple of {compat.pad_to_multiple_of} "
                             f"with compat={compat.name}, as the engine's budget")
        if max_paths is not None and max_paths < 1:
            raise ValueError(f"max_paths={max_paths} must be at least 1")
        self.tokenizer = tokenizer
        self.compat = compat
        self.pad_id = tokenizer.convert_tokens_to_ids(protocol.PAD) if compat.pad_to_multiple_of else None
        self.ids = ControlTokenIds.from_tokenizer(tokenizer)
        self.template = self._tokens(protocol.SUMMARY_TEMPLATE)  # tokenized alone, as the engine does
        self.max_path_tokens = max_path_tokens
        self.max_length = max_length
        self.max_paths = max_paths
        self.extrapolate_prob = extrapolate_prob

    def _tokens(self, text: str) -> list[int]:
        return _tokens(self.tokenizer, text)

    def units(self, record: dict) -> list[EncodedRecord | None]:
        """The training units of a record: the record itself (None when it does not fit)."""
        return [self.encode(record)]

    def sample(self, enc: EncodedRecord, rng: random.Random) -> TrainingExample:
        """The row of ``enc`` for one epoch: paths renamed for extrapolation as ``rng`` draws."""
        return self.build(enc, extrapolation_indices(len(enc.paths), self.ids.num_control_paths, self.extrapolate_prob, rng))

    def encode(self, record: dict) -> EncodedRecord | None:
        """Tokenize a record; None when even its first two paths exceed ``max_length``. A record
        read from transcript text carries its literal ``prompt`` instead of a ``problem``."""
        text = record.get("prompt") or protocol.build_prompt(self.compat.question(record["problem"]), self.tokenizer)
        prompt = self.compat.prompt_ids(text, self.tokenizer)
        paths, truncated = [], []
        for text in record["paths"][: self.max_paths]:
            body = self._tokens(text)
            keep = len(body) if self.max_path_tokens is None else self.max_path_tokens - 2
            paths.append(body[:keep])
            truncated.append(len(body) > keep)
        summary_text = record.get("summary") or f" \\boxed{{{record['answer']}}}"
        return fit_paths(EncodedRecord(prompt, paths, truncated, self._tokens(summary_text)), self.length, self.max_length)

    def length(self, enc: EncodedRecord) -> int:
        """Packed length of an encoded record."""
        paths = sum(self.compat.padded(len(p) + 2) for p in enc.paths)
        return len(enc.prompt) + paths + len(self.template) + len(enc.summary) + 1

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


_CLOSING_TAIL = re.compile(r"(?:\s|[.$*)\]]|\\[)\]])*")  # what may follow a final answer: punctuation, math closers


def ends_in_boxed(text: str) -> bool:
    """True when ``text`` ends with a complete ``\\boxed{...}`` (closing punctuation aside)."""
    box = last_box(text)
    return box is not None and box[0] is not None and _CLOSING_TAIL.fullmatch(text[box[2]:]) is not None


class SequentialBuilder:
    """Plain samples for the sequential-SFT baseline (fine-tuning on the same records without the
    parallel layout): each path is its own sequence after the evaluated prompt, the task's
    question (:data:`protocol.TASK_QUESTION`, the tasks' ``doc_to_text``) under the model's chat
    template exactly as ``lm_eval --apply_chat_template`` builds and encodes it (the question alone
    when the tokenizer has no chat template, as ``lm_eval`` without that flag). A path that does not
    end in ``\\boxed{...}`` gets `` \\boxed{answer}`` appended; the sequence ends with EOS.

    Labels: the path, the appended answer and EOS (no EOS for a path cut by ``max_path_tokens``,
    which counts the path, the appended answer and EOS). No control tokens, no thought embeddings:
    the checkpoint is a plain model.
    """

    def __init__(self, tokenizer, *, max_path_tokens: int | None = None, max_length: int | None = None,
                 max_paths: int | None = None):
        if max_path_tokens is not None and max_path_tokens < 2:
            raise ValueError(f"max_path_tokens={max_path_tokens} must leave room for a token and EOS")
        if max_paths is not None and max_paths < 1:
            raise ValueError(f"max_paths={max_paths} must be at least 1")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token to end a sample with")
        self.tokenizer = tokenizer
        self.max_path_tokens = max_path_tokens
        self.max_length = max_length
        self.max_paths = max_paths

    def prompt_text(self, problem: str) -> str:
        """The prompt string ``lm_eval`` hands the model for ``problem`` (lm-eval's HFLM.apply_chat_template)."""
        question = protocol.TASK_QUESTION.format(problem=problem)
        if not getattr(self.tokenizer, "chat_template", None):
            return question
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )

    def units(self, record: dict) -> list[TrainingExample | None]:
        """One sample per path (None for a sample longer than ``max_length``)."""
        prompt = PAPER.prompt_ids(self.prompt_text(record["problem"]), self.tokenizer)  # as HFLM encodes it
        samples = []
        for path in record["paths"][: self.max_paths]:
            text = path if ends_in_boxed(path) else f"{path} \\boxed{{{record['answer']}}}"
            body = _tokens(self.tokenizer, text)
            keep = len(body) if self.max_path_tokens is None else min(len(body), self.max_path_tokens - 1)
            completion = body[:keep] + ([self.tokenizer.eos_token_id] if keep == len(body) else [])
            if self.max_length is not None and len(prompt) + len(completion) > self.max_length:
                samples.append(None)
                continue
            input_ids = torch.tensor(prompt + completion, dtype=torch.long)
            labels = input_ids.clone()
            labels[: len(prompt)] = IGNORE_INDEX
            layout = protocol.sequence_layout(len(input_ids), [], 0)  # one prompt block: causal, positions 0..n-1
            samples.append(TrainingExample(input_ids=input_ids, labels=labels, layout=layout, path_indices=()))
        return samples

    def length(self, example: TrainingExample) -> int:
        return example.input_ids.numel()

    def sample(self, example: TrainingExample, rng: random.Random) -> TrainingExample:
        """A plain sample is the same every epoch."""
        return example
