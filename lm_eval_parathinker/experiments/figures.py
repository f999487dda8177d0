"""An experiment's pictures and tables: per sweep a CSV, a PNG and a markdown table, made from the
points' results JSON files, read as the leaderboard reads any run.

* ``scaling``: pass@1 against generated tokens per response (all paths and the summary; log x), one
  line per run of the sweep and value of its other axes, joined along P (or along the budget when P
  is not an axis: sequential over budgets, majority and ParaThinker over P at a per-path budget);
  below it, seconds per response against the same tokens.
* ``width``: pass@1 and think-stage seconds per response (``think_s``, run one request at a time)
  against P, each think time marked with its ratio to the line's smallest P.
* ``ablations``: the paper's table, rows the variants, columns the tasks, each cell pass@1 with the
  generated tokens and seconds per problem (the k responses of a problem, as the leaderboard counts
  them) beside it; the PNG is the leaderboard's picture of the same rows.

Every point's value has its 95% interval over problems (``stats.METHOD``, from the point's samples
file) in the CSV, the table and as an error bar in the pictures. Each sweep's points are also compared
with its first point on the same problems (the leaderboard's ``--compare``): ``<sweep>_comparisons.csv``
and ``.png``, and a list under the table.

When every point scores 0 (a small model), the pictures say so: their curves then show cost only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import leaderboard, stats
from ..formats import FORMATS
from ..files import atomic_write
from ..leaderboard import as_number
from ..plotting import label_points, save_png
from ..tables import markdown_table, write_csv
from .config import SHORT, Experiment, Point

OPTIONS = ("termination", "thought_embedding", "positions", "summary_kv")
METRICS = ("pass_at_1", "gen_tokens", "think_s", "latency_s")
FORK_METRICS = ("forks", "well_formed_fork")  # means per response (the table shows them for a forking format)
COLUMNS = ["sweep", "kind", "point", "checkpoint", "pretrained", "method", "num_paths", "max_gen_toks",
           "termination", "thought_embedding", "positions", "summary_kv", "compat", "batch_size", "task",
           "pass_at_1", "pass_at_1_stderr", "gen_tokens", "think_s", "latency_s",
           *(f"{m}_{end}" for m in METRICS for end in ("ci_low", "ci_high")), *FORK_METRICS, "repeats", "n", "results"]
ZERO_NOTE = "every point scores pass@1 = 0 here: the picture shows cost only"


def point_rows(point: Point, root: Path) -> list[dict[str, Any]]:
    """One row per task of a done point, from its results JSON (read as the leaderboard reads it;
    ``results``: its path under ``root``)."""
    (path,) = leaderboard.find_result_files(point.output_dir)
    data = json.loads(path.read_text(encoding="utf-8"))
    settings = data["config"].get("parathinker") or {}
    by_task: dict[str, dict[str, Any]] = {}
    for r in leaderboard.rows_from_file(path):
        row = by_task.setdefault(r["task"], {
            "sweep": point.sweep, "kind": point.kind, "point": point.title, "checkpoint": point.checkpoint,
            "pretrained": r["pretrained"], "method": r["method"], "num_paths": r["num_paths"],
            "max_gen_toks": data["configs"][r["task"]]["generation_kwargs"]["max_gen_toks"],
            **{k: settings.get(k, "") if r["method"] == "parathinker" else "" for k in OPTIONS},  # baselines: none
            "compat": r["compat"] or "",
            "batch_size": data["config"]["batch_size"], "task": r["task"], "repeats": r["repeats"], "n": r["n"],
            "results": str(path.relative_to(root)),
        })
        if r["metric"] in METRICS:
            row[r["metric"]] = r["value"]
            row[f"{r['metric']}_ci_low"], row[f"{r['metric']}_ci_high"] = r["ci_low"], r["ci_high"]
            if r["metric"] == "pass_at_1":
                row["pass_at_1_stderr"] = r["stderr"]
        elif r["metric"] in FORK_METRICS:
            row[r["metric"]] = r["value"]
    return list(by_task.values())


def _joined_axis(point: Point) -> str:
    """The axis a point's line runs along: P when its run varies P, else the budget."""
    return "num_paths" if "num_paths" in point.axes else "max_gen_toks"


def _line_name(point: Point, along: str) -> str:
    values = [f"{SHORT.get(k, k)}={v}" for k, v in point.axes.items()
              if k != along and (k, v) != ("method", point.label)]
    if along == "num_paths" and "max_gen_toks" not in point.axes and point.method != "sequential":
        values.append(f"B={point.max_gen_toks}")
    return " ".join([point.label, *values])


def _lines(points: list[Point], rows: dict[int, list[dict]], along: Callable[[Point], str]) -> dict:
    """{(run, line name): [(point, row of each task)]}: a sweep's points joined into lines (never
    across its runs)."""
    lines: dict[tuple[int, str], list[tuple[Point, list[dict]]]] = {}
    for point in points:
        lines.setdefault((point.run, _line_name(point, along(point))), []).append((point, rows[id(point)]))
    return lines


def _all_zero(rows: list[dict]) -> bool:
    values = [as_number(r.get("pass_at_1")) for r in rows]
    return bool(values) and all(v == 0 for v in values)


def _draw_lines(ax, lines: dict, task: str, x_metric: str | None, y_metric: str, along: Callable[[Point], str],
                ratio: bool = False) -> None:
    """One line per entry of ``lines`` on ``ax``: ``y_metric`` against ``x_metric`` (None: the line's axis),
    each marker labelled with its axis value (``ratio``: and its y over the line's first y)."""
    for (_, name), members in lines.items():
        xs, ys, marks, errors = [], [], [], []
        for point, task_rows in sorted(members, key=lambda m: getattr(m[0], along(m[0]))):
            row = next((r for r in task_rows if r["task"] == task), None)
            if row is None:
                continue
            axis = along(point)
            x = getattr(point, axis) if x_metric is None else as_number(row.get(x_metric))
            y = as_number(row.get(y_metric))
            if x is None or y is None:
                continue
            xs.append(x)
            ys.append(y)
            marks.append(f"{SHORT[axis]}={getattr(point, axis)}")
            errors.append(_error_bar(row, y_metric, y))
        if not xs:
            continue
        ax.errorbar(xs, ys, yerr=list(zip(*errors)), marker="o", capsize=3, label=name)
        label_points(ax, [(x, y, f"{mark} ({y / ys[0]:.2f}x)" if ratio and ys[0] else mark)
                          for x, y, mark in zip(xs, ys, marks)])


def _error_bar(row: dict, metric: str, value: float) -> tuple[float, float]:
    """(below, above) ``value``: its 95% interval over problems, nan when the point has none."""
    low, high = as_number(row.get(f"{metric}_ci_low")), as_number(row.get(f"{metric}_ci_high"))
    if low is None or high is None:
        return math.nan, math.nan
    return max(0.0, value - low), max(0.0, high - value)


def _tasks(rows: list[dict]) -> list[str]:
    return leaderboard.task_sort(r["task"] for r in rows)


@dataclass(frozen=True)
class Curves:
    """The picture of a ``scaling`` or ``width`` sweep: per task a column of panels, each a metric
    against the x axis, one line per run of the sweep and value of its other axes."""

    title: str
    along: Callable[[Point], str]  # the axis a point's line runs along
    x_metric: str | None  # the x of a point: this metric, or (None) its value of the line's axis
    x_label: str
    x_log_base: int
    panels: tuple[tuple[str, str, bool], ...]  # (metric, label, log y)
    ratio: str | None = None  # the metric whose markers show their ratio to the line's first point


CURVES = {
    "scaling": Curves("scaling: accuracy and time against generated tokens", _joined_axis, "gen_tokens",
                      "generated tokens per response (all paths + summary)", 10,
                      (("pass_at_1", "pass@1", False), ("latency_s", "seconds per response", True))),
    "width": Curves("width: accuracy and think-stage latency against P\n(one request at a time)",
                    lambda point: "num_paths", None, "paths P", 2,
                    (("pass_at_1", "pass@1", False), ("think_s", "think-stage seconds per response", False)),
                    ratio="think_s"),
}


def _plain_log_labels(axis, base: int) -> None:
    """A log axis labelled in plain numbers (20, not 2 x 10^1), minor ticks labelled where there is room."""
    from matplotlib.ticker import LogFormatter

    axis.set_major_formatter(LogFormatter(base))
    axis.set_minor_formatter(LogFormatter(base, labelOnlyBase=False, minor_thresholds=(2, 0.4)))


def plot_curves(curves: Curves, points: list[Point], rows: dict[int, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flat = [r for p in points for r in rows[id(p)]]
    tasks = _tasks(flat)
    lines = _lines(points, rows, curves.along)
    fig, axes = plt.subplots(len(curves.panels), len(tasks), figsize=(max(7.0, 5.5 * len(tasks)),
                                                                       3.6 * len(curves.panels) + 0.8), squeeze=False)
    for j, task in enumerate(tasks):
        for i, (metric, label, log_y) in enumerate(curves.panels):
            ax = axes[i][j]
            _draw_lines(ax, lines, task, curves.x_metric, metric, curves.along, ratio=metric == curves.ratio)
            ax.set_xscale("log", base=curves.x_log_base)
            _plain_log_labels(ax.xaxis, curves.x_log_base)
            ax.margins(x=0.15)  # room for the markers' labels
            if log_y:
                ax.set_yscale("log")
                _plain_log_labels(ax.yaxis, 10)
            if metric == "pass_at_1":
                ax.set_ylim(0, 1)
            ax.set_xlabel(curves.x_label)
            ax.set_ylabel(label)
            ax.set_title(f"{task}: {label}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
    # one legend for the figure, below its panels: inside one it would cover points and their labels
    handles, names = axes[0][0].get_legend_handles_labels()
    columns = min(len(names), 3) or 1
    legend_in = 0.25 + 0.18 * -(-len(names) // columns)
    fig.legend(handles, names, loc="lower center", ncol=columns, fontsize=7)
    note = f"\n({ZERO_NOTE})" if _all_zero(flat) else ""
    fig.suptitle(curves.title + note, fontsize=10)
    fig.tight_layout(rect=(0, legend_in / fig.get_figheight(), 1, 1))
    save_png(fig, path)


def _cell(row: dict | None, kind: str, forking: bool = False) -> str:
    """pass@1 [95% interval] ± stderr, then the kind's costs (see CELL_UNITS); ``forking`` (a format
    whose model forks): the share of its responses with a well-formed fork."""
    if row is None or as_number(row.get("pass_at_1")) is None:
        return "-"
    text = f"{float(row['pass_at_1']):.3f}"
    low, high = as_number(row.get("pass_at_1_ci_low")), as_number(row.get("pass_at_1_ci_high"))
    if low is not None and high is not None:
        text += f" [{low:.3f}, {high:.3f}]"
    if (stderr := as_number(row.get("pass_at_1_stderr"))) is not None:
        text += f" ± {stderr:.3f}"
    tokens, think, latency = (as_number(row.get(m)) for m in ("gen_tokens", "think_s", "latency_s"))
    if kind == "ablations":  # per problem: the k responses of a problem, as the leaderboard counts them
        repeats = as_number(row.get("repeats")) or 1.0
        tokens, latency = (None if v is None else v * repeats for v in (tokens, latency))
    costs = []
    if kind == "width" and think is not None:
        costs.append(f"think {think:.2f} s")
    if kind != "width" and tokens is not None:
        costs.append(f"{tokens:,.0f} tok")
    if kind != "width" and latency is not None:
        costs.append(f"{latency:.2f} s")
    if forking and (formed := as_number(row.get("well_formed_fork"))) is not None:
        costs.append(f"a well-formed fork in {formed:.0%} of responses")
    return text + (f" ({', '.join(costs)})" if costs else "")


CELL_UNITS = {
    "scaling": "pass@1 [95% interval] ± stderr (generated tokens and seconds per response)",
    "width": "pass@1 [95% interval] ± stderr (think-stage seconds per response, one request at a time)",
    "ablations": "pass@1 [95% interval] ± stderr (generated tokens and seconds per problem: its k responses together)",
}


def markdown(sweep: str, kind: str, points: list[Point], rows: dict[int, list[dict]],
             comparisons: list[dict] = ()) -> str:
    """The sweep's table: a row per point (variant), a column per task; then each point against the
    sweep's first point (``comparisons``)."""
    tasks = _tasks([r for p in points for r in rows[id(p)]])
    head = ["variant" if kind == "ablations" else "point", "method", "P", "tokens per path", *tasks]
    table = []
    for point in points:
        by_task = {r["task"]: r for r in rows[id(point)]}
        paths = "" if point.num_paths is None else point.num_paths  # a forking format's model counts its own
        table.append(dict(zip(head, [point.title, point.shown_method, paths, point.max_gen_toks,
                                     *(_cell(by_task.get(t), kind, point.shown_method in FORMATS)
                                       for t in tasks)])))
    lines = [f"**{sweep}** ({kind}): {CELL_UNITS[kind]}; intervals: {stats.METHOD}", "", markdown_table(table, head)]
    if _all_zero([r for p in points for r in rows[id(p)]]):
        lines += ["", f"Note: {ZERO_NOTE}."]
    if comparisons:
        lines += ["", f"Against **{points[0].title}** on the same problems: the mean difference in pass@1, its "
                      "paired 95% interval and the sign-flip p-value:", ""]
        lines += [f"- {r['task']}: {r['run_a']}: {r['difference']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}], "
                  f"p = {r['p_value']:.3f} ({r['problems']} problems)" for r in comparisons]
    return "\n".join(lines) + "\n"


def plot_ablations(points: list[Point], path: Path) -> None:
    """The leaderboard's picture (accuracy, tokens and seconds per problem) with a bar per variant."""
    rows = []
    for point in points:
        (results,) = leaderboard.find_result_files(point.output_dir)
        rows += [{**r, "variant": point.title} for r in leaderboard.rows_from_file(results)]
    zero = _all_zero([{"pass_at_1": r["value"]} for r in rows if r["metric"] == "pass_at_1"])
    leaderboard.plot(rows, path, label=lambda r: r["variant"], sort=False,
                     title="ablations: accuracy and cost per variant" + (f"\n({ZERO_NOTE})" if zero else ""))


def compare_with_first(points: list[Point], root: Path) -> tuple[list[dict], list[str]]:
    """Each point after the first against the sweep's first point, per task, as the leaderboard's
    ``--compare`` rows (``run_a``: the point, ``run_b``: the first point), and the refused pairs."""
    def scores(point: Point) -> list[leaderboard.RunScores]:
        (path,) = leaderboard.find_result_files(point.output_dir)
        return [dataclasses.replace(s, label=point.title) for s in leaderboard.run_scores(path, root)]

    first = {s.task: s for s in scores(points[0])}
    rows, refusals = [], []
    for point in points[1:]:
        for a in scores(point):
            b = first.get(a.task)
            if b is None:
                refusals.append(f"{a.task}: {a.label}: not compared, the first point {points[0].title} did not run it")
                continue
            try:
                rows.append(leaderboard.compare_pair(a, b))
            except leaderboard.Refused as e:
                refusals.append(str(e))
    return rows, refusals


def write(experiment: Experiment) -> list[Path]:
    """Every sweep's CSV, PNG and markdown table (of its done points) in the output folder, and its
    comparisons with its first point (``<sweep>_comparisons.csv`` and ``.png``; refused pairs on stderr)."""
    written = []
    for sweep, points in experiment.sweeps().items():
        done = [p for p in points if p.output_dir.is_dir()]
        if not done:
            continue
        kind = done[0].kind
        out = experiment.output_path
        rows = {id(p): point_rows(p, out) for p in done}
        write_csv([r for p in done for r in rows[id(p)]], out / f"{sweep}.csv", COLUMNS)  # its .md: markdown()
        if kind == "ablations":
            plot_ablations(done, out / f"{sweep}.png")
        else:
            plot_curves(CURVES[kind], done, rows, out / f"{sweep}.png")
        comparisons, refusals = compare_with_first(done, out)
        for refusal in refusals:
            print(f"experiments: {sweep}: {refusal}", file=sys.stderr)
        atomic_write(out / f"{sweep}.md", markdown(sweep, kind, done, rows, comparisons))
        written += [out / f"{sweep}.{ext}" for ext in ("csv", "png", "md")]
        if comparisons:
            leaderboard.write_comparison_rows(comparisons, out / f"{sweep}_comparisons.csv",
                                              out / f"{sweep}_comparisons.png",
                                              title=f"{sweep}: each point minus {done[0].title}, 95% paired intervals")
            written += [out / f"{sweep}_comparisons.{ext}" for ext in ("csv", "md", "png")]
    return written


__all__ = ["COLUMNS", "compare_with_first", "markdown", "point_rows", "write"]
