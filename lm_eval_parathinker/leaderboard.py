"""Collect lm-eval results JSON files into a CSV leaderboard (plus a terminal table and a PNG).

    python -m lm_eval_parathinker.leaderboard RESULTS_DIR [-o results/leaderboard.csv] [--plot results/leaderboard.png]

Every ``**/results_*.json`` under RESULTS_DIR (as written by ``lm_eval --output_path``) becomes one CSV row per
run x task x metric. Partial or corrupt files are skipped with a warning. Outputs are written atomically.
The picture puts each run's accuracy beside its cost (generated tokens and seconds per problem), so runs
compare even when every one of them scores 0.
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
from pathlib import Path
from typing import Any, Callable, Iterable

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
            if metric.endswith("_stderr"):
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
                    "num_paths": "" if num_paths is None else num_paths,
                    "termination": termination,
                    "compat": compat,
                    "task": task,
                    "metric": metric if filt in ("all", "none") else f"{metric},{filt}",
                    "value": "" if value is None else value,
                    "stderr": "" if stderr is None else stderr,
                    "n": n,
                    "repeats": tcfg.get("repeats", ""),
                    "limit": "" if limit is None else limit,
                    "gen_tokens": "" if by_name.get("gen_tokens") is None else by_name["gen_tokens"],
                    "latency_s": "" if by_name.get("latency_s") is None else by_name["latency_s"],
                    "date": date,
                }
            )
    return rows


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
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            rows.extend(rows_from_results(data, str(path)))
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
    label: Callable[[dict[str, Any]], str] = _run_label,
) -> tuple[list[str], list[str], dict]:
    """(row labels, tasks, {(label, task): value}) of ``metric``; later runs win on duplicates.

    ``per_problem``: a per-response mean times the task's repeats (the k responses of each problem).
    ``label`` names a row's run (default: checkpoint, method, paths, compat).
    """
    cells: dict[tuple[str, str], float] = {}
    for r in sorted(rows, key=lambda r: str(r["date"])):
        if r["metric"] == metric and r["value"] != "":
            repeats = as_number(r.get("repeats")) if per_problem else None
            cells[(label(r), r["task"])] = float(r["value"]) * (repeats or 1.0)
    labels = sorted({k[0] for k in cells})
    tasks = task_sort(k[1] for k in cells)
    return labels, tasks, cells


def format_table(rows: list[dict[str, Any]], metric: str = MAIN_METRIC) -> str:
    labels, tasks, cells = pivot(rows, metric)
    if not labels:
        return f"(no {metric} results)"
    head = ["model / method / paths"] + tasks
    body = [[lab] + [f"{cells[(lab, t)]:.3f}" if (lab, t) in cells else "-" for t in tasks] for lab in labels]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    fmt = lambda cols: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))
    lines = [f"{metric}:", fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
    return "\n".join(lines)


# The cost panels of the picture: per-response means (gen_tokens, latency_s) times k, per problem.
COST_PANELS = (("gen_tokens", "generated tokens per problem"), ("latency_s", "seconds per problem (k x sample latency)"))


def _bar_text(value: float | None, cost: bool) -> str:
    if value is None:
        return "n/a"
    if not cost:
        return f"{value:.3f}"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


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
        height = 0.8 / max(len(tasks), 1)
        for j, task in enumerate(tasks):
            ys = [i + (j - (len(tasks) - 1) / 2) * height for i in range(len(labels))]
            values = [cells.get((lab, task)) for lab in labels]
            bars = ax.barh(ys, [v or 0.0 for v in values], height=height, label=task)
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lm_eval_parathinker.leaderboard", description=__doc__.split("\n")[0])
    ap.add_argument("results_dir", help="folder searched recursively for lm-eval results_*.json files")
    ap.add_argument("-o", "--output", default="results/leaderboard.csv", help="CSV path (default: %(default)s)")
    ap.add_argument("--plot", default=None, help="also draw a PNG here")
    ap.add_argument("--metric", default=MAIN_METRIC, help="metric of the terminal table and plot (default: %(default)s)")
    args = ap.parse_args(argv)
    if not Path(args.results_dir).exists():
        print(f"leaderboard: {args.results_dir} does not exist", file=sys.stderr)
        return 2
    rows = collect(args.results_dir)
    write_csv(rows, args.output)
    print(format_table(rows, args.metric))
    print(f"wrote {len(rows)} rows to {args.output}")
    if args.plot:
        plot(rows, args.plot, args.metric)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
