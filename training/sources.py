"""What ``--data`` / ``--eval-data`` name, and in which form their rows are.

Where the rows come from (:func:`open_source`):

* a ``save_to_disk`` folder (a ``DatasetDict`` folder gives its ``train`` split to ``--data``,
  ``test`` to ``--eval-data``; ``FOLDER/train`` names a split itself);
* local files: ``.jsonl`` / ``.json`` / ``.parquet`` (globs allowed);
* otherwise a hub dataset id with an optional split, ``owner/name[/split]``, through
  ``datasets.load_dataset`` (offline, ``HF_DATASETS_OFFLINE=1``, only what the datasets cache holds).

Which form the rows are in (:class:`Form`), from their columns: this project's records
(``problem``, ``paths``), pre-tokenized rows (``input_ids``, ``labels``), or transcripts (``text``,
``messages``, ``conversations``). A project JSONL file is read by :func:`training.data.load_records`
(errors name the file and line), the rest with ``datasets``.
"""

from __future__ import annotations

import enum
import glob
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .data import DataError, iter_json_lines, load_records

HUB_ID = re.compile(r"^([\w.-]+/[\w.-]+)(?:/([\w.-]+))?$")
_OTHER_FORM_COLUMNS = {"input_ids", "text", "messages", "conversations"}  # a JSONL without them: project records
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class Form(enum.Enum):
    RECORDS = "multi-path records (problem, paths)"
    TOKENIZED = "pre-tokenized ParaThinker rows (input_ids, labels)"
    TEXT = "transcript text (text)"
    MESSAGES = "chat transcripts (messages)"
    CONVERSATIONS = "chat transcripts (conversations)"
    RESPONSES = "responses (instruction_prompt or problem, response)"


@dataclass(frozen=True)
class Source:
    """The rows of ``--data`` (or ``--eval-data``), their form and where they came from."""

    spec: str  # as given
    origin: str  # e.g. "save_to_disk folder", "hub dataset Leslie04/parathinker-math-6K, split train"
    form: Form
    rows: Sequence[dict]  # a datasets.Dataset, or the rows of a project JSONL (records: validated)
    lines: Sequence[int] | None = None  # a JSONL file's line of each row (errors name it)


def form_of(columns: Sequence[str], spec: str) -> Form:
    """The form of rows with ``columns``."""
    cols = set(columns)
    if {"input_ids", "labels"} <= cols:
        return Form.TOKENIZED
    for form, column in ((Form.TEXT, "text"), (Form.MESSAGES, "messages"), (Form.CONVERSATIONS, "conversations")):
        if column in cols:
            return form
    if {"problem", "paths"} <= cols:
        return Form.RECORDS
    if "response" in cols:
        return Form.RESPONSES
    raise DataError(f"{spec}: columns {sorted(cols)} are none of the forms training.sft reads: problem+paths, "
                    "input_ids+labels, text, messages, conversations or response")


def _first_object(path: str) -> dict:
    for _, obj in iter_json_lines(path):
        return obj
    raise DataError(f"{path}: no records")


def _from_disk(folder: Path, spec: str, split: str):
    import datasets

    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{spec}: this DatasetDict has the splits {sorted(loaded)}, not {split!r}; "
                            f"name one as {spec}/SPLIT")
        return loaded[split], f"save_to_disk folder, split {split}"
    return loaded, "save_to_disk folder"


def _from_hub(repo: str, split: str, spec: str):
    import datasets

    try:
        return datasets.load_dataset(repo, split=split)
    except Exception as e:  # offline, missing, no such split ...
        first = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"{spec}: no such local file or folder, and the hub dataset {repo} (split {split}) cannot be "
                        f"loaded ({type(e).__name__}: {first}). Offline (HF_DATASETS_OFFLINE=1) it must be in the "
                        "datasets cache; or give a save_to_disk folder or local parquet/JSON files") from None


def open_source(spec: str, *, split: str) -> Source:
    """The rows that ``spec`` names (``split``: the split taken from a DatasetDict or hub id without one)."""
    import datasets

    path = Path(spec)
    files = sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else ([spec] if path.is_file() else [])
    if path.is_dir():
        if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            raise DataError(f"{spec}: a folder, but not one written by datasets' save_to_disk")
        rows, origin = _from_disk(path, spec, split)
    elif files:
        suffixes = {Path(f).suffix for f in files}
        if len(suffixes) != 1 or not suffixes <= set(_FILE_BUILDERS):
            raise DataError(f"{spec}: files must all be .jsonl, .json or .parquet (got {', '.join(sorted(suffixes))})")
        (suffix,) = suffixes
        first = set(_first_object(files[0])) if suffix == ".jsonl" and len(files) == 1 else None
        if first is not None and not _OTHER_FORM_COLUMNS & first:  # errors name file:line
            if "response" in first and "paths" not in first:
                lines, rows = zip(*iter_json_lines(files[0]))
                return Source(spec, "JSONL file", Form.RESPONSES, list(rows), lines)
            return Source(spec, "JSONL file", Form.RECORDS, load_records(files[0]))
        rows = datasets.load_dataset(_FILE_BUILDERS[suffix], data_files=files, split="train")
        origin = f"{len(files)} {suffix} file(s)"
    elif match := HUB_ID.fullmatch(spec):
        repo, named_split = match.groups()
        rows = _from_hub(repo, named_split or split, spec)
        origin = f"hub dataset {repo}, split {named_split or split}"
    else:
        raise DataError(f"{spec}: no such file or folder, and not a hub dataset id (owner/name[/split])")
    return Source(spec, origin, form_of(rows.column_names, spec), rows)


def _parser(source: Source, rows, tokenizer, model: str):
    """The function that turns one row of ``source`` into a training item (``ValueError``: the defect)."""
    from lm_eval_parathinker.protocol import ControlTokenIds, num_control_paths

    from .data import validate_record
    from .released import check_control_ids, parse_row
    from .transcripts import record_from_chat, record_from_text

    if source.form is Form.TOKENIZED:
        ids = ControlTokenIds.from_tokenizer(tokenizer)
        try:
            check_control_ids(rows, ids, model)
        except ValueError as e:
            raise DataError(f"{source.spec}: {e}") from None
        return lambda row: parse_row(row, ids, len(tokenizer))
    paths = num_control_paths(tokenizer)  # transcripts may open paths up to the tokenizer's <think K>
    if source.form is Form.TEXT:
        return lambda row: record_from_text(row["text"], paths)
    if source.form in (Form.MESSAGES, Form.CONVERSATIONS):
        column = "messages" if source.form is Form.MESSAGES else "conversations"
        return lambda row: record_from_chat(row[column], paths)
    return lambda row: validate_record(dict(row), "record")


def read_items(source: Source, tokenizer, *, model: str, skip_bad_rows: bool, fork_reader=None) -> tuple[list, int]:
    """The training items of ``source`` (records for :class:`~training.sequence.SequenceBuilder`,
    :class:`~training.released.TokenizedRow` for :class:`~training.released.TokenizedBuilder`,
    :class:`~training.fork_layouts.ForkItem` through ``fork_reader`` for ``--format``) and how
    many bad rows were skipped. A bad row raises ``DataError`` naming the data, the row (its file
    line, or 0-based index; and its ``id``) and the defect, unless ``skip_bad_rows``."""
    from tqdm.auto import tqdm

    if fork_reader is None and source.form is Form.RECORDS and isinstance(source.rows, list):
        return list(source.rows), 0  # a project JSONL file: validated line by line already
    if fork_reader is None and source.form is Form.RESPONSES:
        raise DataError(f"{source.spec}: responses with a format's tags ({source.form.value}) need --format")
    rows = source.rows.with_format("numpy") if source.form is Form.TOKENIZED else source.rows
    parse = (lambda row: fork_reader(row, source.form)) if fork_reader else _parser(source, rows, tokenizer, model)
    items, skipped = [], 0
    for i, row in enumerate(tqdm(rows, desc=f"reading {source.spec}", unit="row", mininterval=2)):
        try:
            items.append(parse(row))
        except ValueError as e:
            if not skip_bad_rows:
                where = f"{source.spec}:{source.lines[i]}" if source.lines else f"{source.spec} ({source.origin}): row {i}"
                name = f" (id {row['id']})" if isinstance(row, dict) and row.get("id") else ""
                raise DataError(f"{where}{name}: {e} (--skip-bad-rows skips such rows)") from None
            skipped += 1
    if not items:
        raise DataError(f"{source.spec}: no usable rows ({skipped} bad rows skipped)")
    return items, skipped
