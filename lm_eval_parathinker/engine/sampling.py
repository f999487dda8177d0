"""How the engine chooses tokens: the official token rules, and sampling that depends only on the
request, never on the slot it runs in or on its neighbours.

A sampled token is drawn by inverse-CDF sampling with one uniform number per token, hashed on the
device from (request seed, path, token index). No generator state is shared between requests or
advanced by the batch, so a request gets the same tokens alone or in any batch, and a step needs
no host round trip (a counter-based stream in the spirit of Philox, written with int64 tensor ops
that every backend and ``torch.compile`` handle).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF
SUMMARY_STREAM = -1  # the "path" of summary tokens in a request's random streams


@dataclass(frozen=True)
class SamplingParams:
    """Greedy when ``temperature`` is 0; otherwise temperature / top-k / top-p sampling."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2**32.
    The multipliers are below 2**31, so no product overflows int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


def request_seeds(seed: int | Sequence[int] | None, count: int) -> list[int]:
    """One 62-bit seed per request: given as a list, derived from one ``seed`` and the request's
    index, or drawn from torch's global generator (so ``torch.manual_seed`` makes runs repeatable)."""
    if seed is not None and not isinstance(seed, int):
        seeds = [int(s) for s in seed]
        if len(seeds) != count:
            raise ValueError(f"seed has {len(seeds)} entries for {count} prompts")
        return seeds
    base = int(torch.randint(0, 2**62, (1,))) if seed is None else seed
    index = torch.arange(count, dtype=torch.long)
    lo = _mix32((index + (base & _MASK32)) & _MASK32)
    hi = _mix32((index * 3 + ((base >> 32) & _MASK32) + 1) & _MASK32)
    return ((hi << 30) ^ lo).tolist()


@dataclass(frozen=True)
class Draw:
    """Whose tokens a sampling call draws: row r, query q is token ``index[r, q]`` of path
    ``path[r, q]`` (0-based; ``SUMMARY_STREAM`` for the summary) of request ``request[r]``.
    These coordinates pick each token's random number (and let tests script tokens)."""

    seed: torch.Tensor  # [R] the request's seed
    request: torch.Tensor  # [R] request index in the engine call
    path: torch.Tensor  # [R, Q]
    index: torch.Tensor  # [R, Q]

    def uniform(self) -> torch.Tensor:
        """[R, Q] numbers in [0, 1), a function of (seed, path, index) only."""
        seed = self.seed[:, None]
        h = _mix32((self.index + 0x9E3779B9) & _MASK32)
        h = _mix32(h ^ ((self.path + 2) & _MASK32))
        h = _mix32(h ^ (seed & _MASK32))
        h = _mix32(h ^ ((seed >> 32) & _MASK32))
        return (h >> 8).to(torch.float32) / float(1 << 24)


def sample(logits: torch.Tensor, params: SamplingParams, draw: Draw) -> torch.Tensor:
    """Next token for each [R, Q] position of ``logits`` ([R, Q, V])."""
    if params.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    order = None
    if params.top_p < 1.0:
        logits, order = logits.sort(dim=-1, descending=True)
        probs = logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop, float("-inf"))
    cdf = logits.softmax(-1).cumsum(-1)
    # right side: the first token whose cumulative mass exceeds u * total never has zero mass
    target = (draw.uniform() * cdf[..., -1])[..., None]
    picked = torch.searchsorted(cdf, target, right=True).clamp(max=logits.shape[-1] - 1)
    return (picked if order is None else order.gather(-1, picked))[..., 0]


@dataclass(frozen=True)
class TokenRules:
    """How a stage polices what it samples (the official engine's rewriting).

    An ``ender`` ends the path (or summary) and is rewritten to ``closer`` (a path's own
    ``</think k>``, or ``</summary>``) when one is given; ``stray`` tokens (another path's or the
    summary's opener) are rewritten to ``stray_replacement`` (the base model's ``<think>``), or
    banned when the model has none; enders are banned until a path has ``min_tokens`` tokens.
    With ``pad_to_multiple_of`` (the official engine's KV page size, vLLM's block size), a path that has ended is fed ``pad``
    until its length is a multiple of ``pad_to_multiple_of``, and is done only then.
    """

    enders: torch.Tensor
    closer: torch.Tensor | int | None = None
    stray: torch.Tensor | None = None
    stray_replacement: int | None = None
    min_tokens: int = 0
    pad: int | None = None
    pad_to_multiple_of: int | None = None

    def banned(self, vocab_size: int) -> torch.Tensor:
        """[V] tokens that may never be sampled: strays with no replacement."""
        mask = torch.zeros(vocab_size, dtype=torch.bool, device=self.enders.device)
        if self.stray is not None and self.stray_replacement is None:
            mask[self.stray] = True
        return mask

    def ender_mask(self, vocab_size: int) -> torch.Tensor:
        """[V] the enders, as a mask (banned while a path is shorter than ``min_tokens``)."""
        mask = torch.zeros(vocab_size, dtype=torch.bool, device=self.enders.device)
        mask[self.enders] = True
        return mask

    def rewrite(self, tokens: torch.Tensor) -> torch.Tensor:
        """Sampled tokens as the stage keeps them: strays and enders rewritten."""
        if self.stray is not None and self.stray_replacement is not None:
            tokens = torch.where(torch.isin(tokens, self.stray), self.stray_replacement, tokens)
        if self.closer is not None:
            tokens = torch.where(torch.isin(tokens, self.enders), self.closer, tokens)
        return tokens

    def done_at(self, lengths: torch.Tensor) -> torch.Tensor:
        """Whether a path that has ended is done once it is ``lengths`` tokens long."""
        if self.pad_to_multiple_of is None:
            return torch.ones_like(lengths, dtype=torch.bool)
        return lengths % self.pad_to_multiple_of == 0
