"""Per-problem metrics for lm-eval: pass@1, pass@k, majority vote, their curves over k, no-answer rate,
timeouts, and the means of the responses' numeric statistics."""

from __future__ import annotations

import math
from typing import Any, Sequence

from .. import stats
from .answer import extract_answer
from .worker import judge

#: the k of the curves: ``pass_at_<k>`` and ``maj_at_<k>`` for each of these up to the task's repeats n
CURVE_KS = (1, 2, 4, 8, 16, 32, 64)
#: metric keys process_results can return (plus one key per numeric ``.meta`` entry of the responses);
#: ``pass_at_k`` and ``maj_at_k`` are at k = n, ``pass_at_1`` is also the first point of the pass@k curve
#: the accuracies whose 95% interval over problems the results JSON holds, as ``<metric>_ci_low`` and
#: ``<metric>_ci_high`` (each problem's value repeated, aggregated by stats.ci_low / stats.ci_high)
INTERVAL_METRICS = ("pass_at_1", "pass_at_k", "maj_at_k")
METRICS = ("pass_at_1", "pass_at_k", "maj_at_k", "no_answer", "verify_timeouts",
           *(f"pass_at_{k}" for k in CURVE_KS[1:]), *(f"maj_at_{k}" for k in CURVE_KS),
           *(f"{m}_ci_{end}" for m in INTERVAL_METRICS for end in ("low", "high")))


def _groups(answers: Sequence[str | None], timeout: float | None = None) -> tuple[list[list[int]], int]:
    """Indices of equal answers grouped by the judge (first member first), and the timeout count."""
    groups: list[list[int]] = []
    timeouts = 0
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        for group in groups:
            same, timed_out = judge(answer, answers[group[0]], timeout)
            timeouts += timed_out
            if same:
                group.append(i)
                break
        else:
            groups.append([i])
    return groups, timeouts


def _largest(groups: list[list[int]]) -> list[int]:
    return max(groups, key=lambda g: (len(g), -g[0]))


def majority_answer(answers: Sequence[str | None], timeout: float | None = None) -> int | None:
    """Index of the majority answer: answers are grouped by the same judge as correctness, the
    largest group wins, ties go to the group seen first; the index returned is that group's first
    member. ``None`` if no answer at all."""
    groups, _ = _groups(answers, timeout)
    return _largest(groups)[0] if groups else None


def _numeric_meta(response: Any) -> dict[str, float]:
    meta = getattr(response, "meta", None)
    if not isinstance(meta, dict):
        return {}
    return {
        str(k): float(v)
        for k, v in meta.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def curves(correct: Sequence[bool], groups: list[list[int]]) -> dict[str, float]:
    """pass@k (unbiased) and maj@k (over the k-subsets of the n samples) for every k of ``CURVE_KS`` up
    to n, from the samples' correctness and their answers' groups (``_groups``; first member first)."""
    n = len(correct)
    labels = [-1] * n
    for g, members in enumerate(groups):
        for i in members:
            labels[i] = g
    group_correct = [correct[members[0]] for members in groups]
    out = {}
    for k in (k for k in CURVE_KS if k <= n):
        out[f"pass_at_{k}"] = stats.pass_at_k(n, sum(correct), k)
        out[f"maj_at_{k}"] = stats.maj_at_k(labels, group_correct, k)
    return out


def score_responses(responses: Sequence[Any], gold: str, timeout: float | None = None) -> dict[str, float]:
    """Metrics of the n responses to one problem (see ``METRICS``), plus the means of numeric ``.meta``."""
    responses = list(responses)
    k = len(responses)
    answers = [extract_answer(r) for r in responses]
    verdicts = [judge(a, gold, timeout) for a in answers]
    correct = [ok for ok, _ in verdicts]
    groups, group_timeouts = _groups(answers, timeout)
    out: dict[str, float] = {
        "pass_at_1": sum(correct) / k if k else 0.0,
        "pass_at_k": float(any(correct)),
        "maj_at_k": float(correct[_largest(groups)[0]]) if groups else 0.0,
        "no_answer": sum(a is None for a in answers) / k if k else 1.0,
        "verify_timeouts": float(sum(t for _, t in verdicts) + group_timeouts),
        **curves(correct, groups),
    }
    out.update({f"{m}_ci_{end}": out[m] for m in INTERVAL_METRICS for end in ("low", "high")})
    values: dict[str, list[float]] = {}
    for r in responses:
        for key, v in _numeric_meta(r).items():
            values.setdefault(key, []).append(v)
    for key, vs in values.items():
        out.setdefault(key, sum(vs) / len(vs))
    return out


def process_results(doc: dict, results: list) -> dict[str, float]:
    """lm-eval ``process_results``: ``results[0]`` is the list of k responses (filter ``take_first_k``)."""
    first = results[0] if results else []
    responses = list(first) if isinstance(first, (list, tuple)) else [first]
    return score_responses(responses, str(doc["answer"]))
