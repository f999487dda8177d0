"""``python -m lm_eval_parathinker.leaderboard DIR --compare`` over real lm_eval runs of a tiny model,
checked against numbers recomputed here from the samples files; refusals; intervals in the leaderboard."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import offline_env, run_lm_evals
from tiny import save_tiny_checkpoint

from lm_eval_parathinker import leaderboard
from lm_eval_parathinker.scoring import extract_answer, judge

LIMIT, REPEATS = 4, 2
METHODS = ("sequential", "majority")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two real runs (`lm_eval --model parathinker`, --log_samples) of a tiny model on the same problems."""
    root = tmp_path_factory.mktemp("compare")
    ckpt = save_tiny_checkpoint(root / "tiny", "qwen2", parathinker=False)
    runs = []
    for method in METHODS:
        model_args = f"pretrained={ckpt},method={method},dtype=float32" + (",num_paths=2" if method == "majority" else "")
        runs.append(([
            "--model", "parathinker", "--model_args", model_args, "--tasks", "aime24", "--limit", str(LIMIT),
            "--gen_kwargs", "max_gen_toks=8,temperature=5.0,do_sample=True", "--metadata", json.dumps({"repeats": REPEATS}),
            "--device", "cpu", "--batch_size", str(LIMIT), "--log_samples",
        ], root / "runs" / method))  # fmt: skip
    run_lm_evals(runs, OMP_NUM_THREADS="1")
    return root / "runs"


def _compare(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lm_eval_parathinker.leaderboard", str(root), "--compare"],
                          capture_output=True, text=True, timeout=120, env=offline_env())


def _samples_file(root: Path, method: str) -> Path:
    (path,) = (root / method).glob("**/samples_aime24_*.jsonl")
    return path


def _graded(path: Path) -> dict[int, float]:
    """Each problem's share of correct responses, graded here from the logged responses."""
    out = {}
    for line in path.read_text().splitlines():
        sample = json.loads(line)
        verdicts = [judge(extract_answer(r), sample["doc"]["answer"])[0] for r in sample["filtered_resps"][0]]
        assert len(verdicts) == REPEATS
        out[sample["doc_id"]] = float(np.mean(verdicts))
    return out


def _expected(a: list[float], b: list[float]) -> dict[str, float]:
    """The documented method, recomputed: the mean difference, its percentile bootstrap interval
    (10000 resamples of the problems, numpy's default_rng(0)) and the exact sign-flip p-value."""
    d = np.asarray(a) - np.asarray(b)
    means = d[np.random.default_rng(0).integers(0, len(d), size=(10_000, len(d)))].mean(axis=1)
    flips = [abs(np.mean(np.array(s) * d)) >= abs(d.mean()) - 1e-12 for s in itertools.product([1, -1], repeat=len(d))]
    return {"difference": d.mean(), "ci_low": np.quantile(means, 0.025), "ci_high": np.quantile(means, 0.975),
            "p_value": np.mean(flips)}


def _check_row(row: dict, a: list[float], b: list[float]) -> None:
    assert (row["task"], row["metric"], int(row["problems"])) == ("aime24", "pass_at_1", LIMIT)
    assert float(row["mean_a"]) == pytest.approx(np.mean(a)) and float(row["mean_b"]) == pytest.approx(np.mean(b))
    for key, value in _expected(a, b).items():
        assert float(row[key]) == pytest.approx(value, abs=1e-12), key
    assert float(row["repeats_for_halfwidth_estimate"]) >= 1 and float(row["halfwidth"]) == 0.02


@pytest.mark.slow
def test_compare_real_runs_against_the_samples(runs, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(runs, root)
    proc = _compare(root)
    assert proc.returncode == 0, proc.stderr
    assert "pass_at_1, run A minus run B" in proc.stdout and "10000 resamples, seed 0" in proc.stdout
    (row,) = list(csv.DictReader((root / "comparisons.csv").open()))
    assert list(row) == leaderboard.COMPARISON_COLUMNS
    assert (root / "comparisons.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # runs sorted by label: "tiny majority P=2 (majority/...)" is A, sequential is B
    assert row["run_a"].startswith("tiny majority P=2") and row["run_b"].startswith("tiny sequential P=1")
    graded = {m: _graded(_samples_file(root, m)) for m in METHODS}
    assert sorted(graded["majority"]) == list(range(LIMIT))
    _check_row(row, [graded["majority"][i] for i in range(LIMIT)], [graded["sequential"][i] for i in range(LIMIT)])

    # A tiny random model hardly ever answers right: give the same runs known per-problem scores
    # (as if graded so), for a comparison whose numbers are not all zero.
    scores = {"majority": [1.0, 0.5, 0.5, 0.0], "sequential": [0.0, 0.0, 0.5, 0.0]}
    for method, values in scores.items():
        path = _samples_file(root, method)
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        for sample in lines:
            sample["pass_at_1"] = values[sample["doc_id"]]
        path.write_text("".join(json.dumps(s) + "\n" for s in lines))
    proc = _compare(root)
    assert proc.returncode == 0, proc.stderr
    (row,) = list(csv.DictReader((root / "comparisons.csv").open()))
    _check_row(row, scores["majority"], scores["sequential"])
    assert float(row["difference"]) == 0.375


@pytest.mark.slow
def test_compare_refuses_different_problem_sets(runs, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(runs, root)
    # a third run on fewer problems (as --limit 3 logs them) and a fourth whose doc 0 is another document
    shutil.copytree(root / "majority", root / "fewer")
    path = _samples_file(root, "fewer")
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines() if json.loads(line)["doc_id"] != 3))
    shutil.copytree(root / "majority", root / "changed")
    path = _samples_file(root, "changed")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[0]["doc_hash"] = "0" * 64
    path.write_text("".join(json.dumps(s) + "\n" for s in lines))
    # and a run without --log_samples
    shutil.copytree(root / "sequential", root / "nosamples")
    _samples_file(root, "nosamples").unlink()

    proc = _compare(root)
    assert proc.returncode == 1
    # "fewer" sorts before "majority" and "sequential": it is the first run of those pairs
    assert "3 vs 4 problems" in proc.stderr and "doc_id 3 only in the second" in proc.stderr
    assert "doc_id 0 are different documents (doc_hash differs)" in proc.stderr
    assert "its comparisons need --log_samples" in proc.stderr and "(nosamples/" in proc.stderr
    # only the original pair is compared: every other pair has a refused run
    (row,) = list(csv.DictReader((root / "comparisons.csv").open()))
    assert row["results_a"].startswith("majority/") and row["results_b"].startswith("sequential/")

    # nothing comparable: no output at all
    lone = tmp_path / "lone"
    shutil.copytree(root / "fewer", lone / "fewer")
    shutil.copytree(root / "majority", lone / "majority")
    proc = _compare(lone)
    assert proc.returncode == 1 and "nothing written" in proc.stderr
    assert not (lone / "comparisons.csv").exists() and not (lone / "comparisons.png").exists()


@pytest.mark.slow
def test_leaderboard_rows_carry_intervals(runs, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(runs, root)
    path = _samples_file(root, "majority")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for sample, value in zip(lines, [1.0, 0.5, 0.5, 0.0]):
        sample["pass_at_1"] = value
    path.write_text("".join(json.dumps(s) + "\n" for s in lines))
    results = next(path.parent.glob("results_*.json"))
    data = json.loads(results.read_text())
    data["results"]["aime24"]["pass_at_1,all"] = 0.5  # the same runs, as if so graded
    results.write_text(json.dumps(data))
    rows = leaderboard.collect(root)
    (row,) = [r for r in rows if r["metric"] == "pass_at_1" and r["method"] == "majority"]
    d = np.array([1.0, 0.5, 0.5, 0.0])
    means = d[np.random.default_rng(0).integers(0, 4, size=(10_000, 4))].mean(axis=1)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert row["stderr"] != ""  # lm-eval's stderr column stays
    assert "[" in leaderboard.format_table(rows) and "10000 resamples" in leaderboard.format_table(rows)
    leaderboard.plot(rows, tmp_path / "lb.png")
    assert (tmp_path / "lb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=rf"{path.name}:{LIMIT + 1}: malformed JSON"):
        leaderboard.rows_from_file(results)
