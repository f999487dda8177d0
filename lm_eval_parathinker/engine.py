"""ParaThinker parallel decoding on any transformers decoder-only model.

The generation loop is a few small functions in the style of gpt-fast:

* :func:`prefill` runs each prompt once and leaves its KV in the shared row of the cache;
* :func:`decode_paths` decodes the B x P paths in lockstep, one model forward per step;
* :func:`summarize` force-feeds the summary template in one forward and decodes the summary,
  attending to the prompt's and all paths' KV in place (or, for ``summary_kv="reprefill"``,
  after recomputing everything, the paper's ablation baseline).

:class:`ParaThinkerEngine` validates arguments, allocates the cache once per call and returns one
:class:`GenerationOutput` per prompt. Modes: ``parathinker`` (P paths + summary), ``independent``
(P plain samples sharing one prefill: majority voting) and ``sequential`` (one plain sample).
``compat`` picks the layout of :mod:`protocol` (``paper``: as trained; ``official``: as the
released vLLM engine runs the released checkpoint; ``auto``: official when the tokenizer has
``<vllm_pad>``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import protocol
from .attention import packed_attention
from .kv_cache import ParallelKVCache
from .protocol import PROMPT_BLOCK, SUMMARY_BLOCK, Compat, ControlTokenIds
from .rope import rope_scaling

MODES = ("parathinker", "independent", "sequential")
TERMINATIONS = ("first", "half", "last")
SUMMARY_KV = ("reuse", "reprefill")
POSITIONS = ("aligned", "flattened")


@dataclass(frozen=True)
class SamplingParams:
    """Greedy when ``temperature`` is 0; otherwise temperature / top-k / top-p sampling."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass
class GenerationOutput:
    """What the engine returns for one prompt."""

    prompt_ids: list[int]
    path_ids: list[list[int]]
    path_texts: list[str]
    path_finished: list[bool]  # ended by its own closing token (or EOS / a stop string), not cut
    summary_ids: list[int]  # summary template + generated summary ([] outside parathinker mode)
    summary_text: str
    transcript: str  # the paths, then the summary
    stats: dict = field(default_factory=dict)
    path_logits: list[torch.Tensor] | None = None  # per path: [len, vocab], logits that predicted each next token
    summary_logits: torch.Tensor | None = None  # [len(summary_ids), vocab]


@dataclass
class _Run:
    """Per-call constants shared by the stage functions."""

    model: torch.nn.Module
    cache: ParallelKVCache
    num_paths: int
    budget: int
    sampling: SamplingParams
    generator: torch.Generator | None
    thought_embedding: bool
    flattened: bool
    prompt_lens: torch.Tensor  # [B]
    keep_logits: bool


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token for each row of ``logits`` ([..., V])."""
    if params.temperature <= 0:
        return logits.argmax(-1)
    shape = logits.shape[:-1]
    logits = logits.reshape(-1, logits.shape[-1]).float() / params.temperature
    if params.top_k > 0:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    tokens = torch.multinomial(logits.softmax(-1), 1, generator=generator)
    return tokens.view(shape)


@dataclass(frozen=True)
class TokenRules:
    """How a stage polices what it samples (the official engine's rewriting).

    An ``ender`` ends the path (or summary) and is rewritten to ``closer`` (a path's own
    ``</think k>``, or ``</summary>``) when one is given; ``stray`` tokens (another path's or the
    summary's opener) are rewritten to ``stray_replacement`` (the base model's ``<think>``), or
    banned when the model has none; enders are banned until a path has ``min_tokens`` tokens.
    With ``block_size`` (the official engine's KV blocks), a path that has ended is fed ``pad``
    until its length is a multiple of ``block_size``, and is done only then.
    """

    enders: torch.Tensor
    closer: torch.Tensor | int | None = None
    stray: torch.Tensor | None = None
    stray_replacement: int | None = None
    min_tokens: int = 0
    pad: int | None = None
    block_size: int | None = None

    def done_at(self, length: int) -> bool:
        """Whether a path that has ended is done once it is ``length`` tokens long."""
        return self.block_size is None or length % self.block_size == 0


def next_tokens(run: _Run, logits: torch.Tensor, rules: TokenRules, length: int) -> torch.Tensor:
    """Sample the next token of every sequence (each ``length`` tokens long so far) under ``rules``."""
    banned = []
    if rules.stray is not None and rules.stray_replacement is None:
        banned.append(rules.stray)
    if length < rules.min_tokens:
        banned.append(rules.enders)
    if banned:
        logits = logits.index_fill(-1, torch.cat(banned), float("-inf"))
    cur = sample(logits, run.sampling, run.generator)
    if rules.stray is not None and rules.stray_replacement is not None:
        cur = torch.where(torch.isin(cur, rules.stray), rules.stray_replacement, cur)
    if rules.closer is not None:
        cur = torch.where(torch.isin(cur, rules.enders), rules.closer, cur)
    return cur


def clock(device: torch.device) -> float:
    """Wall time after the device's queued work is done (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def forward(run: _Run, tokens, columns, positions, blocks, valid, last_only: bool = False) -> torch.Tensor:
    """One model forward of ``tokens`` ([B, Q]) written into cache ``columns`` ([Q])."""
    run.cache.write(columns, tokens, blocks, positions, valid)
    out = run.model(
        input_ids=tokens,
        position_ids=positions,
        attention_mask=run.cache.attention_mask(run.cache.keys[0].dtype),
        cache=run.cache,
        use_cache=True,
        segment_ids=protocol.segment_id(blocks, run.thought_embedding),
        logits_to_keep=1 if last_only else 0,
    )
    return out.logits


def prefill(run: _Run, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """Run the left-padded prompts once; returns the logits of each prompt's last token ([B, V])."""
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    columns = torch.arange(prompt_ids.shape[1], device=prompt_ids.device)
    blocks = torch.full_like(prompt_ids, PROMPT_BLOCK)
    return forward(run, prompt_ids, columns, positions, blocks, prompt_mask.bool(), last_only=True)[:, -1]


@dataclass
class _ThinkState:
    tokens: torch.Tensor  # [B, P, budget] path tokens
    lengths: torch.Tensor  # [B, P]
    finished: torch.Tensor  # [B, P] ended by an ender
    done: torch.Tensor  # [B, P] takes no more tokens (finished, and block-aligned if the rules pad)
    thinking: torch.Tensor  # [B] row still in its think stage
    steps: int = 0  # lockstep steps taken
    reasons: list[str] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # per step [B, P, V]


def decode_paths(
    run: _Run,
    first_tokens: torch.Tensor,
    rules: TokenRules,
    finished_needed: int,
    stop_check=None,
    progress: bool = False,
) -> _ThinkState:
    """Decode the B x P paths in lockstep from ``first_tokens`` ([B, P]); one forward per step.

    A path ends with one of ``rules.enders`` (or a stop string); a row's think stage ends once
    ``finished_needed`` of its paths are done, or every path has reached the budget.
    """
    B, P = first_tokens.shape
    device = first_tokens.device
    state = _ThinkState(
        tokens=torch.zeros(B, P, run.budget, dtype=torch.long, device=device),
        lengths=torch.zeros(B, P, dtype=torch.long, device=device),
        finished=torch.zeros(B, P, dtype=torch.bool, device=device),
        done=torch.zeros(B, P, dtype=torch.bool, device=device),
        thinking=torch.ones(B, dtype=torch.bool, device=device),
        reasons=[""] * B,
    )
    blocks = torch.arange(1, P + 1, device=device).expand(B, P)
    offsets = torch.tensor(
        protocol.path_offsets([run.budget] * P, run.flattened, stride=run.budget), device=device
    )
    base = run.cache.length
    cur = first_tokens
    bar = tqdm(total=run.budget, desc="think", unit="step", disable=not progress, leave=False)
    for t in range(run.budget):
        in_path = state.thinking[:, None] & ~state.done  # cur is a real token of its path
        state.tokens[:, :, t] = cur
        state.lengths += in_path
        columns = base + t * P + torch.arange(P, device=device)
        positions = run.prompt_lens[:, None] + offsets + t
        logits = forward(run, cur, columns, positions, blocks, in_path)
        if run.keep_logits:
            state.logits.append(logits)
        ended = in_path & torch.isin(cur, rules.enders)
        if stop_check is not None:
            ended |= in_path & stop_check(state, t)
        state.finished |= ended
        if rules.done_at(t + 1):
            state.done |= state.finished
        state.steps = t + 1
        bar.update(1)
        done_first = state.thinking & (state.done.sum(-1) >= finished_needed)
        done_budget = state.thinking & ~done_first & (t + 1 >= run.budget)
        for b in done_first.nonzero().flatten().tolist():
            state.reasons[b] = "finished"
        for b in done_budget.nonzero().flatten().tolist():
            state.reasons[b] = "budget"
        state.thinking &= ~(done_first | done_budget)
        if not state.thinking.any():
            break
        cur = next_tokens(run, logits, rules, length=t + 1)
        if rules.pad is not None:
            cur = torch.where(state.finished, rules.pad, cur)
    bar.close()
    for b in range(B):
        state.reasons[b] = state.reasons[b] or "finished"
    return state


def summarize(
    run: _Run,
    template: torch.Tensor,
    summary_positions: torch.Tensor,
    rules: TokenRules,
    max_tokens: int,
    stop_check=None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Force-feed ``template`` ([Ls]) in one forward, then decode up to ``max_tokens``.

    ``summary_positions`` ([B]) is the position of each row's first summary token. Returns the
    generated tokens [B, n], their per-row lengths, and the logits kept (template, then steps).
    """
    B = summary_positions.shape[0]
    device = template.device
    Ls = template.numel()
    blocks = torch.full((B, Ls), SUMMARY_BLOCK, device=device)
    columns = run.cache.length + torch.arange(Ls, device=device)
    positions = summary_positions[:, None] + torch.arange(Ls, device=device)
    ones = torch.ones(B, Ls, dtype=torch.bool, device=device)
    logits = forward(run, template.expand(B, Ls), columns, positions, blocks, ones, last_only=not run.keep_logits)
    kept = [logits] if run.keep_logits else []
    out = torch.zeros(B, max_tokens, dtype=torch.long, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    active = torch.ones(B, dtype=torch.bool, device=device)
    for s in range(max_tokens):
        cur = next_tokens(run, logits[:, -1], rules, length=s)
        out[:, s] = cur
        lengths += active
        ended = active & torch.isin(cur, rules.enders)
        if stop_check is not None:
            ended |= active & stop_check(out[:, : s + 1], lengths)
        if s + 1 == max_tokens or (active & ~ended).sum() == 0:
            break
        column = torch.tensor([run.cache.length], device=device)
        pos = (summary_positions + Ls + s)[:, None]
        logits = forward(run, cur[:, None], column, pos, blocks[:, :1], active[:, None])
        active &= ~ended
        if run.keep_logits:
            kept.append(logits)
    return out, lengths, kept


def reprefill(run: _Run, template_len: int, summary_max: int) -> None:
    """The ablation baseline: recompute the KV of prompt + all paths, packed path after path,
    with the same positions and segment ids as the shared cache (so results must agree)."""
    old = run.cache
    n = old.length
    device = old.token.device
    rows = []
    for b in range(old.token.shape[0]):
        cols = old.valid[b, :n].nonzero().flatten()
        # packed order: prompt first, then path 1..P, each in time order
        order = old.block[b, cols].clamp(min=0) * n + cols
        rows.append(cols[order.argsort()])
    width = max(len(r) for r in rows)
    fresh = ParallelKVCache(run.model, len(rows), width + template_len + summary_max, device, old.keys[0].dtype)
    tokens = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    blocks, positions = torch.zeros_like(tokens), torch.zeros_like(tokens)
    valid = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    for b, cols in enumerate(rows):  # left-pad like the prompt prefill
        sl = slice(width - len(cols), width)
        tokens[b, sl], blocks[b, sl], positions[b, sl] = old.token[b, cols], old.block[b, cols], old.position[b, cols]
        valid[b, sl] = True
    run.cache = fresh
    columns = torch.arange(width, device=device)
    # A packed row is causal in packed order; may_attend keeps paths apart.
    forward(run, tokens, columns, positions, blocks, valid, last_only=True)


class ParaThinkerEngine:
    """Parallel decoding for a model and tokenizer (see module docstring).

    >>> engine = ParaThinkerEngine(model, tokenizer)
    >>> out = engine.generate(["What is 2+3?"], num_paths=4, max_new_tokens=512)[0]
    >>> print(out.transcript)
    """

    def __init__(self, model, tokenizer, num_control_paths: int = protocol.DEFAULT_NUM_CONTROL_PATHS):
        self.model = model
        self.tokenizer = tokenizer
        self.num_control_paths = num_control_paths
        eos = tokenizer.eos_token_id
        self.eos_ids = sorted({*(eos if isinstance(eos, list) else [eos])} - {None})
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            self.eos_ids = sorted({*self.eos_ids, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])})

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _control_ids(self) -> ControlTokenIds:
        return ControlTokenIds.from_tokenizer(self.tokenizer, self.num_control_paths)

    def encode(self, prompts: Sequence[str | Sequence[int]], compat: Compat = protocol.PAPER) -> list[list[int]]:
        """Token ids of each prompt: strings as ``compat`` encodes them, id lists as they are."""
        return [compat.prompt_ids(p, self.tokenizer) if isinstance(p, str) else list(p) for p in prompts]

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        *,
        mode: str = "parathinker",
        num_paths: int = 8,
        max_new_tokens: int = 1024,
        termination: str = "first",
        summary_max_tokens: int = 128,
        summary_kv: str = "reuse",
        thought_embedding: bool = True,
        positions: str = "aligned",
        compat: str = "auto",
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        min_new_tokens: int = 0,
        stop_strings: Sequence[str] = (),
        output_logits: bool = False,
        progress: bool = False,
    ) -> list[GenerationOutput]:
        """Generate for a batch of prompts (strings, or token ids used as they are).

        ``max_new_tokens`` is the per-path budget (the opening ``<think k>`` included);
        ``min_new_tokens``: no path ends before it has that many tokens (like transformers'
        ``min_new_tokens``; useful to make an untrained model think in training-free mode).
        ``stop_strings`` end a plain sample (independent/sequential) or the summary.
        ``compat`` (parathinker mode): ``paper``, ``official`` or ``auto`` (see :class:`protocol.Compat`).
        """
        ids, layout = self._validate(prompts, mode, num_paths, max_new_tokens, termination, summary_kv, positions,
                                     compat)
        if mode == "sequential":
            num_paths = 1
        parathinker = mode == "parathinker"
        template = self.tokenizer(protocol.SUMMARY_TEMPLATE, add_special_tokens=False)["input_ids"] if parathinker else []
        prompt_ids = self.encode(prompts, layout)
        summary_tokens = layout.summary_tokens(summary_max_tokens, len(template)) if parathinker else 0
        self._check_lengths(prompt_ids, num_paths, max_new_tokens, len(template), summary_tokens, positions, layout)

        device = self.device
        B, P = len(prompt_ids), num_paths
        width = max(map(len, prompt_ids))
        padded = torch.full((B, width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros(B, width, dtype=torch.long)
        for b, p in enumerate(prompt_ids):
            padded[b, width - len(p):] = torch.tensor(p)
            mask[b, width - len(p):] = 1
        summary_cols = len(template) + summary_tokens
        dtype = next(self.model.parameters()).dtype
        run = _Run(
            model=self.model,
            cache=ParallelKVCache(self.model, B, width + P * max_new_tokens + summary_cols, device, dtype),
            num_paths=P,
            budget=max_new_tokens,
            sampling=SamplingParams(temperature, top_p, top_k, seed),
            generator=torch.Generator(device=device).manual_seed(seed) if seed is not None else None,
            thought_embedding=thought_embedding and parathinker,
            flattened=positions == "flattened",
            prompt_lens=mask.sum(-1).to(device),
            keep_logits=output_logits,
        )
        rope = layout.rope_parameters(max_new_tokens, self._rope_theta()) if parathinker else None
        with packed_attention(self.model), rope_scaling(self.model, rope):
            t0 = clock(device)
            last_logits = prefill(run, padded.to(device), mask.to(device))
            t1 = clock(device)
            if parathinker:
                enders = torch.tensor(ids.path_enders(self.eos_ids if layout.eos_ends_path else ()), device=device)
                stray = torch.tensor(ids.stray_in_path(), device=device)
                pad = self.tokenizer.convert_tokens_to_ids(protocol.PAD) if layout.block_size else None
                path_rules = TokenRules(enders, torch.tensor(ids.think_close[:P], device=device), stray, ids.think,
                                        min_new_tokens, pad, layout.block_size)
                first = torch.tensor(ids.think_open[:P], device=device).expand(B, P)
                needed = {"first": 1, "half": math.ceil(P / 2), "last": P}[termination]
                state = decode_paths(run, first, path_rules, needed, progress=progress)
            else:
                plain_rules = TokenRules(torch.tensor(self.eos_ids, device=device), min_tokens=min_new_tokens)
                first = next_tokens(run, last_logits[:, None].expand(B, P, -1), plain_rules, length=0)
                stop_check = self._stop_check(stop_strings) if stop_strings else None
                state = decode_paths(run, first, plain_rules, P, stop_check, progress=progress)
            t2 = clock(device)

            summary = None
            if parathinker:
                starts = [layout.summary_position(int(lp), row, run.flattened, stride=max_new_tokens)
                          for lp, row in zip(run.prompt_lens.tolist(), state.lengths.tolist())]
                if summary_kv == "reprefill":
                    reprefill(run, len(template), summary_tokens)
                # The released engine appends what the summary samples as it is (no stray rewriting).
                summary_rules = TokenRules(enders, ids.summary_close, None if layout.block_size else stray, ids.think)
                s_stop = self._summary_stop_check(stop_strings) if stop_strings else None
                summary = summarize(run, torch.tensor(template, device=device), torch.tensor(starts, device=device),
                                    summary_rules, summary_tokens, s_stop)
            t3 = clock(device)
        timing = {"prefill_s": t1 - t0, "think_s": t2 - t1, "summary_s": t3 - t2, "latency_s": t3 - t0}
        return self._outputs(prompt_ids, state, summary, template, timing, mode, termination, P)

    # -- helpers -------------------------------------------------------------------------

    def _validate(self, prompts, mode, num_paths, max_new_tokens, termination, summary_kv, positions, compat):
        """Check the arguments; returns the control token ids and the layout (parathinker mode)."""
        for name, value, choices in (
            ("mode", mode, MODES),
            ("termination", termination, TERMINATIONS),
            ("summary_kv", summary_kv, SUMMARY_KV),
            ("positions", positions, POSITIONS),
        ):
            if value not in choices:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")
        protocol.check_compat_name(compat)
        if not prompts:
            raise ValueError("prompts is empty")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompts[{i}] is empty")
        if num_paths < 1:
            raise ValueError(f"num_paths={num_paths} must be at least 1")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
        if mode != "parathinker":
            if compat == "official":
                raise ValueError(f"compat='official' applies to mode='parathinker' only, not mode={mode!r}")
            return None, protocol.PAPER
        layout = protocol.resolve_compat(compat, self.tokenizer)
        if layout.max_paths is not None and num_paths > layout.max_paths:
            raise ValueError(f"num_paths={num_paths}: the released engine (compat=official) runs at most {layout.max_paths} paths")
        if layout.block_size is not None:
            if max_new_tokens % layout.block_size:
                raise ValueError(
                    f"max_new_tokens={max_new_tokens} must be a multiple of {layout.block_size} with compat=official "
                    "(the released engine asserts it)"
                )
            if positions == "flattened":
                raise ValueError("positions='flattened' has no equivalent in the released engine: use compat='paper'")
            for i, p in enumerate(prompts):
                if not isinstance(p, str) and len(p) % layout.block_size:
                    raise ValueError(
                        f"prompts[{i}] has {len(p)} token ids; with compat=official a prompt is a multiple of "
                        f"{layout.block_size} long: pass the text, or ids from protocol.OFFICIAL.prompt_ids"
                    )
        ids = self._control_ids()
        if num_paths > ids.num_control_paths:
            raise ValueError(
                f"num_paths={num_paths} exceeds the {ids.num_control_paths} <think k> control tokens available"
            )
        max_segments = getattr(self.model.config, "max_segments", protocol.DEFAULT_MAX_SEGMENTS)
        if num_paths >= max_segments:
            raise ValueError(f"num_paths={num_paths} needs segment ids up to {num_paths}, but max_segments={max_segments}")
        return ids, layout

    def _check_lengths(self, prompt_ids, num_paths, budget, template_len, summary_tokens, positions, layout):
        """The summary must have room to generate, and every position must exist."""
        if template_len and summary_tokens < 1:
            raise ValueError(
                f"summary_max_tokens leaves no room after the {template_len}-token summary template "
                f"(compat={layout.name} counts the template)"
            )
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is None:
            return
        path_lens = [budget] * (num_paths if positions == "flattened" else 1)
        last_path = layout.summary_position(max(map(len, prompt_ids)), path_lens, positions == "flattened")
        needed = last_path + (template_len + summary_tokens if template_len else 0)
        if needed > limit:
            raise ValueError(
                f"prompt + max_new_tokens={budget} (+ summary) needs {needed} positions, beyond the "
                f"model's max_position_embeddings={limit}"
            )

    def _rope_theta(self) -> float:
        config = self.model.config
        params = getattr(config, "rope_parameters", None) or {}
        return params.get("rope_theta", getattr(config, "rope_theta", 10000.0))

    def _stop_check(self, stop_strings):
        """Per step: which paths' text now contains a stop string (independent modes)."""
        tail = max(len(s) for s in stop_strings) + 8  # tokens enough to hold any stop string

        def check(state: _ThinkState, t: int) -> torch.Tensor:
            window = state.tokens[:, :, max(0, t + 1 - tail) : t + 1].tolist()
            hits = [[any(s in self.tokenizer.decode(w) for s in stop_strings) for w in row] for row in window]
            return torch.tensor(hits, device=state.tokens.device)

        return check

    def _summary_stop_check(self, stop_strings):
        def check(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            texts = [self.tokenizer.decode(row[:n]) for row, n in zip(tokens.tolist(), lengths.tolist())]
            return torch.tensor([any(s in t for s in stop_strings) for t in texts], device=tokens.device)

        return check

    def _outputs(self, prompt_ids, state, summary, template, timing, mode, termination, P):
        decode = self.tokenizer.decode
        outputs = []
        for b, prompt in enumerate(prompt_ids):
            paths = [state.tokens[b, k, : state.lengths[b, k]].tolist() for k in range(P)]
            finished = state.finished[b].tolist()
            if mode != "parathinker":  # plain samples: the EOS that ended a sample is not text
                texts = [decode(p[:-1] if f and p[-1] in self.eos_ids else p) for p, f in zip(paths, finished)]
            else:
                texts = [decode(p) for p in paths]
            summary_ids = template + (summary[0][b, : summary[1][b]].tolist() if summary else [])
            summary_text = decode(summary_ids)
            path_logits = summary_logits = None
            if state.logits:
                per_step = torch.stack([lg[b] for lg in state.logits], dim=1)  # [P, steps, V]
                path_logits = [per_step[k, : len(paths[k])] for k in range(P)]
            if summary and summary[2]:
                summary_logits = torch.cat([lg[b] for lg in summary[2]], dim=0)[: len(summary_ids)]
            think_tokens = int(state.lengths[b].sum())
            summary_tokens = len(summary_ids)
            reason = state.reasons[b]
            if mode == "parathinker" and reason == "finished":
                reason = {"first": "first_finished", "half": "half_finished", "last": "all_finished"}[termination]
            outputs.append(
                GenerationOutput(
                    prompt_ids=prompt,
                    path_ids=paths,
                    path_texts=texts,
                    path_finished=finished,
                    summary_ids=summary_ids,
                    summary_text=summary_text,
                    transcript="".join(texts) + summary_text,
                    stats={
                        "num_paths": P,
                        "think_tokens": think_tokens,
                        "summary_tokens": summary_tokens,
                        "gen_tokens": think_tokens + summary_tokens,
                        "paths_finished": sum(finished),
                        "termination": reason,
                        **timing,
                    },
                    path_logits=path_logits,
                    summary_logits=summary_logits,
                )
            )
        return outputs
