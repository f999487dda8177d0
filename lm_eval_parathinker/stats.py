"""The statistics of small benchmarks (numpy only): pass@k and maj@k from n samples per problem,
bootstrap intervals over problems, paired comparisons, and how many samples are enough.

* ``pass_at_k(n, c, k)``: the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k).
* ``maj_at_k(labels, correct, k)``: majority-vote accuracy of k samples, averaged over the k-subsets
  of the n samples: exact up to ``MAX_SUBSETS`` subsets, else a fixed-seed estimate (see its docstring).
* ``bootstrap_interval(scores)``: 95% percentile bootstrap over problems of the mean per-problem score.
* ``compare_paired(a, b)``: mean per-problem difference, its paired bootstrap interval, a sign-flip p-value.
* ``repeats_for_halfwidth(...)``: repeats per problem that would shrink a paired interval to a half-width.

Problems are a sample from a population of problems (Miller 2024, "Adding Error Bars to Evals"): every
resampling is over problems, and a problem's score is the mean over its samples.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

#: the interval's resampling: stated in the docs and in every output that prints an interval
RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95
#: how every interval of the package is made, in words (printed beside the intervals)
METHOD = f"95% percentile bootstrap over problems, {RESAMPLES} resamples, seed {SEED}"
#: maj@k enumerates the k-subsets up to this many; beyond, it averages this many random k-subsets
MAX_SUBSETS = 20_000
#: z of a two-sided 95% normal interval (the repeats estimate is a normal approximation)
Z95 = 1.959963984540054


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n, c of them
    correct, is correct: 1 - C(n-c, k) / C(n, k) (exact integers, then one division)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _k_subsets(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """The k-subsets of range(n) as sorted index rows: all of them, or MAX_SUBSETS random ones."""
    if math.comb(n, k) <= MAX_SUBSETS:
        return np.array(list(itertools.combinations(range(n), k)), dtype=np.int64).reshape(-1, k)
    return np.sort(np.argsort(rng.random((MAX_SUBSETS, n)), axis=1)[:, :k], axis=1)


def maj_at_k(labels: Sequence[int], correct: Sequence[bool], k: int) -> float:
    """Expected correctness of the majority answer of k of the n samples, over their k-subsets.

    ``labels[i]``: the answer group of sample i (groups formed once, by the judge, on all n answers),
    -1 for no answer; ``correct[g]``: whether group g is right. In a subset the largest group wins and
    a tie goes to the group whose member comes first (as ``majority_answer`` on all n); a subset without
    any answer scores 0. Exact when C(n, k) <= MAX_SUBSETS; otherwise the mean over MAX_SUBSETS random
    subsets (seed ``SEED``), whose standard error is at most 0.5 / sqrt(MAX_SUBSETS) = 0.0035.
    """
    labels_arr = np.asarray(labels, dtype=np.int64)
    n = len(labels_arr)
    if not 1 <= k <= n:
        raise ValueError(f"maj_at_k needs 1 <= k <= n, got n={n}, k={k}")
    if not len(correct):
        return 0.0
    drawn = labels_arr[_k_subsets(n, k, np.random.default_rng(SEED))]  # (subsets, k)
    # per group: its count in the subset (major key) and how early its first member comes (minor key)
    keys = np.full((len(drawn), len(correct)), -1, dtype=np.int64)
    for g in range(len(correct)):
        member = drawn == g
        count = member.sum(axis=1)
        first = np.where(count > 0, member.argmax(axis=1), k)
        keys[:, g] = np.where(count > 0, count * (k + 1) + (k - first), -1)
    winner = keys.argmax(axis=1)
    any_answer = keys.max(axis=1) >= 0
    return float(np.mean(np.asarray(correct, dtype=bool)[winner] & any_answer))


@dataclass(frozen=True)
class Interval:
    """An estimate with its 95% interval."""

    estimate: float
    low: float
    high: float


def _resample_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Means of ``resamples`` bootstrap resamples of ``values`` (problems drawn with replacement)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(resamples, len(values)))
    return values[idx].mean(axis=1)


def bootstrap_interval(scores: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """Mean of per-problem scores and its 95% percentile bootstrap interval over problems."""
    values = np.asarray(scores, dtype=float)
    if values.size == 0:
        raise ValueError("bootstrap_interval needs at least one problem")
    means = _resample_means(values, resamples, seed)
    low, high = np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Interval(float(values.mean()), float(low), float(high))


def ci_low(scores: Sequence[float]) -> float:
    """The low end of :func:`bootstrap_interval`: an lm-eval aggregation (the tasks declare it for
    ``<metric>_ci_low``, whose per-problem values are the metric's), so the results JSON holds it."""
    return bootstrap_interval(scores).low


def ci_high(scores: Sequence[float]) -> float:
    """The high end of :func:`bootstrap_interval` (see :func:`ci_low`)."""
    return bootstrap_interval(scores).high


def sign_flip_pvalue(differences: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED) -> float:
    """Two-sided p-value of "no difference" for paired per-problem differences: how often a mean with
    random signs is at least as far from 0 as the observed one. Exact (all 2^N sign patterns) up to
    N = 16 problems, otherwise ``resamples`` random patterns, counted as (1 + hits) / (1 + resamples)."""
    d = np.asarray(differences, dtype=float)
    observed = abs(d.mean())
    tolerance = 1e-12 * max(1.0, float(np.abs(d).max(initial=0.0)))  # float noise must not make a tie a miss
    if len(d) <= 16:
        signs = 1 - 2 * ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1)
        return float(np.mean(np.abs((signs * d).mean(axis=1)) >= observed - tolerance))
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(resamples, len(d)))
    hits = int(np.sum(np.abs((signs * d).mean(axis=1)) >= observed - tolerance))
    return (1 + hits) / (1 + resamples)


@dataclass(frozen=True)
class PairedComparison:
    """Run A minus run B on the same problems."""

    problems: int
    mean_a: float
    mean_b: float
    difference: Interval  # mean per-problem difference and its paired bootstrap interval
    p_value: float


def compare_paired(scores_a: Sequence[float], scores_b: Sequence[float], resamples: int = RESAMPLES,
                   seed: int = SEED) -> PairedComparison:
    """Paired comparison of two runs' per-problem scores (same problems, same order)."""
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"compare_paired needs two equal-length score lists, got {a.shape} and {b.shape}")
    d = a - b
    return PairedComparison(len(d), float(a.mean()), float(b.mean()), bootstrap_interval(d, resamples, seed),
                            sign_flip_pvalue(d, resamples, seed))


def within_variance(accuracies: Sequence[float], repeats: int) -> float:
    """Mean over problems of the variance of one 0/1 sample, from each problem's accuracy over
    ``repeats`` samples (unbiased: p (1 - p) n / (n - 1)); needs n >= 2."""
    if repeats < 2:
        raise ValueError(f"the within-problem variance needs at least 2 repeats, got {repeats}")
    p = np.asarray(accuracies, dtype=float)
    return float(np.mean(p * (1 - p)) * repeats / (repeats - 1))


def repeats_for_halfwidth(accuracies_a: Sequence[float], accuracies_b: Sequence[float], repeats_a: int,
                          repeats_b: int, halfwidth: float) -> float:
    """Estimated repeats per problem (both runs) for a 95% interval of the paired difference of
    about +/- ``halfwidth``, on these problems (a normal approximation).

    The variance of the mean difference over N problems with r repeats is (B + (Wa + Wb) / r) / N:
    W the within-problem variance of one sample of each run, B the between-problem variance of the
    true per-problem differences (the observed variance of the differences minus the within parts).
    Returns ``inf`` when B alone is too large: more problems are needed, not more repeats.
    """
    a, b = np.asarray(accuracies_a, dtype=float), np.asarray(accuracies_b, dtype=float)
    within_a, within_b = within_variance(a, repeats_a), within_variance(b, repeats_b)
    observed = float(np.var(a - b, ddof=1)) if len(a) > 1 else 0.0
    between = max(0.0, observed - within_a / repeats_a - within_b / repeats_b)
    room = len(a) * (halfwidth / Z95) ** 2 - between
    if room <= 0:
        return math.inf
    return max(1.0, float(math.ceil((within_a + within_b) / room)))


__all__ = ["Interval", "LEVEL", "MAX_SUBSETS", "METHOD", "PairedComparison", "RESAMPLES", "SEED", "bootstrap_interval",
           "ci_high", "ci_low",
           "compare_paired", "maj_at_k", "pass_at_k", "repeats_for_halfwidth", "sign_flip_pvalue",
           "within_variance"]
