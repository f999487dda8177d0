"""Training rows of the formats whose model forks itself (Parallel-R1, Multiverse, NPR).

A training item is a prompt and a response written with the format's tags; the format is the
:class:`~lm_eval_parathinker.formats.Format` object the engine decodes with. ``--compat`` picks
the layout a row is built in:

* ``paper`` (the default): the layout ``lm_eval``'s ``compat=paper`` decodes in. The response is
  parsed into its forks (:func:`parse_response`): each path sees the context and itself, every
  path of a fork starts at the position after the trigger, the join comes after the longest
  path. What the engine writes itself (a path's opening, the separator and the join) is written
  as the format spells it, whatever whitespace the data has there, and carries no label;
  everything the model samples does. Text the engine never writes (between the paths of a fork,
  between the join's tags) is refused.
* ``official``: the layout of the authors' SFT code, quirks included: the whole sequence is
  scanned for tags (the prompt too), the text between paths is outside every path (so later paths
  see it), and Parallel-R1 gives position 0 to a block's tokens outside its paths
  (:func:`official_parallel_r1`, :func:`official_sglang`).
* ``sequential`` (``--layout sequential``, Parallel-R1's "Seen"): the same text as a plain
  causal sample.

Every row is a :class:`ForkExample`: tokens, labels, positions and, for each token and nesting
depth, the fork and path it lies in. A token attends to an earlier one of its document unless they
lie in different paths of one fork (:func:`allowed_mask`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lm_eval_parathinker.formats import Format
from lm_eval_parathinker.protocol import PAD_DOCUMENT, PAPER

from .sequence import IGNORE_INDEX
from .sources import Form
from .transcripts import last_exchange

LAYOUTS = ("paper", "official", "sequential")
Branch = tuple[tuple[int, int], ...]  # (fork, path) from the outermost fork in: where a token lies


# -- the response as a tree ------------------------------------------------------------------


@dataclass
class Path:
    label: str  # the outline's label ("1:"), "" where the format does not number its paths
    line: Line


@dataclass
class Fork:
    paths: list[Path]


@dataclass
class Line:
    """A main line or a path's body: text runs, tags (single tokens) and forks, in order."""

    parts: list = field(default_factory=list)  # str (text), Tag, Fork


@dataclass(frozen=True)
class Tag:
    name: str


@dataclass(frozen=True)
class FormatTags:
    """The roles of a format's tags in its responses."""

    path_open: str  # the tag in the path opening (<Path>, <step>)
    lead_tail: str  # what the engine writes after that tag ("\n{label}" for counted formats)
    join_tags: tuple[str, ...]  # the tags the engine writes at a join, in order
    join_tail: str  # what it writes after the last of them

    @classmethod
    def of(cls, fmt: Format) -> FormatTags:
        path_open = next(t for t in fmt.tokens if t in fmt.path_start)
        join_tags = tuple(sorted((t for t in fmt.tokens if t in fmt.join), key=fmt.join.index))
        return cls(path_open, fmt.path_start.split(path_open, 1)[1], join_tags,
                   fmt.join.rsplit(join_tags[-1], 1)[1])

    def lead_text_after_tag(self, label: str) -> str:
        return self.lead_tail.format(label=label)


class _Pieces:
    """A response split at the format's tags, read left to right."""

    def __init__(self, text: str, fmt: Format):
        pattern = "(" + "|".join(re.escape(t) for t in sorted(fmt.tokens, key=len, reverse=True)) + ")"
        self.items = [p for p in re.split(pattern, text) if p]
        self.tags = set(fmt.tokens)
        self.i = 0

    def peek(self) -> str | None:
        return self.items[self.i] if self.i < len(self.items) else None

    def take(self) -> str:
        self.i += 1
        return self.items[self.i - 1]

    def is_tag(self, item: str | None) -> bool:
        return item in self.tags


class ParseError(ValueError):
    """A response the layout cannot represent; the message names the defect."""


def _excerpt(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


class _Parser:
    """:func:`parse_response`: a recursive reader of lines, forks and paths."""

    def __init__(self, fmt: Format, strict: bool):
        self.fmt, self.tags, self.strict = fmt, FormatTags.of(fmt), strict
        self.block = 0

    def line(self, pieces: _Pieces, seen: str, depth: int, in_path: bool) -> tuple[Line, str]:
        """Read a line up to its path's close tag (``in_path``) or the end; returns it and the text
        seen at its end (the outline counts paths from it)."""
        fmt, tags, line = self.fmt, self.tags, Line()
        while (item := pieces.peek()) is not None:
            pieces.take()
            if not pieces.is_tag(item):
                line.parts.append(item)
                seen += item
                continue
            if item == fmt.path_close:
                if not in_path:
                    raise ParseError(f"{item} outside a path")
                line.parts.append(Tag(item))
                return line, seen + item
            if item == tags.path_open or (item in tags.join_tags and self.strict):
                raise ParseError(f"{item} where the engine does not write it (it writes {item} itself, "
                                 f"{'opening a path' if item == tags.path_open else 'at a join'})")
            line.parts.append(Tag(item))
            seen += item
            if item == fmt.trigger and depth <= fmt.max_depth:
                fork, seen = self.fork(pieces, seen, depth)
                line.parts.append(fork)
        if in_path:
            raise ParseError(f"a path is not closed by {fmt.path_close}")
        return line, seen

    def _between(self, pieces: _Pieces, where: str) -> None:
        """Skip the text between structural tags: whitespace (the engine writes its own), or any
        text outside the strict layout (the authors' layouts keep it; their builders read it)."""
        text = ""
        while (item := pieces.peek()) is not None and not pieces.is_tag(item):
            text += pieces.take()
        if text.strip() and self.strict:
            raise ParseError(f"block {self.block}: text {_excerpt(text.strip())} {where}: the engine writes nothing "
                             "there (compat=official keeps it)")

    def fork(self, pieces: _Pieces, seen: str, depth: int) -> tuple[Fork, str]:
        fmt, tags = self.fmt, self.tags
        self.block += 1
        labels = fmt.labels(seen) if fmt.counted and self.strict else None
        if labels is not None and (not labels or (fmt.max_count is not None and len(labels) > fmt.max_count)):
            raise ParseError(f"block {self.block}: its outline names {len(labels)} paths, which the engine does not fork")
        fork, where = Fork([]), f"between {fmt.trigger} and {tags.path_open}"
        written = ""  # the paths' text, in order: what the line sees after the join
        while True:
            self._between(pieces, where)
            item = pieces.peek()
            if item != tags.path_open:
                break
            pieces.take()
            label = labels[len(fork.paths)] if labels is not None and len(fork.paths) < len(labels) else ""
            self._lead(pieces, label)
            line, path_seen = self.line(pieces, seen + fmt.start_text(label), depth + 1, in_path=True)
            written += path_seen[len(seen):]
            fork.paths.append(Path(label, line))
            where = f"between {fmt.path_close} and {tags.path_open}"
        if not fork.paths:
            raise ParseError(f"block {self.block}: {fmt.trigger} is not followed by {tags.path_open}")
        if labels is not None and len(labels) != len(fork.paths):
            raise ParseError(f"block {self.block}: {len(fork.paths)} paths, but its outline names {len(labels)}")
        for k, tag in enumerate(tags.join_tags):
            if pieces.peek() != tag:
                got = pieces.peek()
                raise ParseError(f"block {self.block}: {tag} expected after its paths (got "
                                 f"{'the end' if got is None else _excerpt(got)})")
            pieces.take()
            if k + 1 < len(tags.join_tags):
                self._between(pieces, f"between {tag} and {tags.join_tags[k + 1]}")
        if tags.join_tail:  # the engine writes the join's tail itself ("<Conclusion>\n"): the text goes on after it
            self._drop_written(pieces, tags.join_tail)
        return fork, seen + written + fmt.separator + fmt.join

    @staticmethod
    def _drop_written(pieces: _Pieces, text: str) -> bool:
        """Drop ``text`` from the start of the next text run (what the engine writes there itself);
        False when the run does not start with it."""
        item = pieces.peek()
        run = "" if item is None or pieces.is_tag(item) else item
        if not run.startswith(text):
            return False
        if run == text:
            pieces.take()
        else:
            pieces.items[pieces.i] = run[len(text):]
        return True

    def _lead(self, pieces: _Pieces, label: str) -> None:
        """The text after the path's opening tag starts with what the engine writes there ("\\n1:")."""
        expected = self.tags.lead_text_after_tag(label)
        if expected and self.strict and not self._drop_written(pieces, expected):
            got = pieces.peek() or ""
            raise ParseError(f"block {self.block}: a path opens with {_excerpt(got)}, not {expected!r} as its "
                             "outline labels it")


def parse_response(fmt: Format, text: str, *, strict: bool = True) -> Line:
    """The response's tree. ``strict``: as the engine writes it (the ``paper`` layout); otherwise
    text between a fork's paths or a join's tags is allowed (the authors' layouts keep it). Either
    way a malformed response raises :class:`ParseError` naming the defect: a path not closed, a
    path tag outside a fork, a join not written in full, a Parallel-R1 summary not closed."""
    parser = _Parser(fmt, strict)
    pieces = _Pieces(text, fmt)
    line, _ = parser.line(pieces, "", 0, in_path=False)
    if fmt.summary_close is not None:
        _check_summaries(fmt, text)
    return line


def _check_summaries(fmt: Format, text: str) -> None:
    """Parallel-R1: each summary the join opens ends with its ``</Summary>`` before anything else."""
    opened = FormatTags.of(fmt).join_tags[-1]
    depth = 0
    for tag in re.findall("|".join(re.escape(t) for t in (opened, fmt.summary_close, fmt.trigger)), text):
        if tag == opened:
            if depth:
                raise ParseError(f"a second {opened} before the first one's {fmt.summary_close}")
            depth = 1
        elif tag == fmt.summary_close:
            if not depth:
                raise ParseError(f"{fmt.summary_close} without {opened}")
            depth = 0
        elif depth:
            raise ParseError(f"{fmt.trigger} inside a summary (its {fmt.summary_close} is missing)")
    if depth:
        raise ParseError(f"the last {opened} is not closed by {fmt.summary_close}")


# -- rows ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForkExample:
    """One training row: labels IGNORE_INDEX where untrained; ``forks``/``paths`` ``[L, D]``: the
    fork (numbered from 1 in the row, 0: none) and the path each token lies in at nesting depth d."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    forks: torch.Tensor
    paths: torch.Tensor


def example(ids: Sequence[int], trained: Sequence[bool], positions: Sequence[int],
            branches: Sequence[Branch]) -> ForkExample:
    depth = max((len(b) for b in branches), default=0) or 1
    forks = torch.zeros(len(ids), depth, dtype=torch.long)
    paths = torch.zeros(len(ids), depth, dtype=torch.long)
    for t, branch in enumerate(branches):
        for d, (f, p) in enumerate(branch):
            forks[t, d], paths[t, d] = f, p
    input_ids = torch.tensor(list(ids), dtype=torch.long)
    labels = torch.where(torch.tensor(list(trained), dtype=torch.bool), input_ids, IGNORE_INDEX)
    return ForkExample(input_ids, labels, torch.tensor(list(positions), dtype=torch.long), forks, paths)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class _Writer:
    """Tokens of the paper layout, with their labels, positions and branches."""

    def __init__(self, tokenizer, fmt: Format):
        self.tokenizer, self.fmt = tokenizer, fmt
        self.ids: list[int] = []
        self.trained: list[bool] = []
        self.positions: list[int] = []
        self.branches: list[Branch] = []
        self.forks = 0

    def encode(self, text: str) -> list[int]:
        return _encode(self.tokenizer, text)

    def add(self, ids: Sequence[int], trained: bool, position: int, branch: Branch) -> int:
        """Write ``ids`` from ``position``; returns the position after them."""
        self.ids += ids
        self.trained += [trained] * len(ids)
        self.positions += range(position, position + len(ids))
        self.branches += [branch] * len(ids)
        return position + len(ids)

    def line(self, line: Line, position: int, branch: Branch) -> int:
        for part in line.parts:
            if isinstance(part, str):
                position = self.add(self.encode(part), True, position, branch)
            elif isinstance(part, Tag):
                position = self.add([self.tokenizer.convert_tokens_to_ids(part.name)], True, position, branch)
            else:
                position = self.fork(part, position, branch)
        return position

    def fork(self, fork: Fork, position: int, branch: Branch) -> int:
        """Paths from ``position`` (each opened by the engine's text, untrained), then the join
        after the longest."""
        self.forks += 1
        number, ends = self.forks, []
        for k, path in enumerate(fork.paths, 1):
            inner = (*branch, (number, k))
            end = self.add(self.encode(self.fmt.start_text(path.label)), False, position, inner)
            ends.append(self.line(path.line, end, inner))
        return self.add(self.encode(self.fmt.separator + self.fmt.join), False, max(ends), branch)


# -- the authors' layouts (compat=official) ------------------------------------------------------


def official_parallel_r1(ids: Sequence[int], tag: dict[str, int]) -> tuple[list[int], list[Branch]]:
    """Positions and branches of Parallel-R1's SFT dataset (``parallel_thinking_sft_dataset.py``:
    the mask at 125-175, the positions at 297-367), over the whole sequence, prompt included.

    Mask: at ``</Parallel>`` the ``<Path>``..``</Path>`` spans gathered since the last
    ``<Parallel>`` hide from each other; tokens between them belong to no path. Positions: a
    block's paths all start after ``<Parallel>``; ``</Parallel>`` follows the longest path; tokens
    of the block outside its paths keep position 0 (the newlines between the tags, the text
    before the first path), and a ``<Parallel>`` never closed leaves everything after it at 0.
    """
    n, branches = len(ids), [()] * len(ids)
    block, spans, forks, i = False, [], 0, 0
    while i < n:
        if ids[i] == tag["<Parallel>"]:
            block, spans = True, []
        elif block and ids[i] == tag["<Path>"]:
            start = i
            while i < n and ids[i] != tag["</Path>"]:
                i += 1
            spans.append((start, min(i, n - 1)))
        elif ids[i] == tag["</Parallel>"]:
            forks += 1
            for k, (start, end) in enumerate(spans, 1):
                branches[start:end + 1] = [((forks, k),)] * (end + 1 - start)
            block, spans = False, []
        i += 1
    positions, current, i = [0] * n, 0, 0
    while i < n:
        if ids[i] != tag["<Parallel>"]:
            positions[i], current = current, current + 1
            i += 1
            continue
        positions[i], longest, t = current, 0, i + 1
        while t < n and ids[t] != tag["</Parallel>"]:
            if ids[t] == tag["<Path>"]:
                for step, t in enumerate(range(t, n)):
                    positions[t] = current + 1 + step
                    if ids[t] == tag["</Path>"]:
                        break
                else:
                    raise ParseError("<Path> not closed by </Path> (the authors' code fails with an IndexError)")
                longest = max(longest, positions[t] - current)
            t += 1
        if t < n:
            positions[t] = current + longest + 1
            current += longest + 2
        i = t + 1
    return positions, branches


@dataclass(frozen=True)
class SGLangTags:
    """Where Multiverse's and NPR's SFT code reads a block: ``opens`` it, ``goal_close`` ends its
    outline, ``path``/``path_close`` delimit its paths, ``conclusion`` follows them, ``closes``
    ends it (NPR: the conclusion itself), ``nests``: blocks may nest (NPR's code refuses it)."""

    opens: str
    goal_open: str | None
    goal_close: str
    path: str
    path_close: str
    conclusion: str
    closes: str
    nests: bool


MULTIVERSE_TAGS = SGLangTags("<Parallel>", "<Goal>", "</Goal>", "<Path>", "</Path>", "<Conclusion>", "</Parallel>", True)
NPR_TAGS = SGLangTags("<guideline>", None, "</guideline>", "<step>", "</step>", "<takeaway>", "<takeaway>", False)
OFFICIAL_TAGS = {"multiverse": MULTIVERSE_TAGS, "npr": NPR_TAGS}


def official_sglang(ids: Sequence[int], tag: dict[str, int], spec: SGLangTags, start: int = 0
                    ) -> tuple[list[int], list[Branch]]:
    """Positions and branches of Multiverse's SFT code (``train/utils.py``: the mask at 59-179,
    the positions at 182-253) or NPR's (``npr-beta/train/utils.py``: 79-311, 314-396; ``start``:
    after the first ``<|im_end|>``, where NPR's code begins to read).

    Mask: at a block's close, its paths (``<Path>``..``</Path>``, the tags included) hide from each
    other; text between them belongs to no path. Positions: plain, except that each path restarts
    after the outline's close and the conclusion follows the longest path; what follows a token
    moves with it (so the newline after the outline shares the first path's position).
    """
    n = len(ids)
    placed: list[dict[int, tuple[int, int]]] = [{} for _ in range(n)]  # depth -> (fork, path)
    blocks: list[dict] = []  # open blocks: their paths' spans, the path being read
    forks = 0
    for i in range(start, n):
        t = ids[i]
        if t == tag[spec.opens]:
            if blocks and not spec.nests:
                raise ParseError(f"{spec.opens} inside a block (NPR's code refuses nested blocks)")
            blocks.append({"spans": [], "path": None})
        elif t == tag[spec.path]:
            if not blocks or blocks[-1]["path"] is not None:
                raise ParseError(f"{spec.path} outside a block")
            blocks[-1]["path"] = i
        elif t == tag[spec.path_close]:
            if not blocks or blocks[-1]["path"] is None:
                raise ParseError(f"{spec.path_close} without {spec.path}")
            blocks[-1]["spans"].append((blocks[-1]["path"], i))
            blocks[-1]["path"] = None
        elif t == tag[spec.closes]:
            if not blocks or blocks[-1]["path"] is not None:
                raise ParseError(f"{spec.closes} inside a path or outside a block")
            forks += 1
            depth = len(blocks) - 1
            for k, (s, e) in enumerate(blocks.pop()["spans"], 1):
                for j in range(s, e + 1):
                    placed[j][depth] = (forks, k)
    if blocks:
        raise ParseError(f"a block not closed by {spec.closes}")
    branches = [tuple(p.get(d, (0, 0)) for d in range(max(p) + 1)) if p else () for p in placed]
    return _sglang_positions(ids, tag, spec, start), branches


def _sglang_positions(ids: Sequence[int], tag: dict[str, int], spec: SGLangTags, start: int) -> list[int]:
    positions = list(range(len(ids)))
    blocks: list[dict] = []

    def shift(i: int, to: int) -> None:
        delta = positions[i] - to
        for j in range(i, len(ids)):
            positions[j] -= delta

    for i in range(start, len(ids)):
        t, block = ids[i], blocks[-1] if blocks else None
        if t == tag[spec.opens]:
            blocks.append({"goal_end": -1, "longest": 0, "in_goal": spec.goal_open is None, "in_path": False})
        elif spec.goal_open is not None and t == tag[spec.goal_open] and block:
            block["in_goal"] = True
        elif t == tag[spec.goal_close] and block and block["in_goal"]:
            block["goal_end"], block["in_goal"] = positions[i], False
        elif t == tag[spec.path] and block and block["goal_end"] != -1:
            block["in_path"] = True
            shift(i, block["goal_end"] + 1)
        elif t == tag[spec.path_close] and block and block["in_path"]:
            block["longest"], block["in_path"] = max(block["longest"], positions[i] - block["goal_end"]), False
        elif t == tag[spec.conclusion] and block and block["goal_end"] != -1:
            shift(i, block["goal_end"] + block["longest"] + 1)
            if spec.closes == spec.conclusion:
                blocks.pop()
        elif t == tag[spec.closes] and spec.closes != spec.conclusion and blocks:
            blocks.pop()
    return positions


# -- building rows ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ForkItem:
    """A training item: the prompt (as the engine gets it) and the response transcript."""

    prompt: str
    response: str
    user: str | None = None  # the user turn the prompt holds (the official layouts render it with the response)
    instruction: str | None = None  # that turn with "{Problem}" for the row's problem (None: not known)


class ForkBuilder:
    """Rows of one format and layout for one tokenizer (with the format's tokens). Interface of
    :class:`training.batching.SFTDataset`: ``units``, ``length``, ``sample``, ``max_length``."""

    def __init__(self, tokenizer, fmt: Format, layout: str = "paper", *, max_length: int | None = None):
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token to end a response with")
        self.tokenizer, self.fmt, self.layout, self.max_length = tokenizer, fmt, layout, max_length
        self.tag = {t: tokenizer.convert_tokens_to_ids(t) for t in fmt.tokens}

    def encode(self, text: str) -> list[int]:
        return _encode(self.tokenizer, text)

    def units(self, item: ForkItem) -> list[ForkExample | None]:
        row = self.build(item)
        return [row if self.max_length is None or row.input_ids.numel() <= self.max_length else None]

    def length(self, row: ForkExample) -> int:
        return row.input_ids.numel()

    def sample(self, row: ForkExample, rng: random.Random) -> ForkExample:
        return row

    def build(self, item: ForkItem) -> ForkExample:
        if self.layout == "official":
            return self._official(item)
        prompt = PAPER.prompt_ids(item.prompt, self.tokenizer)  # as the engine encodes the format's prompt
        if self.layout == "sequential":
            response = self.encode(item.response) + [self.tokenizer.eos_token_id]
            return example(prompt + response, [False] * len(prompt) + [True] * len(response),
                           range(len(prompt) + len(response)), [()] * (len(prompt) + len(response)))
        writer = _Writer(self.tokenizer, self.fmt.as_run(official=False))
        writer.add(prompt, False, 0, ())
        end = writer.line(parse_response(self.fmt, item.response), len(prompt), ())
        writer.add([self.tokenizer.eos_token_id], True, end, ())
        return example(writer.ids, writer.trained, writer.positions, writer.branches)

    def _official(self, item: ForkItem) -> ForkExample:
        """The authors' tokenization, labels and layout: Parallel-R1's dataset tokenizes the chat
        prompt and ``response + EOS`` apart and trains every response token; Multiverse's and NPR's
        render the whole chat and train the assistant turn (trl's completion-only collator)."""
        if self.fmt.name == "parallel-r1":
            prompt = self.encode(item.prompt)
            ids = prompt + self.encode(item.response + self.tokenizer.eos_token)
            positions, branches = official_parallel_r1(ids, self.tag)
            return example(ids, [False] * len(prompt) + [True] * (len(ids) - len(prompt)), positions, branches)
        if not getattr(self.tokenizer, "chat_template", None) or item.user is None:
            raise ParseError(f"compat=official for {self.fmt.name} renders the user and assistant turns with the "
                             "tokenizer's chat template: it needs one, and the item's user turn")
        whole = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": item.user}, {"role": "assistant", "content": item.response}],
            tokenize=False, **dict(self.fmt.chat_template_kwargs))
        if not whole.startswith(item.prompt):
            raise ParseError("the chat template renders the assistant turn elsewhere than after the generation prompt")
        prompt, ids = self.encode(item.prompt), self.encode(whole)
        if ids[:len(prompt)] != prompt:
            raise ParseError("the prompt tokenizes differently alone and with the response")
        spec = OFFICIAL_TAGS[self.fmt.name]
        start = len(prompt)
        if self.fmt.name == "npr":  # its code reads after the first <|im_end|> (the user turn's end)
            im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
            start = ids.index(im_end) + 1 if im_end in ids else len(prompt)
        positions, branches = official_sglang(ids, self.tag, spec, start)
        return example(ids, [False] * len(prompt) + [True] * (len(ids) - len(prompt)), positions, branches)


# -- batches -----------------------------------------------------------------------------------


@dataclass
class ForkCollator:
    """Right-pads a batch of rows (each one or more :class:`ForkExample` documents) to its longest:
    ``input_ids``, ``labels``, ``position_ids`` and the ``fork_ids``, ``path_ids`` and
    ``document_ids`` :func:`allowed_mask` reads (padding: document ``PAD_DOCUMENT``)."""

    pad_token_id: int

    def __call__(self, batch: Sequence[tuple[ForkExample, ...]]) -> dict[str, torch.Tensor]:
        width = max(sum(ex.input_ids.numel() for ex in row) for row in batch)
        depth = max(ex.forks.shape[1] for row in batch for ex in row)
        shape = (len(batch), width)
        out = {
            "input_ids": torch.full(shape, self.pad_token_id, dtype=torch.long),
            "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
            "position_ids": torch.zeros(shape, dtype=torch.long),
            "fork_ids": torch.zeros(*shape, depth, dtype=torch.long),
            "path_ids": torch.zeros(*shape, depth, dtype=torch.long),
            "document_ids": torch.full(shape, PAD_DOCUMENT, dtype=torch.long),
        }
        for b, row in enumerate(batch):
            start = 0
            for doc, ex in enumerate(row):
                span = slice(start, start + ex.input_ids.numel())
                out["input_ids"][b, span], out["labels"][b, span] = ex.input_ids, ex.labels
                out["position_ids"][b, span], out["document_ids"][b, span] = ex.position_ids, doc
                d = ex.forks.shape[1]
                out["fork_ids"][b, span, :d], out["path_ids"][b, span, :d] = ex.forks, ex.paths
                start = span.stop
        return out


def allowed_mask(fork_ids: torch.Tensor, path_ids: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
    """``[B, 1, L, L]`` boolean mask (True: attend): causal, within one document, and never across
    two paths of one fork."""
    L = document_ids.shape[1]
    allowed = torch.ones(L, L, dtype=torch.bool, device=document_ids.device).tril()[None]
    allowed = allowed & (document_ids[:, :, None] == document_ids[:, None, :])
    for d in range(fork_ids.shape[2]):
        fq, fk = fork_ids[:, :, d, None], fork_ids[:, None, :, d]
        pq, pk = path_ids[:, :, d, None], path_ids[:, None, :, d]
        allowed &= ~((fq == fk) & (fq > 0) & (pq != pk))
    return allowed[:, None]


# -- reading rows and preparing the model ----------------------------------------------------------


class ForkReader:
    """Turns a row of ``--data`` into a :class:`ForkItem`, checked by :func:`parse_response` as
    ``layout`` needs (``ParseError`` names the defect). Forms (:class:`training.sources.Form`):

    * responses: ``response`` with ``instruction_prompt`` (the user turn, as Parallel-R1's file
      has it) or ``problem`` (put into the format's own prompt);
    * messages / conversations: the last assistant turn and the user turn before it;
    * text: the whole transcript; the response starts after the chat template's generation prompt.
    """

    def __init__(self, fmt: Format, tokenizer, layout: str):
        self.fmt, self.tokenizer, self.strict = fmt, tokenizer, layout == "paper"

    def __call__(self, row, form: Form) -> ForkItem:
        instruction = None
        if form is Form.RESPONSES:
            user, response = row.get("instruction_prompt"), row.get("response")
            problem = row.get("problem")
            if not isinstance(user, str) or not user.strip():
                if not isinstance(problem, str) or not problem.strip():
                    raise ParseError("needs a non-empty 'instruction_prompt' or 'problem'")
                user = self.fmt.user_message(problem)
            if isinstance(problem, str) and problem and user.count(problem) == 1:
                instruction = user.replace(problem, "{Problem}")
            prompt = self.fmt.chat_prompt(user, self.tokenizer)
        elif form in (Form.MESSAGES, Form.CONVERSATIONS):
            user, response = last_exchange(row[form.name.lower()])
            prompt = self.fmt.chat_prompt(user, self.tokenizer)
        elif form is Form.TEXT:
            text = row.get("text")
            if not isinstance(text, str):
                raise ParseError("'text' must be a string")
            cut = self._response_start(text)
            user, prompt, response = None, text[:cut], text[cut:]
        else:
            raise ParseError(f"--format {self.fmt.name} reads responses, text or messages, not {form.value}")
        if not isinstance(response, str) or not response.strip():
            raise ParseError("the response is empty")
        parse_response(self.fmt, response, strict=self.strict)
        return ForkItem(prompt, response, user, instruction)

    def _response_start(self, text: str) -> int:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ParseError("a 'text' transcript is cut where the chat template's generation prompt ends: the "
                             "tokenizer has no chat template (give responses or messages instead)")
        marker = "\x00"
        suffix = self.fmt.chat_prompt(marker, self.tokenizer).split(marker, 1)[1]
        at = text.find(suffix)
        if at < 0:
            raise ParseError(f"no {suffix!r} (the chat template's generation prompt) in the text")
        return at + len(suffix)


def add_format_tokens(model, tokenizer, fmt: Format) -> list[str]:
    """Add the format's tags the tokenizer lacks as special tokens; returns those added. Each new
    embedding (and untied output) row starts as the mean of the rows of the tag's name without
    its brackets (``</Path>``: ``/Path``), as Multiverse's and NPR's training code starts them."""
    new = fmt.missing_tokens(tokenizer.get_vocab())
    if not new:
        return []
    pieces = {t: tokenizer(t.strip("<>"), add_special_tokens=False)["input_ids"] for t in new}
    tokenizer.add_tokens(new, special_tokens=True)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    tables = [model.get_input_embeddings().weight]
    if not model.config.get_text_config().tie_word_embeddings:
        tables.append(model.get_output_embeddings().weight)
    with torch.no_grad():
        for t in new:
            for table in tables:
                table[tokenizer.convert_tokens_to_ids(t)] = table[pieces[t]].mean(0)
    return new


def trained_instruction(items: Sequence[ForkItem]) -> str | None:
    """The user turn every item's prompt was built from, "{Problem}" where its problem goes (the
    data's instruction, recorded in the checkpoint); None when the items do not share one."""
    found = {item.instruction for item in items}
    return found.pop() if len(found) == 1 else None
