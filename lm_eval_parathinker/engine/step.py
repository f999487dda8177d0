"""The device side of the decode loop: per-slot state, the model forward, and the bookkeeping of
one step. Everything here is tensor operations on the device; nothing waits for the host.

Every step runs one forward over all slots, ``P`` queries each: a thinking slot feeds its P paths'
current tokens, a summary slot its next summary token (the other queries pad), an idle or waiting
slot only padding. :func:`advance` then records what was fed, applies the token rules, samples
the next tokens and moves each slot's phase along; a slot whose think stage or summary has just
ended waits (``THINK_DONE``, ``DONE``) until the host handles it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import protocol
from . import sampling
from .kv_cache import SlotKVCache
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
    summary_col: torch.Tensor  # [S] column of generated summary token 0 (after the template)
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
            reason=zeros(slots), path_tokens=zeros(slots, P, plan.budget), summary_col=zeros(slots),
            summary_pos=zeros(slots), summary_ids=zeros(slots, max(plan.summary_tokens, 1)), summary_len=zeros(slots),
        )

    def start(self, slot: int, **values) -> None:
        """Set row ``slot`` of the named fields (the host does this when a slot changes stage)."""
        for name, value in values.items():
            getattr(self, name)[slot] = value


@dataclass(frozen=True)
class StepInputs:
    """What one step forwards, per slot and query ([S, P] each)."""

    tokens: torch.Tensor
    positions: torch.Tensor
    columns: torch.Tensor
    blocks: torch.Tensor
    real: torch.Tensor  # a token of a path or summary (not padding)


def step_inputs(state: SlotState, plan: Plan, scratch: int) -> StepInputs:
    """The queries of the next step: thinking slots feed token t of their P paths (column
    Lp + t P + k), summary slots their last summary token; padding goes to the scratch column."""
    P = plan.num_paths
    k = torch.arange(P, device=state.cur.device)
    think = (state.phase == THINK)[:, None]
    summary = (state.phase == SUMMARY)[:, None] & (k == 0)
    real = (think & ~state.done) | summary
    t = state.t[:, None]
    s = (state.summary_len - 1)[:, None]  # the summary token fed: the last one sampled
    columns = torch.where(think, state.prompt_len[:, None] + t * P + k, state.summary_col[:, None] + s)
    positions = torch.where(think, state.prompt_len[:, None] + plan.offsets + t, state.summary_pos[:, None] + s)
    blocks = torch.where(think, k + 1, torch.where(summary, protocol.SUMMARY_BLOCK, protocol.PROMPT_BLOCK))
    return StepInputs(
        tokens=state.cur,
        positions=torch.where(real, positions, 0),
        columns=torch.where(real, columns, scratch),
        blocks=blocks,
        real=real,
    )


def model_forward(model, cache: SlotKVCache, tokens, positions, segments, logits_to_keep: int = 0,
                  row_spans: list | None = None) -> torch.Tensor:
    """The model on ``tokens`` ([B, Q]) with the cache's mask: the function ``torch.compile`` compiles."""
    return model(
        input_ids=tokens,
        position_ids=positions,
        attention_mask=cache.attention_mask(cache.keys[0].dtype),
        cache=cache,
        use_cache=True,
        segment_ids=segments,
        logits_to_keep=logits_to_keep,
        row_spans=row_spans,  # a ragged step's rows (see attention.per_row_sdpa)
    ).logits


def forward(model, cache: SlotKVCache, rows: slice, tokens, columns, positions, blocks, valid, key_len: int,
            thought_embedding: bool, last_only: bool = False, compiled: Callable | None = None,
            query_rows: torch.Tensor | None = None, row_spans: list | None = None) -> torch.Tensor:
    """One forward of ``tokens`` ([B, Q]) into ``columns`` of the cache ``rows`` (a ragged step:
    ``[1, N]`` tokens of rows ``query_rows``, grouped as ``row_spans``)."""
    cache.write(rows, columns, blocks, valid, key_len, query_rows)
    segments = protocol.segment_id(blocks, thought_embedding)
    return (compiled or model_forward)(model, cache, tokens, positions, segments, 1 if last_only else 0, row_spans)


def ragged_forward(model, cache: SlotKVCache, inputs: StepInputs, key_len: int,
                   thought_embedding: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A step's forward on its real tokens only, ``[1, N]`` grouped by row: no padding query is
    computed. Returns the logits [1, N, V] and each token's flat index in [S, P], or None when no
    slot has a token. It reads the number of real tokens, a host round trip: the scheduler takes
    this path only on the CPU, where that costs nothing."""
    S, P = inputs.real.shape
    index = inputs.real.flatten().nonzero()[:, 0]
    if index.numel() == 0:
        return None
    rows = index // P
    slots, counts = torch.unique_consecutive(rows, return_counts=True)
    spans, start = [], 0  # consecutive rows with as many tokens each share one attention call
    for slot, n in zip(slots.tolist(), counts.tolist()):
        if spans and spans[-1][0] + spans[-1][1] == slot and (spans[-1][3] - spans[-1][2]) == spans[-1][1] * n:
            spans[-1] = (spans[-1][0], spans[-1][1] + 1, spans[-1][2], start + n)
        else:
            spans.append((slot, 1, start, start + n))
        start += n

    def pick(x: torch.Tensor) -> torch.Tensor:
        return x.flatten()[index][None]

    logits = forward(model, cache, slice(None), pick(inputs.tokens), pick(inputs.columns), pick(inputs.positions),
                     pick(inputs.blocks), pick(inputs.real), key_len, thought_embedding, query_rows=rows[None],
                     row_spans=spans)
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
