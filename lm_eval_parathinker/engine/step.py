"""The device side of the decode loop: per-slot state, the model forward, and the bookkeeping of
one step. Everything here is tensor operations on the device; nothing waits for the host.

Every step runs one forward over all slots, ``P`` queries each: a thinking slot feeds its P paths'
current tokens, a summary slot its next summary token (the other queries pad), an idle or waiting
slot only padding. Each token's keys and values go into its block's pages (:mod:`pages`), and
each query reads the pages it may see (:mod:`attention`). :func:`advance` then records what was
fed, applies the token rules, samples the next tokens and moves each slot's phase along; a slot
whose think stage or summary has just ended waits (``THINK_DONE``, ``DONE``) until the host
handles it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import protocol
from ..upstream import torch as upstream_torch
from ..protocol import ControlTokenIds
from . import sampling
from .attention import FreshReads, Kernel, page_reads
from .kv_cache import PagedKVCache
from .options import CallSettings, EngineOptions
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
    template_len: int  # tokens of the summary template (the summary's block: template, then generated tokens)
    sampling: SamplingParams
    banned: torch.Tensor  # [2, V] never sampled: in a path (row 0), in a summary (row 1)
    path_enders: torch.Tensor  # [V] banned while a path is shorter than path_rules.min_tokens

    @classmethod
    def build(cls, opts: EngineOptions, call: CallSettings, ids: ControlTokenIds | None, eos_ids: Sequence[int],
              pad: int | None, template_len: int, vocab: int, device: torch.device) -> Plan:
        """The plan of a call with resolved ``opts``: ``ids`` the control tokens (parathinker mode,
        else None), ``pad`` the id of ``protocol.PAD`` (layouts that pad), ``vocab`` the logits' size."""
        layout, P, budget = opts.layout, opts.num_paths, call.max_new_tokens
        if ids is not None:
            path_rules, summary_rules = _parathinker_rules(ids, eos_ids if layout.eos_ends_path else (), P,
                                                           call.min_new_tokens, pad, layout.pad_to_multiple_of, device)
            needed = {"first": 1, "half": math.ceil(P / 2), "last": P}[opts.termination]
        else:
            path_rules = TokenRules(torch.tensor(list(eos_ids), device=device), min_tokens=call.min_new_tokens)
            summary_rules, needed = None, P
        never = torch.zeros(vocab, dtype=torch.bool, device=device)
        never[list(call.banned_tokens)] = True
        summary_banned = summary_rules.banned(vocab) if summary_rules else torch.zeros_like(never)
        return cls(
            num_paths=P,
            budget=budget,
            needed=needed,
            offsets=torch.tensor(protocol.path_offsets([budget] * P, opts.positions == "flattened", stride=budget),
                                 device=device),
            thought_embedding=opts.thought_embedding and ids is not None,
            path_rules=path_rules,
            summary_rules=summary_rules,
            summary_tokens=layout.summary_tokens(opts.summary_max_tokens, template_len) if ids is not None else 0,
            template_len=template_len,
            sampling=call.sampling,
            banned=torch.stack([path_rules.banned(vocab), summary_banned]) | never,
            path_enders=path_rules.ender_mask(vocab),
        )


def _parathinker_rules(ids: ControlTokenIds, eos_ids: Sequence[int], P: int, min_tokens: int, pad: int | None,
                       pad_to_multiple_of: int | None, device: torch.device) -> tuple[TokenRules, TokenRules]:
    """The token rules of the paths and of the summary (``eos_ids``: those that end a path)."""
    enders = torch.tensor(ids.path_enders(eos_ids), device=device)
    stray = torch.tensor(ids.stray_in_path(), device=device)
    path_rules = TokenRules(enders, torch.tensor(ids.think_close[:P], device=device), stray, ids.think, min_tokens,
                            pad, pad_to_multiple_of)
    # The released engine appends what the summary samples as it is (no stray rewriting).
    summary_rules = TokenRules(enders, ids.summary_close, None if pad_to_multiple_of else stray, ids.think)
    return path_rules, summary_rules


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
    done: torch.Tensor  # [S, P] takes no more tokens (closed, and padded to the rules' multiple if they pad)
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


@dataclass(frozen=True)
class StepInputs:
    """What one step forwards, per slot and query ([S, P] each; a ragged step's [1, N])."""

    tokens: torch.Tensor
    positions: torch.Tensor
    blocks: torch.Tensor  # protocol block of each query (its pages' row in the page table)
    offsets: torch.Tensor  # where in its block the token goes
    real: torch.Tensor  # a token of a path or summary (not padding)

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


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


def block_lengths(state: SlotState, plan: Plan, inputs: StepInputs) -> torch.Tensor:
    """[S, P + 2] tokens in every block of every slot once the step's tokens are written, in the
    page table's row order: prompt, paths 1 to P, summary (``SUMMARY_BLOCK``, the last row)."""
    fed = inputs.real & (state.phase == THINK)[:, None]
    summary = plan.template_len + state.summary_len
    return torch.cat([state.prompt_len[:, None], state.lengths + fed, summary[:, None]], dim=1)


def block_reads(blocks: torch.Tensor, real: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[..., num_rows] the page table's rows (blocks) each query reads: a path its prompt and
    itself, the summary everything (the two-phase rule), padding nothing."""
    row = torch.arange(num_rows, device=blocks.device)
    block = torch.where(row == num_rows - 1, protocol.SUMMARY_BLOCK, row)
    return protocol.may_attend(blocks[..., None], block) & real[..., None]


def columns(table: torch.Tensor, slot: torch.Tensor, block: torch.Tensor, offset: torch.Tensor,
            real: torch.Tensor, page_size: int) -> torch.Tensor:
    """Flat pool column of each token (``real`` ones; the rest write to the scratch page). The
    summary's block, -1, indexes the table's last row."""
    page = table[slot, block, offset // page_size]
    return torch.where(real, page * page_size + offset % page_size, SCRATCH_PAGE * page_size)


@dataclass(frozen=True)
class DecodeBatch:
    """Everything one decode forward reads (the argument of the compiled step)."""

    queries: StepInputs  # [B0, Q] each; query i of row r belongs to slot ``slot[r, i]``
    slot: torch.Tensor  # [B0, Q]
    table: torch.Tensor  # [S, P + 2, M] the slots' page ids, one row per block
    lengths: torch.Tensor  # [S, P + 2] tokens in each block, this step's included
    thought_embedding: bool
    kernel: Kernel
    static_batch: bool  # a rectangle, whose number of queries is the same at every step


def decode_forward(model, cache: PagedKVCache, batch: DecodeBatch) -> torch.Tensor:
    """One decode forward with paged reads: the function ``torch.compile`` compiles."""
    q = batch.queries
    write = cache.write(columns(batch.table, batch.slot, q.blocks, q.offsets, q.real, cache.page_size), q.real)
    reads = page_reads(batch.table, batch.lengths, batch.slot.flatten(),
                       block_reads(q.blocks, q.real, batch.lengths.shape[1]).flatten(0, 1), cache.fill,
                       cache.page_size, batch.kernel, cache.groups, batch.static_batch)
    return model(
        input_ids=q.tokens, position_ids=q.positions, attention_mask=cache.no_mask, **{cache.argument: write},
        use_cache=True, segment_ids=protocol.segment_id(q.blocks, batch.thought_embedding), reads=reads,
    ).logits


def fresh_forward(model, cache: PagedKVCache, tokens: torch.Tensor, positions: torch.Tensor, blocks: torch.Tensor,
                  reads: FreshReads, thought_embedding: bool, last_only: bool) -> torch.Tensor:
    """A multi-token forward of one request (``tokens`` [1, n]): a prefill, a summary template or
    a reprefill, written into ``reads.columns``."""
    write = cache.write(reads.columns, torch.ones_like(reads.columns, dtype=torch.bool))
    return model(
        input_ids=tokens, position_ids=positions, attention_mask=cache.no_mask, **{cache.argument: write},
        use_cache=True, segment_ids=protocol.segment_id(blocks, thought_embedding),
        logits_to_keep=1 if last_only else 0, reads=reads,
    ).logits


def step_forward(model, cache: PagedKVCache, table: torch.Tensor, state: SlotState, plan: Plan, inputs: StepInputs,
                 kernel: Kernel, ragged: bool, run: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A step's forward: the rectangle of every slot's P queries (static shapes: compiled steps,
    GPUs), or with ``ragged`` its real tokens only (``[1, N]``: eager CPU steps, where a padding
    query costs as much as a real one; it reads how many there are, a host round trip that costs
    nothing there); ``run(decode_forward, model, cache, batch)`` runs it
    (:class:`compilation.DecodeStep`: compiled or eager; None: eager, as it is). Returns the logits
    and, for a ragged step, each token's flat index in [S, P]; None when no slot has a token."""
    S, P = inputs.real.shape
    lengths = block_lengths(state, plan, inputs)
    slot = torch.arange(S, device=inputs.real.device)[:, None].expand(S, P)
    index = None
    if ragged:
        index = inputs.real.flatten().nonzero()[:, 0]
        if index.numel() == 0:
            return None
        slot = slot.flatten()[index][None]
        inputs = StepInputs(*(x.flatten()[index][None] for x in inputs.tensors()))
    else:  # a rectangle: a static batch for the compiled step (see attention.PageReads.static_batch)
        for x in (lengths, slot, *inputs.tensors()):
            upstream_torch.mark_static(x)
    batch = DecodeBatch(inputs, slot, table, lengths, plan.thought_embedding, kernel, static_batch=not ragged)
    return (run(decode_forward, model, cache, batch) if run else decode_forward(model, cache, batch)), index


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
    think_row, summary_row = state.phase == THINK, state.phase == SUMMARY
    t = state.t
    think_end = _end_paths(state, plan, inputs, think_row, stopped)
    drawn = _draw(state, plan, logits, think_row, summary_row, token_index)

    nxt = plan.path_rules.rewrite(drawn)
    if plan.path_rules.pad is not None:  # an ended path is fed pads until it is done
        nxt = torch.where(state.closed, plan.path_rules.pad, nxt)
    going = think_row & ~think_end
    state.cur = torch.where(going[:, None], nxt, state.cur)
    state.t = torch.where(going, t + 1, t)
    state.phase = torch.where(think_end, THINK_DONE if plan.summary_rules is not None else DONE, state.phase)
    if plan.summary_rules is not None:
        _advance_summaries(state, plan, drawn[:, 0], summary_row, summary_stopped)


def _end_paths(state: SlotState, plan: Plan, inputs: StepInputs, think_row: torch.Tensor,
               stopped: Callable[[SlotState], torch.Tensor] | None) -> torch.Tensor:
    """Record the fed path tokens, close the paths that ended; returns which think stages end."""
    S, P = state.cur.shape
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
    return think_end


def _draw(state: SlotState, plan: Plan, logits: torch.Tensor, think_row: torch.Tensor, summary_row: torch.Tensor,
          token_index: torch.Tensor | None) -> torch.Tensor:
    """[S, P] one draw for every slot: token t + 1 of each path, or the next summary token (query 0)."""
    S, P = state.cur.shape
    t = state.t
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
        return sampling.sample(logits.masked_fill(banned, float("-inf")), plan.sampling, draw)
    # only the real tokens have logits: draw theirs (with the same random numbers)
    rows = token_index // P
    picked = sampling.sample(
        logits[0][:, None].masked_fill(banned[rows], float("-inf")), plan.sampling,
        sampling.Draw(draw.seed[rows], draw.request[rows], draw.path.flatten()[token_index][:, None],
                      draw.index.flatten()[token_index][:, None]),
    )
    return torch.zeros(S * P, dtype=torch.long, device=t.device).index_copy(0, token_index, picked[:, 0]).view(S, P)


def _advance_summaries(state: SlotState, plan: Plan, drawn: torch.Tensor, summary_row: torch.Tensor,
                       summary_stopped: Callable[[SlotState], torch.Tensor] | None) -> None:
    """Append the drawn summary tokens ([S]) of the summary slots, and end the summaries that ended."""
    token = plan.summary_rules.rewrite(drawn)
    _store(state.summary_ids, state.summary_len.clamp(max=plan.summary_tokens - 1)[:, None], token[:, None],
           summary_row[:, None])
    state.summary_len += summary_row
    summary_end = summary_row & (torch.isin(token, plan.summary_rules.enders) | (state.summary_len >= plan.summary_tokens))
    if summary_stopped is not None:
        summary_end |= summary_row & summary_stopped(state)
    state.cur[:, 0] = torch.where(summary_row, token, state.cur[:, 0])
    state.phase = torch.where(summary_end, DONE, state.phase)
