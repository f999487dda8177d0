"""Stop strings: host-side checks, run after each step, of the text the slots have decoded so far.

A stop string ends a plain sample (independent / sequential) when the sample's text ends in it,
or a summary (parathinker) when the summary's text contains it. Checking decodes tokens on the
host at every step, so a call without stop strings gets no checks (:func:`stop_checks`: None).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .step import SlotState


@dataclass(frozen=True)
class StopChecks:
    """Which paths' text ends in a stop string (plain samples), which summaries' text contains one."""

    paths: Callable[[SlotState], torch.Tensor] | None = None
    summary: Callable[[SlotState], torch.Tensor] | None = None


def stop_checks(stop_strings: Sequence[str], tokenizer, summary: bool) -> StopChecks | None:
    """The checks of ``stop_strings`` (None when there are none): of the summaries with
    ``summary``, else of the paths."""
    if not stop_strings:
        return None
    if summary:
        return StopChecks(summary=_summary_check(stop_strings, tokenizer))
    return StopChecks(paths=_path_check(stop_strings, tokenizer))


def _path_check(stop_strings: Sequence[str], tokenizer) -> Callable[[SlotState], torch.Tensor]:
    """Per step: which paths' text now ends in a stop string (reads the tokens)."""
    tail = max(len(s) for s in stop_strings) + 8  # tokens enough to hold any stop string

    def check(state: SlotState) -> torch.Tensor:
        hits = []
        for slot, t in enumerate(state.t.tolist()):
            window = state.path_tokens[slot, :, max(0, t + 1 - tail) : t + 1].tolist()
            hits.append([any(s in tokenizer.decode(w) for s in stop_strings) for w in window])
        return torch.tensor(hits, device=state.t.device)

    return check


def _summary_check(stop_strings: Sequence[str], tokenizer) -> Callable[[SlotState], torch.Tensor]:
    """Per step: which summaries' text now contains a stop string (reads the tokens)."""

    def check(state: SlotState) -> torch.Tensor:
        texts = [tokenizer.decode(row[:n]) for row, n in zip(state.summary_ids.tolist(), state.summary_len.tolist())]
        return torch.tensor([any(s in t for s in stop_strings) for t in texts], device=state.t.device)

    return check
