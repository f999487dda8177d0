"""The host side of the decode loop: continuous batching over a fixed number of slots.

Each slot holds one request at a time, in its own row of a :class:`SlotKVCache`. The host:

* admits a waiting request into a free slot (one eager prefill of its prompt into that row);
* launches one step for all slots (:mod:`step`: forward + bookkeeping, all on the device);
* reads the slots' phases without waiting for the device (:class:`PhaseView`), and only acts
  when a slot has changed stage: a finished think stage gets its summary template forwarded at
  once (after recomputing the paths for ``summary_kv="reprefill"``), a finished request is read
  back and its slot refilled with the next request.

So every row-step of a busy slot computes a token that is kept, and a request costs the host a
few reads (when it enters its summary and when it ends), not one per step. A step is a
rectangle ``[slots, P]`` of queries (static shapes, for a compiled step and the GPU, where a
padding query costs next to nothing) or, with ``ragged=True`` (eager CPU steps, where it costs as
much as a real one), the flat list of the real queries only. ``static=True`` admits requests
only when every slot is free and steps as rectangles: the fixed batches of a lockstep engine,
kept as a baseline for the benchmarks.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .. import protocol
from . import sampling
from .kv_cache import SlotKVCache
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
    forward,
    ragged_forward,
    step_inputs,
)

KEY_BUCKETS = 32  # attention reads a multiple of capacity / KEY_BUCKETS columns: few compiled shapes


@dataclass
class Finished:
    """One request as the scheduler hands it back."""

    index: int
    path_ids: list[list[int]]
    path_finished: list[bool]
    reason: str  # "finished" or "budget"
    summary_ids: list[int]  # generated summary tokens (after the template)
    timing: dict
    path_logits: list[torch.Tensor] | None = None
    summary_logits: torch.Tensor | None = None  # template positions, then generated ones


@dataclass
class _Busy:
    """What the host knows of a busy slot."""

    request: int
    prompt_len: int
    admitted: float
    steps: int = 0  # steps since the stage started
    summary_col: int | None = None  # set when the summary starts
    handled: int = -1  # the step count when the host last acted on the slot
    times: dict = field(default_factory=dict)
    think_logits: list = field(default_factory=list)
    summary_logits: list = field(default_factory=list)


class PhaseView:
    """The slots' phases as the host sees them. On CUDA each step's phases are copied to pinned
    memory and read once the copy has landed, so the host waits for the device only when it is
    ``depth`` steps ahead of it; elsewhere they are read at once."""

    def __init__(self, device: torch.device, slots: int, depth: int = 2):
        self.cuda = device.type == "cuda"
        self.in_flight: deque = deque()  # (step, buffer, event): copies not read yet
        self.landed: list[tuple[int, list[int]]] = []
        if self.cuda:
            self.spare = [(torch.empty(slots, dtype=torch.long, pin_memory=True), torch.cuda.Event()) for _ in range(depth)]

    def push(self, step: int, phase: torch.Tensor) -> None:
        """The phases after ``step``."""
        if not self.cuda:
            self.landed.append((step, phase.tolist()))
            return
        if not self.spare:  # `depth` copies in flight: wait for the oldest
            self.in_flight[0][2].synchronize()
            self._read_landed()
        buffer, event = self.spare.pop()
        buffer.copy_(phase, non_blocking=True)
        event.record()
        self.in_flight.append((step, buffer, event))

    def _read_landed(self) -> None:
        while self.in_flight and self.in_flight[0][2].query():
            step, buffer, event = self.in_flight.popleft()
            self.landed.append((step, buffer.tolist()))
            self.spare.append((buffer, event))

    def pull(self) -> list[tuple[int, list[int]]]:
        """Snapshots (step, phase per slot) that have landed, oldest first."""
        if self.cuda:
            self._read_landed()
        ready, self.landed = self.landed, []
        return ready


class Scheduler:
    """Runs a list of prompts (token ids) through ``num_slots`` slots; see the module docstring."""

    def __init__(
        self,
        model,
        plan: Plan,
        prompts: Sequence[list[int]],
        seeds: Sequence[int],
        *,
        num_slots: int,
        first_tokens: list[int] | None,  # parathinker: the forced <think k>; None: sampled
        template: list[int],
        layout: protocol.Compat,
        flattened: bool,
        reprefill: bool,
        compiled: Callable | None = None,
        static: bool = False,
        ragged: bool = False,
        keep_logits: bool = False,
        stopped: Callable | None = None,
        summary_stopped: Callable | None = None,
        on_finished: Callable[[Finished], None],
        progress: bool = False,
    ):
        self.model, self.plan, self.prompts, self.seeds = model, plan, prompts, seeds
        self.device = next(model.parameters()).device
        slots = min(num_slots, len(prompts))
        P = plan.num_paths
        summary_cols = len(template) + plan.summary_tokens if plan.summary_rules is not None else 0
        capacity = max(map(len, prompts)) + P * plan.budget + summary_cols
        self.cache = SlotKVCache(model, slots, capacity, self.device, next(model.parameters()).dtype)
        if compiled is not None:
            self.cache.mark_static()
        self.bucket = -(-capacity // KEY_BUCKETS)
        self.state = SlotState.allocate(slots, plan, self.device)
        self.first_tokens = None if first_tokens is None else torch.tensor(first_tokens, device=self.device)
        self.template = torch.tensor(template, device=self.device)
        self.layout, self.flattened, self.reprefill, self.compiled = layout, flattened, reprefill, compiled
        self.static, self.ragged, self.keep_logits = static, ragged and not static, keep_logits
        self.stopped, self.summary_stopped, self.on_finished = stopped, summary_stopped, on_finished
        self.busy: list[_Busy | None] = [None] * slots
        self.view = PhaseView(self.device, slots)
        self.steps = 0
        self.bar = tqdm(total=len(prompts), desc="requests", unit="req", disable=not progress, leave=False)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Until every prompt has finished (each is handed to ``on_finished`` as it does)."""
        waiting = deque(range(len(self.prompts)))
        while True:
            self._admit(waiting)
            if not any(self.busy):
                break
            self._step()
            for step, phases in self.view.pull():
                for slot, phase in enumerate(phases):
                    busy = self.busy[slot]
                    if busy is None or step <= busy.handled:  # a snapshot from before the host acted
                        continue
                    if phase == THINK_DONE:
                        self._start_summary(slot)
                    elif phase == DONE:
                        self._harvest(slot)
        self.bar.close()

    def _admit(self, waiting: deque) -> None:
        if self.static and any(self.busy):
            return
        for slot in range(len(self.busy)):
            if self.busy[slot] is None and waiting:
                self._prefill(slot, waiting.popleft())

    def _step(self) -> None:
        for busy in self.busy:
            if busy is not None:
                busy.steps += 1
        inputs = step_inputs(self.state, self.plan, self.cache.scratch)
        index = None
        if self.ragged:
            ragged = ragged_forward(self.model, self.cache, inputs, self._key_len(), self.plan.thought_embedding)
            logits, index = ragged if ragged is not None else (None, None)
        else:
            logits = forward(self.model, self.cache, slice(None), inputs.tokens, inputs.columns, inputs.positions,
                             inputs.blocks, inputs.real, self._key_len(), self.plan.thought_embedding,
                             compiled=self.compiled)
        if logits is not None:  # None: every slot waits for the host
            if self.keep_logits:
                self._keep(logits, index)
            advance(self.state, self.plan, logits, inputs, self.stopped, self.summary_stopped, index)
        self.steps += 1
        self.view.push(self.steps, self.state.phase)

    def _key_len(self) -> int:
        """Columns the next step reads: an upper bound of every busy row's use, rounded up to a bucket."""
        used = 1
        for busy in self.busy:
            if busy is None:
                continue
            if busy.summary_col is None:
                used = max(used, busy.prompt_len + busy.steps * self.plan.num_paths)
            else:
                used = max(used, busy.summary_col + busy.steps)
        return min(self.cache.capacity, -(-used // self.bucket) * self.bucket)

    # -- stage changes ----------------------------------------------------------------------

    def _prefill(self, slot: int, request: int) -> None:
        """Admit ``request`` into ``slot``: prefill its prompt into the row and set its state."""
        ids = self.prompts[request]
        n = len(ids)
        admitted = time.perf_counter()
        self.cache.clear(slot)
        cols = torch.arange(n, device=self.device)[None]
        zeros = torch.zeros_like(cols)
        logits = forward(self.model, self.cache, slice(slot, slot + 1), torch.tensor([ids], device=self.device), cols,
                         cols, zeros, torch.ones_like(cols, dtype=torch.bool), n, self.plan.thought_embedding,
                         last_only=True)
        seed = self.seeds[request]
        P = self.plan.num_paths
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
        busy = _Busy(request, n, admitted, handled=self.steps)
        busy.times["prefilled"] = time.perf_counter()
        self.busy[slot] = busy

    def _start_summary(self, slot: int) -> None:
        """The think stage of ``slot`` has ended: forward the summary template and draw summary
        token 0 (the request is harvested at once if that token ends it)."""
        busy = self.busy[slot]
        busy.times["thought"] = time.perf_counter()
        P = self.plan.num_paths
        steps = int(self.state.t[slot]) + 1
        lengths = self.state.lengths[slot].tolist()
        lp = busy.prompt_len
        start = self.layout.summary_position(lp, lengths, self.flattened, stride=self.plan.budget)
        column = self._recompute_paths(slot, lp, lengths) if self.reprefill else lp + steps * P
        n = self.template.numel()
        cols = column + torch.arange(n, device=self.device)[None]
        blocks = torch.full_like(cols, protocol.SUMMARY_BLOCK)
        logits = forward(self.model, self.cache, slice(slot, slot + 1), self.template[None], cols,
                         start + torch.arange(n, device=self.device)[None], blocks, torch.ones_like(cols, dtype=torch.bool),
                         column + n, self.plan.thought_embedding, last_only=not self.keep_logits)
        if self.keep_logits:
            busy.summary_logits.append(logits[0].clone())
        rules = self.plan.summary_rules
        draw = sampling.Draw(self.state.seed[slot : slot + 1], self.state.request[slot : slot + 1],
                             torch.full((1, 1), sampling.SUMMARY_STREAM, device=self.device),
                             torch.zeros(1, 1, dtype=torch.long, device=self.device))
        token = choose(logits[:, -1:], self.plan, draw, self.plan.banned[1], rules)[0, 0]
        self.state.start(slot, summary_col=column + n, summary_pos=start + n, summary_len=1, phase=SUMMARY)
        self.state.summary_ids[slot, 0] = token
        self.state.cur[slot, 0] = token
        busy.summary_col, busy.steps, busy.handled = column + n, 0, self.steps
        ended = bool(torch.isin(token, rules.enders)) or self.plan.summary_tokens <= 1
        if not ended and self.summary_stopped is not None:
            ended = bool(self.summary_stopped(self.state)[slot])
        if ended:
            self._harvest(slot)

    def _recompute_paths(self, slot: int, prompt_len: int, lengths: list[int]) -> int:
        """``summary_kv="reprefill"``: recompute the row's KV, prompt then path 1..P packed, with
        the same positions and segments; returns the first free column."""
        device = self.device
        pieces = [(torch.tensor(self.prompts[self.busy[slot].request], device=device),
                   torch.arange(prompt_len, device=device), protocol.PROMPT_BLOCK)]
        for k, n in enumerate(lengths):
            pieces.append((self.state.path_tokens[slot, k, :n],
                           prompt_len + self.plan.offsets[k] + torch.arange(n, device=device), k + 1))
        tokens = torch.cat([p[0] for p in pieces])[None]
        positions = torch.cat([p[1] for p in pieces])[None]
        blocks = torch.cat([torch.full_like(p[0], p[2]) for p in pieces])[None]
        total = tokens.shape[1]
        self.cache.clear(slot)
        cols = torch.arange(total, device=device)[None]
        forward(self.model, self.cache, slice(slot, slot + 1), tokens, cols, positions, blocks,
                torch.ones_like(cols, dtype=torch.bool), total, self.plan.thought_embedding, last_only=True)
        return total

    def _harvest(self, slot: int) -> None:
        """A request has ended: read it back, hand it to ``on_finished``, free its slot."""
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
        timing = {"prefill_s": times["prefilled"] - busy.admitted, "think_s": thought - times["prefilled"],
                  "summary_s": end - thought, "latency_s": end - busy.admitted}
        done = Finished(busy.request, [row[:n] for row, n in zip(tokens, lengths)], finished, reason, summary, timing)
        if self.keep_logits:
            per_step = torch.stack(busy.think_logits)  # [steps, P, V]
            done.path_logits = [per_step[:n, k] for k, n in enumerate(lengths)]
            if busy.summary_logits:
                done.summary_logits = torch.cat(busy.summary_logits)
        state.start(slot, request=-1, phase=IDLE)
        self.busy[slot] = None
        self.bar.update(1)
        self.on_finished(done)

    def _keep(self, logits: torch.Tensor, index: torch.Tensor | None) -> None:
        """``output_logits``: file each busy slot's logits under its request (reads the phases: tests only)."""
        if index is not None:  # a ragged step: back to [S, P, V] (zeros for padding)
            S, P = self.state.cur.shape
            logits = logits.new_zeros(S * P, logits.shape[-1]).index_copy(0, index, logits[0]).view(S, P, -1)
        phases = self.state.phase.tolist()
        for slot, busy in enumerate(self.busy):
            if busy is None:
                continue
            if phases[slot] == THINK:
                busy.think_logits.append(logits[slot].clone())
            elif phases[slot] == SUMMARY:
                busy.summary_logits.append(logits[slot, :1].clone())
