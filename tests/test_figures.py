"""Every figure writer's picture, drawn on sample data, has no two texts on top of each other: tick
labels, titles, axis labels, annotations and legend texts, as matplotlib's renderer places them."""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from benchmarks import grading, harness, training  # noqa: E402
from benchmarks import engine as bench  # noqa: E402
from lm_eval_parathinker import leaderboard  # noqa: E402
from lm_eval_parathinker.experiments import config, figures  # noqa: E402
from lm_eval_parathinker.tables import read_csv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"


def overlapping_texts(fig: Figure) -> list[tuple[str, str]]:
    """The pairs of texts whose boxes overlap, among those a draw of ``fig`` renders (a tick label
    outside the view is not drawn, so it is not counted)."""
    drawn = []
    draw = Text.draw

    def recorded(self, renderer):
        if self.get_visible() and self.get_text().strip():
            drawn.append(self)
        return draw(self, renderer)

    Text.draw = recorded
    try:
        fig.canvas.draw()
    finally:
        Text.draw = draw
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in dict.fromkeys(drawn)]
    return [(a, b) for (a, box_a), (b, box_b) in combinations(boxes, 2) if box_a.overlaps(box_b)]


@pytest.fixture
def overlaps(monkeypatch):
    """Every figure saved while the test runs, checked as it is saved: [(its title, text, text)]."""
    found = []
    savefig = Figure.savefig

    def checked(self, path, *args, **kwargs):
        name = self.get_suptitle() or self.axes[0].get_title()
        found.extend((name, a, b) for a, b in overlapping_texts(self))
        return savefig(self, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", checked)
    return found


def test_the_check_sees_overlapping_texts():
    fig, ax = plt.subplots()
    ax.set_title("title")
    ax.annotate("first label", (0.5, 0.5))
    ax.annotate("second label", (0.5, 0.5))
    ax.set_xticks([0.0, 1.0], ["a", "b"])
    assert overlapping_texts(fig) == [("first label", "second label")]
    plt.close(fig)


# ----------------------------------------------------------------- the leaderboard's pictures


def _run(method: str, paths: int, task: str, accuracy: float, tokens: float, seconds: float) -> list[dict]:
    """A run's leaderboard rows: accuracy and cost (per response, 2 responses per problem), with intervals."""
    base = {"model": "parathinker", "pretrained": "embedded", "method": method, "num_paths": paths, "compat": "",
            "task": task, "repeats": 2, "date": "2026-12-01T00:00:00Z"}
    return [{**base, "metric": metric, "value": value, "ci_low": 0.8 * value, "ci_high": min(1.2 * value, 1.0)
             if metric == "pass_at_1" else 1.2 * value}
            for metric, value in (("pass_at_1", accuracy), ("gen_tokens", tokens), ("latency_s", seconds))]


@pytest.mark.parametrize("tasks", [("aime24",), ("aime24", "amc23")])
def test_leaderboard_picture(tasks, overlaps, tmp_path):
    rows = [r for task in tasks for r in
            _run("sequential", 1, task, 0.95, 245.0, 60.0) + _run("majority", 4, task, 0.0, 1024.0, 73.0)
            + _run("parathinker", 4, task, 1.0, 219.0, 19.0)]
    leaderboard.plot(rows, tmp_path / "leaderboard.png")
    assert not overlaps


def test_committed_leaderboard_and_comparisons(overlaps, tmp_path):
    leaderboard.plot(read_csv(RESULTS / "leaderboard.csv")[0], tmp_path / "leaderboard.png")
    leaderboard.plot_comparisons(read_csv(RESULTS / "comparisons.csv")[0], tmp_path / "comparisons.png")
    assert not overlaps


def test_comparisons_picture_with_far_differences(overlaps, tmp_path):
    rows = [{"task": "aime24", "metric": "pass_at_1", "run_a": f"run {a}", "run_b": f"run {b}", "problems": 30,
             "difference": d, "ci_low": d - 0.1, "ci_high": d + 0.1, "p_value": 0.04}
            for a, b, d in ((1, 2, -0.6), (1, 3, 0.6), (2, 3, 0.0))]
    leaderboard.plot_comparisons(rows, tmp_path / "comparisons.png")
    assert not overlaps


# --------------------------------------------------------------------- the experiments' pictures


@pytest.fixture(scope="module")
def demo_sweeps():
    """The demo config's sweeps (no weights load), each point with a row of sample numbers in which
    points coincide: every pass@1 0, sequential B=16 and majority P=1 the same tokens and seconds."""
    experiment = config.load(REPO / "experiments" / "demo.yaml", REPO / "results" / "experiments" / "demo")
    rows = {}
    for point in experiment.points:
        tokens = point.num_paths * point.max_gen_toks + (20 if point.method == "parathinker" else 0)
        seconds = 2.5 * point.num_paths if point.method != "sequential" else 2.5 * point.max_gen_toks / 16
        row = {"task": "aime24", "pass_at_1": 0.0, "gen_tokens": tokens, "latency_s": seconds, "think_s": seconds}
        for metric in figures.METRICS:
            row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = row[metric], row[metric]
        rows[id(point)] = [row]
    return experiment.sweeps(), rows


@pytest.mark.parametrize("kind", ["scaling", "width"])
def test_experiment_curves(kind, demo_sweeps, overlaps, tmp_path):
    sweeps, rows = demo_sweeps
    figures.plot_curves(figures.CURVES[kind], sweeps[kind], rows, tmp_path / f"{kind}.png")
    assert not overlaps


# ------------------------------------------------------------------------------- the benchmarks


@pytest.mark.parametrize("name", bench.BENCHMARKS)
def test_benchmark_picture(name, overlaps, tmp_path):
    """Each benchmark's picture of its committed CSV (the numbers of a real run)."""
    rows, _ = read_csv(RESULTS / f"bench_{name}.csv")
    harness.draw(bench.BENCHMARKS[name].plot, rows, tmp_path / f"{name}.png",
                 harness.plot_title(name, "smollm2-135m", "cpu", "float32"))
    assert not overlaps


TRAINING_STEP = [
    {"check": "step", "length": n, "attention": a, "pass": "forward+backward", "seconds": s, "max_rel_diff": math.nan}
    for n, a, s in ((16384, "sdpa", 4.1), (28672, "sdpa", 9.8), (16384, "flex_attention", 2.2),
                    (28672, "flex_attention", 4.0))
] + [{"check": "flex_vs_sdpa", "length": 8192, "attention": "both", "pass": "gradients", "seconds": math.nan,
      "max_rel_diff": 3e-6}]


@pytest.mark.parametrize("name", ["training_attention", "training_throughput", "training_step"])
def test_training_benchmark_picture(name, overlaps, tmp_path):
    rows = TRAINING_STEP if name == "training_step" else read_csv(RESULTS / f"bench_{name}.csv")[0]
    harness.draw(getattr(training, f"plot_{name}"), rows, tmp_path / f"{name}.png", f"{name} (cuda)")
    assert not overlaps


def test_grading_picture(overlaps, tmp_path):
    grading.write_png(read_csv(RESULTS / "bench_grading.csv")[0], tmp_path / "grading.png")
    assert not overlaps


def test_sft_loss_picture(overlaps, tmp_path):
    from training.trainer import plot_loss

    rows, _ = read_csv(RESULTS / "sft_loss.csv")
    plot_loss(rows, tmp_path / "loss.png")
    assert not overlaps
