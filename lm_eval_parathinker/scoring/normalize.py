"""Thin string rules applied to both answers before math-verify reads them (standard library only).

Each fixes a case where math-verify 0.9 reads a careful grader's "same number" differently
(see shared/reference/math-verify.md, behaviour catalogue).
"""

from __future__ import annotations

import re

# Unicode that LaTeX parsing does not read (math-verify leaves `30°` unparsed, `√2` too).
_UNICODE = {
    "\u2212": "-",  # minus sign
    "\u00b0": r"^\circ",
    "\u221a": r"\sqrt",
    "\u00bd": r"\frac{1}{2}",
    "\u221e": r"\infty",
    "\u2264": r"\le ",
    "\u2265": r"\ge ",
    "\u2009": " ",  # thin space
    "\u202f": " ",  # narrow no-break space
}
# A LaTeX thin space or group inside a number: `2,\!024,\!000`, `12\,345` (math-verify reads 12+345).
_THIN_SEPARATOR = re.compile(r"(?<=\d)(,?)(?:\\[,!; ]|~|\{,\})+(?=\d{3}(?!\d))")
_SPACE_THOUSANDS = re.compile(r"-?\d{1,3}(?: \d{3})+(?:\.\d+)?")
# `\text{6 ways}`: a number with its unit words inside \text (math-verify makes a symbol of it).
_NUMBER_IN_TEXT = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\s*\{\s*(-?[\d.,]+)\s+[A-Za-z ]*\}")
_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
).split()
_NUMBER_WORD = re.compile(rf"\s*(?:\\text\s*\{{\s*)?({'|'.join(_NUMBER_WORDS)})\s*\}}?\s*", re.IGNORECASE)
_TRAILING_PUNCTUATION = re.compile(r"(?<!\\)[.,;]\s*$")
# A full stop written inside the math: `\[\frac{5}{18}.\]`, `$20.$` (math-verify cannot parse `20.`).
_PERIOD_IN_MATH = re.compile(r"(?<!\\)\.\s*(?=\\\]|\\\)|\$\$|\$(?:\s|$))")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
# Spaces before a closing `$` (`$864 \mbox{ inches}^2 $`) keep math-verify from dropping the unit.
_SPACE_BEFORE_CLOSING_DOLLAR = re.compile(r"\s+\$(?=[\s.,;:!?)]|$)")


def unicode_math(s: str) -> str:
    """Unicode math characters as LaTeX."""
    return "".join(_UNICODE.get(c, c) for c in s)


def thousands_separators(s: str) -> str:
    """Drop thin spaces used as thousands separators; join a number grouped by plain spaces."""
    s = _THIN_SEPARATOR.sub(r"\1", s)
    return s.replace(" ", "") if _SPACE_THOUSANDS.fullmatch(s.strip()) else s


def number_in_text(s: str) -> str:
    """``\\text{6 ways}`` -> ``6``; a whole answer written as a word (``five``) -> ``5``."""
    word = _NUMBER_WORD.fullmatch(s)
    return str(_NUMBER_WORDS.index(word.group(1).lower())) if word else _NUMBER_IN_TEXT.sub(r"\1", s)


def punctuation(s: str) -> str:
    """Sentence punctuation and spaces inside or after the math, and Markdown bold (``**73**``), removed."""
    s = _PERIOD_IN_MATH.sub("", _SPACE_BEFORE_CLOSING_DOLLAR.sub("$", _BOLD.sub(r"\1", s)))
    return _TRAILING_PUNCTUATION.sub("", s.strip())


def normalize(s: str) -> str:
    """All thin rules, in order."""
    s = unicode_math(s).replace(r"\varnothing", r"\emptyset").replace(r"\bmod", r"\mod")
    return punctuation(number_in_text(thousands_separators(s)))
