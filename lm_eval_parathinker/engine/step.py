"""The device side of the decode loop: per-slot state, the model forward, and the bookkeeping of
one step. Everything here is tensor operations on the device; nothing waits for the host.

Every step runs one forward over all slots, ``P`` queries each: a thinking slot feeds its P paths'
current tokens, a summary slot its next summary token (the other queries pad), an idle or waiting
slot only padding. Each token's keys and values go into its segment's pages (:mod:`pages`), and
each query reads the pages it may see (:mod:`attention`). :func:`advance` then records what was
fed, applies the token rules, samples the next tokens and moves each slot's phase along; a slot
whose think stage or summary has just ended waits (``THINK_DONE``, ``DONE``) until the host
handles it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import protocol
from ..upstream import torch as upstream_torch
from . import sampling
from .attention import FreshReads, Kernel, compile_limits, page_reads
from .kv_cache import PagedKVCache
from .pages import SCRATCH_PAGE
from .sampling import SamplingParams, TokenRules

# slot phases
IDLE, THINK, SUMMARY, THINK_DONE, DONE = range(5)
# why a think stage ended
FINISHED, BUDGET = 0, 1


@dataclass(frozen=True)
class Plan:
    """The constants of one engine call."""

    num_paths: int
    budget: int  # tokens per path
    needed: int  # done paths that end a request's think stage
    offsets: torch.Tensor  # [P] position offset of each path's token 0 (0: aligned paths)
    thought_embedding: bool
    path_rules: TokenRules
    summary_rules: TokenRules | None  # None: plain samples (no summary stage)
    summary_tokens: int  # tokens a summary may generate after its template
    template_len: int  # tokens of the summary template (summary segment: template, then generated tokens)
    sampling: SamplingParams
    banned: torch.Tensor  # [2, V] never sampled: in a path (row 0), in a summary (row 1)
    path_enders: torch.Tensor  # [V] banned while a path is shorter than path_rules.min_tokens


@dataclass
class SlotState:
    """Per-slot device state: row s of every tensor describes the request in slot s."""

    request: torch.Tensor  # [S] index of the request in the call, -1 when idle
    seed: torch.Tensor  # [S]
    phase: torch.Tensor  # [S]
    prompt_len: torch.Tensor  # [S]
    t: torch.Tensor  # [S] think stage: index of the path tokens being fed
    cur: torch.Tensor  # [S, P] tokens fed by the next step
    lengths: torch.Tensor  # [S, P] tokens of each path
    closed: torch.Tensor  # [S, P] ended by an ender (or a stop string)
    done: torch.Tensor  # [S, P] takes no more tokens (closed, and block-aligned if the rules pad)
    reason: torch.Tensor  # [S] FINISHED or BUDGET
    path_tokens: torch.Tensor  # [S, P, budget]
    summary_pos: torch.Tensor  # [S] its position
    summary_ids: torch.Tensor  # [S, summary_tokens] generated summary tokens
    summary_len: torch.Tensor  # [S]

    @classmethod
    def allocate(cls, slots: int, plan: Plan, device: torch.device) -> SlotState:
        P = plan.num_paths

        def zeros(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(
            request=torch.full((slots,), -1, dtype=torch.long, device=device), seed=zeros(slots),
            phase=zeros(slots), prompt_len=zeros(slots), t=zeros(slots), cur=zeros(slots, P),
            lengths=zeros(slots, P), closed=zeros(slots, P, dtype=torch.bool), done=zeros(slots, P, dtype=torch.bool),
            reason=zeros(slots), path_tokens=zeros(slots, P, plan.budget), summary_pos=zeros(slots),
            summary_ids=zeros(slots, max(plan.summary_tokens, 1)), summary_len=zeros(slots),
        )

    def start(self, slot: int, **values) -> None:
        """Set row ``slot`` of the named fields (the host does this when a slot changes stage)."""
        for name, value in values.items():
            getattr(self, name)[slot] = value


def summary_segment(num_paths: int) -> int:
    """Index of the summary's segment (prompt 0, path k -> k)."""
    return num_paths + 1


def segment_of(block: torch.Tensor, num_paths: int) -> torch.Tensor:
    """The segment a protocol block is stored in."""
    return torch.where(block == protocol.SUMMARY_BLOCK, summary_segment(num_paths), block)


@dataclass(frozen=True)
class StepInputs:
    """What one step forwards, per slot and query ([S, P] each)."""

    tokens: torch.Tensor
    positions: torch.Tensor
    blocks: torch.Tensor  # protocol block of each query (thought-embedding segment)
    offsets: torch.Tensor  # where in its segment the token goes
    real: torch.Tensor  # a token of a path or summary (not padding)


def step_inputs(state: SlotState, plan: Plan) -> StepInputs:
    """The queries of the next step: thinking slots feed token t of their P paths, summary slots
    their last summary token (query 0); the rest pad."""
    P = plan.num_paths
    k = torch.arange(P, device=state.cur.device)
    think = (state.phase == THINK)[:, None]
    summary = (state.phase == SUMMARY)[:, None] & (k == 0)
    real = (think & ~state.done) | summary
    t = state.t[:, None]
    s = (state.summary_len - 1)[:, None]  # the summary token fed: the last one sampled
    positions = torch.where(think, state.prompt_len[:, None] + plan.offsets + t, state.summary_pos[:, None] + s)
    blocks = torch.where(think, k + 1, torch.where(summary, protocol.SUMMARY_BLOCK, protocol.PROMPT_BLOCK))
    return StepInputs(
        tokens=state.cur,
        positions=torch.where(real, positions, 0),
        blocks=blocks,
        offsets=torch.where(think, t, plan.template_len + s).expand_as(real),
        real=real,
    )


def segment_lengths(state: SlotState, plan: Plan, inputs: StepInputs) -> torch.Tensor:
    """[S, G] tokens in every segment of every slot once the step's tokens are written."""
    fed = inputs.real & (state.phase == THINK)[:, None]
    summary = plan.template_len + state.summary_len
    return torch.cat([state.prompt_len[:, None], state.lengths + fed, summary[:, None]], dim=1)


def segment_reads(blocks: torch.Tensor, real: torch.Tensor, num_paths: int) -> torch.Tensor:
    """[..., G] the segments each query reads: a path its prompt and itself, the summary
    everything (the two-phase rule), padding nothing."""
    segment = torch.arange(num_paths + 2, device=blocks.device)
    block = torch.where(segment == summary_segment(num_paths), protocol.SUMMARY_BLOCK, segment)
    return protocol.may_attend(blocks[..., None], block) & real[..., None]


def columns(table: torch.Tensor, slot: torch.Tensor, segment: torch.Tensor, offset: torch.Tensor,
            real: torch.Tensor, page_size: int) -> torch.Tensor:
    """Flat pool column of each token (``real`` ones; the rest write to the scratch page)."""
    page = table[slot, segment, offset // page_size]
    return torch.where(real, page * page_size + offset % page_size, SCRATCH_PAGE * page_size)


def decode_forward(model, cache: PagedKVCache, table: torch.Tensor, lengths: torch.Tensor, slot: torch.Tensor,
                   tokens, positions, blocks, offsets, real, num_paths: int, thought_embedding: bool,
                   kernel: Kernel, static_batch: bool) -> torch.Tensor:
    """One decode forward of ``tokens`` ([B0, Q]; query i of row r belongs to slot ``slot[r, i]``)
    with paged reads: the function ``torch.compile`` compiles. ``static_batch``: the step is a
    rectangle, whose number of queries is the same at every step."""
    segment = segment_of(blocks, num_paths)
    cache.begin(columns(table, slot, segment, offsets, real, cache.page_size), real)
    cache.reads = page_reads(table, lengths, slot.flatten(), segment_reads(blocks, real, num_paths).flatten(0, 1),
                             cache.fill, cache.page_size, kernel, cache.groups, static_batch)
    return model(
        input_ids=tokens, position_ids=positions, attention_mask=cache.no_mask, **{cache.argument: cache}, use_cache=True,
        segment_ids=protocol.segment_id(blocks, thought_embedding), reads=cache.reads,
    ).logits


def fresh_forward(model, cache: PagedKVCache, tokens: torch.Tensor, columns: torch.Tensor, positions: torch.Tensor,
                  blocks: torch.Tensor, reads: FreshReads, thought_embedding: bool, last_only: bool) -> torch.Tensor:
    """A multi-token forward of one request (``tokens`` [1, n]): a prefill, a summary template or
    a reprefill, written into ``columns``."""
    cache.begin(columns, torch.ones_like(columns, dtype=torch.bool))
    cache.reads = reads
    return model(
        input_ids=tokens, position_ids=positions, attention_mask=cache.no_mask, **{cache.argument: cache}, use_cache=True,
        segment_ids=protocol.segment_id(blocks, thought_embedding), logits_to_keep=1 if last_only else 0,
        reads=reads,
    ).logits


def step_forward(model, cache: PagedKVCache, table: torch.Tensor, state: SlotState, plan: Plan, inputs: StepInputs,
                 kernel: Kernel, ragged: bool, compiled: Callable | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A step's forward: the rectangle of every slot's P queries (static shapes: compiled steps,
    GPUs), or with ``ragged`` its real tokens only (``[1, N]``: eager CPU steps, where a padding
    query costs as much as a real one; it reads how many there are, a host round trip that costs
    nothing there). Returns the logits and, for a ragged step, each token's flat index in
    [S, P]; None when no slot has a token."""
    S, P = inputs.real.shape
    lengths = segment_lengths(state, plan, inputs)
    slot = torch.arange(S, device=inputs.real.device)[:, None].expand(S, P)
    fields = (inputs.tokens, inputs.positions, inputs.blocks, inputs.offsets, inputs.real)
    index = None
    if ragged:
        index = inputs.real.flatten().nonzero()[:, 0]
        if index.numel() == 0:
            return None
        slot = slot.flatten()[index][None]
        fields = tuple(x.flatten()[index][None] for x in fields)
    else:  # a rectangle: a static batch for the compiled step (see attention.PageReads.static_batch)
        for x in (lengths, slot, *fields):
            upstream_torch.mark_static(x)
    run = compiled or decode_forward
    with compile_limits():  # the compiled step, or the eager step's flex calls (attention.RECOMPILE_LIMIT)
        logits = run(model, cache, table, lengths, slot, *fields, plan.num_paths, plan.thought_embedding, kernel,
                     not ragged)
    return logits, index


def choose(logits: torch.Tensor, plan: Plan, draw: sampling.Draw, banned: torch.Tensor, rules: TokenRules) -> torch.Tensor:
    """Tokens for ``logits`` ([R, Q, V]) under ``rules``, ``banned`` ([..., V]) never drawn."""
    return rules.rewrite(sampling.sample(logits.masked_fill(banned, float("-inf")), plan.sampling, draw))


def _store(buffer: torch.Tensor, index: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> None:
    """``buffer[..., index] = values`` where ``keep`` (one index per row of the last dimension)."""
    buffer.scatter_(-1, index, torch.where(keep, values, buffer.gather(-1, index)))


def advance(state: SlotState, plan: Plan, logits: torch.Tensor, inputs: StepInputs,
            stopped: Callable[[SlotState], torch.Tensor] | None = None,
            summary_stopped: Callable[[SlotState], torch.Tensor] | None = None,
            token_index: torch.Tensor | None = None) -> None:
    """Bookkeeping after a step's forward (``logits``: [S, P, V]; a ragged step's [1, N, V] for the
    flat indices ``token_index``): record the fed path tokens, end paths and think stages, sample
    every slot's next tokens under its stage's rules, end summaries.

    ``stopped`` / ``summary_stopped`` (stop strings, checked on the host) flag paths / summaries
    whose text now contains one; without them the step makes no host round trip.
    """
    S, P = state.cur.shape
    think_row, summary_row = state.phase == THINK, state.phase == SUMMARY
    in_path = inputs.real & think_row[:, None]
    t = state.t

    _store(state.path_tokens, t.clamp(max=plan.budget - 1)[:, None, None].expand(S, P, 1), state.cur[..., None],
           in_path[..., None])
    state.lengths += in_path
    ended = in_path & torch.isin(state.cur, plan.path_rules.enders)
    if stopped is not None:
        ended |= in_path & stopped(state)
    state.closed |= ended
    state.done |= state.closed & plan.path_rules.done_at(t + 1)[:, None]
    finished = think_row & (state.done.sum(-1) >= plan.needed)
    think_end = finished | (think_row & (t + 1 >= plan.budget))
    state.reason = torch.where(think_end, torch.where(finished, FINISHED, BUDGET), state.reason)

    # one draw for every slot: token t + 1 of each path, or the next summary token (query 0)
    k = torch.arange(P, device=t.device)
    draw = sampling.Draw(
        seed=state.seed,
        request=state.request,
        path=torch.where(summary_row[:, None], sampling.SUMMARY_STREAM, k),
        index=torch.where(summary_row, state.summary_len, t + 1)[:, None].expand(S, P),
    )
    short = think_row & (t + 1 < plan.path_rules.min_tokens)
    banned = plan.banned[summary_row.long()][:, None] | (short[:, None, None] & plan.path_enders)  # [S, 1, V]
    if token_index is None:
        drawn = sampling.sample(logits.masked_fill(banned, float("-inf")), plan.sampling, draw)
    else:  # only the real tokens have logits: draw theirs (with the same random numbers)
        rows = token_index // P
        picked = sampling.sample(
            logits[0][:, None].masked_fill(banned[rows], float("-inf")), plan.sampling,
            sampling.Draw(draw.seed[rows], draw.request[rows], draw.path.flatten()[token_index][:, None],
                          draw.index.flatten()[token_index][:, None]),
        )
        drawn = torch.zeros(S * P, dtype=torch.long, device=t.device).index_copy(0, token_index, picked[:, 0]).view(S, P)

    nxt = plan.path_rules.rewrite(drawn)
    if plan.path_rules.pad is not None:  # an ended path is fed pads until it is done
        nxt = torch.where(state.closed, plan.path_rules.pad, nxt)
    going = think_row & ~think_end
    state.cur = torch.where(going[:, None], nxt, state.cur)
    state.t = torch.where(going, t + 1, t)
    state.phase = torch.where(think_end, THINK_DONE if plan.summary_rules is not None else DONE, state.phase)

    if plan.summary_rules is not None:
        token = plan.summary_rules.rewrite(drawn[:, 0])
        _store(state.summary_ids, state.summary_len.clamp(max=plan.summary_tokens - 1)[:, None], token[:, None],
               summary_row[:, None])
        state.summary_len += summary_row
        summary_end = summary_row & (torch.isin(token, plan.summary_rules.enders) | (state.summary_len >= plan.summary_tokens))
        if summary_stopped is not None:
            summary_end |= summary_row & summary_stopped(state)
        state.cur[:, 0] = torch.where(summary_row, token, state.cur[:, 0])
        state.phase = torch.where(summary_end, DONE, state.phase)
