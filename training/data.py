"""Multi-path SFT records: the JSONL format, its loader and converters from the shared sources.

One record a line::

    {"problem": str, "answer": str, "paths": [str, str, ...], "summary": str (optional), ...}

``paths`` are 2+ independent solutions of the problem. ``summary`` (optional) is the text that
follows the forced summary template; without it the summary is `` \\boxed{answer}``. Other fields
(``id``, ``provenance``...) are kept and ignored by training.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from lm_eval_parathinker.data import iter_json_lines as read_json_lines
from lm_eval_parathinker.files import atomic_write

MIN_PATHS = 2
#: any ParaThinker control token (<think k>, </think k> for every k, <summary>, </summary>): a path
#: text must spell none, whatever number of them the tokenizer has
CONTROL_TOKEN = re.compile(r"</?think[1-9]\d*>|</?summary>")
_THINK_MARKERS = re.compile(r"</?think>")


class DataError(ValueError):
    """A malformed input file; the message starts with ``file:line:``."""


def run_cli(body: Callable[[], object]) -> int:
    """Run a command's body; a :class:`DataError` prints ``error: ...`` and gives exit code 2."""
    try:
        body()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; bad JSON raises ``DataError(file:line: ...)``."""
    return read_json_lines(path, DataError)


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def control_token_in(text: str) -> str | None:
    """The first ParaThinker control token spelled inside ``text`` (it would tokenize as one)."""
    match = CONTROL_TOKEN.search(text)
    return match.group() if match else None


def validate_record(obj: dict, where: str) -> dict:
    """Check one record; raise ``DataError(f"{where}: field ...")`` naming the first bad field."""
    for name in ("problem", "answer"):
        if not _nonempty_str(obj.get(name)):
            raise DataError(f"{where}: field '{name}' must be a non-empty string (got {obj.get(name)!r:.60})")
    paths = obj.get("paths")
    if not isinstance(paths, list) or len(paths) < MIN_PATHS:
        got = f"{len(paths)} entries" if isinstance(paths, list) else type(paths).__name__
        raise DataError(f"{where}: field 'paths' must be a list of at least {MIN_PATHS} strings (got {got})")
    for i, p in enumerate(paths, 1):
        if not _nonempty_str(p):
            raise DataError(f"{where}: field 'paths' entry {i} must be a non-empty string")
        if token := control_token_in(p):
            raise DataError(f"{where}: field 'paths' entry {i} contains the control token {token!r}")
    if "summary" in obj and not isinstance(obj["summary"], str):
        raise DataError(f"{where}: field 'summary' must be a string")
    return obj


def load_records(path: str | os.PathLike) -> list[dict]:
    """All records of a multi-path JSONL file, validated (``DataError`` on the first bad line)."""
    records = [validate_record(obj, f"{path}:{lineno}") for lineno, obj in iter_json_lines(path)]
    if not records:
        raise DataError(f"{path}: no records")
    return records


def clean_path_text(text: str) -> str:
    """A teacher sample as a path: the base model's ``<think>``/``</think>`` markers removed (at
    inference ``</think>`` would end the path before the final answer) and whitespace trimmed."""
    return _THINK_MARKERS.sub("\n", text).strip()


# -- converters from /work/shared/data/train --------------------------------------------------


def from_maj8(obj: dict, where: str) -> dict | None:
    """qwen25math_maj8_samples row -> record: its correct samples (``scores``) become the paths."""
    responses, scores = obj.get("responses"), obj.get("scores")
    if not isinstance(responses, list) or not isinstance(scores, list) or len(responses) != len(scores):
        raise DataError(f"{where}: fields 'responses' and 'scores' must be lists of the same length")
    paths = [clean_path_text(r) for r, ok in zip(responses, scores) if ok is True]
    paths = [p for p in paths if p and control_token_in(p) is None]
    return _record(obj, paths, "qwen25math_maj8_samples (Qwen2.5-Math-Instruct, T=0.7, top_p=0.8)")


def from_parallel_r1(obj: dict, where: str) -> dict | None:
    """parallel_r1_gsm8k_sft row -> record. Path k is the text before the first ``<Parallel>``
    (the shared setup the paths build on) followed by the k-th ``<Path>`` of every parallel block,
    so each path reads as one thread through the response; rows without blocks are dropped."""
    blocks = obj.get("parallel_blocks")
    if not isinstance(blocks, list) or not all(isinstance(b, list) for b in blocks):
        raise DataError(f"{where}: field 'parallel_blocks' must be a list of lists of strings")
    if not blocks:
        return None
    width = min(len(b) for b in blocks)
    setup = str(obj.get("response", "")).split("<Parallel>", 1)[0].strip()
    paths = ["\n\n".join([setup, *(str(b[k]).strip() for b in blocks)]).strip() for k in range(width)]
    return _record(obj, paths, "Parallel-R1 GSM8K SFT (DeepSeek-R1-0528-Qwen3-8B)")


def _record(obj: dict, paths: list[str], teacher: str) -> dict | None:
    if len(paths) < MIN_PATHS:
        return None
    return {
        "id": obj.get("id"),
        "problem": obj["problem"],
        "answer": str(obj["answer"]),
        "paths": paths,
        "provenance": {"teacher": teacher},
    }


CONVERTERS = {"maj8": from_maj8, "parallel_r1": from_parallel_r1}


def detect_format(obj: dict, where: str) -> str:
    """Which converter a source row needs, from its fields."""
    if "responses" in obj and "scores" in obj:
        return "maj8"
    if "parallel_blocks" in obj:
        return "parallel_r1"
    raise DataError(
        f"{where}: unknown source format (need 'responses'+'scores' or 'parallel_blocks'; have {sorted(obj)})"
    )


def convert(path: str | os.PathLike) -> tuple[list[dict], int]:
    """Convert a whole source file; returns (records, number of rows dropped for < 2 paths)."""
    records, dropped = [], 0
    for lineno, obj in iter_json_lines(path):
        where = f"{path}:{lineno}"
        for name in ("problem", "answer"):
            if obj.get(name) in (None, ""):
                raise DataError(f"{where}: field '{name}' is missing or empty")
        record = CONVERTERS[detect_format(obj, where)](obj, where)
        if record is None:
            dropped += 1
        else:
            records.append(validate_record(record, where))
    return records, dropped


def write_jsonl_atomic(records: Iterable[dict], path: str | os.PathLike) -> None:
    """Write all records as JSON lines, all or nothing (:func:`~lm_eval_parathinker.files.atomic_write`)."""
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
