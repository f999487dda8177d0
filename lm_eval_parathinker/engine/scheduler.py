"""The host side of the decode loop: continuous batching over a fixed number of slots, with KV pages
allocated as requests grow.

Each slot holds one request at a time; its keys and values live in pages of a shared pool
(:mod:`pages`). The host:

* admits a waiting request into a free slot when the pool has the pages its prompt and the first
  token of each path need (one eager prefill of its prompt into its pages);
* before each step, gives every block whose next token opens a page that page; when the pool is
  empty, it *preempts* the most recently admitted request (frees its pages, puts it back at the
  head of the queue, admits nothing new until a request ends), which later starts again from its
  prompt and decodes step by step: its random streams depend only on its seed, so it produces
  what it would have produced, without re-prefilling generated tokens;
* launches one step for all slots (:mod:`step`: forward + bookkeeping, all on the device);
* reads the slots' phases (and which paths are done) without waiting for the device
  (:class:`PhaseView`), and acts only when a slot changes stage: a finished think stage gets its
  summary template forwarded at once (after recomputing the paths for ``summary_kv="reprefill"``),
  a finished request is read back, its pages freed and its slot refilled.

A step is a rectangle ``[slots, P]`` of queries (static shapes, for a compiled step and the GPU,
where a padding query costs next to nothing) or, with ``ragged=True`` (eager CPU steps, where it
costs as much as a real one), the flat list of the real queries only. :class:`StaticScheduler`
admits requests only when every slot is free: the fixed batches of a lockstep engine, on the
same kernels (what continuous batching saves, tests/test_scheduler.py). The engine takes the
scheduler class as an argument.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .. import protocol
from . import sampling
from .attention import FreshReads, Kernel
from .compilation import DecodeStep
from .kv_cache import PagedKVCache
from .pages import PagePool, pages_for
from .recording import LogitsRecorder
from .step import (
    BUDGET,
    DONE,
    IDLE,
    SUMMARY,
    THINK,
    THINK_DONE,
    Plan,
    SlotState,
    advance,
    choose,
    fresh_forward,
    step_forward,
    step_inputs,
)
from .stops import StopChecks


@dataclass(frozen=True)
class SchedulerConfig:
    """What one engine call runs with, besides the step's constants (:class:`step.Plan`)."""

    layout: protocol.Compat
    flattened: bool  # positions=flattened
    reprefill: bool  # summary_kv=reprefill
    kernel: Kernel
    num_slots: int  # rows of a step (a compiled step keeps them for every call; an idle slot pads)
    first_tokens: list[int] | None  # parathinker: the forced <think k>; None: sampled
    template: list[int]  # the summary template ([] without a summary)
    decode_step: DecodeStep  # runs each step's forward, compiled or eager
    ragged: bool = False  # steps on the real tokens only (see the module docstring)
    static_addresses: bool = False  # the pool and page table at fixed addresses (CUDA graphs)
    table_pages: int | None = None  # the page table's width (None: the call's longest block)
    stops: StopChecks | None = None
    recorder: LogitsRecorder | None = None  # ``output_logits``: files every step's logits


@dataclass
class Finished:
    """One request as the scheduler hands it back."""

    index: int
    path_ids: list[list[int]]
    path_finished: list[bool]
    reason: str  # "finished" or "budget"
    summary_ids: list[int]  # generated summary tokens (after the template)
    timing: dict
    preemptions: int = 0
    path_logits: list[torch.Tensor] | None = None
    summary_logits: torch.Tensor | None = None  # template positions, then generated ones


@dataclass
class _Busy:
    """What the host knows of a busy slot."""

    request: int
    prompt_len: int
    admitted: float
    order: int  # admission order: the most recent is preempted first
    t: int = 0  # think stage: index of the path tokens the next step feeds
    summary: int | None = None  # summary stage: index of the generated summary token the next step feeds
    done: list[bool] = field(default_factory=list)  # paths known to take no more tokens
    lengths: list[int] = field(default_factory=list)  # their lengths, as last seen
    handled: int = -1  # the step count when the host last acted on the slot
    times: dict = field(default_factory=dict)
    compiling: dict = field(default_factory=lambda: {"think": 0.0, "summary": 0.0})  # seconds its steps compiled


class PhaseView:
    """Each step's slot phases, done paths and path lengths ([S, 1 + 2P]) as the host sees them.
    On CUDA they are copied to pinned memory and read once the copy has landed, so the host waits
    for the device only when it is ``depth`` steps ahead of it; elsewhere they are read at once."""

    def __init__(self, device: torch.device, shape: tuple[int, int], depth: int = 2):
        self.device = device
        self.cuda = device.type == "cuda"
        self.in_flight: deque = deque()  # (step, buffer, event): copies not read yet
        self.landed: list[tuple[int, list[list[int]]]] = []
        if self.cuda:
            self.spare = [(torch.empty(shape, dtype=torch.long, pin_memory=True), torch.cuda.Event())
                          for _ in range(depth)]

    def push(self, step: int, state: SlotState) -> None:
        """The state after ``step``."""
        snapshot = torch.cat([state.phase[:, None], state.done.long(), state.lengths], dim=1)
        if not self.cuda:
            self.landed.append((step, snapshot.tolist()))
            return
        if not self.spare:  # `depth` copies in flight: wait for the oldest
            self.in_flight[0][2].synchronize()
            self._read_landed()
        buffer, event = self.spare.pop()
        buffer.copy_(snapshot, non_blocking=True)
        # the copy runs on the model's device's stream, which is not the current device's when
        # the model is on another GPU (cuda:1 with cuda:0 current)
        event.record(torch.cuda.current_stream(self.device))
        self.in_flight.append((step, buffer, event))

    def _read_landed(self) -> None:
        while self.in_flight and self.in_flight[0][2].query():
            step, buffer, event = self.in_flight.popleft()
            self.landed.append((step, buffer.tolist()))
            self.spare.append((buffer, event))

    def pull(self) -> list[tuple[int, list[list[int]]]]:
        """Snapshots (step, one row per slot) that have landed, oldest first."""
        if self.cuda:
            self._read_landed()
        ready, self.landed = self.landed, []
        return ready


class Scheduler:
    """Runs a list of prompts (token ids) through the call's slots; see the module docstring."""

    def __init__(self, model, plan: Plan, cache: PagedKVCache, config: SchedulerConfig):
        self.model, self.plan, self.cache, self.config = model, plan, cache, config
        self.device = next(model.parameters()).device
        self.layout, self.flattened, self.reprefill = config.layout, config.flattened, config.reprefill
        self.first_tokens = None if config.first_tokens is None else torch.tensor(config.first_tokens, device=self.device)
        self.template = torch.tensor(config.template, device=self.device)
        self.stops = config.stops or StopChecks()
        self.recorder = config.recorder

    def _start(self, prompts: Sequence[list[int]], seeds: Sequence[int],
               on_finished: Callable[[Finished], None]) -> None:
        """The per-run state: slots, page lists, device state."""
        self.prompts, self.seeds, self.on_finished = prompts, seeds, on_finished
        plan, cache = self.plan, self.cache
        slots = self.config.num_slots
        P, ps = plan.num_paths, cache.page_size
        summary_len = self.template.numel() + plan.summary_tokens if plan.summary_rules is not None else 0
        # at least 2: dynamo specializes a size of 1, and a compiled step would compile again for 2
        max_pages = self.config.table_pages or max(2, pages_for(max(max(map(len, prompts)), plan.budget, summary_len), ps))
        self.pool = PagePool(cache.num_pages, ps, cache.page_table(slots, P + 2, max_pages))
        if self.config.static_addresses:
            cache.mark_static()
        elif self.config.decode_step.compiles(self.config.kernel):
            cache.mark_growable()
        self.state = SlotState.allocate(slots, plan, self.device)
        self.busy: list[_Busy | None] = [None] * slots
        self.view = PhaseView(self.device, (slots, 1 + 2 * P))
        self.steps = self.admissions = 0
        self.pressure = False  # a request was preempted: admit nothing new until one ends
        self.preempted: dict[int, int] = {}  # request -> times preempted

    # -- the loop ---------------------------------------------------------------------------

    def run(self, prompts: Sequence[list[int]], seeds: Sequence[int],
            on_finished: Callable[[Finished], None]) -> None:
        """Until every prompt has finished (each is handed to ``on_finished`` as it does); prompt i
        samples from ``seeds[i]``."""
        self._start(prompts, seeds, on_finished)
        waiting = deque(range(len(self.prompts)))
        P = self.plan.num_paths
        try:
            while True:
                self._admit(waiting)
                if not any(self.busy):
                    break
                self._reserve(waiting)
                self._step()
                for step, rows in self.view.pull():
                    for slot, row in enumerate(rows):
                        busy = self.busy[slot]
                        if busy is None or step <= busy.handled:  # a snapshot from before the host acted
                            continue
                        busy.done, busy.lengths = [bool(d) for d in row[1 : 1 + P]], row[1 + P :]
                        if row[0] == THINK_DONE:
                            self._start_summary(slot, waiting)
                        elif row[0] == DONE:
                            self._harvest(slot)
        finally:  # a failed run (an error, an interrupt) leaves no page held
            for slot in range(len(self.busy)):
                self.pool.release(slot)

    def _admit(self, waiting: deque) -> None:
        if not any(self.busy):
            self.pressure = False
        if self.pressure:
            return
        for slot in range(len(self.busy)):
            if self.busy[slot] is not None or not waiting:
                continue
            need = pages_for(len(self.prompts[waiting[0]]), self.pool.page_size) + self.plan.num_paths
            if need > self.pool.num_free:  # the queue's head waits for pages (first come, first served)
                return
            self.prefill(slot, waiting.popleft())

    def _reserve(self, waiting: deque) -> None:
        """Pages for the tokens the next step writes, oldest request first: a block gets a page
        when its next token opens one (a path only while it is not known to be done), and never
        beyond its limit: the host's counters run on while a late phase read (CUDA) has not yet
        shown that the device has finished the stage."""
        ps, plan = self.pool.page_size, self.plan
        for slot in sorted((s for s, b in enumerate(self.busy) if b is not None), key=lambda s: self.busy[s].order):
            busy = self.busy[slot]
            if busy is None:  # preempted for an older request in this loop
                continue
            if busy.summary is None:
                offset, limit = busy.t, plan.budget
                blocks = [k + 1 for k, done in enumerate(busy.done) if not done]
            else:
                offset, limit = plan.template_len + busy.summary, plan.template_len + plan.summary_tokens
                blocks = [protocol.SUMMARY_BLOCK]
            if offset % ps or offset >= limit:
                continue
            for block in blocks:
                if not self._grow(slot, block, offset + 1, waiting):
                    break
        self.pool.flush()
        self._note_peak()

    def _grow(self, slot: int, block: int, tokens: int, waiting: deque) -> bool:
        """Pages for ``tokens`` tokens of a block, preempting the most recent requests until the
        pool has them; False if ``slot`` itself had to be preempted."""
        while not self.pool.grow(slot, block, tokens):
            victim = max((s for s, b in enumerate(self.busy) if b is not None), key=lambda s: self.busy[s].order)
            self._preempt(victim, waiting)
            if victim == slot:
                return False
        return True

    def _preempt(self, slot: int, waiting: deque) -> None:
        """Free everything ``slot`` holds and put its request back at the head of the queue."""
        request = self.busy[slot].request
        self.pool.release(slot)
        self.state.start(slot, request=-1, phase=IDLE)
        self.busy[slot] = None
        waiting.appendleft(request)
        self.preempted[request] = self.preempted.get(request, 0) + 1
        if self.recorder is not None:
            self.recorder.forget(request)
        self.pool.stats.preemptions += 1
        self.pressure = True

    def _note_peak(self) -> None:
        """Tokens held when the most pages are held (the memory report compares the two)."""
        if self.pool.num_used < self.pool.stats.peak_pages:
            return  # counting the tokens is host work: only at a peak
        tokens = 0
        for busy in self.busy:
            if busy is None:
                continue
            tokens += busy.prompt_len
            if busy.summary is None:
                tokens += sum(n if done else busy.t + 1 for done, n in zip(busy.done, busy.lengths))
            else:
                tokens += sum(busy.lengths) + self.plan.template_len + busy.summary + 1
        self.pool.note_tokens(tokens)

    def _step(self) -> None:
        inputs = step_inputs(self.state, self.plan)
        compiled_before = self.config.decode_step.stats.seconds
        out = step_forward(self.model, self.cache, self.pool.table, self.state, self.plan, inputs, self.config.kernel,
                           self.config.ragged, self.config.decode_step)
        compiling = self.config.decode_step.stats.seconds - compiled_before  # kept out of the requests' times
        if out is not None:  # None: every slot waits for the host
            logits, index = out
            if self.recorder is not None:
                self.recorder.step(logits, index, self.state, [b.request if b else None for b in self.busy])
            advance(self.state, self.plan, logits, inputs, self.stops.paths, self.stops.summary, index)
        for busy in self.busy:
            if busy is None:
                continue
            busy.compiling["think" if busy.summary is None else "summary"] += compiling
            if busy.summary is None:
                busy.t += 1
            else:
                busy.summary += 1
        self.steps += 1
        self.view.push(self.steps, self.state)

    # -- stage changes ----------------------------------------------------------------------

    def _columns(self, slot: int, block: int, offsets: torch.Tensor) -> torch.Tensor:
        """Pool columns of the tokens at ``offsets`` of a block (from the host's page lists)."""
        pages = torch.tensor(self.pool.pages(slot, block), device=self.device)
        ps = self.pool.page_size
        return pages[offsets // ps] * ps + offsets % ps

    def prefill(self, slot: int, request: int) -> None:
        """Admit ``request`` into ``slot``: prefill its prompt into its pages and set its state
        (subclasses that prepare a request override it)."""
        ids = self.prompts[request]
        n = len(ids)
        admitted = time.perf_counter()
        P = self.plan.num_paths
        self.pool.grow(slot, protocol.PROMPT_BLOCK, n)
        positions = torch.arange(n, device=self.device)
        logits = fresh_forward(self.model, self.cache, torch.tensor([ids], device=self.device), positions[None],
                               torch.zeros(1, n, dtype=torch.long, device=self.device),
                               FreshReads(self._columns(slot, protocol.PROMPT_BLOCK, positions)),
                               self.plan.thought_embedding, last_only=True)
        seed = self.seeds[request]
        if self.first_tokens is not None:
            first = self.first_tokens
        else:  # plain samples: token 0 of every path drawn from the prompt's last logits
            k = torch.arange(P, device=self.device)
            draw = sampling.Draw(torch.tensor([seed], device=self.device), torch.tensor([request], device=self.device),
                                 k[None], torch.zeros(1, P, dtype=torch.long, device=self.device))
            banned = self.plan.banned[0] | (self.plan.path_enders if self.plan.path_rules.min_tokens > 0 else False)
            first = choose(logits.expand(1, P, -1), self.plan, draw, banned, self.plan.path_rules)[0]
        self.state.start(slot, request=request, seed=seed, phase=THINK, prompt_len=n, t=0, cur=first, lengths=0,
                         closed=False, done=False, reason=0, summary_len=0)
        busy = _Busy(request, n, admitted, self.admissions, done=[False] * P, lengths=[0] * P, handled=self.steps)
        busy.times["prefilled"] = time.perf_counter()
        self.admissions += 1
        self.busy[slot] = busy

    def _start_summary(self, slot: int, waiting: deque) -> None:
        """The think stage of ``slot`` has ended: free the pages taken ahead for paths that had
        ended, forward the summary template, draw summary token 0 (the request is harvested at once
        if that token ends it)."""
        busy = self.busy[slot]
        busy.times["thought"] = time.perf_counter()
        lengths = self.state.lengths[slot].tolist()
        for k, n in enumerate(lengths):
            self.pool.shrink(slot, k + 1, n)
        lp = busy.prompt_len
        if self.reprefill:
            self._recompute_paths(slot, lp, lengths)
        n = self.template.numel()
        if not self._grow(slot, protocol.SUMMARY_BLOCK, n, waiting):
            return
        context = [page for k in range(self.plan.num_paths + 1) for page in self.pool.pages(slot, k)]
        offsets = torch.arange(n, device=self.device)
        start = self.layout.summary_position(lp, lengths, self.flattened, stride=self.plan.budget)
        reads = FreshReads(self._columns(slot, protocol.SUMMARY_BLOCK, offsets),
                           context=torch.tensor(context, device=self.device), fill=self.cache.fill,
                           page_size=self.pool.page_size)
        logits = fresh_forward(self.model, self.cache, self.template[None], (start + offsets)[None],
                               torch.full((1, n), protocol.SUMMARY_BLOCK, device=self.device),
                               reads, self.plan.thought_embedding, last_only=self.recorder is None)
        if self.recorder is not None:
            self.recorder.template(busy.request, logits[0])
        rules = self.plan.summary_rules
        draw = sampling.Draw(self.state.seed[slot : slot + 1], self.state.request[slot : slot + 1],
                             torch.full((1, 1), sampling.SUMMARY_STREAM, device=self.device),
                             torch.zeros(1, 1, dtype=torch.long, device=self.device))
        token = choose(logits[:, -1:], self.plan, draw, self.plan.banned[1], rules)[0, 0]
        self.state.start(slot, summary_pos=start + n, summary_len=1, phase=SUMMARY)
        self.state.summary_ids[slot, 0] = token
        self.state.cur[slot, 0] = token
        busy.summary, busy.lengths, busy.handled = 0, lengths, self.steps
        ended = bool(torch.isin(token, rules.enders)) or self.plan.summary_tokens <= 1
        if not ended and self.stops.summary is not None:
            ended = bool(self.stops.summary(self.state)[slot])
        if ended:
            self._harvest(slot)

    def _recompute_paths(self, slot: int, prompt_len: int, lengths: list[int]) -> None:
        """``summary_kv="reprefill"``: recompute the prompt's and the paths' KV in one forward of
        the packed sequence (the two-phase rule, the same positions and segment ids), overwriting
        their pages in place."""
        device = self.device
        layout = protocol.sequence_layout(prompt_len, lengths, 0, flattened=self.flattened,
                                          path_stride=self.plan.budget, thought_embedding=self.plan.thought_embedding)
        prompt = torch.tensor(self.prompts[self.busy[slot].request], device=device)
        tokens = torch.cat([prompt, *(self.state.path_tokens[slot, k, :n] for k, n in enumerate(lengths))])
        columns = torch.cat([self._columns(slot, k, torch.arange(n, device=device))
                             for k, n in enumerate([prompt_len, *lengths])])
        runs = [(protocol.PROMPT_BLOCK, prompt_len), *((k + 1, n) for k, n in enumerate(lengths))]
        fresh_forward(self.model, self.cache, tokens[None], layout.position_ids.to(device)[None],
                      layout.block_ids.to(device)[None], FreshReads(columns, runs=runs), self.plan.thought_embedding,
                      last_only=True)

    def _harvest(self, slot: int) -> None:
        """A request has ended: read it back, hand it to ``on_finished``, free its slot and pages."""
        busy = self.busy[slot]
        state = self.state
        lengths = state.lengths[slot].tolist()
        tokens = state.path_tokens[slot].tolist()
        summary = state.summary_ids[slot, : int(state.summary_len[slot])].tolist()
        finished = state.closed[slot].tolist()
        reason = "budget" if int(state.reason[slot]) == BUDGET else "finished"
        end = time.perf_counter()
        times = busy.times
        thought = times.get("thought", end)
        compiling = busy.compiling  # seconds of compilation, reported apart
        timing = {"prefill_s": times["prefilled"] - busy.admitted,
                  "think_s": thought - times["prefilled"] - compiling["think"],
                  "summary_s": end - thought - compiling["summary"],
                  "latency_s": end - busy.admitted - sum(compiling.values()), "compile_s": sum(compiling.values())}
        done = Finished(busy.request, [row[:n] for row, n in zip(tokens, lengths)], finished, reason, summary, timing,
                        self.preempted.get(busy.request, 0))
        if self.recorder is not None:
            done.path_logits, done.summary_logits = self.recorder.collect(busy.request, lengths)
        state.start(slot, request=-1, phase=IDLE)
        self.pool.release(slot)
        self.busy[slot] = None
        self.pressure = False
        self.on_finished(done)


class StaticScheduler(Scheduler):
    """Admits requests only when every slot is free: the fixed batches of a lockstep engine (a
    comparison for continuous batching), on the same kernels."""

    def _admit(self, waiting: deque) -> None:
        if not any(self.busy):
            super()._admit(waiting)
