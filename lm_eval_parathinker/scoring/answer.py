"""Where a response states its final answer: the rules math-verify lacks (standard library only).

A careful grader reads only what a response commits to:

* ``graded_text``: in a ParaThinker transcript only the ``<summary>`` counts (no summary, no answer),
  in a forking format's response its answer region (after Parallel-R1's last ``</Summary>``,
  Multiverse's last ``</Parallel>``, NPR's last ``<takeaway>``);
  the base model's ``<think>`` block is a scratchpad superseded by what follows it.
* ``last_box``: the last ``\\boxed{}``/``\\fbox{}``, together with the boxes just before it that
  form one list with it (``\\boxed{3} and \\boxed{5}``); an unbalanced or empty last box is no answer.
* ``final_answer_statement``: "Final Answer: ...", "the final answer is ...", "the answer is ...":
  after the last box it is the final answer, and without a box it is the answer.
* ``concluding_sentence``: with neither, the last sentence when it ends on a value ("so the area grows
  by 50%"); a text cut off mid-sentence has no answer.

``extract_answer`` applies them in that order and returns a :class:`FinalAnswer`: a box's content
(LaTeX) or the sentence that states the answer, which math-verify reads in the worker.
"""

from __future__ import annotations

import re

from ..formats import format_of_text

# ParaThinker's control tokens (lm_eval_parathinker.protocol, not imported: it needs torch).
_PATH_OPEN = re.compile(r"<think\d+>")
_SUMMARY_OPEN = "<summary>"
_SUMMARY_CLOSE = "</summary>"
_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"

_BOX = re.compile(r"\\(?:boxed|fbox)\b")
# Text allowed between boxes that form one list: separators and spacing only.
_LIST_GAP = re.compile(r"(?:\s|\$|\\\[|\\\]|\\\(|\\\)|,|;|\\quad|\\qquad|\\[ ,;!]|\\text\{\s*(?:and|or)?\s*\}|and|or)*")
_STATEMENT = re.compile(
    r"final answer(?:\s*is\b)?\s*:?|\b(?:the|my|our) answer is\b\s*:?|\banswer\s*(?:is\s*)?:", re.IGNORECASE
)
# Math delimiters, paired by _mask_math so that a period inside `$...$` or `\[...\]` ends no sentence.
_MATH_DELIMITER = re.compile(r"\\\$|\$\$|\$|\\\[|\\\]|\\\(|\\\)")
_MATH_CLOSER = {"$$": "$$", "$": "$", "\\[": "\\]", "\\(": "\\)"}
_SENTENCE_END = re.compile(r"[.!?](?=\s)|\n")
# A value at the end of the last sentence, possibly followed by one clause of words (units, "...is
# the solution") before the full stop: "so 12 is one candidate, but ..." does not end on a value.
# Spans are bounded so that a long unclosed `\[` costs linear time.
_VALUE = (
    r"(?:\$\$.{1,2000}?\$\$|\$[^$]{1,2000}\$|\\\[.{1,2000}?\\\]|\\\(.{1,2000}?\\\)|\*\*[^*]{1,200}\*\*"
    r"|(?<![A-Za-z0-9])-?\d[\d,]*(?:\.\d+)?(?:/\d+)?)"
)
_ENDS_ON_VALUE = re.compile(rf"{_VALUE}\s*(?:%|\\%|percent)?(?:[^,;:\n$\\]{{0,100}}?[.!])?\s*$", re.DOTALL)
_TAIL = 3000  # characters of the last sentence in which its final value is looked for
_SIGN_OFF = re.compile(r"\s*(?:I hope (?:it|this|that) is correct|Hope (?:this|it) helps)\s*[.!]?\s*$", re.IGNORECASE)
# Generation that ran on into a new chat turn: nothing after it belongs to the answer.
_CHAT_TOKEN = re.compile(r"<\|[A-Za-z_]+\|>")


class FinalAnswer(str):
    """The final answer of a response as written: a box's content (LaTeX), or, for an answer stated
    without a box, the sentence that states it (``sentence=True``; math-verify picks the value)."""

    sentence: bool

    def __new__(cls, text: str, sentence: bool = False) -> FinalAnswer:
        answer = super().__new__(cls, text)
        answer.sentence = sentence
        return answer


def graded_text(text: str) -> str | None:
    """The part of a response a grader reads, or None when the response has no final part.

    A forking format's response (Parallel-R1, Multiverse, NPR: :func:`formats.format_of_text`): its
    answer region (:meth:`formats.Format.answer_region`). ParaThinker transcript: the text after the
    last ``<summary>`` (up to ``</summary>``; a stop string may have removed it). Otherwise the text after the last ``</think>``; a response still
    inside an unclosed ``<think>`` was cut off while thinking. A response that ran on into a new chat
    turn (``<|im_start|>user``) ends there.
    """
    text = _CHAT_TOKEN.split(text, 1)[0]
    fork_format = format_of_text(text)
    if fork_format is not None:  # a format whose model forks: its own answer region
        return fork_format.answer_region(text)
    summary = text.rfind(_SUMMARY_OPEN)
    if summary >= 0:
        return text[summary + len(_SUMMARY_OPEN):].split(_SUMMARY_CLOSE, 1)[0]
    if _PATH_OPEN.search(text):
        return None  # cut off before the summary: the paths' answers do not count
    think_end = text.rfind(_THINK_CLOSE)
    if think_end >= 0:
        return text[think_end + len(_THINK_CLOSE):]
    if _THINK_OPEN in text:
        return None
    return text


def _box_content(text: str, start: int) -> tuple[str, int] | None:
    """(content, end) of the box whose command starts at ``start``; None when unbalanced.

    ``\\boxed 5`` (no braces) holds the next token.
    """
    i = text.find("{", start)
    command_end = start + len("\\boxed") if text.startswith("\\boxed", start) else start + len("\\fbox")
    if i < 0 or text[command_end:i].strip():
        token = re.match(r"\s+([^\s$]+)", text[command_end:])
        return (token.group(1).rstrip(".,;"), command_end + token.end()) if token else None
    depth, j = 0, i
    while j < len(text):
        if text[j] == "\\":
            j += 2  # an escaped character: \{ and \} are set braces, not groups
            continue
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j], j + 1
        j += 1
    return None


def last_box(text: str) -> tuple[str | None, int, int] | None:
    """(content, start, end) of the final boxed answer; None when the text has no box.

    Content is None when the last box is unbalanced or empty: the response was cut off while writing
    its final answer. Boxes separated from the last one by list separators only (``,``, ``and``,
    ``\\quad``) are part of it: their contents are joined with ", ".
    """
    starts = [m.start() for m in _BOX.finditer(text)]
    if not starts:
        return None
    last = _box_content(text, starts[-1])
    if last is None or not last[0].strip():
        return None, starts[-1], len(text)
    contents, first_start, end = [last[0]], starts[-1], last[1]
    for start in reversed(starts[:-1]):
        box = _box_content(text, start)
        if box is None or not _LIST_GAP.fullmatch(text[box[1]:first_start]):
            break
        contents.insert(0, box[0])
        first_start = start
    return ", ".join(c.strip() for c in contents), first_start, end


def _mask_math(text: str) -> str:
    """``text`` with every closed math span replaced by ``x``s of the same length (one linear pass)."""
    out, opened = list(text), None
    for m in _MATH_DELIMITER.finditer(text):
        delimiter = m.group()
        if opened is None and delimiter in _MATH_CLOSER:
            opened = (delimiter, m.start())
        elif opened is not None and delimiter == _MATH_CLOSER[opened[0]]:
            out[opened[1]:m.end()] = "x" * (m.end() - opened[1])
            opened = None
    return "".join(out)


def _sentence_ends(text: str, start: int = 0) -> list[int]:
    """Positions where sentences end after ``start`` (sentence ends inside math spans don't count)."""
    return [m.end() for m in _SENTENCE_END.finditer(_mask_math(text), start)]


def _sentence_start(text: str, pos: int) -> int:
    """Start of the sentence that contains ``pos``."""
    return max((end for end in _sentence_ends(text) if end <= pos), default=0)


def final_answer_statement(text: str, after: int = 0) -> str | None:
    """The last explicit answer statement ("Final Answer: ...") that starts at or after ``after``:
    from the start of its sentence (or ``after``) to the end of the first sentence that says
    something after the anchor, so that a check written after it ("Check: $12/3 = 4$") is not read
    as the answer. None when nothing follows the anchor ("The final answer is</summary>")."""
    matches = list(_STATEMENT.finditer(text, after))
    if not matches:
        return None
    anchor = matches[-1]
    start = max(after, _sentence_start(text, anchor.start()))
    for end in _sentence_ends(text, anchor.end()) + [len(text)]:
        if re.search(r"[A-Za-z0-9]", text[anchor.end():end]):
            return text[start:end].strip()
    return None


def concluding_sentence(text: str) -> str | None:
    """The last sentence when it ends on a value (a closing "I hope it is correct." aside); None for
    a text cut off mid-sentence."""
    text = text.rstrip()
    while (sign_off := _SIGN_OFF.search(text)) and sign_off.start() > 0:
        text = text[:sign_off.start()].rstrip()
    sentence = text[_sentence_start(text, len(text)):].strip()
    return sentence if _ENDS_ON_VALUE.search(sentence[-_TAIL:]) else None


def extract_answer(text: str | None) -> FinalAnswer | None:
    """The answer a response commits to (see the module docstring), or None."""
    graded = graded_text(str(text)) if text else None
    if not graded or not graded.strip():
        return None
    box = last_box(graded)
    if box is not None:
        content, _, end = box
        statement = final_answer_statement(graded, after=end)
        if statement is not None:
            return FinalAnswer(statement, sentence=True)
        return FinalAnswer(content.strip()) if content is not None else None
    statement = final_answer_statement(graded)
    if statement is not None:
        return FinalAnswer(statement, sentence=True)
    sentence = concluding_sentence(graded)
    return FinalAnswer(sentence, sentence=True) if sentence else None
