"""The leaderboard's pictures: each run's accuracy beside its cost (generated tokens and seconds per
problem), so runs compare even when every one of them scores 0; and the paired differences of
``--compare``, each with its 95% interval."""

from __future__ import annotations

import math
import os
from typing import Any, Callable

from .. import stats
from ..plotting import save_png
from .rows import MAIN_METRIC, pivot, run_label, task_sort

# The cost panels of the picture: per-response means (gen_tokens, latency_s) times k, per problem.
COST_PANELS = (("gen_tokens", "generated tokens per problem", "tokens (all paths and the summary, k responses)"),
               ("latency_s", "seconds per problem", "seconds (k x the latency of one response)"))


def _bar_text(value: float | None, cost: bool) -> str:
    if value is None:
        return "n/a"
    if not cost:
        return f"{value:.3f}"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def plot(rows: list[dict[str, Any]], path: str | os.PathLike, metric: str = MAIN_METRIC,
         label: Callable[[dict[str, Any]], str] = run_label, sort: bool = True, title: str | None = None) -> None:
    """Accuracy and its cost side by side, one horizontal bar per run and task in each panel
    (``label`` names the runs; ``sort=False`` keeps them in the order of ``rows``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label(r) for r in rows if r["metric"] == metric))
    labels = sorted(labels) if sort else labels
    panels = [(metric, f"{metric} (accuracy)", f"{metric} (95% interval over problems)", False)]
    panels += [(m, heading, unit, True) for m, heading, unit in COST_PANELS]
    height_in = 2.2 + 0.5 * max(len(labels), 1)
    fig, axes = plt.subplots(1, len(panels), figsize=(15, height_in), sharey=True)
    for ax, (name, heading, unit, per_problem) in zip(axes, panels):
        _, tasks, cells = pivot(rows, name, per_problem, label)
        _, _, lows = pivot(rows, name, per_problem, label, field="ci_low")
        _, _, highs = pivot(rows, name, per_problem, label, field="ci_high")
        height = 0.8 / max(len(tasks), 1)
        right = 0.0  # where the rightmost value label starts
        for j, task in enumerate(tasks):
            ys = [i + (j - (len(tasks) - 1) / 2) * height for i in range(len(labels))]
            values = [cells.get((lab, task)) for lab in labels]
            # the 95% interval over problems as an error bar, where the run logged its samples
            errors = [[max(0.0, v - lows[(lab, task)]), max(0.0, highs[(lab, task)] - v)]
                      if v is not None and (lab, task) in lows and (lab, task) in highs else [math.nan, math.nan]
                      for lab, v in zip(labels, values)]
            ax.barh(ys, [v or 0.0 for v in values], height=height, label=task,
                    xerr=list(zip(*errors)) if errors else None, error_kw={"elinewidth": 1, "capsize": 2})
            # the value beside every bar, past its error bar: a run that scores 0 still shows its number
            for y, v, (_, above) in zip(ys, values, errors):
                end = (v or 0.0) + (0.0 if math.isnan(above) else above)
                right = max(right, end)
                ax.annotate(_bar_text(v, per_problem), (end, y), xytext=(4, 0), textcoords="offset points",
                            va="center", fontsize=7)
        if not cells:
            ax.text(0.5, 0.5, f"no {name} in these runs", transform=ax.transAxes, ha="center", fontsize=8)
        ax.set_title(heading, fontsize=10)
        ax.set_xlabel(unit, fontsize=8)
        ax.grid(alpha=0.3, axis="x")
        ax.set_xlim(0, 1.2 if not per_problem else 1.3 * right or 1.0)  # room for the labels
    axes[0].set_xticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])  # an accuracy: the room beyond 1 is for the labels
    axes[0].set_yticks(range(len(labels)))
    axes[0].set_yticklabels(labels, fontsize=8)
    axes[0].invert_yaxis()
    tasks = task_sort(r["task"] for r in rows)
    legend = 0.0
    if len(tasks) > 1:  # below the panels, clear of the bars' labels
        fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(tasks), fontsize=7)
        legend = 0.35 / height_in
    fig.suptitle(title or f"accuracy and cost per run ({', '.join(tasks)})", fontsize=10)
    fig.tight_layout(rect=(0, legend, 1, 1))
    save_png(fig, path)


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
    for y, r in zip(ys, rows):  # above its row, over 0 (the middle): never off the axes
        ax.annotate(f"{r['difference']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}], p = {r['p_value']:.2f}, "
                    f"{r['problems']} problems", (0.5, y), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([f"{r['task']}: {r['run_a']}\n  minus {r['run_b']}" for r in rows], fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.8)  # top to bottom, room for the text above the first row
    span = 1.3 * max([0.05] + [abs(r[end]) for r in rows for end in ("ci_low", "ci_high")])
    ax.set_xlim(-span, span)  # 0 in the middle
    metric = rows[0]["metric"] if rows else ""
    ax.set_xlabel(f"difference in {metric} (A - B; per problem the mean of its samples)")
    ax.grid(alpha=0.3, axis="x")
    ax.set_title(title or f"paired differences with 95% intervals ({stats.METHOD})", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
