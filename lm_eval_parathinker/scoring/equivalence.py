"""Is a final answer equal to the gold answer? math-verify's parse and verify, plus the grading rules
it lacks. Runs only inside the worker process (lm_eval_parathinker.scoring.worker): math-verify and
sympy stay out of the evaluation process.
"""

from __future__ import annotations

import logging
import re

import sympy
from latex2sympy2_extended.latex2sympy2 import NormalizationConfig
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from .normalize import normalize

logging.getLogger("math_verify").setLevel(logging.ERROR)  # it logs every unparsable answer


def _latex_config(units: bool) -> LatexExtractionConfig:
    # boxed_match_priority=0: a box beats every other pattern in a stated answer.
    return LatexExtractionConfig(
        boxed_match_priority=0,
        normalization_config=NormalizationConfig(
            basic_latex=True, units=units, malformed_operators=True, nits=True, boxed="all", equations=False
        ),
    )


# units=False when the gold holds a variable: the unit stripper would read `2k` as 2.
_LATEX = {units: _latex_config(units) for units in (True, False)}
_EXPR = ExprExtractionConfig()
_COMMAND = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox|operatorname)\s*\{[^{}]*\}|\\[A-Za-z]+")
_CHOICE = re.compile(r"\s*(?:\\text(?:bf|rm)?\s*\{\s*)?\(?\s*([A-E])\s*\)?\s*\}?\s*")
_CHOICE_LABEL = re.compile(r"\s*(?:\\text(?:bf|rm)?\s*\{\s*\(([A-E])\)[^}]*\}|\(([A-E])\))")
# A choice letter in a stated answer: "(C)", "\\text{(C)}", "$C$".
_CHOICE_IN_SENTENCE = re.compile(r"\(([A-E])\)|\\text(?:bf|rm)?\{\s*\(?([A-E])\)?\s*\}|\$\s*([A-E])\s*\$")
_ORDERED_PAIR = re.compile(r"\s*(?:\\left)?\(")
_SET_BRACES = re.compile(r"\s*(?:\\left)?\\\{")


def has_variable(latex: str) -> bool:
    """Whether a letter remains once LaTeX commands and \\text{} are removed (``2k``, ``x=5``)."""
    return re.search(r"[A-Za-z]", _COMMAND.sub("", latex)) is not None


def parse_answer(text: str, sentence: bool, units: bool, gold: bool = False) -> list:
    """math-verify's parse of an answer: a box's content or a gold answer is LaTeX (read as one
    ``$...$``), a sentence is read with math-verify's own answer patterns (LaTeX, then numbers)."""
    if sentence:
        return parse(normalize(text), [_LATEX[units], _EXPR], extraction_mode="first_match")
    latex = " ".join(normalize(text).split())  # an inline $...$ is one line
    return parse(f"${latex}$", [_LATEX[units]], extraction_mode="any_match" if gold else "first_match")


def exact_decimals(parsed: list) -> list:
    """Decimals as the exact rationals they denote, so that 0.333333 is not 1/3 and 3.14 is not pi
    (math-verify compares floats at six digits); 0.5 still equals 1/2 and 27.0 equals 27."""
    out = []
    for value in parsed:
        if isinstance(value, (sympy.Basic, sympy.MatrixBase)):
            floats = value.atoms(sympy.Float)
            value = value.xreplace({f: sympy.Rational(str(f)) for f in floats}) if floats else value
        out.append(value)
    return out


def solved_inequality(parsed: list) -> bool:
    """Whether the answer is an inequality solved for one variable (``x > 5``, ``-2 \\le x \\le 7``),
    which may be compared with an interval; ``x^2 > 4`` restates the problem and may not."""
    value = parsed[0] if parsed else None
    parts = value.args if isinstance(value, sympy.And) else (value,)
    def solved(part) -> bool:
        sides = ((part.lhs, part.rhs), (part.rhs, part.lhs))
        return any(isinstance(side, sympy.Symbol) and not other.free_symbols for side, other in sides)

    return all(isinstance(part, sympy.core.relational.Relational) and solved(part) for part in parts)


def choice_letter(gold: str, pred: str, pred_sentence: bool) -> bool | None:
    """For a multiple-choice gold (``\\text{(C)}``): whether the prediction names that letter
    (``C``, ``(C)``, ``\\textbf{(C) }12``, "The answer is (C)."); None when the gold is not a letter."""
    gold_letter = _CHOICE.fullmatch(gold)
    if gold_letter is None:
        return None
    if pred_sentence:
        pred_letter = ([None] + list(_CHOICE_IN_SENTENCE.finditer(pred)))[-1]
    else:
        pred_letter = _CHOICE.fullmatch(pred) or _CHOICE_LABEL.match(pred)
    return pred_letter is not None and next(g for g in pred_letter.groups() if g) == gold_letter.group(1)


def equivalent(gold: str, gold_sentence: bool, pred: str, pred_sentence: bool) -> bool:
    """Whether ``pred`` states the value ``gold`` states (both as ``FinalAnswer`` text and kind)."""
    if not gold_sentence:
        letter = choice_letter(gold, pred, pred_sentence)
        if letter is not None:
            return letter
        if not pred_sentence and _ORDERED_PAIR.match(gold) and _SET_BRACES.match(pred):
            return False  # a set {1, 2} is never the ordered pair (1, 2)
    units = not has_variable(gold) if not gold_sentence else True
    gold_parsed = exact_decimals(parse_answer(gold, gold_sentence, units, gold=True))
    pred_parsed = exact_decimals(parse_answer(pred, pred_sentence, units))
    if not gold_parsed or not pred_parsed:
        return False
    # numeric_precision=50: math-verify's default (15 digits) chops 1/2^99 - 1/2^98 to zero
    solved = solved_inequality(pred_parsed)
    return bool(verify(gold_parsed, pred_parsed, numeric_precision=50, allow_set_relation_comp=solved))
