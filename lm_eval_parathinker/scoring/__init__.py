"""Grading the ParaThinker math tasks as a careful human grader does.

* ``extract_answer(text)`` (``answer``): the final answer a response commits to: in a ParaThinker
  transcript only the ``<summary>``; the last box, unless an explicit final-answer sentence follows it;
  without a box, the final-answer sentence or a concluding sentence that ends on a value; else None.
* ``is_equiv(pred, gold)`` (``worker``): math-verify's parse and verify on both answers, plus the
  rules it lacks (``equivalence``: exact decimals, inequality vs interval, choice letters; ``normalize``:
  thin-space thousands, unicode), in a killable worker process with a hard per-answer timeout
  (``PARATHINKER_VERIFY_TIMEOUT`` seconds, default 10).
* ``majority_answer(answers)`` and ``maj_at_k`` group answers with that same judge.
* ``process_results(doc, results)`` (``metrics``): the per-problem metrics of the tasks (``METRICS``),
  with the pass@k and maj@k curves over k (``CURVE_KS``; estimators in ``lm_eval_parathinker.stats``).

Only the standard library and numpy are imported here; math-verify lives in the worker.
"""

from __future__ import annotations

from .answer import FinalAnswer, extract_answer
from .metrics import CURVE_KS, METRICS, majority_answer, process_results, score_responses
from .worker import DEFAULT_TIMEOUT, Verifier, get_verifier, is_equiv, judge

__all__ = [
    "CURVE_KS",
    "DEFAULT_TIMEOUT",
    "METRICS",
    "FinalAnswer",
    "Verifier",
    "extract_answer",
    "get_verifier",
    "is_equiv",
    "judge",
    "majority_answer",
    "process_results",
    "score_responses",
]
