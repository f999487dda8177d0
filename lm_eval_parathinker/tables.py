"""Result tables: every ``X.csv`` the package and its benchmarks write has ``X.md`` beside it, a
Markdown table of the same rows, rounded for reading, with the columns a reader needs (the docs
include it with ``--8<-- "results/X.md"``, so no results table is typed by hand).

Both files are written atomically (:func:`files.atomic_write`).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .files import atomic_write


def write_table(rows: Iterable[dict[str, Any]], path: str | os.PathLike, columns: Sequence[str],
                shown: Sequence[str] | None = None) -> None:
    """``path`` (a CSV of ``columns``) and the Markdown table of its ``shown`` columns (default: all)
    beside it (``path`` with ``.md``); both made before either is written."""
    rows = list(rows)
    table, markdown = csv_text(rows, columns), markdown_table(rows, shown or columns) + "\n"
    atomic_write(path, table)
    atomic_write(Path(path).with_suffix(".md"), markdown)


def write_csv(rows: Iterable[dict[str, Any]], path: str | os.PathLike, columns: Sequence[str]) -> None:
    """A CSV of ``columns`` alone: for a CSV whose ``.md`` is another table (an experiment's sweep)."""
    atomic_write(path, csv_text(rows, columns))


def csv_text(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    """The CSV of ``columns`` (a missing value: an empty cell)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: r.get(c, "") for c in columns} for r in rows)
    return buf.getvalue()


def read_csv(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, columns) of a CSV: its numbers as numbers (a table or a picture redrawn from it), the
    rest as text."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = [{k: _cell(v) for k, v in row.items()} for row in reader]
        return rows, list(reader.fieldnames or [])


def markdown_table(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``columns`` (headings as named), one line per row, cells ``readable``;
    numeric columns right-aligned."""
    rows = list(rows)
    cells = [[readable(r.get(c, "")) for c in columns] for r in rows]
    numeric = [all(_number(r.get(c, "")) is not None for r in rows if r.get(c, "") not in ("", None)) and
               any(r.get(c, "") not in ("", None) for r in rows) for c in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(line) + " |" for line in cells]
    return "\n".join(lines)


def readable(value: Any) -> str:
    """A cell for reading: integers whole, other numbers to 4 significant digits (from 1,000 up:
    whole), nan blank, text as it is (``|`` escaped)."""
    number = _number(value)
    if number is None:
        return str(value if value is not None else "").replace("|", "\\|").replace("\n", " ")
    if isinstance(number, int):
        return str(number)
    if math.isnan(number):
        return ""
    if math.isinf(number) or abs(number) < 1000:
        return f"{number:.4g}"
    return f"{number:.0f}"


def _cell(text: str) -> Any:
    number = _number(text)
    return text if number is None else number


def _number(value: Any) -> int | float | None:
    """``value`` as a number (a CSV's text included: "3" an int, "3.0" a float), else None; booleans
    are text."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and value.strip():
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return None


__all__ = ["csv_text", "markdown_table", "read_csv", "readable", "write_csv", "write_table"]
