"""Benchmark data for the ParaThinker math tasks (``custom_dataset`` loaders for lm-eval).

Each loader returns ``{"test": datasets.Dataset}`` with (at least) the columns ``problem`` and ``answer``
(``answer`` always a string, e.g. AIME's ``"025"`` is kept as is).

Where the rows come from, in order:

1. ``data_dir`` from ``--metadata '{"data_dir": "/path"}'`` (lm-eval passes task metadata as keyword
   arguments to ``custom_dataset``);
2. the environment variable ``PARATHINKER_DATA_DIR``;
3. the public Hugging Face hub dataset (see ``HUB_SOURCES``).

An offline folder must hold ``aime24.jsonl``, ``aime25.jsonl``, ``amc23.jsonl`` and ``math500.jsonl``,
one JSON object per line with ``problem`` and ``answer`` (and ``train/gsm8k_test.jsonl`` for
:func:`load_gsm8k`, as ``shared/data`` has it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV_VAR = "PARATHINKER_DATA_DIR"

#: benchmark name -> list of (hub dataset id, config name, split, problem field, answer field), tried in order
HUB_SOURCES: dict[str, list[tuple[str, str | None, str, str, str]]] = {
    "aime24": [
        ("HuggingFaceH4/aime_2024", None, "train", "problem", "answer"),
        ("Maxwell-Jia/AIME_2024", None, "train", "Problem", "Answer"),
    ],
    "aime25": [("math-ai/aime25", None, "test", "problem", "answer")],
    "amc23": [("math-ai/amc23", None, "test", "question", "answer")],
    "math500": [("HuggingFaceH4/MATH-500", None, "test", "problem", "answer")],
}

_PROBLEM_KEYS = ("problem", "Problem", "question", "Question")
_ANSWER_KEYS = ("answer", "Answer")


class DataUnavailableError(RuntimeError):
    """Neither the offline folder nor the Hugging Face hub could provide a benchmark."""


def _answer_str(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def normalise_row(row: dict, where: str = "") -> dict:
    """Map a raw row to ``problem``/``answer`` (string); other fields are kept (as strings if not scalar)."""
    problem = next((row[k] for k in _PROBLEM_KEYS if k in row and row[k] is not None), None)
    answer = next((row[k] for k in _ANSWER_KEYS if k in row and row[k] is not None), None)
    missing = [n for n, v in (("problem", problem), ("answer", answer)) if v is None]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)} (have: {sorted(row)})")
    out = {"problem": str(problem), "answer": _answer_str(answer)}
    if "id" in row:
        out["id"] = str(row["id"])
    return out


def iter_json_lines(path: str | os.PathLike, error: type[ValueError] = ValueError) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file; a missing file or a bad line
    raises ``error("<file>:<line>: ...")``."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise error(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read and normalise a benchmark JSONL file; a bad line raises ``ValueError("<file>:<line>: ...")``."""
    rows = [normalise_row(obj, where=f"{path}:{lineno}") for lineno, obj in iter_json_lines(path)]
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The offline data folder: the ``data_dir`` argument, else ``$PARATHINKER_DATA_DIR``, else ``None``."""
    d = data_dir if data_dir not in (None, "") else os.environ.get(ENV_VAR) or None
    return Path(os.path.expanduser(str(d))) if d else None


def _load_from_hub(name: str) -> list[dict]:
    """Rows of benchmark ``name`` from the HF hub (tries each source in turn); raises on failure."""
    import datasets

    errors = []
    for repo, config, split, pkey, akey in HUB_SOURCES[name]:
        try:
            ds = datasets.load_dataset(repo, config, split=split)
        except Exception as e:  # offline, missing, renamed ...
            errors.append(f"{repo}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        rows = []
        for i, r in enumerate(ds):
            r = dict(r)
            if pkey in r and "problem" not in r:
                r["problem"] = r[pkey]
            if akey in r and "answer" not in r:
                r["answer"] = r[akey]
            rows.append(normalise_row(r, where=f"{repo}[{split}] row {i}"))
        return rows
    raise ConnectionError("; ".join(errors))


def load_rows(name: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Normalised rows of benchmark ``name`` (``aime24``, ``aime25``, ``amc23`` or ``math500``)."""
    if name not in HUB_SOURCES:
        raise KeyError(f"unknown benchmark {name!r}; expected one of {sorted(HUB_SOURCES)}")
    folder = resolve_data_dir(data_dir)
    if folder is not None:
        file = folder / f"{name}.jsonl"
        if not file.is_file():
            raise DataUnavailableError(
                f"{name}: offline data file {file} not found (data folder from "
                f"{'--metadata data_dir' if data_dir else '$' + ENV_VAR}). The folder must contain "
                f"{', '.join(k + '.jsonl' for k in HUB_SOURCES)}."
            )
        return read_jsonl(file)
    try:
        return _load_from_hub(name)
    except Exception as e:
        ids = " or ".join(src[0] for src in HUB_SOURCES[name])
        raise DataUnavailableError(
            f"{name}: cannot load the dataset {ids} from the Hugging Face hub ({e}). To run offline, "
            f"set {ENV_VAR}=/path/to/folder (or pass --metadata '{{\"data_dir\": \"/path/to/folder\"}}') "
            f"where the folder holds {name}.jsonl with 'problem' and 'answer' fields."
        ) from None


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, **_: Any) -> dict:
    """``{"test": datasets.Dataset}`` for benchmark ``name``."""
    import datasets

    rows = load_rows(name, data_dir)
    return {"test": datasets.Dataset.from_list(rows)}


# lm-eval calls custom_dataset(**metadata, **dataset_kwargs): metadata holds model_args, version, etc.
def load_aime24(data_dir=None, **kwargs: Any) -> dict:
    return load_dataset("aime24", data_dir)


def load_aime25(data_dir=None, **kwargs: Any) -> dict:
    return load_dataset("aime25", data_dir)


def load_amc23(data_dir=None, **kwargs: Any) -> dict:
    return load_dataset("amc23", data_dir)


def load_math500(data_dir=None, **kwargs: Any) -> dict:
    return load_dataset("math500", data_dir)


GSM8K_HUB = ("openai/gsm8k", "main", "test")
GSM8K_FILE = "train/gsm8k_test.jsonl"  # in the offline folder: GSM8K's test split, with its final answer as 'final'


def load_gsm8k(data_dir=None, **kwargs: Any) -> dict:
    """GSM8K's test split as ``question`` (lm-eval's gsm8k prompt reads it), ``problem`` (the same:
    what a forking format's prompt takes) and ``answer``, the final number (the text after
    ``####``): from ``<data dir>/train/gsm8k_test.jsonl``, else the hub's openai/gsm8k."""
    import datasets

    folder = resolve_data_dir(data_dir)
    if folder is not None:
        file = folder / GSM8K_FILE
        if not file.is_file():
            raise DataUnavailableError(f"gsm8k: offline data file {file} not found (data folder from "
                                       f"{'--metadata data_dir' if data_dir else '$' + ENV_VAR})")
        raw = [obj for _, obj in iter_json_lines(file)]
    else:
        try:
            raw = list(datasets.load_dataset(GSM8K_HUB[0], GSM8K_HUB[1], split=GSM8K_HUB[2]))
        except Exception as e:
            raise DataUnavailableError(f"gsm8k: cannot load {GSM8K_HUB[0]} from the Hugging Face hub ({e}); set "
                                       f"{ENV_VAR} to a folder holding {GSM8K_FILE}") from None
    rows = [{"id": str(r.get("id", i)), "question": r["question"], "problem": r["question"],
             "answer": r["answer"].split("####")[-1].strip()} for i, r in enumerate(raw)]
    return {"test": datasets.Dataset.from_list(rows)}
