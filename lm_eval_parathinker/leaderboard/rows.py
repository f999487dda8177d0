"""The leaderboard's rows: one per run x task x metric of every lm-eval results JSON under a folder,
with a 95% interval over problems where the run logged its samples; written as a CSV with its
Markdown table beside it, pivoted into the terminal table."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from .. import stats
from ..data import iter_json_lines
from ..tables import write_table

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
#: the columns of the Markdown table beside the CSV (the run, the task, the value and its cost)
READER_COLUMNS = ["model", "pretrained", "method", "num_paths", "compat", "task", "metric", "value", "ci_low", "ci_high",
                  "n", "repeats", "gen_tokens", "latency_s"]
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
    if settings.get("format", "parathinker") != "parathinker":  # a forking format is a method of its own
        method = settings["format"]
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


def write_csv(rows: Iterable[dict[str, Any]], path: str | os.PathLike) -> None:
    """The leaderboard's CSV (``COLUMNS``) and its Markdown table (``READER_COLUMNS``) beside it."""
    write_table(rows, path, COLUMNS, READER_COLUMNS)


def run_label(r: dict[str, Any]) -> str:
    """A run's name: checkpoint, method, paths, and ``official`` for the released layout."""
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
    label: Callable[[dict[str, Any]], str] = run_label, field: str = "value",
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
