"""The grading-speed benchmark runs end to end on a few responses and writes its table (speed is not tested)."""

from __future__ import annotations

import csv

import pytest

from helpers import DATA_DIR

from benchmarks import grading


@pytest.mark.slow
def test_smoke_writes_csv_and_png(tmp_path):
    csv_path = grading.main(["--smoke", "--data-dir", str(DATA_DIR), "--output", str(tmp_path)])
    assert csv_path == tmp_path / "bench_grading.csv"
    rows = list(csv.DictReader(csv_path.open()))
    assert list(rows[0]) == grading.COLUMNS
    cells = {(r["grader"], r["kind"]): r for r in rows}
    for grader in ("scorer", "math_verify_whole_response"):
        for kind in (*grading.KINDS, "all"):
            assert float(cells[grader, kind]["responses_per_s"]) > 0
    assert int(cells["scorer", "all"]["responses"]) == 24 == int(cells["scorer_process_results", "all"]["responses"])
    assert float(cells["math_verify_whole_response", "all"]["speed_vs_baseline"]) == 1.0  # the baseline itself
    # every response was built with a known verdict: the scorer agrees with all of them
    assert float(cells["scorer", "all"]["agreement"]) == 1.0
    assert (tmp_path / "bench_grading.png").read_bytes()[:4] == b"\x89PNG"


def test_responses_are_deterministic_and_cover_every_kind():
    golds = ["025", "27.0", r"\frac{14}{3}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", "(3,-1)", "x=5"]
    first, again = grading.build_responses(golds, 40, seed=3), grading.build_responses(golds, 40, seed=3)
    assert first == again and len(first) == 40
    assert {r.kind for r in first} == set(grading.KINDS)
    assert not any(r.correct for r in first if r.kind == "no_answer")
    widths = {r.text.count("</think") for r in first if r.kind == "parathinker"}
    assert widths <= set(range(2, 9)) and len(widths) > 1


@pytest.mark.slow
def test_missing_data_exits_with_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"aime24.*not found"):
        grading.main(["--smoke", "--data-dir", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # no partial output
