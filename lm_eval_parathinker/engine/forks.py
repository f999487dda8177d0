"""Forks the model triggers: Parallel-R1, Multiverse and NPR responses (:mod:`..formats`) decoded
with paged KV, continuous batching and preemption.

A response is a tree. A :class:`Thread` is one line of it (the main line, or one path), a list
of parts: :class:`Segment` s, runs of tokens whose KV lives in pages of their own, and
:class:`Fork` s, each holding its paths (threads again, so forks nest). A segment sees, besides
itself, the segments written before it on its line: its thread's context (a path's context is
everything its parent saw, read in place: the prefix is shared, never copied) and its own earlier
parts, where a fork counts with every path (the join reads them in place). Positions: a path starts
where its parent stopped, all paths at the same position; the join after the longest path.

Every step writes one token of every thread that has one to write (sampled, or written by the
engine: a path's opening text, the join text) across all running requests, in one forward whose
queries each read only their visible pages; a thread samples its next token once it has nothing
left to write. What a sampled token does (written, a fork, a path's end, the response's end) is
the format's control flow (:class:`SGLangFlow`, :class:`LoopFlow`), per layout:

* ``paper``: as trained: isolated paths at a shared start position, read in place at the join.
* ``official``: as the released engine runs (:class:`formats.ReleasedEngine`).

The host drives this loop token by token: these formats decode eager (``compile`` applies to
ParaThinker's step). A request is admitted when the pool holds its worst case (a format whose
budget bounds every token, Parallel-R1's) or its prompt and a page (the others, whose trees have
no bounded size): when the pool runs dry, the most recently admitted request is preempted (its
pages freed, restarted later from its prompt); its random streams are keyed by its seed and each
thread's place in its tree, so it produces what it would have produced.
"""

from __future__ import annotations

import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .. import formats as formats_module
from ..formats import Format
from . import sampling
from .attention import FreshReads, Kernel, page_reads
from .kv_cache import PagedKVCache
from .pages import SCRATCH_PAGE, PoolStats, pages_for
from .sampling import SamplingParams
from .step import fresh_forward

# why a thread ended
LENGTH, EOS, PATH_END, MATCHED, CUT, STOP = "length", "eos", "path_end", "matched", "cut", "stop"


@dataclass(eq=False)
class Segment:
    """A run of tokens of one thread, at consecutive positions from ``start``, in pages of its own."""

    start: int
    sees: list[Segment]  # the segments before it that its tokens read in full
    tokens: list[int] = field(default_factory=list)  # written: their KV is in ``pages``
    inserted: list[bool] = field(default_factory=list)  # written by the engine, not sampled
    pages: list[int] = field(default_factory=list)
    hidden: bool = False  # a later path's leading token that the released SGLang merge drops
    shown_from: int = 0  # tokens before it are not the response's (the prompt; a re-encoded copy of the paths)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # output_logits: token index -> next-token logits

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass(eq=False)
class Fork:
    labels: list[str]
    paths: list[Thread]
    reencoded: bool = False  # its paths were re-encoded after it (their pages freed)

    def done(self) -> bool:
        return all(p.ended is not None for p in self.paths)


@dataclass(eq=False)
class Thread:
    """One line of a response (see the module docstring) and its control-flow state."""

    key: str  # its place in the tree ("root", "root/2", ...): its random stream's name
    context: list[Segment]
    depth: int  # forks it is inside
    parent: Thread | None = None
    parts: list = field(default_factory=list)  # Segment | Fork, in order
    pending: list[tuple[int, bool]] = field(default_factory=list)  # (token, inserted) to write, in order
    then: Callable[[], None] | None = None  # what to do once ``pending`` is written (None: sample)
    sampled: list[int] = field(default_factory=list)  # tokens sampled since it (re)started (SGLang's ``out``)
    origin: int = 0  # response tokens in its request's input when it (re)started (NPR's degree limit)
    degree: int = 1  # its fork's paths (1 on the main line)
    trigger: int | None = None  # SGLang: the stop token whose lookahead is being read
    summary: bool = False  # Parallel-R1: inside a summary
    ended: str | None = None
    tail: list[int] = field(default_factory=list)  # sampled, not written, shown at the end (the last token)
    joins: int = 0  # joins it has gone through: its random stream is named by its key and this
    draws: int = 0  # tokens drawn since its last join (the index in that stream)

    @property
    def segment(self) -> Segment:
        return self.parts[-1]

    @property
    def end(self) -> int:
        """The position after its last token (a path that ended inside a fork of its own: its longest path's)."""
        last = self.parts[-1]
        return last.end if isinstance(last, Segment) else max(path.end for path in last.paths)

    def forks(self) -> list[Fork]:
        return [p for p in self.parts if isinstance(p, Fork)]

    def visible(self) -> list[Segment]:
        """What a new segment at the end of this thread reads: its context, then its parts."""
        return self.context + _flatten(self.parts, own=True)


def _flatten(parts: list, own: bool) -> list[Segment]:
    """The segments of ``parts`` a reader sees (``own``: the thread itself, which sees its hidden lead)."""
    seen = []
    for part in parts:
        if isinstance(part, Segment):
            if own or not part.hidden:
                seen.append(part)
        elif not part.reencoded:
            for path in part.paths:
                seen += _flatten(path.parts, own=False)
    return seen


@dataclass
class Tree:
    """One request: its prompt, its root thread and what the host knows of it."""

    index: int
    seed: int
    prompt: list[int]
    order: int  # admission order: the most recent is preempted first
    root: Thread
    admitted: float
    forks: int = 0
    threads: list[Thread] = field(default_factory=list)  # every thread with tokens to write or draw

    def segments(self) -> list[Segment]:
        out = []

        def walk(thread: Thread) -> None:
            for part in thread.parts:
                if isinstance(part, Segment):
                    out.append(part)
                else:
                    for path in part.paths:
                        walk(path)

        walk(self.root)
        return out


@dataclass(frozen=True)
class ForkConfig:
    """What one call runs with."""

    format: Format
    official: bool
    budget: int  # max_new_tokens: the whole response (total budget) or its longest chain (critical)
    max_paths: int  # a fork asking for more paths is refused (Multiverse has no cap of its own)
    num_paths: int | None  # Parallel-R1: paths per fork (None: the format's)
    sampling: SamplingParams
    eos_ids: tuple[int, ...]
    kernel: Kernel
    num_slots: int
    banned: tuple[int, ...] = ()
    stop: Callable[[list[int]], bool] | None = None  # whether the main line's tokens end in a stop string
    output_logits: bool = False


@dataclass
class ForkedOutput:
    """A finished request: its transcript's tokens and the tree behind them."""

    index: int
    ids: list[int]  # the response as one sequence (engine-written tokens included)
    inserted: list[bool]
    root: Thread
    stats: dict


class ForkScheduler:
    """Runs prompts through a format's control flow (see the module docstring)."""

    def __init__(self, model, tokenizer, cache: PagedKVCache, config: ForkConfig):
        self.model, self.tokenizer, self.cache, self.config = model, tokenizer, cache, config
        self.device = next(model.parameters()).device
        self.fmt = config.format.as_run(config.official)  # the path openings and separator its layout writes
        self.ids = {t: tokenizer.convert_tokens_to_ids(t) for t in self.fmt.tokens}
        self.flow = (LoopFlow if self.fmt.summary_close is not None else SGLangFlow)(self)
        self.stats = PoolStats(num_pages=cache.num_pages, page_size=cache.page_size)

    # -- the loop ---------------------------------------------------------------------------

    def run(self, prompts: Sequence[list[int]], seeds: Sequence[int],
            on_finished: Callable[[ForkedOutput], None]) -> None:
        self.prompts, self.seeds, self.on_finished = prompts, seeds, on_finished
        self.free = list(range(self.cache.num_pages - 1, SCRATCH_PAGE, -1))
        self.running: list[Tree] = []
        self.admissions = 0
        self.pressure = False
        self.preempted: dict[int, int] = {}
        self.waiting = deque(range(len(prompts)))  # a preempted request goes back to its head
        while self.waiting or self.running:
            self._admit(self.waiting)
            queries = self._reserve()
            if queries:
                self._step(queries)

    def _admit(self, waiting: deque) -> None:
        if not self.running:
            self.pressure = False
        while waiting and not self.pressure and len(self.running) < self.config.num_slots:
            prompt = self.prompts[waiting[0]]
            if self.worst_pages(len(prompt)) > len(self.free):
                if not self.running:
                    raise ValueError(f"prompt {waiting[0]} needs {self.worst_pages(len(prompt))} KV pages, but the "
                                     f"pool has {len(self.free)}: raise num_blocks or max_memory_percent")
                return
            self._prefill(waiting.popleft())

    def worst_pages(self, prompt_len: int) -> int:
        return admission_pages(self.config, prompt_len, self.cache.page_size)

    def _prefill(self, request: int) -> None:
        prompt = self.prompts[request]
        n = len(prompt)
        root = Thread("root", [], 0)
        tree = Tree(request, self.seeds[request], prompt, self.admissions, root, time.perf_counter())
        self.admissions += 1
        self.running.append(tree)
        segment = self.new_segment(root, 0)
        self._grow(segment, n, tree)
        positions = torch.arange(n, device=self.device)
        logits = fresh_forward(self.model, self.cache, torch.tensor([prompt], device=self.device), positions[None],
                               torch.zeros(1, n, dtype=torch.long, device=self.device),
                               FreshReads(self._columns(segment, 0, n)), False, last_only=True)
        segment.tokens += prompt
        segment.inserted += [False] * n
        segment.shown_from = n
        tree.threads.append(root)
        self.draw([(tree, root, logits[0, -1])])

    # -- pages ------------------------------------------------------------------------------

    def _grow(self, segment: Segment, tokens: int, tree: Tree) -> bool:
        """Pages for ``tokens`` tokens of ``segment`` in all, preempting the most recent requests
        until the pool has them; False when ``tree`` itself was preempted."""
        missing = pages_for(tokens, self.cache.page_size) - len(segment.pages)
        while missing > len(self.free):
            victim = max(self.running, key=lambda t: t.order)
            self._preempt(victim)
            if victim is tree:
                return False
        for _ in range(max(missing, 0)):
            segment.pages.append(self.free.pop())
        used = self.cache.num_pages - 1 - len(self.free)
        if used >= self.stats.peak_pages:  # the tokens held then (this segment's with those it takes)
            self.stats.peak_pages = used
            held = sum(len(s.tokens) for t in self.running for s in t.segments() if s.pages and s is not segment)
            self.stats.peak_tokens = max(self.stats.peak_tokens, held + tokens)
        return True

    def release(self, segment: Segment) -> None:
        self.free.extend(reversed(segment.pages))
        segment.pages = []

    def _preempt(self, tree: Tree) -> None:
        for segment in tree.segments():
            self.release(segment)
        self.running.remove(tree)
        self.waiting.appendleft(tree.index)
        self.preempted[tree.index] = self.preempted.get(tree.index, 0) + 1
        self.stats.preemptions += 1
        self.pressure = True

    def _columns(self, segment: Segment, first: int, count: int) -> torch.Tensor:
        ps = self.cache.page_size
        offsets = torch.arange(first, first + count)
        pages = torch.tensor(segment.pages)[offsets // ps]
        return (pages * ps + offsets % ps).to(self.device)

    # -- one step ---------------------------------------------------------------------------

    def _reserve(self) -> list[tuple[Tree, Thread]]:
        """The threads that write a token this step, each with a page for it, oldest request first."""
        queries = []
        for tree in sorted(self.running, key=lambda t: t.order):
            if tree not in self.running:  # preempted for an older request in this loop
                continue
            for thread in list(tree.threads):
                if not self._grow(thread.segment, len(thread.segment.tokens) + 1, tree):
                    queries = [(t, th) for t, th in queries if t is not tree]
                    break
                queries.append((tree, thread))
        return queries

    def _step(self, queries: list[tuple[Tree, Thread]]) -> None:
        """One forward: every query writes its thread's next token and reads its visible pages."""
        ps = self.cache.page_size
        reads = [[*th.segment.sees, th.segment] for _, th in queries]
        width = max(len(r) for r in reads)
        pages = max(len(s.pages) for r in reads for s in r)
        # each query's visible segments as rows of a page table of its own (scratch-padded), and their
        # lengths (its own segment's with the token it writes now): built on the host, copied once
        table = [[s.pages + [SCRATCH_PAGE] * (pages - len(s.pages)) for s in r]
                 + [[SCRATCH_PAGE] * pages] * (width - len(r)) for r in reads]
        lengths = [[len(s.tokens) for s in r[:-1]] + [len(r[-1].tokens) + 1] + [0] * (width - len(r)) for r in reads]
        tokens, positions, columns = [], [], []
        for _, thread in queries:
            segment, n = thread.segment, len(thread.segment.tokens)
            tokens.append(thread.pending[0][0])
            positions.append(segment.start + n)
            columns.append(segment.pages[n // ps] * ps + n % ps)
        table = torch.tensor(table, device=self.device)
        lengths = torch.tensor(lengths, device=self.device)
        columns = torch.tensor([columns], device=self.device)
        write = self.cache.write(columns, torch.ones_like(columns, dtype=torch.bool))
        index = torch.arange(len(queries), device=self.device)
        page_view = page_reads(table, lengths, index, lengths > 0, self.cache.fill, ps, self.config.kernel,
                               self.cache.groups)
        logits = self.model(input_ids=torch.tensor([tokens], device=self.device),
                            position_ids=torch.tensor([positions], device=self.device),
                            attention_mask=self.cache.no_mask, **{self.cache.argument: write}, use_cache=True,
                            reads=page_view).logits[0]
        ready = []
        for b, (tree, thread) in enumerate(queries):
            token, inserted = thread.pending.pop(0)
            thread.segment.tokens.append(token)
            thread.segment.inserted.append(inserted)
            if thread.pending or tree not in self.running:  # (preempted by an action of this step)
                continue
            if thread.then is not None:  # written: act on it instead of drawing
                action, thread.then = thread.then, None
                action()
            else:
                ready.append((tree, thread, logits[b]))
        self.draw([(tree, thread, row) for tree, thread, row in ready if tree in self.running])

    def draw(self, rows: list[tuple[Tree, Thread, torch.Tensor]]) -> None:
        """Draw the next token of each thread (``rows``: its request, itself, its last written
        token's logits), one sampling call per sampling setting, and let the format's control flow
        act on each."""
        by_params: dict[SamplingParams, list] = {}
        for row in rows:
            by_params.setdefault(self.flow.params(row[1]), []).append(row)
        for params, group in by_params.items():
            logits = torch.stack([row for *_, row in group])[:, None].float()
            if self.config.banned:
                logits[..., list(self.config.banned)] = float("-inf")
            draw = sampling.Draw(torch.tensor([tree.seed for tree, *_ in group], device=self.device),
                                 torch.tensor([tree.index for tree, *_ in group], device=self.device),
                                 torch.tensor([[stream(t.key, t.joins)] for _, t, _ in group], device=self.device),
                                 torch.tensor([[t.draws] for _, t, _ in group], device=self.device))
            drawn = sampling.sample(logits, params, draw)[:, 0].tolist()
            for (tree, thread, row), token in zip(group, drawn):
                if self.config.output_logits:
                    thread.segment.logits[len(thread.segment.tokens) - 1] = row.float().cpu()
                thread.draws += 1
                if tree not in self.running or thread.ended is not None:
                    continue
                if thread.parent is None and self.config.stop and self.config.stop(thread.segment.tokens + [token]):
                    self.end_thread(tree, thread, STOP, [token])  # stop strings end the main line only
                else:
                    self.flow.on_token(tree, thread, token)

    # -- what the control flows call ----------------------------------------------------------

    def new_segment(self, thread: Thread, start: int, hidden: bool = False) -> Segment:
        segment = Segment(start, thread.visible(), hidden=hidden)
        thread.parts.append(segment)
        return segment

    def restart(self, tree: Tree, thread: Thread) -> None:
        """``thread`` goes on after a join: a new random stream, a new SGLang request."""
        thread.joins += 1
        thread.draws, thread.sampled, thread.degree, thread.trigger = 0, [], 1, None
        if thread not in tree.threads:
            tree.threads.append(thread)

    def write(self, thread: Thread, tokens: Sequence[int], inserted: bool = False) -> None:
        thread.pending += [(t, inserted) for t in tokens]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    def fork(self, tree: Tree, thread: Thread, labels: list[str], starts: list[list[int]],
             hide_later_leads: bool) -> None:
        """Open a path per label after the tokens ``thread`` has written; each starts by writing its
        ``starts`` tokens (the first of them in a segment of its own with ``hide_later_leads``)."""
        tree.forks += 1
        context, start = thread.visible(), thread.segment.end  # what every path sees, where each starts
        fork = Fork(labels, [])
        thread.parts.append(fork)
        tree.threads.remove(thread)
        for k, tokens in enumerate(starts, 1):
            path = Thread(f"{thread.key}/{len(thread.forks())}.{k}", context, thread.depth + 1,
                          parent=thread, degree=len(starts))
            fork.paths.append(path)
            path.origin = sum(len(s.tokens) for s in path.context) - len(tree.prompt) + len(tokens)
            if hide_later_leads:
                self.new_segment(path, start, hidden=k > 1)  # the lead, alone in its segment
                self.write(path, tokens[:1], inserted=True)
                path.then = lambda path=path, rest=tokens[1:], at=start + 1: self._after_lead(path, rest, at)
            else:
                self.new_segment(path, start)
                self.write(path, tokens, inserted=True)
            tree.threads.append(path)

    def _after_lead(self, path: Thread, rest: list[int], start: int) -> None:
        self.new_segment(path, start)
        self.write(path, rest, inserted=True)

    def end_thread(self, tree: Tree, thread: Thread, reason: str, tail: Sequence[int] = ()) -> None:
        """``thread`` takes no more tokens; the response ends with its main line, a fork joins once
        its last path ends."""
        thread.ended, thread.tail = reason, list(tail)
        if thread in tree.threads:
            tree.threads.remove(thread)
        if thread.parent is None:
            self._finish(tree)
            return
        parent = thread.parent
        fork = parent.parts[-1]
        if fork.done():
            self.flow.join(tree, parent, fork)

    def reencode(self, tree: Tree, thread: Thread, fork: Fork, join: list[int], start: int) -> torch.Tensor | None:
        """Parallel-R1's released rollout: a new segment holding the paths one after the other, then
        ``join``, at sequential positions from ``start``, encoded in one forward over what the thread
        saw before the fork; the paths' pages are freed. Returns the last logits (None: the request
        was preempted for the pages)."""
        copy = [t for path in fork.paths for s in path.parts for t in s.tokens]
        tokens = copy + join
        for path in fork.paths:
            for segment in _flatten(path.parts, own=True):
                self.release(segment)
        fork.reencoded = True
        segment = self.new_segment(thread, start)
        segment.shown_from = len(copy)
        if not self._grow(segment, len(tokens), tree):
            return None
        context = [page for s in segment.sees for page in s.pages]
        reads = FreshReads(self._columns(segment, 0, len(tokens)), context=torch.tensor(context, device=self.device),
                           fill=self.cache.fill, page_size=self.cache.page_size)
        n = len(tokens)
        logits = fresh_forward(self.model, self.cache, torch.tensor([tokens], device=self.device),
                               (start + torch.arange(n, device=self.device))[None],
                               torch.zeros(1, n, dtype=torch.long, device=self.device), reads, False, last_only=True)
        segment.tokens += tokens
        segment.inserted += [True] * n
        self.restart(tree, thread)
        return logits[0, -1]

    def _finish(self, tree: Tree) -> None:
        self.running.remove(tree)
        self.pressure = False
        ids, inserted = transcript(tree.root)
        if self.fmt.budget == "total":  # Parallel-R1 cuts its response to the budget
            ids, inserted = ids[: self.config.budget], inserted[: self.config.budget]
        stats = tree_stats(tree.root, len(ids))
        stats["preemptions"] = self.preempted.get(tree.index, 0)
        stats["latency_s"] = time.perf_counter() - tree.admitted
        output = ForkedOutput(tree.index, ids, inserted, tree.root, stats)
        for segment in tree.segments():
            self.release(segment)
        self.on_finished(output)


def admission_pages(config: ForkConfig, prompt_len: int, page_size: int) -> int:
    """Pages a request is admitted with: its worst case where the format bounds every token (the
    whole response within the budget: its tokens, and a partial page per segment), else its
    prompt's and one more (preemption makes room as its tree grows)."""
    fmt = config.format
    if fmt.budget != "total":
        return pages_for(prompt_len, page_size) + 1
    segments = 1 + (fmt.max_forks or 0) * ((config.num_paths or fmt.fixed_paths) + 1)
    return pages_for(prompt_len, page_size) + pages_for(config.budget, page_size) + segments


def typical_pages(config: ForkConfig, prompt_len: int, page_size: int) -> int:
    """Pages a pool gives each request: its worst case (bounded formats), else its longest chain
    with one fork of ``max_paths`` paths over the whole budget."""
    if config.format.budget == "total":
        return admission_pages(config, prompt_len, page_size)
    return pages_for(prompt_len, page_size) + config.max_paths * (pages_for(config.budget, page_size) + 1)


def stop_check(stop_strings: Sequence[str], tokenizer) -> Callable[[list[int]], bool] | None:
    """Whether the main line's text now ends in one of ``stop_strings`` (None: no stop strings)."""
    if not stop_strings:
        return None
    tail = max(len(s) for s in stop_strings) + 8  # tokens enough to hold any stop string

    def check(tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens[-tail:])
        return any(text.endswith(s) for s in stop_strings)

    return check


def tree_json(thread: Thread, tokenizer) -> dict:
    """A thread as ``--log_samples`` shows it: its parts' text, each fork with its labels and paths."""
    parts = []
    for part in thread.parts:
        if isinstance(part, Segment):
            if not part.hidden and len(part.tokens) > part.shown_from:
                parts.append(tokenizer.decode(part.tokens[part.shown_from :]))
        else:
            parts.append({"labels": part.labels, "paths": [tree_json(p, tokenizer) for p in part.paths]})
    if thread.tail:
        parts.append(tokenizer.decode(thread.tail))
    return {"ended": thread.ended, "parts": parts}


def stream(key: str, joins: int) -> int:
    """The random stream of thread ``key`` after ``joins`` joins ("root#0", "root/1.2#0"...): a
    function of its place in the tree only."""
    return zlib.crc32(f"{key}#{joins}".encode()) & 0x3FFFFFFF


def transcript(thread: Thread) -> tuple[list[int], list[bool]]:
    """A thread's tokens as one sequence (paths in order), what the engine wrote marked."""
    ids, inserted = [], []
    for part in thread.parts:
        if isinstance(part, Segment):
            if not part.hidden:
                ids += part.tokens[part.shown_from :]
                inserted += part.inserted[part.shown_from :]
        else:
            for path in part.paths:
                more, marks = transcript(path)
                ids += more
                inserted += marks
    ids += thread.tail
    inserted += [False] * len(thread.tail)
    return ids, inserted


def tree_stats(root: Thread, total: int) -> dict:
    """Forks, paths per fork, and the critical path (the longest chain of tokens, the latency these
    papers report) against the total."""
    forks: list[int] = []

    def critical(thread: Thread) -> int:
        length = len(thread.tail)
        for part in thread.parts:
            if isinstance(part, Segment):
                length += len(part.tokens) - part.shown_from
            else:
                forks.append(len(part.paths))
                length += max(critical(p) for p in part.paths)
        return length

    chain = critical(root)
    return {"forks": len(forks), "paths_per_fork": forks, "critical_tokens": chain, "total_tokens": total}


def well_formed_forks(thread: Thread) -> int:
    """Forks of a thread and its paths (nested ones included) whose every path ended with its own
    closing tag and whose join was written (the thread went on after it)."""
    count = 0
    for i, part in enumerate(thread.parts):
        if isinstance(part, Fork):
            joined = i + 1 < len(thread.parts)
            count += joined and all(path.ended == PATH_END for path in part.paths)
            count += sum(well_formed_forks(path) for path in part.paths)
    return count


def response_tokens(tree: Tree) -> int:
    """Tokens of the response so far (written or ended on; re-encoded copies counted once)."""

    def count(thread: Thread) -> int:
        n = len(thread.tail)
        for part in thread.parts:
            n += len(part.tokens) - part.shown_from if isinstance(part, Segment) else sum(map(count, part.paths))
        return n

    return count(tree.root)


class SGLangFlow:
    """Multiverse's and NPR's control flow. ``official``: their SGLang forks' (a lookahead token
    read past each trigger and path end, budget slack, NPR's own-output and degree rules,
    Multiverse's text trim); ``paper``: a fork right after the trigger is written, a path ended by
    its closing tag, the separator and the join written by the engine, the budget the critical path."""

    def __init__(self, engine: ForkScheduler):
        self.engine, self.fmt, self.config = engine, engine.fmt, engine.config
        self.released = self.fmt.released if self.config.official else formats_module.ReleasedEngine()
        ids = engine.ids
        self.trigger, self.close = ids[self.fmt.trigger], ids[self.fmt.path_close]
        self.outline_open = ids[self.fmt.outline_open]
        self.eos = set(self.config.eos_ids)

    def params(self, thread: Thread) -> SamplingParams:
        return self.config.sampling

    def on_token(self, tree: Tree, thread: Thread, token: int) -> None:
        released, budget = self.released, self.config.budget
        thread.sampled.append(token)
        position = thread.segment.end - len(tree.prompt)  # the token's place on its chain
        if position >= budget - released.length_slack:
            return self.finish(tree, thread, LENGTH, token)
        if released.degree_limit and thread.origin + len(thread.sampled) * thread.degree >= budget - 128:
            return self.finish(tree, thread, LENGTH, token)
        if not released.lookahead:
            return self._paper(tree, thread, token, position)
        if token in (self.trigger, self.close):  # a stop token: its lookahead decides
            thread.trigger = token
            return self.engine.write(thread, [token])
        if thread.trigger is not None:
            trigger, thread.trigger = thread.trigger, None
            if trigger == self.trigger:
                return self._lookahead_after_trigger(tree, thread, token, position)
            return self._lookahead_after_close(tree, thread, token)
        if token in self.eos:
            return self.finish(tree, thread, EOS, token)
        self.engine.write(thread, [token])

    def _lookahead_after_trigger(self, tree: Tree, thread: Thread, token: int, position: int) -> None:
        """The token after ``</Goal>``/``</guideline>``: dropped at a fork, kept when it is refused."""
        if self.fmt.own_outline_only and (self.close in thread.sampled or self.outline_open not in thread.sampled):
            return self.finish(tree, thread, MATCHED, token)
        labels = self._labels(thread)
        if self.fmt.out_of_range_ends and not 1 <= len(labels) <= self.fmt.max_count:
            return self.finish(tree, thread, MATCHED, token)
        if position >= self.config.budget - self.released.fork_slack or not self._may_fork(thread, labels):
            return self.engine.write(thread, [token])  # refused: decoding goes on, lookahead included
        self._fork(tree, thread, labels)

    def _lookahead_after_close(self, tree: Tree, thread: Thread, token: int) -> None:
        """Two tokens after ``</Path>``/``</step>``: the first kept, the second ends the path (dropped)."""
        if self.fmt.own_outline_only and self.trigger in thread.sampled:
            return self.finish(tree, thread, MATCHED, token)
        if len(thread.sampled) >= 3 and thread.sampled[-3] == self.close:
            return self.finish(tree, thread, PATH_END, token)
        thread.trigger = self.close
        self.engine.write(thread, [token])

    def _paper(self, tree: Tree, thread: Thread, token: int, position: int) -> None:
        engine = self.engine
        in_path = thread.parent is not None
        rewritten = token in self.eos
        if rewritten:
            if not in_path:
                return self.finish(tree, thread, EOS, token)
            token = self.close  # a path ended by EOS is closed
        if token == self.close and in_path:
            engine.write(thread, [token], rewritten)
            thread.then = lambda: engine.end_thread(tree, thread, PATH_END)
            return
        engine.write(thread, [token])
        if token != self.trigger:
            return
        labels = self._labels(thread)
        if self.fmt.out_of_range_ends and not 1 <= len(labels) <= self.fmt.max_count:
            thread.then = lambda: engine.end_thread(tree, thread, MATCHED)
        elif self._may_fork(thread, labels):
            thread.then = lambda: self._fork(tree, thread, labels)

    def _labels(self, thread: Thread) -> list[str]:
        """The paths the outline asks for, read from what the thread has seen and written."""
        tokens = [t for s in thread.visible() for t in s.tokens] + [t for t, _ in thread.pending]
        return self.fmt.labels(self.engine.text(tokens))

    def _may_fork(self, thread: Thread, labels: list[str]) -> bool:
        """No fork without paths (the released Multiverse scheduler crashes on one), past the paths'
        cap (max_paths), or nested too deep."""
        return 1 <= len(labels) <= self.config.max_paths and thread.depth <= self.fmt.max_depth

    def _fork(self, tree: Tree, thread: Thread, labels: list[str]) -> None:
        starts = [self.engine.encode(self.fmt.start_text(label)) for label in labels]
        self.engine.fork(tree, thread, labels, starts, hide_later_leads=self.released.hide_later_leads)

    def finish(self, tree: Tree, thread: Thread, reason: str, token: int) -> None:
        """``thread`` ends on ``token`` (not written): shown at the end of the response when the
        released engine's text keeps it, dropped at the join in a path."""
        keep = self.released.lookahead and thread.parent is None and not (self.released.trim_last and reason != LENGTH)
        self.engine.end_thread(tree, thread, reason, [token] if keep else [])

    def join(self, tree: Tree, thread: Thread, fork: Fork) -> None:
        """Every path has ended: the join text after the longest path, reading them all in place."""
        engine = self.engine
        start = max(path.end for path in fork.paths)
        text = self.fmt.join if self.released.lookahead else self.fmt.separator + self.fmt.join
        tokens = engine.encode(text)
        if not self.released.lookahead and start + len(tokens) - len(tree.prompt) > self.config.budget:
            return engine.end_thread(tree, thread, LENGTH)
        segment = engine.new_segment(thread, start)
        engine.restart(tree, thread)
        thread.origin = sum(len(s.tokens) for s in segment.sees) - len(tree.prompt) + len(tokens)
        engine.write(thread, tokens, inserted=True)


class LoopFlow:
    """Parallel-R1's control flow, its rollout loop's: the main line forks at ``<Parallel>`` into a
    fixed number of paths (sampled at temperature 1.0), each opened by ``<Path>`` and ended by
    ``</Path>`` (EOS is rewritten to it; a path cut at its cap gets one); the join writes
    ``</Parallel>\n<Summary>`` and the summary runs to ``</Summary>`` (EOS rewritten); the response
    ends at EOS, after the fourth block's summary, or when it holds ``max_new_tokens`` tokens (the
    whole response, paths included, cut there). ``official`` re-encodes the paths in sequence
    before the summary; ``paper`` reads them in place."""

    def __init__(self, engine: ForkScheduler):
        self.engine, self.fmt, self.config = engine, engine.fmt, engine.config
        ids = engine.ids
        self.trigger, self.close, self.summary_close = ids[self.fmt.trigger], ids[self.fmt.path_close], ids[self.fmt.summary_close]
        self.path_open = engine.encode(self.fmt.path_start)
        self.eos = set(self.config.eos_ids)
        self.num_paths = self.config.num_paths or self.fmt.fixed_paths
        self.path_params = SamplingParams(self.fmt.path_temperature, self.config.sampling.top_p, self.config.sampling.top_k)

    def params(self, thread: Thread) -> SamplingParams:
        return self.path_params if thread.parent is not None else self.config.sampling

    def on_token(self, tree: Tree, thread: Thread, token: int) -> None:
        if thread.parent is not None:
            return self._in_path(tree, thread, token)
        engine, budget = self.engine, self.config.budget
        thread.sampled.append(token)
        full = response_tokens(tree) + 1 >= budget  # this token is the response's last
        if thread.summary:
            inserted = token in self.eos
            token = self.summary_close if inserted else token
            if token == self.summary_close:
                thread.summary = False
                if full or tree.forks >= self.fmt.max_forks:
                    return engine.end_thread(tree, thread, LENGTH if full else CUT, [token])
            elif full:
                return engine.end_thread(tree, thread, LENGTH, [token])
            return engine.write(thread, [token], inserted)
        if token in self.eos:
            return engine.end_thread(tree, thread, EOS, [token])
        if full:
            return engine.end_thread(tree, thread, LENGTH, [token])
        engine.write(thread, [token])
        if token == self.trigger:
            thread.then = lambda: engine.fork(tree, thread, [str(k) for k in range(1, self.num_paths + 1)],
                                              [self.path_open] * self.num_paths, hide_later_leads=False)

    def _in_path(self, tree: Tree, thread: Thread, token: int) -> None:
        engine = self.engine
        fork = thread.parent.parts[-1]
        before = response_tokens(tree) - sum(response_tokens_of(p) for p in fork.paths)
        upto = sum(response_tokens_of(p) for p in fork.paths[: fork.paths.index(thread) + 1])
        if before + upto >= self.config.budget:  # past the cut whatever the paths before it do
            return engine.end_thread(tree, thread, CUT)
        thread.sampled.append(token)
        inserted = token in self.eos or len(thread.sampled) > self.fmt.path_token_cap
        if inserted:
            token = self.close
        engine.write(thread, [token], inserted)
        if token == self.close:
            thread.then = lambda: engine.end_thread(tree, thread, PATH_END)

    def join(self, tree: Tree, thread: Thread, fork: Fork) -> None:
        engine = self.engine
        if response_tokens(tree) >= self.config.budget:
            return engine.end_thread(tree, thread, LENGTH)
        tokens = engine.encode(self.fmt.separator + self.fmt.join)
        thread.summary = True
        if self.config.official:
            logits = engine.reencode(tree, thread, fork, tokens, start=thread.parts[-2].end)
            if logits is not None:
                engine.draw([(tree, thread, logits)])
            return
        engine.new_segment(thread, max(path.end for path in fork.paths))
        engine.restart(tree, thread)
        engine.write(thread, tokens, inserted=True)


def paths_of(thread: Thread) -> list[Thread]:
    """Every path of a thread's forks, nested ones included, in order."""
    found = []
    for fork in thread.forks():
        for path in fork.paths:
            found += [path, *paths_of(path)]
    return found


def response_tokens_of(thread: Thread) -> int:
    """The response tokens of a thread's own segments (its forks' paths not included)."""
    return sum(len(p.tokens) - p.shown_from for p in thread.parts if isinstance(p, Segment))
