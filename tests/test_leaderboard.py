"""Leaderboard CSV/table/PNG from results produced by a real lm_eval run (plus synthetic and corrupt files)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import tiny_hf_aime24_run

from lm_eval_parathinker import leaderboard


def _parathinker_result(path: Path, num_paths: int, value: float, model_args, compat=None):
    data = {
        "results": {"aime24": {"alias": "aime24", "pass_at_1,all": value, "pass_at_1_stderr,all": 0.1,
                               "gen_tokens,all": 1000.0 * num_paths, "gen_tokens_stderr,all": "N/A",
                               "latency_s,all": 2.5, "latency_s_stderr,all": 0.5}},
        "configs": {"aime24": {"repeats": 16}},
        "n-samples": {"aime24": {"original": 30, "effective": 30}},
        "config": {"model": "parathinker", "model_args": model_args, "limit": None},
        "date": 1795784072.54,
    }
    if compat is not None:  # recorded by ParaThinkerLM.get_model_info
        data["config"]["parathinker"] = {"method": "parathinker", "num_paths": num_paths, "compat": compat}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.mark.slow
def test_leaderboard_end_to_end(tmp_path_factory, tmp_path):
    out, _ = tiny_hf_aime24_run(tmp_path_factory.mktemp("hf"))
    root = tmp_path / "runs"
    shutil.copytree(out, root / "hf")
    _parathinker_result(root / "pt" / "results_2026-01-01T00-00-00.json", 4, 0.5,
                        {"pretrained": "Qwen/tiny", "num_paths": 4, "method": "parathinker", "termination": "first"})
    _parathinker_result(root / "pt8" / "results_2026-01-02T00-00-00.json", 8, 0.6,
                        "pretrained=Qwen/tiny,num_paths=8,method=parathinker")  # string model_args
    _parathinker_result(root / "pt8o" / "results_2026-01-03T00-00-00.json", 8, 0.4,
                        {"pretrained": "Qwen/tiny", "num_paths": 8}, compat="official")
    (root / "bad").mkdir()
    (root / "bad" / "results_corrupt.json").write_text('{"results": {"aime24": ')  # partial file
    (root / "bad" / "results_other.json").write_text("[1, 2]")

    csv_path, png = tmp_path / "lb" / "leaderboard.csv", tmp_path / "lb" / "leaderboard.png"
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval_parathinker.leaderboard", str(root), "-o", str(csv_path), "--plot", str(png)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "skipping" in proc.stderr and "results_corrupt.json" in proc.stderr and "results_other.json" in proc.stderr
    assert "tiny_llama sequential P=1" in proc.stdout and "tiny parathinker P=8 " in proc.stdout
    assert "tiny parathinker P=8 official" in proc.stdout  # compat=official runs are told apart
    print(proc.stdout)

    rows = list(csv.DictReader(csv_path.open()))
    assert list(rows[0]) == leaderboard.COLUMNS
    hf = [r for r in rows if r["model"] == "hf"]
    assert {r["metric"] for r in hf} >= {"pass_at_1", "pass_at_k", "maj_at_k", "no_answer", "verify_timeouts"}
    r = next(r for r in hf if r["metric"] == "pass_at_1")
    assert (r["method"], r["num_paths"], r["task"], r["n"], r["repeats"], r["limit"]) == ("sequential", "1", "aime24", "2", "2", "2.0")
    assert r["pretrained"].endswith("tiny_llama")
    assert float(r["ci_low"]) <= float(r["value"]) <= float(r["ci_high"])  # its samples were logged: an interval
    # the synthetic runs have no samples files: no interval, the stderr column only
    assert all(x["ci_low"] == x["ci_high"] == "" for x in rows if x["model"] == "parathinker")
    p4 = next(r for r in rows if r["num_paths"] == "4" and r["metric"] == "pass_at_1")
    assert (p4["method"], p4["termination"], p4["value"], p4["stderr"]) == ("parathinker", "first", "0.5", "0.1")
    assert p4["compat"] == "" and r["compat"] == ""  # absent from the results JSON
    assert {x["compat"] for x in rows if x["value"] == "0.4"} == {"official"}
    assert (p4["gen_tokens"], p4["latency_s"], p4["n"], p4["repeats"]) == ("4000.0", "2.5", "30", "16")
    p8 = next(r for r in rows if r["num_paths"] == "8" and r["metric"] == "gen_tokens")
    assert p8["stderr"] == "" and p8["pretrained"] == "Qwen/tiny"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(csv_path.parent.glob("*.tmp"))


def _row(method, metric, value, repeats=1, **extra):
    return {"model": "parathinker", "pretrained": "embedded", "method": method, "num_paths": 4, "task": "aime24",
            "metric": metric, "value": value, "repeats": repeats, "date": "2026-01-01T00:00:00Z", **extra}


def test_cost_is_visible_when_every_run_scores_zero(tmp_path):
    """The make demo case: three methods, all at pass@1 = 0, that differ in tokens and seconds."""
    costs = {"sequential": (245.0, 60.0), "majority": (1024.0, 73.0), "parathinker": (219.0, 19.0)}
    rows = [_row(m, "pass_at_1", 0.0) for m in costs]
    rows += [_row(m, "gen_tokens", tok, repeats=2) for m, (tok, _) in costs.items()]
    rows += [_row(m, "latency_s", sec, repeats=2) for m, (_, sec) in costs.items()]
    _, _, accuracy = leaderboard.pivot(rows, "pass_at_1")
    assert set(accuracy.values()) == {0.0}
    _, _, tokens = leaderboard.pivot(rows, "gen_tokens", per_problem=True)
    _, _, seconds = leaderboard.pivot(rows, "latency_s", per_problem=True)
    assert tokens[("embedded majority P=4", "aime24")] == 2048.0  # per response x 2 responses per problem
    assert seconds[("embedded parathinker P=4", "aime24")] == 38.0
    assert len(set(tokens.values())) == len(set(seconds.values())) == 3
    leaderboard.plot(rows, tmp_path / "lb.png")
    assert (tmp_path / "lb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_official_compat_in_the_label():
    official, paper = (_row("parathinker", "pass_at_1", 0.0, compat=c) for c in ("official", "paper"))
    assert leaderboard.run_label(official) == "embedded parathinker P=4 official"
    assert leaderboard.run_label(paper) == "embedded parathinker P=4"


def test_atomic_write_leaves_no_partial_csv(tmp_path, monkeypatch):
    target = tmp_path / "lb.csv"
    target.write_text("old\n")

    class Boom(dict):
        def get(self, *a):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        leaderboard.write_csv([Boom()], target)
    assert target.read_text() == "old\n"
    assert list(tmp_path.iterdir()) == [target]


def test_parse_model_args():
    assert leaderboard.parse_model_args("pretrained=a/b,num_paths=4") == {"pretrained": "a/b", "num_paths": "4"}
    assert leaderboard.parse_model_args({"x": 1}) == {"x": 1}
    assert leaderboard.parse_model_args(None) == {}


def test_markdown_table_beside_the_csv(tmp_path):
    """The CSV's rows again as a Markdown table (the docs include it): the reader's columns, numbers
    rounded to 4 significant digits, whole from 1,000, integers as they are, the text escaped."""
    rows = [{**_row("majority", "gen_tokens", 986.6666666666666), "n": 3, "latency_s": 1234.56, "pretrained": "a|b"}]
    leaderboard.write_csv(rows, tmp_path / "lb.csv")
    head, rule, line = (tmp_path / "lb.md").read_text().splitlines()
    assert head == "| " + " | ".join(leaderboard.READER_COLUMNS) + " |"
    cells = dict(zip(leaderboard.READER_COLUMNS, line.strip("| ").split(" | ")))
    assert (cells["value"], cells["n"], cells["latency_s"], cells["pretrained"]) == ("986.7", "3", "1235", "a\\|b")
    assert rule.split("|")[1:-1][leaderboard.READER_COLUMNS.index("value")] == "---:"  # numbers to the right
