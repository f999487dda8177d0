"""``output_logits=True``: every request's logits, filed as the scheduler produces them.

Tests compare them with a training forward of the finished sequence. Recording reads the slots'
phases at every step (a host round trip), so it lives here, plugged into the scheduler only when
asked for, and not in the scheduler's loop.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from .step import SUMMARY, THINK, SlotState


class LogitsRecorder:
    """Per request: the think stage's logits of every step, then the summary's (its template's
    positions first)."""

    def __init__(self) -> None:
        self.think: dict[int, list[torch.Tensor]] = defaultdict(list)  # request -> [P, V] per step
        self.summary: dict[int, list[torch.Tensor]] = defaultdict(list)  # request -> [n, V] per forward

    def step(self, logits: torch.Tensor, index: torch.Tensor | None, state: SlotState,
             requests: Sequence[int | None]) -> None:
        """A step's logits ([S, P, V]; a ragged step's [1, N, V] at the flat indices ``index``);
        ``requests``: the request in each slot (None: idle)."""
        if index is not None:  # a ragged step: back to [S, P, V] (zeros for padding)
            S, P = state.cur.shape
            logits = logits.new_zeros(S * P, logits.shape[-1]).index_copy(0, index, logits[0]).view(S, P, -1)
        phases = state.phase.tolist()
        for slot, request in enumerate(requests):
            if request is None:
                continue
            if phases[slot] == THINK:
                self.think[request].append(logits[slot].clone())
            elif phases[slot] == SUMMARY:
                self.summary[request].append(logits[slot, :1].clone())

    def template(self, request: int, logits: torch.Tensor) -> None:
        """The logits of the summary template's forward ([n, V])."""
        self.summary[request].append(logits.clone())

    def forget(self, request: int) -> None:
        """A preempted request starts again: what it had is discarded."""
        self.think.pop(request, None)
        self.summary.pop(request, None)

    def collect(self, request: int, lengths: Sequence[int]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """A finished request's logits: per path [len, V], and the summary's [n, V] (None: none)."""
        per_step = torch.stack(self.think.pop(request))  # [steps, P, V]
        summary = self.summary.pop(request, None)
        return [per_step[:n, k] for k, n in enumerate(lengths)], torch.cat(summary) if summary else None
