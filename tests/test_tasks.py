"""Tasks: the start-up hook (ours win over lm-eval's aime24/aime25), data loading, and real lm_eval runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import DATA_DIR, REPO_ROOT, run_lm_eval, tiny_hf_aime24_run

from lm_eval_parathinker import _autoload, data
from lm_eval_parathinker.harness.generator import META_METRICS
from lm_eval_parathinker.scoring import METRICS

OUR_TASKS = ["aime24", "aime25", "amc23", "math500"]
SIZES = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500}


def test_tasks_dir_editable_layout():
    d = Path(_autoload.tasks_dir())
    assert d == REPO_ROOT / "tasks"
    for t in OUR_TASKS + ["parathinker_math"]:
        assert (d / f"{t}.yaml").is_file()


@pytest.mark.slow
def test_autoload_is_light():
    # the .pth hook runs at every Python start: it must not pull in lm_eval or torch
    code = "import sys, lm_eval_parathinker._autoload as a; print('lm_eval' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_ours_win_over_builtin_and_builtins_kept():
    """Full TaskManager (built-ins included): aime24/aime25 resolve to OUR YAMLs, other built-ins stay."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager()
    ours = Path(_autoload.tasks_dir()).resolve()
    for t in OUR_TASKS + ["parathinker_math"]:
        assert Path(tm.task_index[t].yaml_path).resolve() == ours / f"{t}.yaml", t
    assert "hendrycks_math500" in tm.all_tasks  # built-ins still there
    # the model name is registered lazily once lm_eval.models is imported, and built-ins keep working
    from lm_eval.api.registry import get_model, model_registry

    assert get_model("dummy").__name__ == "DummyLM"
    assert get_model("hf").__name__ == "HFLM"
    assert "parathinker" in model_registry


@pytest.mark.slow
def test_model_is_registered_lazily():
    # in a fresh process: importing lm_eval's models registers the name without importing our model
    code = (
        "import sys, lm_eval.models; from lm_eval.api.registry import model_registry; "
        "print('parathinker' in model_registry, 'lm_eval_parathinker.harness.model' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["True", "False"]


def test_user_include_path_wins(tmp_path):
    from lm_eval.tasks import TaskManager

    (tmp_path / "mine.yaml").write_text((REPO_ROOT / "tasks" / "aime24.yaml").read_text().replace(
        "include: _parathinker_math_template_yaml", f"include: {REPO_ROOT / 'tasks' / '_parathinker_math_template_yaml'}"))
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    assert Path(tm.task_index["aime24"].yaml_path) == tmp_path / "mine.yaml"
    assert "math500" in tm.all_tasks


def test_task_configs_and_repeats_override():
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_defaults=False, metadata={"data_dir": str(DATA_DIR)})
    loaded = tm.load(["parathinker_math"])["tasks"]
    assert sorted(loaded) == sorted(OUR_TASKS)
    for name, task in loaded.items():
        cfg = task.config
        assert len(task.dataset["test"]) == SIZES[name]
        assert cfg.repeats == (4 if name == "math500" else 16)
        assert cfg.filter_list[0]["filter"][0] == {"function": "take_first_k", "k": cfg.repeats}
        g = cfg.generation_kwargs
        assert (g["do_sample"], g["temperature"], g["top_p"], g["max_gen_toks"], g["until"]) == (True, 0.6, 0.95, 16384, [])
        doc = task.dataset["test"][0]
        prompt = task.doc_to_text(doc)
        assert prompt == doc["problem"] + "\nPlease reason step by step, and put your final answer within \\boxed{}."
        assert isinstance(doc["answer"], str)
    aime = loaded["aime24"].dataset["test"]
    assert any(a.startswith("0") for a in aime["answer"])  # "025"-style answers kept as strings

    # every key process_results can return has a declared aggregation: lm-eval's lookup never misses
    for task in loaded.values():
        assert set(task.aggregation()) == set(task.higher_is_better()) == set(METRICS) | set(META_METRICS)

    tm2 = TaskManager(include_defaults=False, metadata={"data_dir": str(DATA_DIR), "repeats": 3})
    t = tm2.load(["amc23"])["tasks"]["amc23"]
    assert t.config.repeats == 3 and t.config.filter_list[0]["filter"][0]["k"] == 3


# ------------------------------------------------------------------------------------------- data
def test_data_env_and_metadata(monkeypatch, tmp_path):
    monkeypatch.setenv("PARATHINKER_DATA_DIR", str(DATA_DIR))
    ds = data.load_aime25()["test"]
    assert len(ds) == 30 and {"problem", "answer"} <= set(ds.column_names)
    # --metadata data_dir beats the environment variable
    (tmp_path / "amc23.jsonl").write_text('{"question": "1+1?", "answer": 2.0}\n')
    rows = data.load_amc23(data_dir=str(tmp_path), version=1.0, pretrained="x")["test"]
    assert rows[0] == {"problem": "1+1?", "answer": "2"}


def test_data_malformed_line(tmp_path):
    f = tmp_path / "aime24.jsonl"
    f.write_text('{"problem": "p", "answer": "1"}\n\n{"problem": "q", "answer": \n')
    with pytest.raises(ValueError, match=r"aime24\.jsonl:3: malformed JSON"):
        data.load_aime24(data_dir=str(tmp_path))
    f.write_text('{"problem": "p", "answer": "1"}\n{"problem": "q"}\n')
    with pytest.raises(ValueError, match=r"aime24\.jsonl:2: missing field\(s\) answer"):
        data.load_aime24(data_dir=str(tmp_path))


def test_data_missing_file_and_no_hub(monkeypatch, tmp_path):
    with pytest.raises(data.DataUnavailableError, match=r"math500.*not found"):
        data.load_math500(data_dir=str(tmp_path / "nowhere"))
    monkeypatch.delenv("PARATHINKER_DATA_DIR", raising=False)

    def offline(name):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(data, "_load_from_hub", offline)
    with pytest.raises(data.DataUnavailableError) as ei:
        data.load_math500()
    msg = str(ei.value)
    assert "HuggingFaceH4/MATH-500" in msg and "PARATHINKER_DATA_DIR" in msg and "data_dir" in msg


# -------------------------------------------------------------------------------- real lm_eval runs
def test_lm_eval_hf_tiny_model(tmp_path_factory):
    out, res = tiny_hf_aime24_run(tmp_path_factory.mktemp("hf"))
    r = res["results"]["aime24"]
    repeats = res["configs"]["aime24"]["repeats"]
    for m in METRICS:
        if m.rsplit("_", 1)[-1].isdigit() and int(m.rsplit("_", 1)[-1]) > repeats:
            assert f"{m},all" not in r  # the curves stop at k = repeats
            continue
        assert f"{m},all" in r, (m, sorted(r))
        assert 0.0 <= r[f"{m},all"] <= 1.0 or m == "verify_timeouts"
    assert res["n-samples"]["aime24"] == {"original": 30, "effective": 2}
    assert res["configs"]["aime24"]["repeats"] == 2
    assert res["configs"]["aime24"]["metadata"]["config_source"].endswith("tasks/aime24.yaml")
    samples = list(Path(out).glob("**/samples_aime24_*.jsonl"))
    assert samples
    first = json.loads(samples[0].read_text().splitlines()[0])
    assert len(first["resps"][0]) == 2  # both repeats reached process_results
    assert "Please reason step by step" in first["arguments"]["gen_args_0"]["arg_0"]
    # the 95% interval over problems, recomputed here: a percentile bootstrap of the per-problem pass@1
    # (10000 resamples of the problems, numpy's default_rng(0))
    per_problem = np.array([json.loads(line)["pass_at_1"] for line in samples[0].read_text().splitlines()])
    means = per_problem[np.random.default_rng(0).integers(0, len(per_problem), (10_000, len(per_problem)))].mean(1)
    assert (r["pass_at_1_ci_low,all"], r["pass_at_1_ci_high,all"]) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert r["pass_at_1_ci_low,all"] <= r["pass_at_1,all"] <= r["pass_at_1_ci_high,all"]
    log = (Path(out) / "lm_eval.log").read_text()
    assert "pass_at_1" in log  # the console output (results table) was captured
    assert "No aggregation function defined" not in log


@pytest.mark.slow
def test_lm_eval_dummy_group(tmp_path):
    # (`lm_eval ls tasks` builds the same TaskManager() as test_ours_win_over_builtin_and_builtins_kept)
    _, res = run_lm_eval(
        ["--model", "dummy", "--model_args", "pretrained=dummy", "--tasks", "parathinker_math", "--limit", "1",
         "--metadata", json.dumps({"repeats": 2, "data_dir": str(DATA_DIR)})],
        tmp_path,
        builtin_tasks=True,
        PARATHINKER_DATA_DIR="/nonexistent",  # --metadata data_dir wins
    )
    for t in OUR_TASKS:
        assert res["results"][t]["pass_at_1,all"] == 0.0
        assert res["results"][t]["no_answer,all"] == 1.0
    assert "pass_at_1,all" in res["groups"]["parathinker_math"]



def test_gsm8k_is_lm_evals_prompt_on_the_local_copy(monkeypatch):
    """parathinker_gsm8k: lm-eval's gsm8k prompt and stop strings, on GSM8K's test split read from the
    offline folder (train/gsm8k_test.jsonl), the answer its final number; graded as the math tasks."""
    import yaml
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv(data.ENV_VAR, str(DATA_DIR))
    builtin = yaml.safe_load((Path(sys.modules["lm_eval"].__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    task = TaskManager(include_defaults=False).load(["parathinker_gsm8k"])["tasks"]["parathinker_gsm8k"]
    cfg = task.config
    assert cfg.doc_to_text == builtin["doc_to_text"]
    assert cfg.generation_kwargs["until"] == builtin["generation_kwargs"]["until"]
    rows = task.dataset["test"]
    finals = [json.loads(line)["final"] for line in (DATA_DIR / "train" / "gsm8k_test.jsonl").read_text().split("\n") if line]
    assert len(rows) == len(finals) == 1319 and list(rows["answer"]) == finals
    assert rows[0]["problem"] == rows[0]["question"] and task.doc_to_text(rows[0]).startswith("Question: Janet")
    assert set(task.aggregation()) == set(METRICS) | set(META_METRICS)
