"""Paired comparisons (``--compare``): for every pair of runs of a task with the same problems (read
from their samples files), the mean per-problem difference of pass@1, its paired bootstrap interval,
a sign-flip p-value, and the estimated repeats per problem for an interval of +/- ``halfwidth``.
Pairs whose problems differ are refused, naming the difference."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from .. import stats
from ..tables import write_table
from .pictures import plot_comparisons
from .rows import ProblemKey, as_number, find_result_files, read_samples, rows_from_results, run_label, samples_path, task_sort


COMPARISON_COLUMNS = [
    "task", "metric", "run_a", "run_b", "problems", "repeats_a", "repeats_b", "mean_a", "mean_b", "difference",
    "ci_low", "ci_high", "p_value", "halfwidth", "repeats_for_halfwidth_estimate", "results_a", "results_b",
]  # fmt: skip
COMPARED_METRIC = "pass_at_1"  # a problem's score: the mean correctness of its n samples
#: the columns of the Markdown table beside the CSV
COMPARISON_READER_COLUMNS = ["task", "run_a", "run_b", "problems", "mean_a", "mean_b", "difference", "ci_low", "ci_high",
                             "p_value", "repeats_for_halfwidth_estimate"]
DEFAULT_HALFWIDTH = 0.02


@dataclass(frozen=True)
class RunScores:
    """One run's per-problem scores on one task, from its samples file (``scores`` None: no samples)."""

    label: str
    task: str
    results: Path  # the results file, relative to the folder compared
    repeats: int | None
    limit: Any
    scores: dict[ProblemKey, float] | None


def run_scores(path: Path, root: Path, metric: str = COMPARED_METRIC) -> list[RunScores]:
    """The per-problem ``metric`` of each task of one results file (the tasks of ``configs``: a
    group has no samples of its own)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = rows_from_results(data, str(path))
    if not rows:
        return []
    where = path.relative_to(root) if path.is_relative_to(root) else path  # as the CSV names it
    label = f"{run_label(rows[0])} ({where.parent})"
    out = []
    for task, config in (data.get("configs") or {}).items():
        samples = samples_path(path, task)
        per_metric = read_samples(samples) if samples.is_file() else None
        repeats = as_number(config.get("repeats"))
        scores = None if per_metric is None else next(
            (v for key, v in per_metric.items() if key.split(",")[0] == metric), {})
        out.append(RunScores(label, task, where, None if repeats is None else int(repeats),
                             (data.get("config") or {}).get("limit"), scores))
    return out


def problem_set_difference(a: RunScores, b: RunScores) -> str | None:
    """Why two runs' problems differ (None when they are the same problems)."""
    if a.scores.keys() == b.scores.keys():
        return None
    ids_a, ids_b = {i for i, _ in a.scores}, {i for i, _ in b.scores}
    parts = [f"{len(a.scores)} vs {len(b.scores)} problems (--limit {a.limit} vs {b.limit})"]
    if only_a := sorted(ids_a - ids_b):
        parts.append(f"doc_id {_ids(only_a)} only in the first")
    if only_b := sorted(ids_b - ids_a):
        parts.append(f"doc_id {_ids(only_b)} only in the second")
    if changed := sorted(i for i, h in set(a.scores) ^ set(b.scores) if i in ids_a & ids_b):
        parts.append(f"doc_id {_ids(sorted(set(changed)))} are different documents (doc_hash differs)")
    return "; ".join(parts)


def _ids(ids: list[int], shown: int = 8) -> str:
    return ", ".join(map(str, ids[:shown])) + (f" and {len(ids) - shown} more" if len(ids) > shown else "")


class Refused(ValueError):
    """Two runs that must not be compared, and why."""


def compare_pair(a: RunScores, b: RunScores, halfwidth: float = DEFAULT_HALFWIDTH) -> dict[str, Any]:
    """The comparison row of run ``a`` minus run ``b`` on their task; ``Refused`` unless both logged
    their samples of the same problems."""
    pair = f"{a.task}: {a.label} vs {b.label}"
    if missing := [r.label for r in (a, b) if r.scores is None]:
        raise Refused(f"{pair}: no samples file for {' and '.join(missing)}; its comparisons need --log_samples")
    if missing := [r.label for r in (a, b) if not r.scores]:
        raise Refused(f"{pair}: no per-problem {COMPARED_METRIC} in the samples of {' and '.join(missing)}")
    if (why := problem_set_difference(a, b)) is not None:
        raise Refused(f"{pair}: refused, the problem sets differ: {why}")
    problems = sorted(a.scores)
    xs, ys = [a.scores[p] for p in problems], [b.scores[p] for p in problems]
    result = stats.compare_paired(xs, ys)
    needed: Any = ""  # the within-problem variance needs at least 2 samples per problem in each run
    if (a.repeats or 0) >= 2 and (b.repeats or 0) >= 2:
        needed = stats.repeats_for_halfwidth(xs, ys, a.repeats, b.repeats, halfwidth)
    return {
        "task": a.task, "metric": COMPARED_METRIC, "run_a": a.label, "run_b": b.label, "problems": result.problems,
        "repeats_a": a.repeats, "repeats_b": b.repeats, "mean_a": result.mean_a, "mean_b": result.mean_b,
        "difference": result.difference.estimate, "ci_low": result.difference.low,
        "ci_high": result.difference.high, "p_value": result.p_value, "halfwidth": halfwidth,
        "repeats_for_halfwidth_estimate": needed, "results_a": str(a.results), "results_b": str(b.results),
    }  # fmt: skip


def compare_runs(root: str | os.PathLike, halfwidth: float = DEFAULT_HALFWIDTH) -> tuple[list[dict], list[str]]:
    """(comparison rows, refusals): every pair of runs under ``root`` that share a task, compared when
    both logged their samples of the same problems; every other pair is refused with the reason."""
    root = Path(root)
    by_task: dict[str, list[RunScores]] = {}
    for path in find_result_files(root):
        try:
            for run in run_scores(path, root):
                by_task.setdefault(run.task, []).append(run)
        except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError, KeyError) as e:
            print(f"leaderboard: skipping {path}: {type(e).__name__}: {e}", file=sys.stderr)
    rows, refusals = [], []
    for task in task_sort(by_task):
        for a, b in combinations(sorted(by_task[task], key=lambda r: r.label), 2):
            try:
                rows.append(compare_pair(a, b, halfwidth))
            except Refused as e:
                refusals.append(str(e))
    return rows, refusals


def format_comparisons(rows: list[dict]) -> str:
    """The terminal table of ``compare_runs``' rows."""
    lines = [f"{COMPARED_METRIC}, run A minus run B on the same problems ({stats.METHOD}; sign-flip p-value):"]
    for r in rows:
        needed = r["repeats_for_halfwidth_estimate"]
        needed = "needs >= 2 repeats" if needed == "" else ("more problems, not repeats" if needed == math.inf
                                                             else f"~{needed:.0f}")
        lines.append(f"  {r['task']}: {r['run_a']} - {r['run_b']}: {r['difference']:+.3f} "
                     f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}], p = {r['p_value']:.3f}, {r['problems']} problems; "
                     f"repeats for +/- {r['halfwidth']:.3f} (estimate): {needed}")
    return "\n".join(lines)


def write_comparison_rows(rows: list[dict], csv_path: Path, png_path: Path, title: str | None = None) -> None:
    """Comparison rows as ``csv_path`` (its Markdown table beside it) and ``png_path``."""
    write_table(rows, csv_path, COMPARISON_COLUMNS, COMPARISON_READER_COLUMNS)
    plot_comparisons(rows, png_path, title)


def write_comparisons(root: str | os.PathLike, csv_path: Path, png_path: Path,
                      halfwidth: float = DEFAULT_HALFWIDTH) -> tuple[list[dict], list[str]]:
    """``compare_runs`` written by :func:`write_comparison_rows` (nothing written when no pair compares)."""
    rows, refusals = compare_runs(root, halfwidth)
    if rows:
        write_comparison_rows(rows, csv_path, png_path)
    return rows, refusals
