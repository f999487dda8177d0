"""ParaThinker transcripts as text: records read from ``text`` or from a chat's assistant turn.

A transcript is ``[prompt] <think1> path </think1> <think2> ... </thinkP> <summary> ... </summary>``.
It is cut by the same reader as token ids (:func:`protocol.split_sequence`, over the text split at
its control tokens) and becomes a record that :class:`~training.sequence.SequenceBuilder`
tokenizes as a JSONL record:

* ``text`` column: the whole transcript; the text before ``<think1>`` is the literal prompt (as
  written, e.g. ``<｜User｜>... <｜Assistant｜><think>``; the layout's ids are added as for JSONL);
* ``messages`` (OpenAI style ``{"role", "content"}``) or ``conversations`` (ShareGPT style
  ``{"from", "value"}``): the last assistant turn is the transcript (at most ``<think>`` before
  ``<think1>``), the user turn before it the problem, which gets the ParaThinker prompt as a JSONL
  ``problem`` does; system turns are not used (the engine's prompt has none).

The summary is the text after ``<summary>`` without the forced template (when the transcript
spells it), as the JSONL ``summary``. Only whitespace may follow a ``</think k>`` or the
``</summary>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from lm_eval_parathinker import protocol

from .data import CONTROL_TOKEN, MIN_PATHS

_PIECES = re.compile(f"({CONTROL_TOKEN.pattern})")
_TEMPLATE_TAIL = protocol.SUMMARY_TEMPLATE[len(protocol.SUMMARY_OPEN):]
#: chat roles by field style: OpenAI (role/content) and ShareGPT (from/value)
_ROLE_NAMES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


def parse_transcript(text: str, num_control_paths: int = protocol.DEFAULT_NUM_CONTROL_PATHS) -> tuple[str, list[str], str]:
    """(prompt, path texts, summary text) of a transcript whose paths open with ``<think1>`` ..
    ``<thinkK>`` (K = ``num_control_paths``, the tokenizer's); ``ValueError`` names the defect."""
    pieces = _PIECES.split(text)
    opens = [protocol.think_open(k) for k in range(1, num_control_paths + 1)]
    closes = [protocol.think_close(k) for k in range(1, num_control_paths + 1)]
    if beyond := next((p for p in pieces[1::2] if p not in {*opens, *closes, protocol.SUMMARY_OPEN,
                                                              protocol.SUMMARY_CLOSE}), None):
        has = f"{opens[0]}..{opens[-1]}" if opens else "no control tokens"
        raise ValueError(f"{beyond}: the tokenizer has {has} (python -m training.sft --num-control-tokens K "
                         "gives it <think1>..<thinkK>)")
    hits = [(i, p) for i, p in enumerate(pieces) if p in {*opens, *closes, protocol.SUMMARY_OPEN}]
    split = protocol.split_sequence(hits, opens, closes, protocol.SUMMARY_OPEN)
    paths = []
    for span in split.paths:
        paths.append("".join(pieces[span.start + 1:span.close]))
        if "".join(pieces[span.close + 1:span.end]).strip():
            raise ValueError(f"text between {protocol.think_close(span.index)} and the next block")
    tail = pieces[split.summary_start + 1:]
    if protocol.SUMMARY_CLOSE not in tail:
        raise ValueError(f"{protocol.SUMMARY_OPEN} is not closed by {protocol.SUMMARY_CLOSE}")
    end = tail.index(protocol.SUMMARY_CLOSE)
    if "".join(tail[end + 1:]).strip():
        raise ValueError(f"text after {protocol.SUMMARY_CLOSE}")
    summary = "".join(tail[:end]).removeprefix(_TEMPLATE_TAIL)
    if not summary.strip():
        raise ValueError("the summary is empty")
    if len(paths) < MIN_PATHS:
        raise ValueError(f"{len(paths)} path(s); a record needs at least {MIN_PATHS}")
    return "".join(pieces[:split.prompt_end]), paths, summary


def record_from_text(text: object, num_control_paths: int = protocol.DEFAULT_NUM_CONTROL_PATHS) -> dict:
    """The record of a ``text`` transcript: its literal prompt, paths and summary."""
    if not isinstance(text, str):
        raise ValueError(f"'text' must be a string (got {type(text).__name__})")
    prompt, paths, summary = parse_transcript(text, num_control_paths)
    if not prompt.strip():
        raise ValueError(f"no prompt before {protocol.think_open(1)}")
    return {"prompt": prompt, "paths": paths, "summary": summary}


def last_exchange(turns: object) -> tuple[str, str]:
    """(user turn, assistant turn) of a chat (``messages`` or ``conversations``): its last
    assistant turn and the user turn before it; system turns are not used."""
    if not isinstance(turns, list) or not all(isinstance(t, Mapping) for t in turns):
        raise ValueError("a chat must be a list of turns")
    chat = []
    for i, turn in enumerate(turns):
        role, content = turn.get("role", turn.get("from")), turn.get("content", turn.get("value"))
        if role not in _ROLE_NAMES or not isinstance(content, str):
            raise ValueError(f"turn {i} needs a role (one of {', '.join(_ROLE_NAMES)}) and a text content")
        chat.append((_ROLE_NAMES[role], content))
    last = max((i for i, (role, _) in enumerate(chat) if role == "assistant"), default=None)
    user = next((c for role, c in reversed(chat[:last]) if role == "user"), None) if last is not None else None
    if user is None or not user.strip():
        raise ValueError("a chat needs a user turn followed by an assistant turn")
    return user, chat[last][1]


def record_from_chat(turns: object, num_control_paths: int = protocol.DEFAULT_NUM_CONTROL_PATHS) -> dict:
    """The record of a chat (``messages`` or ``conversations``): the problem and the transcript."""
    problem, assistant = last_exchange(turns)
    before, paths, summary = parse_transcript(assistant, num_control_paths)
    if before.replace(protocol.THINK_OPEN, "").strip():
        raise ValueError(f"the assistant turn has text before {protocol.think_open(1)}")
    return {"problem": problem, "paths": paths, "summary": summary}
