"""lm_eval_parathinker.stats against brute force and simulation: pass@k and maj@k over all k-subsets,
the coverage of the intervals on 30-problem benchmarks, the sign-flip test and the repeats estimate."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from lm_eval_parathinker import stats


def test_pass_at_k_equals_brute_force_over_all_subsets():
    rng = np.random.default_rng(1)
    for n in range(1, 17):
        for c in {0, n, int(rng.integers(0, n + 1))}:
            correct = rng.permutation([1] * c + [0] * (n - c))
            for k in range(1, n + 1):
                brute = np.mean([any(correct[i] for i in s) for s in itertools.combinations(range(n), k)])
                assert stats.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    with pytest.raises(ValueError, match="k <= n"):
        stats.pass_at_k(4, 1, 5)


def _brute_maj(labels: list[int], correct: list[bool], k: int) -> float:
    """Majority of each k-subset, written as plainly as possible: most votes, a tie to the answer seen first."""
    wins = []
    for subset in itertools.combinations(range(len(labels)), k):
        votes = [labels[i] for i in subset if labels[i] >= 0]
        if not votes:
            wins.append(False)
            continue
        counts = Counter(votes)
        best = max(counts.values())
        winner = next(g for g in votes if counts[g] == best)  # votes are in sample order
        wins.append(correct[winner])
    return float(np.mean(wins))


def test_maj_at_k_exact_equals_brute_force():
    rng = np.random.default_rng(2)
    cases = [([0, 1, 1, 0, 2], [True, False, False], k) for k in range(1, 6)]
    cases += [([-1, -1, 0], [True], k) for k in range(1, 4)]  # subsets without any answer score 0
    for _ in range(40):
        n = int(rng.integers(1, 11))
        groups = int(rng.integers(1, 4))
        labels = [int(x) for x in rng.integers(-1, groups, size=n)]
        correct = [bool(x) for x in rng.integers(0, 2, size=groups)]
        cases.append((labels, correct, int(rng.integers(1, n + 1))))
    for labels, correct, k in cases:
        assert stats.maj_at_k(labels, correct, k) == pytest.approx(_brute_maj(labels, correct, k), abs=1e-12), (
            labels, correct, k)


def test_maj_at_k_estimate_within_its_stated_error(monkeypatch):
    labels = [0, 1, 0, 2, 1, 1, 0, -1, 2, 0, 1, 0]
    correct = [True, False, False]
    exact = stats.maj_at_k(labels, correct, 6)  # C(12, 6) = 924 subsets: enumerated
    monkeypatch.setattr(stats, "MAX_SUBSETS", 400)  # now drawn: 400 random subsets
    estimate = stats.maj_at_k(labels, correct, 6)
    assert estimate != exact
    assert abs(estimate - exact) < 4 * 0.5 / math.sqrt(400)


# Simulated benchmarks: 30 problems drawn from a population whose per-problem accuracies follow
# Beta(1.5, 2.5) (mean 0.375), 4 samples per problem; run B's accuracy on a problem is 0.7 times A's,
# so the true paired difference is 0.3 * 0.375. Seed 20241101, 1000 simulated datasets.
SIM_SEED, SIM_DATASETS, SIM_PROBLEMS, SIM_REPEATS = 20241101, 1000, 30, 4
TRUE_A = 1.5 / (1.5 + 2.5)
TRUE_DIFF = 0.3 * TRUE_A


def _simulated_scores(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-problem scores (mean of SIM_REPEATS samples) of runs A and B, shape (datasets, problems)."""
    p = rng.beta(1.5, 2.5, size=(SIM_DATASETS, SIM_PROBLEMS))
    a = rng.binomial(SIM_REPEATS, p) / SIM_REPEATS
    b = rng.binomial(SIM_REPEATS, 0.7 * p) / SIM_REPEATS
    return a, b


def test_intervals_cover_the_truth_on_30_problems():
    a, b = _simulated_scores(np.random.default_rng(SIM_SEED))
    single = [stats.bootstrap_interval(row, seed=i) for i, row in enumerate(a)]
    paired = [stats.bootstrap_interval(d, seed=i) for i, d in enumerate(a - b)]  # compare_paired's interval
    cover_single = np.mean([iv.low <= TRUE_A <= iv.high for iv in single])
    cover_paired = np.mean([iv.low <= TRUE_DIFF <= iv.high for iv in paired])
    print(f"coverage: one run {cover_single:.3f}, paired difference {cover_paired:.3f}")
    assert 0.92 <= cover_single <= 0.98
    assert 0.92 <= cover_paired <= 0.98


def test_sign_flip_pvalue():
    d = [0.25, 0.5, -0.25, 0.75, 0.5, 0.0, 0.25, 1.0, 0.5, 0.25]
    exact = stats.sign_flip_pvalue(d)
    # by hand: the share of the 2^10 sign patterns whose |mean| reaches the observed one
    hits = sum(abs(sum(s * x for s, x in zip(signs, d))) >= abs(sum(d)) - 1e-12
               for signs in itertools.product([1, -1], repeat=len(d)))
    assert exact == pytest.approx(hits / 2 ** len(d))
    assert exact < 0.05
    drawn = stats.sign_flip_pvalue(d * 2)  # 20 problems: random sign patterns
    assert 0 < drawn < 0.01
    assert stats.sign_flip_pvalue([0.0] * 30) == 1.0
    assert stats.sign_flip_pvalue([0.5, -0.5] * 15) == 1.0


def test_repeats_for_halfwidth_reaches_the_halfwidth():
    """The estimate from a 16-repeat pilot, then fresh runs at that many repeats: their paired
    intervals' half-width is about the target."""
    rng = np.random.default_rng(7)
    p = rng.beta(2, 2, size=400)  # a larger benchmark: the target is reachable by repeats
    q = np.clip(p + rng.normal(0, 0.05, size=p.size), 0, 1)
    pilot_a, pilot_b = rng.binomial(16, p) / 16, rng.binomial(16, q) / 16
    r = stats.repeats_for_halfwidth(pilot_a, pilot_b, 16, 16, halfwidth=0.02)
    assert 4 <= r < 200
    r = int(r)
    widths = []
    for seed in range(20):
        run = np.random.default_rng(100 + seed)
        a, b = run.binomial(r, p) / r, run.binomial(r, q) / r
        iv = stats.compare_paired(a, b, resamples=2000, seed=seed).difference
        widths.append((iv.high - iv.low) / 2)
    assert np.mean(widths) == pytest.approx(0.02, rel=0.2)
    # 30 problems whose differences vary a lot: no number of repeats gets to +/- 2 points
    a30, b30 = np.repeat([1.0, 0.0], 15), np.repeat([0.0, 1.0], 15)
    assert stats.repeats_for_halfwidth(a30, b30, 16, 16, 0.02) == math.inf
    with pytest.raises(ValueError, match="at least 2 repeats"):
        stats.repeats_for_halfwidth(a30, b30, 1, 16, 0.02)


def test_process_results_curves_use_the_judge():
    """The tasks' per-problem curves: pass@k from the count correct, maj@k as the majority of every
    k-subset of the answers, each subset voted on afresh by ``majority_answer`` (the judge's groups)."""
    from lm_eval_parathinker.scoring import extract_answer, majority_answer, process_results
    from lm_eval_parathinker.scoring.worker import judge

    resps = [r"\boxed{25}", r"\boxed{7}", r"\boxed{7.0}", "I give up", r"\boxed{025}"]
    m = process_results({"answer": "025"}, [resps])
    assert (m["pass_at_1"], m["pass_at_2"], m["pass_at_4"]) == pytest.approx((2 / 5, 1 - 3 / 10, 1.0))
    assert "pass_at_8" not in m and "maj_at_8" not in m  # k only up to n = 5
    answers = [extract_answer(r) for r in resps]
    for k in (1, 2, 4):
        votes = []
        for subset in itertools.combinations(answers, k):
            winner = majority_answer(list(subset))
            votes.append(winner is not None and judge(subset[winner], "025")[0])
        assert m[f"maj_at_{k}"] == pytest.approx(np.mean(votes)), k
    assert m["maj_at_1"] == m["pass_at_1"]
