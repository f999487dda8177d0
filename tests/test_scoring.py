"""Scoring: where the final answer is, the judge against the graded corpus, voting, metrics, the timeout."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from lm_eval_parathinker import scoring
from lm_eval_parathinker.data import iter_json_lines
from lm_eval_parathinker.scoring import FinalAnswer, extract_answer, is_equiv, majority_answer, process_results
from lm_eval_parathinker.scoring.answer import concluding_sentence, final_answer_statement, graded_text, last_box
from lm_eval_parathinker.scoring.normalize import normalize, number_in_text, thousands_separators, unicode_math

CORPUS = Path(__file__).with_name("scoring_corpus.jsonl")
CASE_FIELDS = {"response": str, "gold": str, "verdict": str, "class": str, "false_positive_prone": bool, "source": str}
VERDICTS = {"correct": True, "wrong": False}
# The classes of issue 9, every one of which the corpus must cover.
REQUIRED_CLASSES = {
    "matrix_vector", "tuple_point", "sign_reciprocal", "thousands", "no_box_sentence", "several_answers",
    "equivalent_forms", "parathinker", "aime_leading_zeros", "amc_float_gold", "approximation", "roots_sets",
    "intervals", "partial", "no_answer",
}  # fmt: skip
FALSE_POSITIVE_PRONE = {"matrix_vector", "tuple_point", "sign_reciprocal"}


def load_corpus(path: Path) -> list[dict]:
    """The graded cases of a JSONL corpus; a malformed line raises ``ValueError("<file>:<line>: ...")``."""
    cases, flag_of_class = [], {}
    for lineno, case in iter_json_lines(path):
        where = f"{path}:{lineno}"
        missing = [k for k in CASE_FIELDS if k not in case]
        unknown = sorted(set(case) - set(CASE_FIELDS) - {"note"})
        if missing or unknown:
            raise ValueError(f"{where}: missing field(s) {missing}, unknown field(s) {unknown}")
        wrong_type = [k for k, t in CASE_FIELDS.items() if not isinstance(case[k], t)]
        if wrong_type or not isinstance(case.get("note", ""), str):
            raise ValueError(f"{where}: wrong type for {wrong_type or ['note']}")
        if case["verdict"] not in VERDICTS:
            raise ValueError(f"{where}: verdict must be one of {sorted(VERDICTS)}, not {case['verdict']!r}")
        if flag_of_class.setdefault(case["class"], case["false_positive_prone"]) != case["false_positive_prone"]:
            raise ValueError(f"{where}: class {case['class']!r} is marked false_positive_prone inconsistently")
        case["line"] = lineno
        cases.append(case)
    return cases


def grade(case: dict) -> bool:
    return is_equiv(extract_answer(case["response"]), case["gold"])


def test_corpus_agreement():
    cases = load_corpus(CORPUS)
    classes = {c["class"] for c in cases}
    assert len(cases) >= 300 and classes >= REQUIRED_CLASSES
    assert {c["class"] for c in cases if c["false_positive_prone"]} == FALSE_POSITIVE_PRONE
    widths = {len(set(re.findall(r"<think(\d+)>", c["response"]))) for c in cases if c["class"] == "parathinker"}
    assert widths >= set(range(2, 9))  # transcripts with P = 2..8 paths

    misses = [c for c in cases if grade(c) != VERDICTS[c["verdict"]]]
    total, missed = Counter(c["class"] for c in cases), Counter(c["class"] for c in misses)
    agreement = 1 - len(misses) / len(cases)
    print(f"\nscorer agrees with the corpus verdicts on {len(cases) - len(misses)}/{len(cases)} = {agreement:.1%}")
    for cls in sorted(total):
        mark = " (false-positive prone)" if cls in FALSE_POSITIVE_PRONE else ""
        print(f"  {cls:20s} {total[cls] - missed[cls]:4d}/{total[cls]:<4d}{mark}")
    report = "\n".join(f"line {c['line']} [{c['class']}]: gold {c['gold']!r}, expected {c['verdict']}" for c in misses)
    assert agreement >= 0.99, report
    assert not [c for c in misses if c["false_positive_prone"]], report


GOOD_CASE = {"response": "x", "gold": "1", "verdict": "wrong", "class": "partial", "false_positive_prone": False,
             "source": "s"}


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"response": "x", "gold": ', "malformed JSON"),
        ('["x"]', "expected a JSON object"),
        (json.dumps({k: v for k, v in GOOD_CASE.items() if k != "source"}), "missing field"),
        (json.dumps({**GOOD_CASE, "gold": 1}), r"wrong type for \['gold'\]"),
        (json.dumps({**GOOD_CASE, "verdict": "right"}), "verdict must be one of"),
        (json.dumps({**GOOD_CASE, "false_positive_prone": True}), "class 'partial' is marked false_positive_prone"),
    ],
)
def test_corpus_errors_name_file_and_line(tmp_path, line, problem):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps(GOOD_CASE) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"corpus\.jsonl:2: {problem}"):
        load_corpus(corpus)


# ------------------------------------------------------------------------- where the final answer is
def test_graded_text():
    transcript = "<think1>a \\boxed{1}</think1><think2>b</think2><summary>The final answer is \\boxed{2}.</summary>"
    assert graded_text(transcript) == "The final answer is \\boxed{2}."
    assert graded_text("<think1>a \\boxed{1}</think1><think2>b \\boxed{1}</think2>") is None  # cut before the summary
    assert graded_text("<think1>a</think1><summary>S1</summary><summary>S2") == "S2"  # last summary, no closing tag
    assert graded_text("<think>scratch \\boxed{1}</think> The answer is 2.") == " The answer is 2."
    assert graded_text("<think>still thinking \\boxed{1}") is None
    assert graded_text("So it is 5.<|im_start|>user\nNext question: 7") == "So it is 5."
    assert graded_text("plain CoT ending in \\boxed{3}") == "plain CoT ending in \\boxed{3}"


@pytest.mark.parametrize(
    "text, content",
    [
        (r"so \boxed{7}. Wait, recheck: \boxed{204}", "204"),
        (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),
        (r"\boxed{\left\{1, 2\right\}}", r"\left\{1, 2\right\}"),  # escaped braces are not groups
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        (r"\fbox{12}", "12"),
        (r"thus \boxed 7.", "7"),
        (r"\boxed{3} and \boxed{5}", "3, 5"),  # one list
        (r"$$\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}$$", "(2, 2), (6, 2)"),
        (r"\boxed{7} ... \boxed{204}", "204"),  # "..." is not a list separator
        (r"first \boxed{3} then truncated \boxed{4", None),  # cut while writing the final box
        (r"\boxed{}", None),
    ],
)
def test_last_box(text, content):
    assert last_box(text)[0] == content


def test_no_box():
    assert last_box("no box here") is None


def test_final_answer_statement():
    assert final_answer_statement("Final Answer: 12\nCheck: $12 / 3 = 4$, as expected.") == "Final Answer: 12"
    on_next_line = "The final answer is:\n\n$$\\frac{14}{3}$$"
    assert final_answer_statement(on_next_line) == on_next_line
    text = r"So $\boxed{5}$. Hmm, the final answer is $7$."
    assert final_answer_statement(text, after=last_box(text)[2]) == "Hmm, the final answer is $7$."
    assert final_answer_statement("This answer is consistent with $x < 20$.") is None


@pytest.mark.parametrize(
    "text, sentence",
    [
        ("It was $xy$. Now it is $1.5xy$, so the area grows by 50%", "Now it is $1.5xy$, so the area grows by 50%"),
        ("We get $x=3$. Thus the number is **73**.", "Thus the number is **73**."),
        ("There are 12 such sequences. I hope it is correct.", "There are 12 such sequences."),
        ("The two cyclists meet 27 miles from City A.", "The two cyclists meet 27 miles from City A."),
        ("The secret code is QX7B.", None),  # a digit inside a word is no value
        ("First we find $3 \\times 4 = 12$, and then we add", None),  # cut off mid-sentence
        ("So 12 is one candidate, but we still need to check other cases.", None),
    ],
)
def test_concluding_sentence(text, sentence):
    assert concluding_sentence(text) == sentence


@pytest.mark.parametrize(
    "text, answer, from_sentence",
    [
        (r"so \boxed{7}. Wait, recheck: \boxed{204}", "204", False),
        ("So the count is $\\boxed{12}$.\n\nFinal Answer: The final answer is 15. I hope it is correct.",
         "Final Answer: The final answer is 15.", True),
        ("<think>Maybe \\boxed{3}?</think>\nThe answer is $\\boxed{5}$.", "5", False),
        ("<think1> \\boxed{25} </think1><think2> \\boxed{25} </think2>", None, None),
        ("<think1> \\boxed{25} </think1><summary>By analyzing ... The final answer is</summary>", None, None),
        ("Final Answer: The smallest $k$ is 12.", "Final Answer: The smallest $k$ is 12.", True),
        ("The secret code is QX7B.", None, None),
        ("", None, None),
        (None, None, None),
    ],
)
def test_extract_answer(text, answer, from_sentence):
    found = extract_answer(text)
    assert found == answer
    assert found is None or found.sentence is from_sentence


def test_thin_normalisations():
    assert unicode_math("30°") == r"30^\circ" and unicode_math("−5") == "-5"
    assert thousands_separators(r"2,\!024,\!000") == "2,024,000"
    assert thousands_separators(r"12\,345") == "12345" and thousands_separators("1 000 000") == "1000000"
    assert thousands_separators(r"3\,\sqrt{2}") == r"3\,\sqrt{2}"  # a thin space that separates no digits
    assert number_in_text(r"\text{6 ways}") == "6" and number_in_text("five") == "5"
    assert normalize(r"\[\frac{5}{18}.\]") == r"\[\frac{5}{18}\]" and normalize("**73**.") == "73"


EQUIV_CASES = [
    # (prediction, gold, expected): the rules math-verify lacks, one or two cases each
    ("0.333333", r"\frac13", False),  # approximations are wrong ...
    ("3.141593", r"\pi", False),
    ("0.5", r"\frac12", True),  # ... an exactly equal decimal is right
    ("27", "27.0", True),
    (r"12\,345", "12345", True),  # thin-space thousands
    ("30°", r"30^\circ", True),
    ("x > 5", r"(5,\infty)", True),  # a solved inequality is its interval ...
    ("x^2 > 25", r"(-\infty,-5)\cup(5,\infty)", False),  # ... a restated problem is not
    (r"\textbf{(C) }12", r"\text{(C)}", True),  # choice letters
    ("(D)", r"\text{(C)}", False),
    (r"\{1,2\}", "(1,2)", False),  # a set is not an ordered pair
    ("2", "2k", False),  # a variable is not a unit
    (r"\frac{1}{2^{98}}", r"\frac{1}{2^{99}}", False),  # tiny values
    ("", "5", False),
    (None, "5", False),
]


@pytest.mark.parametrize("pred, gold, expected", EQUIV_CASES)
def test_is_equiv(pred, gold, expected):
    assert is_equiv(pred, gold) is expected


@pytest.mark.slow
def test_math_verify_stays_out_of_the_evaluation_process():
    code = (
        "import sys; from lm_eval_parathinker import scoring; "
        "assert scoring.is_equiv('0.5', r'\\frac12'); print('math_verify' in sys.modules, 'sympy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ------------------------------------------------------------------------------- voting and metrics
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


def test_majority_uses_the_same_judge_as_correctness():
    # model.py's method=majority: majority_answer over extract_answer of each path's text
    texts = [r"\boxed{0.5}", "The final answer is $\\frac{1}{2}$.", r"\boxed{3}", r"\boxed{3.0}", r"\boxed{\frac{2}{4}}"]
    answers = [extract_answer(t) for t in texts]
    assert majority_answer(answers) == 0  # 0.5 = 1/2 = 2/4 (3 votes) beats 3 = 3.0 (2 votes)
    m = process_results({"answer": r"\frac12"}, [texts])
    assert (m["pass_at_1"], m["maj_at_k"]) == (pytest.approx(3 / 5), 1.0)
    # an approximation is a different answer for the vote too
    assert majority_answer(["0.333", r"\frac13", r"\frac{2}{6}"]) == 1
    assert majority_answer(["1", "2", "2.0", "1", None]) == 0  # tie -> earliest
    assert majority_answer([None, None]) is None
    assert majority_answer([]) is None
    assert isinstance(extract_answer(r"\boxed{3}"), FinalAnswer)


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


# -------------------------------------------------------------------------------- the hard timeout
def test_hard_timeout_kills_worker_and_scores_zero():
    v = scoring.get_verifier()
    before = v.timeouts
    m = scoring.score_responses([r"\boxed{\frac{1}{2}}"], "0.5", timeout=1e-6)
    assert m["pass_at_1"] == 0.0 and m["verify_timeouts"] >= 1
    assert v.timeouts > before and v._proc is None  # worker killed
    assert is_equiv(r"\frac{1}{2}", "0.5")  # restarted lazily, works again


def test_pathological_input_is_bounded():
    t = time.monotonic()
    is_equiv(r"5^{5^{5^{5^{5}}}}", r"5^{5^{5^{5^{6}}}}", timeout=3)
    assert time.monotonic() - t < 20
