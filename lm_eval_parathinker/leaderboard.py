"""Collect lm-eval results JSON files into a CSV leaderboard (plus a terminal table and a PNG), or
compare its runs pairwise on their shared problems.

    python -m lm_eval_parathinker.leaderboard RESULTS_DIR [-o results/leaderboard.csv] [--plot results/leaderboard.png]
    python -m lm_eval_parathinker.leaderboard RESULTS_DIR --compare [--halfwidth 0.02]

Every ``**/results_*.json`` under RESULTS_DIR (as written by ``lm_eval --output_path``) becomes one CSV row per
run x task x metric. Partial or corrupt files are skipped with a warning. Outputs are written atomically.
Where the run logged its samples (``--log_samples``), each row has a 95% interval over problems
(``stats.METHOD``) beside lm-eval's stderr.
The picture puts each run's accuracy beside its cost (generated tokens and seconds per problem), so runs
compare even when every one of them scores 0.

``--compare`` writes RESULTS_DIR/comparisons.csv and comparisons.png: for every pair of runs of a task
with the same problems (read from their samples files), the mean per-problem difference of pass@1,
its paired bootstrap interval, a sign-flip p-value, and the estimated repeats per problem for an
interval of +/- ``--halfwidth``. Pairs whose problems differ are refused, naming the difference.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Iterable

from . import stats
from .data import iter_json_lines
from .files import atomic_write

COLUMNS = [
    "model",
    "pretrained",
    "method",
    "num_paths",
    "termination",
    "compat",
    "task",
    "metric",
    "value",
    "stderr",
    "ci_low",
    "ci_high",
    "n",
    "repeats",
    "limit",
    "gen_tokens",
    "latency_s",
    "date",
]
MAIN_METRIC = "pass_at_1"
_TASK_ORDER = ["aime24", "aime25", "amc23", "math500", "parathinker_math"]


def parse_model_args(model_args: Any) -> dict[str, Any]:
    """``model_args`` as a dict: lm-eval stores a dict (CLI) or a ``"k=v,k2=v2"`` string (Python API)."""
    if isinstance(model_args, dict):
        return dict(model_args)
    if not model_args or not isinstance(model_args, str):
        return {}
    s = model_args.strip()
    if s.startswith("{"):
        try:
            obj = json.loads(s)
            return obj if isinstance(obj, dict) else {}
        except json.JSONDecodeError:
            pass
    out: dict[str, Any] = {}
    for part in s.split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def as_number(x: Any) -> float | None:
    """A finite number from a results value (numbers, numeric strings, booleans), else None."""
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, (int, float)):
        return float(x) if math.isfinite(float(x)) else None
    try:
        v = float(x)
        return v if math.isfinite(v) else None
    except (TypeError, ValueError):
        return None


def _date(x: Any) -> str:
    v = as_number(x)
    if v is None:
        return str(x or "")
    try:
        return _dt.datetime.fromtimestamp(v, tz=_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return str(x)


def rows_from_results(data: dict, source: str = "") -> list[dict[str, Any]]:
    """CSV rows (dicts keyed by ``COLUMNS``) for one lm-eval results JSON object."""
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(f"{source}: not an lm-eval results file (no 'results' object)")
    config = data.get("config") or {}
    margs = parse_model_args(config.get("model_args"))
    model = str(config.get("model") or "")
    pretrained = str(margs.get("pretrained") or margs.get("model") or data.get("model_name") or "")
    # The model's effective options (defaults included), recorded by ParaThinkerLM.get_model_info.
    settings = config.get("parathinker") or {}
    method = settings.get("method") or margs.get("method")
    if not method:
        method = "parathinker" if model == "parathinker" else "sequential"
    num_paths = settings.get("num_paths", margs.get("num_paths"))
    if num_paths in (None, "") and method == "sequential":
        num_paths = 1
    termination = settings.get("termination", margs.get("termination", "")) if method == "parathinker" else ""
    compat = settings.get("compat") or ""  # "paper" or "official", recorded by --model parathinker runs
    configs = data.get("configs") or {}
    n_samples = data.get("n-samples") or {}
    limit = config.get("limit")
    date = _date(data.get("date"))

    sections = dict(data.get("results") or {})
    for g, res in (data.get("groups") or {}).items():
        sections.setdefault(g, res)

    rows = []
    for task, res in sections.items():
        if not isinstance(res, dict):
            continue
        metrics: dict[tuple[str, str], float | None] = {}
        for key, value in res.items():
            if "," not in key:
                continue
            metric, filt = key.split(",", 1)
            if metric.endswith(("_stderr", "_ci_low", "_ci_high")):  # read with their metric's row
                continue
            metrics[(metric, filt)] = as_number(value)
        by_name = {m: v for (m, _f), v in metrics.items()}
        tcfg = configs.get(task) or {}
        ns = n_samples.get(task) or {}
        n = ns.get("effective", ns.get("original", res.get("sample_len", "")))
        for (metric, filt), value in metrics.items():
            stderr = as_number(res.get(f"{metric}_stderr,{filt}"))
            rows.append(
                {
                    "model": model,
                    "pretrained": pretrained,
                    "method": method,
                    "num_paths": _or_blank(num_paths),
                    "termination": termination,
                    "compat": compat,
                    "task": task,
                    "metric": metric if filt in ("all", "none") else f"{metric},{filt}",
                    "value": _or_blank(value),
                    "stderr": _or_blank(stderr),
                    # the results JSON's interval (the tasks' headline accuracies); samples files fill the rest
                    "ci_low": _or_blank(as_number(res.get(f"{metric}_ci_low,{filt}"))),
                    "ci_high": _or_blank(as_number(res.get(f"{metric}_ci_high,{filt}"))),
                    "filter": filt,
                    "n": n,
                    "repeats": tcfg.get("repeats", ""),
                    "limit": _or_blank(limit),
                    "gen_tokens": _or_blank(by_name.get("gen_tokens")),
                    "latency_s": _or_blank(by_name.get("latency_s")),
                    "date": date,
                }
            )
    return rows


#: a problem of a task, as lm-eval's samples files identify it
ProblemKey = tuple[int, str]  # (doc_id, doc_hash)


def _or_blank(value: Any) -> Any:
    """A CSV cell: None as an empty one."""
    return "" if value is None else value


def samples_path(results: Path, task: str) -> Path:
    """The samples file lm-eval writes beside ``results_<date>.json`` for ``task`` with ``--log_samples``."""
    return results.with_name(f"samples_{task}_{results.stem.removeprefix('results_')}.jsonl")


def read_samples(path: Path) -> dict[str, dict[ProblemKey, float]]:
    """Per-problem values of each ``metric,filter`` in a samples file: {key: {(doc_id, doc_hash): value}}.
    A malformed line is a ValueError naming the file and line."""
    values: dict[str, dict[ProblemKey, float]] = {}
    for number, sample in iter_json_lines(path):
        try:
            problem = (int(sample["doc_id"]), str(sample["doc_hash"]))
            for metric in sample["metrics"]:
                value = as_number(sample[metric])
                if value is not None:
                    values.setdefault(f"{metric},{sample['filter']}", {})[problem] = value
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{number}: not an lm-eval sample ({type(e).__name__}: {e})") from None
    return values


def _with_intervals(rows: list[dict[str, Any]], results: Path) -> list[dict[str, Any]]:
    """``rows`` of one results file with the 95% interval over problems of each metric its tasks'
    samples files hold (rows without samples, such as a group's, keep the results JSON's, or none)."""
    by_task: dict[str, dict[str, dict[ProblemKey, float]]] = {}
    for r in rows:
        if r["task"] not in by_task:
            path = samples_path(results, r["task"])
            by_task[r["task"]] = read_samples(path) if path.is_file() else {}
        per_problem = by_task[r["task"]].get(f"{r['metric'].split(',')[0]},{r['filter']}")
        if per_problem:
            interval = stats.bootstrap_interval(list(per_problem.values()))
            r["ci_low"], r["ci_high"] = interval.low, interval.high
    return rows


def rows_from_file(path: Path) -> list[dict[str, Any]]:
    """The rows of one results JSON file, with intervals where its samples were logged."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return _with_intervals(rows_from_results(data, str(path)), path)


def find_result_files(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.glob("**/results_*.json") if p.is_file())


def collect(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of every readable results file under ``root``; unreadable ones are skipped with a warning."""
    rows: list[dict[str, Any]] = []
    for path in find_result_files(root):
        try:
            rows.extend(rows_from_file(path))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, TypeError, AttributeError) as e:
            msg = f"leaderboard: skipping {path}: {type(e).__name__}: {e}"
            print(msg, file=sys.stderr)
    return rows


def write_csv(rows: Iterable[dict[str, Any]], path: str | os.PathLike, columns: list[str] = COLUMNS) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c, "") for c in columns})
    atomic_write(path, buf.getvalue().encode("utf-8"))


def _run_label(r: dict[str, Any]) -> str:
    name = Path(str(r["pretrained"])).name or r["model"]
    label = f"{name} {r['method']}"
    if r.get("num_paths") not in ("", None):
        label += f" P={r['num_paths']}"
    if r.get("compat") == "official":
        label += " official"
    return label


def task_sort(tasks: Iterable[str]) -> list[str]:
    return sorted(set(tasks), key=lambda t: (_TASK_ORDER.index(t) if t in _TASK_ORDER else len(_TASK_ORDER), t))


def pivot(
    rows: list[dict[str, Any]], metric: str = MAIN_METRIC, per_problem: bool = False,
    label: Callable[[dict[str, Any]], str] = _run_label, field: str = "value",
) -> tuple[list[str], list[str], dict]:
    """(row labels, tasks, {(label, task): value}) of ``metric``; later runs win on duplicates.

    ``per_problem``: a per-response mean times the task's repeats (the k responses of each problem).
    ``label`` names a row's run (default: checkpoint, method, paths, compat).
    ``field``: the column read (``value``, or an interval end ``ci_low`` / ``ci_high``).
    """
    cells: dict[tuple[str, str], float] = {}
    for r in sorted(rows, key=lambda r: str(r["date"])):
        if r["metric"] == metric and r.get(field, "") != "":
            repeats = as_number(r.get("repeats")) if per_problem else None
            cells[(label(r), r["task"])] = float(r[field]) * (repeats or 1.0)
    labels = sorted({k[0] for k in cells})
    tasks = task_sort(k[1] for k in cells)
    return labels, tasks, cells


def format_table(rows: list[dict[str, Any]], metric: str = MAIN_METRIC) -> str:
    labels, tasks, cells = pivot(rows, metric)
    if not labels:
        return f"(no {metric} results)"
    _, _, lows = pivot(rows, metric, field="ci_low")
    _, _, highs = pivot(rows, metric, field="ci_high")

    def cell(key: tuple[str, str]) -> str:
        if key not in cells:
            return "-"
        interval = f" [{lows[key]:.3f}, {highs[key]:.3f}]" if key in lows and key in highs else ""
        return f"{cells[key]:.3f}{interval}"

    head = ["model / method / paths"] + tasks
    body = [[lab] + [cell((lab, t)) for t in tasks] for lab in labels]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    fmt = lambda cols: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))
    heading = f"{metric} [{stats.METHOD}]:" if lows else f"{metric}:"
    lines = [heading, fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
    return "\n".join(lines)


# The cost panels of the picture: per-response means (gen_tokens, latency_s) times k, per problem.
COST_PANELS = (("gen_tokens", "generated tokens per problem"), ("latency_s", "seconds per problem (k x sample latency)"))


def _bar_text(value: float | None, cost: bool) -> str:
    if value is None:
        return "n/a"
    if not cost:
        return f"{value:.3f}"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def save_png(fig, path: str | os.PathLike) -> None:
    """Write a matplotlib figure as a PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def plot(rows: list[dict[str, Any]], path: str | os.PathLike, metric: str = MAIN_METRIC,
         label: Callable[[dict[str, Any]], str] = _run_label, sort: bool = True, title: str | None = None) -> None:
    """Accuracy and its cost side by side, one horizontal bar per run and task in each panel
    (``label`` names the runs; ``sort=False`` keeps them in the order of ``rows``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label(r) for r in rows if r["metric"] == metric))
    labels = sorted(labels) if sort else labels
    panels = [(metric, f"{metric} (accuracy)", False)] + [(m, heading, True) for m, heading in COST_PANELS]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 1.8 + 0.5 * max(len(labels), 1)), sharey=True)
    for ax, (name, heading, per_problem) in zip(axes, panels):
        _, tasks, cells = pivot(rows, name, per_problem, label)
        _, _, lows = pivot(rows, name, per_problem, label, field="ci_low")
        _, _, highs = pivot(rows, name, per_problem, label, field="ci_high")
        height = 0.8 / max(len(tasks), 1)
        for j, task in enumerate(tasks):
            ys = [i + (j - (len(tasks) - 1) / 2) * height for i in range(len(labels))]
            values = [cells.get((lab, task)) for lab in labels]
            # the 95% interval over problems as an error bar, where the run logged its samples
            errors = [[max(0.0, v - lows[(lab, task)]), max(0.0, highs[(lab, task)] - v)]
                      if v is not None and (lab, task) in lows and (lab, task) in highs else [math.nan, math.nan]
                      for lab, v in zip(labels, values)]
            bars = ax.barh(ys, [v or 0.0 for v in values], height=height, label=task,
                           xerr=list(zip(*errors)) if errors else None, error_kw={"elinewidth": 1, "capsize": 2})
            # the value beside every bar: a run that scores 0 still shows its number
            ax.bar_label(bars, labels=[_bar_text(v, per_problem) for v in values], fontsize=7, padding=2)
        if not cells:
            ax.text(0.5, 0.5, f"no {name} in these runs", transform=ax.transAxes, ha="center", fontsize=8)
        ax.set_title(heading, fontsize=10)
        ax.grid(alpha=0.3, axis="x")
        ax.margins(x=0.25)
    axes[0].set_xlim(0, 1.15)
    axes[0].set_yticks(range(len(labels)))
    axes[0].set_yticklabels(labels, fontsize=8)
    axes[0].invert_yaxis()
    tasks = task_sort(r["task"] for r in rows)
    if len(tasks) > 1:
        axes[0].legend(fontsize=7)
    fig.suptitle(title or f"accuracy and cost per run ({', '.join(tasks)})", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


# ----------------------------------------------------------------------------------- comparisons
COMPARISON_COLUMNS = [
    "task", "metric", "run_a", "run_b", "problems", "repeats_a", "repeats_b", "mean_a", "mean_b", "difference",
    "ci_low", "ci_high", "p_value", "halfwidth", "repeats_for_halfwidth_estimate", "results_a", "results_b",
]  # fmt: skip
COMPARED_METRIC = "pass_at_1"  # a problem's score: the mean correctness of its n samples
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
    label = f"{_run_label(rows[0])} ({where.parent})"
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


def plot_comparisons(rows: list[dict], path: str | os.PathLike, title: str | None = None) -> None:
    """One line per pair and task: the mean paired difference and its 95% interval, 0 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.45 * max(len(rows), 1)))
    ys = range(len(rows))
    diffs = [r["difference"] for r in rows]
    errors = [[r["difference"] - r["ci_low"] for r in rows], [r["ci_high"] - r["difference"] for r in rows]]
    ax.errorbar(diffs, ys, xerr=errors, fmt="o", capsize=4)
    for y, r in zip(ys, rows):
        ax.annotate(f"{r['difference']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}], p = {r['p_value']:.2f}, "
                    f"{r['problems']} problems", (r["difference"], y), textcoords="offset points", xytext=(0, 7),
                    ha="center", fontsize=7)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([f"{r['task']}: {r['run_a']}\n  minus {r['run_b']}" for r in rows], fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.8)  # top to bottom, room for the text above the first row
    span = 1.3 * max([0.05] + [abs(r[end]) for r in rows for end in ("ci_low", "ci_high")])
    ax.set_xlim(-span, span)  # 0 in the middle
    ax.set_xlabel(f"difference in {COMPARED_METRIC} (A - B; per problem the mean of its samples)")
    ax.grid(alpha=0.3, axis="x")
    ax.set_title(title or f"paired differences with 95% intervals ({stats.METHOD})", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)


def write_comparisons(root: str | os.PathLike, csv_path: Path, png_path: Path,
                      halfwidth: float = DEFAULT_HALFWIDTH) -> tuple[list[dict], list[str]]:
    """``compare_runs`` written to ``csv_path`` and ``png_path`` (nothing written when no pair compares)."""
    rows, refusals = compare_runs(root, halfwidth)
    if rows:
        write_csv(rows, csv_path, COMPARISON_COLUMNS)
        plot_comparisons(rows, png_path)
    return rows, refusals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lm_eval_parathinker.leaderboard", description=__doc__.split("\n")[0])
    ap.add_argument("results_dir", help="folder searched recursively for lm-eval results_*.json files")
    ap.add_argument("-o", "--output", default="results/leaderboard.csv", help="CSV path (default: %(default)s)")
    ap.add_argument("--plot", default=None, help="also draw a PNG here")
    ap.add_argument("--metric", default=MAIN_METRIC, help="metric of the terminal table and plot (default: %(default)s)")
    ap.add_argument("--compare", action="store_true", help="instead: compare every pair of runs of a task on their "
                    "shared problems (needs --log_samples runs); writes RESULTS_DIR/comparisons.csv and .png")
    ap.add_argument("--halfwidth", type=float, default=DEFAULT_HALFWIDTH,
                    help="with --compare: the interval half-width the repeats estimate aims at (default: %(default)s)")
    args = ap.parse_args(argv)
    if not 0 < args.halfwidth < 1:
        ap.error(f"--halfwidth {args.halfwidth}: must be between 0 and 1 (a difference in accuracy)")
    if not Path(args.results_dir).exists():
        print(f"leaderboard: {args.results_dir} does not exist", file=sys.stderr)
        return 2
    if args.compare:
        return compare_main(Path(args.results_dir), args.halfwidth)
    rows = collect(args.results_dir)
    write_csv(rows, args.output)
    print(format_table(rows, args.metric))
    print(f"wrote {len(rows)} rows to {args.output}")
    if args.plot:
        plot(rows, args.plot, args.metric)
        print(f"wrote {args.plot}")
    return 0



def compare_main(root: Path, halfwidth: float) -> int:
    """``--compare``: exit 0 when every pair compared, 1 when a pair was refused (the others are written)."""
    folder = root if root.is_dir() else root.parent
    csv_path, png_path = folder / "comparisons.csv", folder / "comparisons.png"
    rows, refusals = write_comparisons(root, csv_path, png_path, halfwidth)
    for refusal in refusals:
        print(f"leaderboard: {refusal}", file=sys.stderr)
    if not rows:
        print(f"leaderboard: no pair of runs to compare under {root}; nothing written", file=sys.stderr)
        return 1
    print(format_comparisons(rows))
    print(f"wrote {len(rows)} comparison(s) to {csv_path} and {png_path}"
          + (f"; {len(refusals)} pair(s) not compared (see above)" if refusals else ""))
    return 1 if refusals else 0


if __name__ == "__main__":
    sys.exit(main())
