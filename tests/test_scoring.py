"""Answer extraction, math-verify equivalence, pass@k / maj@k arithmetic, the hard verify timeout."""

from __future__ import annotations

import pytest

from lm_eval_parathinker import scoring
from lm_eval_parathinker.scoring import extract_answer, is_equiv, majority_answer, process_results

EQUIV_CASES = [
    # (prediction, gold, expected)
    ("025", "25", True),  # AIME leading zeros, both ways
    ("25", "025", True),
    ("7", "007", True),
    ("250", "025", False),
    ("0.5", r"\frac12", True),  # fraction vs decimal: exact value
    ("0.5", r"\frac{1}{2}", True),
    ("4.6667", r"\frac{14}{3}", False),  # a rounded decimal is not the fraction
    ("14/3", r"\frac{14}{3}", True),
    (r"\dfrac{14}{3}", r"\frac{14}{3}", True),
    ("1.5", r"\frac{3}{2}", True),
    ("27", "27.0", True),  # AMC answers stored as floats
    ("-1", "-1.0", True),
    (r"10\text{ cm}", "10", True),  # units
    (r"10 \text{cm}^2", "10", True),
    ("10 cm", "10", True),
    (r"\text{Evelyn}", r"\text{Evelyn}", True),
    ("Evelyn", r"\text{Evelyn}", True),
    ("Bob", r"\text{Evelyn}", False),
    ("x=5", "5", True),  # variable prefix
    ("x = 5", "5", True),
    ("5", "x=5", True),
    ("x=6", "5", False),
    ("y = 2x+3", "y=2x+3", True),
    ("(1,2)", "(1, 2)", True),  # tuples
    ("(2,1)", "(1,2)", False),
    (r"\left(3, \frac{\pi}{2}\right)", r"\left( 3, \frac{\pi}{2} \right)", True),
    ("[0,1)", "[0, 1)", True),  # intervals
    ("(0,1]", "[0,1]", False),
    (r"(-\infty, 3]", r"(-\infty,3]", True),
    (r"x \in [2, \infty)", r"[2,\infty)", True),
    (r"90^\circ", "90", True),  # degrees, percent, dollars
    (r"90^{\circ}", "90", True),
    (r"50\%", "50", True),
    (r"\$18.90", "18.90", True),
    ("1,000", "1000", True),  # thousands separator
    (r"\sqrt{2}/2", r"\frac{\sqrt2}{2}", True),
    (r"2\sqrt{3}", r"\sqrt{12}", True),
    (r"\frac{\pi}{2}", r"\pi/2", True),
    ("3", "4", False),
    (r"\frac{1}{3}", "0.33", False),
    ("", "5", False),
    (None, "5", False),
    (r"\{1,2\}", r"\{2,1\}", True),  # sets are unordered
]


@pytest.mark.parametrize("pred,gold,expected", EQUIV_CASES)
def test_is_equiv(pred, gold, expected):
    assert is_equiv(pred, gold) is expected


EXTRACT_CASES = [
    (r"so \boxed{7}. Wait, recheck: \boxed{204}", "204"),  # the LAST box counts
    (r"Path 1: \boxed{3}. Path 2: \boxed{5}. Summary: the answer is \boxed{5}.", "5"),
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),  # nested braces
    (r"\boxed{\left\{1, 2\right\}}", r"\left\{1, 2\right\}"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"\fbox{12}", "12"),
    (r"thus \boxed 7.", "7"),
    (r"first \boxed{3} then truncated \boxed{4", "3"),  # last *balanced* box
    ("so the answer is $42$.", "42"),  # no box: tail fallback
    ("</think> The final answer is 12", "12"),
    ("we get 3 apples and 17 pears", "17"),
    ("no digits at all", None),
    ("", None),
    (r"\boxed{}", None),
]


@pytest.mark.parametrize("text,expected", EXTRACT_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_pass_and_maj_arithmetic():
    doc = {"answer": "025"}
    resps = [r"\boxed{25}", r"\boxed{7}", r"\boxed{7.0}", "I give up", r"\boxed{025}"]
    m = process_results(doc, [resps])
    assert m["pass_at_1"] == pytest.approx(2 / 5)
    assert m["pass_at_k"] == 1.0
    assert m["maj_at_k"] == 1.0  # {25, 025} vs {7, 7.0}: tie -> earliest group (25) wins
    assert m["no_answer"] == pytest.approx(1 / 5)
    assert m["verify_timeouts"] == 0.0
    m = process_results(doc, [[r"\boxed{7}", r"\boxed{25}", r"\boxed{7}"]])
    assert (m["pass_at_1"], m["pass_at_k"], m["maj_at_k"]) == (pytest.approx(1 / 3), 1.0, 0.0)
    m = process_results(doc, [["nothing", "nothing"]])
    assert (m["pass_at_1"], m["pass_at_k"], m["maj_at_k"], m["no_answer"]) == (0.0, 0.0, 0.0, 1.0)
    # a single string (no take_first_k filter) is one sample
    assert process_results(doc, [r"\boxed{25}"])["pass_at_1"] == 1.0


def test_majority_answer():
    assert majority_answer(["1", "2", "2.0", "1", None]) == 0  # tie -> earliest
    assert majority_answer([None, "3", r"\frac{6}{2}", "4"]) == 1
    assert majority_answer([None, None]) is None
    assert majority_answer([]) is None


class Meta(str):
    meta: dict


def _with_meta(text, **meta):
    s = Meta(text)
    s.meta = meta
    return s


def test_meta_metrics():
    resps = [_with_meta(r"\boxed{1}", gen_tokens=10, latency_s=1.0, num_paths=4, label="x"),
             _with_meta(r"\boxed{2}", gen_tokens=30, latency_s=3.0, num_paths=4, think_tokens=7)]
    m = process_results({"answer": "1"}, [resps])
    assert m["gen_tokens"] == 20 and m["latency_s"] == 2.0 and m["num_paths"] == 4 and m["think_tokens"] == 7
    assert "label" not in m
    assert "gen_tokens" not in process_results({"answer": "1"}, [[r"\boxed{1}"]])


def test_hard_timeout_kills_worker_and_scores_zero():
    v = scoring.get_verifier()
    before = v.timeouts
    m = scoring.score_responses([r"\boxed{\frac{1}{2}}"], "0.5", timeout=1e-6)
    assert m["pass_at_1"] == 0.0 and m["verify_timeouts"] >= 1
    assert v.timeouts > before and v._proc is None  # worker killed
    assert is_equiv(r"\frac{1}{2}", "0.5")  # restarted lazily, works again


def test_pathological_input_is_bounded():
    import time

    t = time.monotonic()
    is_equiv(r"5^{5^{5^{5^{5}}}}", r"5^{5^{5^{5^{6}}}}", timeout=3)
    assert time.monotonic() - t < 20
