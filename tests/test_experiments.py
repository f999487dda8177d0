"""``python -m lm_eval_parathinker.experiments``: a grid on one shared model (one weight load), each
point equal to its own ``lm_eval`` run, results the leaderboard reads, the three outputs, kill and
rerun, ``ParaThinkerLM.configure``, and bad configs refused before any weights load."""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from transformers import AutoTokenizer

from helpers import ONE_THREAD, REPO_ROOT, journal_entries, kill_when, lm_eval_cmd, offline_env
from tiny import save_tiny_checkpoint

from lm_eval_parathinker import leaderboard, protocol
from lm_eval_parathinker.experiments import config, figures, runner
from lm_eval_parathinker.experiments.__main__ import main
from lm_eval_parathinker.engine import ParaThinkerEngine
from lm_eval_parathinker.harness.model import ParaThinkerLM
from lm_eval_parathinker.upstream import lm_eval as upstream_lm_eval

TIMED = ("latency_s", "think_s")  # wall-clock statistics: excluded when runs are compared
RESPONSES = 2 * 2  # per point: --limit 2, 2 repeats
GRID = """\
output_path: {out}
checkpoints:
  tiny: {{pretrained: {ckpt}, dtype: float32, summary_max_tokens: 4}}
tasks: [aime24]
limit: 2
metadata: {{repeats: 2}}
device: cpu
batch_size: 2
gen_kwargs: {{do_sample: true, temperature: 5.0, seed: 7}}
sweeps:
  scaling:
    kind: scaling
    runs:
      - {{method: sequential, max_gen_toks: [8, 16]}}
      - {{method: [majority, parathinker], num_paths: [1, 2], max_gen_toks: [8, 16]}}
  width:
    kind: width
    runs:
      - {{method: parathinker, num_paths: [1, 2], max_gen_toks: 8}}
  ablations:
    kind: ablations
    runs:
      - {{label: first-finish, method: parathinker, num_paths: 2, max_gen_toks: 8}}
      - {{label: last-finish, method: parathinker, num_paths: 2, max_gen_toks: 8, termination: last}}
"""
NUM_POINTS = 2 + 2 * 2 * 2 + 2 + 2


pytestmark = pytest.mark.usefixtures("one_thread_offline")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A plain checkpoint with one embedding row per token: adding the control tokens creates rows
    that a baseline must never sample."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny_plain", "qwen2", parathinker=False,
                                exact_vocab=True)


def _config(root: Path, ckpt: Path, text: str = GRID) -> Path:
    path = root / "grid.yaml"
    path.write_text(text.format(out=root / "unused", ckpt=ckpt), encoding="utf-8")
    return path


def _results(point_dir: Path) -> dict:
    (path,) = glob.glob(str(point_dir / "**" / "results_*.json"), recursive=True)
    return json.loads(Path(path).read_text())


def _samples(point_dir: Path) -> dict[str, dict]:
    """doc_hash -> the responses and the metrics (wall-clock ones excluded) of a point's aime24 samples."""
    (path,) = glob.glob(str(point_dir / "**" / "samples_aime24_*.jsonl"), recursive=True)
    found = {}
    for line in Path(path).read_text().splitlines():
        s = json.loads(line)
        found[s["doc_hash"]] = {"resps": s["resps"], "metrics": {m: s[m] for m in s["metrics"] if m not in TIMED}}
    return found


def _metrics(point_dir: Path) -> dict:
    return {k: v for k, v in _results(point_dir)["results"]["aime24"].items() if not k.startswith(TIMED)}


@pytest.fixture(scope="module")
def sweep(ckpt, tmp_path_factory):
    """The grid run in this process, weight loads counted, then drawn."""
    root = tmp_path_factory.mktemp("sweep")
    experiment = config.load(_config(root, ckpt), root / "out")
    loads = []
    create = ParaThinkerLM._create_model

    def counted(self, *args, **kwargs):
        loads.append(self)
        return create(self, *args, **kwargs)

    calls = []  # every engine call in order: (in a warm-up, mode, paths, slots)
    warming = []
    generate, warm_up = ParaThinkerEngine.generate, runner.warm_up

    def recorded(self, prompts, options, *args, **kwargs):
        calls.append((bool(warming), options.mode, options.num_paths, kwargs.get("num_slots")))
        return generate(self, prompts, options, *args, **kwargs)

    def marked(lm):
        warming.append(True)
        try:
            return warm_up(lm)
        finally:
            warming.pop()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ParaThinkerLM, "_create_model", counted)
        patch.setattr(ParaThinkerEngine, "generate", recorded)
        patch.setattr(runner, "warm_up", marked)
        counts = runner.run(experiment, report=lambda line: None)
    return SimpleNamespace(experiment=experiment, counts=counts, loads=len(loads), written=figures.write(experiment),
                           root=root, calls=calls)


def _point(experiment, sweep_name: str, title: str) -> config.Point:
    (point,) = [p for p in experiment.points if p.sweep == sweep_name and p.title == title]
    return point


def test_one_weight_load_and_the_leaderboard_reads_every_point(sweep):
    experiment = sweep.experiment
    assert len(experiment.points) == NUM_POINTS
    assert sweep.loads == 1 and sweep.counts == {"ran": NUM_POINTS, "done": 0, "loads": 1}
    rows = [r for r in leaderboard.collect(experiment.output_path / "points") if r["metric"] == "pass_at_1"]
    assert len(rows) == NUM_POINTS
    found = sorted((r["model"], r["method"], str(r["num_paths"]), r["termination"]) for r in rows)
    expected = sorted(("parathinker", p.method, str(p.num_paths),
                       p.model_args.get("termination", "first") if p.method == "parathinker" else "")
                      for p in experiment.points)
    assert found == expected


def test_each_point_warms_up_at_its_shapes(sweep):
    """Before each point, one untimed engine call at the point's mode, paths and slots (the timed
    calls that follow then pay no first call at a new shape)."""
    warm_ups = [i for i, call in enumerate(sweep.calls) if call[0]]
    assert len(warm_ups) == NUM_POINTS
    for i in warm_ups:
        assert not sweep.calls[i + 1][0] and sweep.calls[i][1:] == sweep.calls[i + 1][1:], sweep.calls[i : i + 2]


def test_per_run_state_is_reset_for_every_point(sweep):
    for point in sweep.experiment.points:
        info = _results(point.output_dir)["config"]["parathinker"]
        assert sum(info["termination_reasons"].values()) == RESPONSES, point.title
        assert (info["journal"]["generated"], info["journal"]["reused"]) == (RESPONSES, 0), point.title
        assert (info["method"], info["num_paths"]) == (point.method, point.num_paths)
        assert info["banned_tokens"] == (0 if point.method == "parathinker" else 18)


def _alone(point: config.Point, root: Path) -> tuple[config.Point, subprocess.Popen]:
    """Start the point's own ``lm_eval`` run (its own journal, so it generates everything)."""
    alone = dataclasses.replace(point, output_dir=root / "out",
                                model_args={**point.model_args, "journal_dir": str(root / "journal")})
    proc = subprocess.Popen(lm_eval_cmd() + alone.lm_eval_args(), env=offline_env(**ONE_THREAD), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return alone, proc


@pytest.mark.slow
def test_points_equal_their_own_lm_eval_runs(sweep, tmp_path):
    """A baseline on the shared model (control tokens added, their new rows banned) and a ParaThinker
    point with other engine options than the model was built with, each against `lm_eval` alone."""
    experiment = sweep.experiment
    chosen = [_point(experiment, "scaling", "sequential B=8"), _point(experiment, "ablations", "last-finish")]
    runs = [_alone(p, tmp_path / str(i)) for i, p in enumerate(chosen)]  # both at once: one core each
    for _, proc in runs:
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log[-4000:]
    for point, (alone, _) in zip(chosen, runs):
        assert _samples(point.output_dir) == _samples(alone.output_dir), point.title
        assert _metrics(point.output_dir) == _metrics(alone.output_dir), point.title
        mine, theirs = _results(point.output_dir), _results(alone.output_dir)
        assert mine["config"]["model"] == theirs["config"]["model"] == "parathinker"
        assert mine["model_source"] == theirs["model_source"] == "parathinker"
        strip = lambda args: {k: v for k, v in args.items() if k != "journal_dir"}  # noqa: E731
        assert strip(mine["config"]["model_args"]) == strip(theirs["config"]["model_args"])
        assert mine["config"]["model_args"]["journal_dir"] == point.model_args["journal_dir"]
        assert mine["configs"]["aime24"]["generation_kwargs"] == theirs["configs"]["aime24"]["generation_kwargs"]
    responses = [r for doc in _samples(chosen[0].output_dir).values() for rs in doc["resps"] for r in rs]
    assert len(set(responses)) == RESPONSES  # sampled: not trivially equal


def test_the_baselines_need_the_ban(sweep, ckpt, tmp_path):
    """Without the ban, the shared model's sequential samples change (the new rows get probability)."""
    experiment = sweep.experiment
    point = _point(experiment, "scaling", "sequential B=8")
    lm = runner.load_model(experiment.points)  # as the sweep built it: control tokens added
    own = len(AutoTokenizer.from_pretrained(ckpt))  # the checkpoint's tokenizer: one row per token
    assert lm.parts.baseline_banned == lm.tokenizer.convert_tokens_to_ids(protocol.control_tokens())
    assert min(lm.parts.baseline_banned) == own and len(lm.parts.baseline_banned) == 18
    for name, banned in (("banned", lm.parts.baseline_banned), ("not_banned", [])):
        lm.parts = dataclasses.replace(lm.parts, baseline_banned=banned)
        again = dataclasses.replace(point, output_dir=tmp_path / name / "out",
                                    model_args={**point.model_args, "journal_dir": str(tmp_path / name / "journal")})
        runner.run_point(lm, again)
        assert (_samples(again.output_dir) == _samples(point.output_dir)) == (name == "banned")


def test_three_outputs(sweep):
    out = sweep.experiment.output_path
    assert sorted(p.name for p in sweep.written) == sorted(f"{s}{e}" for s in ("ablations", "scaling", "width")
                                                           for e in (".csv", ".md", ".png", "_comparisons.csv",
                                                                     "_comparisons.md", "_comparisons.png"))
    for name, points in sweep.experiment.sweeps().items():
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        rows = list(csv.DictReader((out / f"{name}.csv").open()))
        assert list(rows[0]) == figures.COLUMNS and len(rows) == len(points)
        for point, row in zip(points, rows):  # against the results JSON, read directly
            res = _results(point.output_dir)
            metrics = res["results"]["aime24"]
            assert row["point"] == point.title and int(row["max_gen_toks"]) == point.max_gen_toks
            for metric in ("pass_at_1", "gen_tokens", "think_s", "latency_s"):
                assert float(row[metric]) == pytest.approx(metrics[f"{metric},all"])
            assert float(row["think_s"]) > 0
            assert row["batch_size"] == res["config"]["batch_size"] == ("1" if name == "width" else "2")
            for metric in figures.METRICS:  # intervals from the point's samples
                assert float(row[f"{metric}_ci_low"]) <= float(row[metric]) <= float(row[f"{metric}_ci_high"])
        # every later point against the sweep's first, on the same two problems
        compared = list(csv.DictReader((out / f"{name}_comparisons.csv").open()))
        assert [r["run_a"] for r in compared] == [p.title for p in points[1:]]
        first = _results(points[0].output_dir)["results"]["aime24"]["pass_at_1,all"]
        for point, row in zip(points[1:], compared):
            mine = _results(point.output_dir)["results"]["aime24"]["pass_at_1,all"]
            assert (row["run_b"], row["problems"]) == (points[0].title, "2")
            assert (float(row["mean_a"]), float(row["mean_b"])) == pytest.approx((mine, first))
            assert float(row["difference"]) == pytest.approx(mine - first)
        assert (out / f"{name}_comparisons.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"Against **{points[0].title}** on the same problems" in (out / f"{name}.md").read_text()
    table = (out / "ablations.md").read_text()
    assert "| variant | method | P | tokens per path | aime24 |" in table and "every point scores pass@1 = 0" in table
    last = _results(_point(sweep.experiment, "ablations", "last-finish").output_dir)["results"]["aime24"]
    per_problem = f"{last['gen_tokens,all'] * 2:,.0f} tok"  # 2 repeats per problem
    assert f"| last-finish | parathinker | 2 | 8 | {last['pass_at_1,all']:.3f}" in table and per_problem in table


def _experiments_cmd(path: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "lm_eval_parathinker.experiments", str(path), "--output-path", str(out)]


@pytest.mark.slow
def test_killed_sweep_rerun_ends_with_identical_results(sweep, ckpt, tmp_path):
    """The grid's width and ablation sweeps (4 points), killed in the middle of the third point and run
    again: each point equals the same point of the whole grid's run in this process."""
    out = tmp_path / "out"
    grid = yaml.safe_load(_config(tmp_path, ckpt).read_text())
    del grid["sweeps"]["scaling"]
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    cmd = _experiments_cmd(tmp_path / "grid.yaml", out)
    points = [p for p in sweep.experiment.points if p.sweep != "scaling"]

    def mid_point() -> bool:  # two points done, and some responses of the next one journaled
        entries = len(journal_entries(out))
        return entries > 2 * RESPONSES and entries % RESPONSES != 0

    kill_when(cmd, mid_point, "killed in the middle of its third point")
    journaled = len(journal_entries(out))
    done = [p for p in points if (out / "points" / p.sweep / p.output_dir.name).is_dir()]
    assert 2 <= len(done) < len(points)
    before = {p.output_dir.name: _results(out / "points" / p.sweep / p.output_dir.name)["date"] for p in done}

    rerun = subprocess.run(cmd, env=offline_env(**ONE_THREAD), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"{len(points) - len(done)} point(s) run, {len(done)} done before, 1 model load(s)" in rerun.stdout
    reused = 0
    for point in points:
        again = out / "points" / point.sweep / point.output_dir.name
        assert _samples(again) == _samples(point.output_dir), point.title
        assert _metrics(again) == _metrics(point.output_dir), point.title
        if point.output_dir.name in before:  # done before the kill: left as it was
            assert _results(again)["date"] == before[point.output_dir.name]
        else:
            reused += _results(again)["config"]["parathinker"]["journal"]["reused"]
    assert reused == journaled - RESPONSES * len(done) > 0  # the killed point's journaled responses
    assert not glob.glob(str(out / "points" / "*" / f"*{runner.PARTIAL}"))


@pytest.mark.slow
def test_configure_switches_options_without_reloading(ckpt):
    lm = ParaThinkerLM(pretrained=str(ckpt), device="cpu", dtype="float32", num_paths=2, resume=False)
    engine = lm.engine
    lm.termination_reasons["budget"] = 3
    lm.configure(method="sequential", batch_size=3, resume=False)
    assert (lm.options.method, lm.compat, lm.batch_size, dict(lm.termination_reasons)) == ("sequential", None, 3, {})
    assert lm.engine is engine  # the compiled step and the KV pool are kept
    lm.configure(method="parathinker", num_paths=3, compat="paper", termination="last", resume=False)
    assert (lm.compat, lm.options.engine.num_paths, lm.options.engine.termination) == (protocol.PAPER, 3, "last")
    assert lm.batch_size == 1 and lm.engine is engine  # unset args take their defaults
    before = lm.options
    for bad, message in (({"num_paths": 9}, "num_paths=9"), ({"compat": "official"}, "compat=official needs"),
                         ({"dtype": "float16"}, "cannot be switched"), ({"batch_size": "auto"}, "batch_size=auto"),
                         ({"positions": "sideways"}, "positions='sideways'")):
        with pytest.raises(ValueError, match=message):
            lm.configure(resume=False, **bad)
        assert lm.options is before and lm.compat is protocol.PAPER
    lm.configure(method="parathinker", compile=True, resume=False)
    assert lm.engine is not engine and lm.engine.compile

    baseline = ParaThinkerLM(pretrained=str(ckpt), device="cpu", dtype="float32", method="sequential", resume=False)
    assert baseline.parts.baseline_banned == [] and baseline.parts.control_tokens_added == []
    with pytest.raises(ValueError, match="construct it with method=parathinker"):
        baseline.configure(method="parathinker", resume=False)


# --------------------------------------------------------------------------- configs, --dry-run


@pytest.mark.parametrize("name, points, checkpoints", [("paper_scaling", 24, 2), ("paper_ablations", 13, 1),
                                                       ("demo", 17, 1)])
def test_ready_configs_dry_run(name, points, checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(REPO_ROOT / "experiments" / f"{name}.yaml"), "--output-path", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"{points} points" in text and f"{checkpoints} checkpoint(s), each loaded once" in text
    commands = [line.split() for line in text.splitlines() if line.strip().startswith("lm_eval ")]
    assert len(commands) == points and not out.exists()  # nothing loaded, nothing written
    experiment = config.load(REPO_ROOT / "experiments" / f"{name}.yaml", out)
    for point, command in zip(experiment.points, commands):
        assert command[command.index("--batch_size") + 1] == ("1" if point.kind == "width" else str(point.batch_size))
        if name.startswith("paper"):
            gen = command[command.index("--gen_kwargs") + 1]
            assert "do_sample=true,temperature=0.5,top_p=1.0" in gen and "max_gen_toks=" in gen
            if point.method == "parathinker":
                assert point.model_args["pretrained"] == "Leslie04/ParaThinker-1.5B"
                assert point.model_args["compat"] in ("official", "paper") and point.num_paths <= 8
            else:
                assert point.model_args["pretrained"] == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    if name == "paper_scaling":
        assert max(p.num_paths for p in experiment.points if p.method == "majority") == 16
        assert {p.max_gen_toks for p in experiment.points if p.method != "sequential"} == {16384}


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize("change, needle, message", [
    ("termination: last}}", "temination: last}}", "sweeps.ablations.runs[1].temination: unknown key 'temination'"),
    ("num_paths: [1, 2], max_gen_toks: 8}}", "num_paths: [0, 2], max_gen_toks: 8}}",
     "sweeps.width.runs[0] (parathinker P=0): num_paths=0 must be at least 1"),
    ("label: first-finish, method: parathinker, num_paths: 2, max_gen_toks: 8",
     "label: first-finish, method: parathinker, num_paths: 2, max_gen_toks: 24, compat: official",
     "sweeps.ablations.runs[0] (first-finish): max_gen_toks=24 (the per-path budget) must be a multiple of 16"),
    ("kind: width", "kind: depth", "sweeps.width.kind: 'depth' is not one of scaling, width, ablations"),
    ("    kind: width\n", "    kind: width\n    batch_size: 4\n",
     "sweeps.width.batch_size: a width sweep runs one request"),
])
def test_bad_configs_fail_naming_the_entry(change, needle, message, ckpt, tmp_path):
    path = _config(tmp_path, ckpt, GRID.replace(change, needle, 1))
    text = path.read_text()
    with pytest.raises(config.ConfigError) as error:
        config.load(path)
    line = _line_of(text, needle.strip().splitlines()[-1].replace("}}", "}"))
    assert str(error.value).startswith(f"{path}:{line}: {message}")


@pytest.mark.parametrize("change, needle, entry, message", [
    ("num_paths: 2, max_gen_toks: 8, termination: last", "num_paths: 2, max_gen_toks: 16, compat: official",
     "sweeps.ablations.runs[1]", "compat=official needs the released checkpoint's tokenizer"),
    ("num_paths: [1, 2], max_gen_toks: 8}}", "num_paths: [1, 9], max_gen_toks: 8}}",
     "sweeps.width.runs[0] (parathinker P=9)",
     "num_paths=9 needs <think9>, but training-free mode gives a plain checkpoint the released <think1>..<think8>"),
])
def test_layout_checked_with_the_tokenizer_before_any_weights_load(change, needle, entry, message, ckpt, tmp_path,
                                                                   monkeypatch, capsys):
    """What needs the checkpoint's tokenizer (compat=official on one without the released tokens,
    more paths than training-free mode gives it): refused by the command, exit 2, no weights loaded and
    nothing written."""
    path = _config(tmp_path, ckpt, GRID.replace(change, needle, 1))
    loads = []
    monkeypatch.setattr(ParaThinkerLM, "_create_model", lambda self, *a, **k: loads.append(1))
    out = tmp_path / "out"
    assert main([str(path), "--output-path", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:{_line_of(path.read_text(), needle.replace('}}', '}'))}: {entry}" in err
    assert message in err
    assert loads == [] and not out.exists()


def test_the_runner_passes_what_lm_evals_cli_passes():
    """The runner mirrors lm-eval's CLI call of simple_evaluate (there is no public equivalent): the
    same keywords (``model`` a model object here). Fails when lm-eval's CLI changes its call,
    naming the keywords."""
    import ast
    import inspect

    def keywords(source: str) -> set[str]:
        calls = [node for node in ast.walk(ast.parse(textwrap.dedent(source))) if isinstance(node, ast.Call)
                 and getattr(node.func, "id", None) == "simple_evaluate"]
        assert len(calls) == 1
        return {k.arg for k in calls[0].keywords}

    theirs = keywords(upstream_lm_eval.cli_evaluate_source())
    ours = keywords(inspect.getsource(runner.evaluate_like_the_cli))
    assert theirs == ours, f"lm-eval's CLI passes {sorted(theirs - ours)} and not {sorted(ours - theirs)}"
