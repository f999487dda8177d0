"""``compile``: its values, ``auto`` from the committed verdicts, the persistent inductor cache, and
(slow, each compiling in processes of their own: tests/compile_scenarios.py) one compilation for a
run whose tasks differ in budget, the fallback for each cause of a failed compile, and compiled
attention from a cache warmed at another thread count."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import REPO_ROOT, offline_env, run_lm_eval
from tiny import save_tiny_checkpoint, tiny_model, tiny_parathinker

from lm_eval_parathinker.files import cache_root
from lm_eval_parathinker.engine import ParaThinkerEngine, attention, compilation
from lm_eval_parathinker.harness.options import RunOptions
from lm_eval_parathinker.upstream import torch as upstream_torch


def test_compile_takes_auto_true_false(monkeypatch):
    assert [compilation.parse_compile(v) for v in ("auto", "TRUE", "false", True, False, "1", "no")] == [
        "auto", "true", "false", "true", "false", "true", "false"]
    with pytest.raises(ValueError, match=r"compile='fast' is not one of auto, true, false"):
        RunOptions.parse(compile="fast")
    monkeypatch.delenv(compilation.COMPILE_ENV)
    assert RunOptions.parse().compile == "auto"
    monkeypatch.setenv(compilation.COMPILE_ENV, "true")
    assert RunOptions.parse().compile == "true" and RunOptions.parse(compile="false").compile == "false"
    monkeypatch.setenv(compilation.COMPILE_ENV, "often")
    with pytest.raises(ValueError, match=r"PARATHINKER_COMPILE='often' is not one of"):
        RunOptions.parse()


def _row(device: str, params: int, eager_s: float, compiled_s: float) -> dict:
    return {"device": device, "size_bucket": compilation.size_bucket(params), "shape": "s", "params": params,
            "eager_s": eager_s, "compiled_s": compiled_s, "speedup": eager_s / compiled_s, "compile_s": 9.0,
            "compile": str(eager_s > compiled_s).lower(), "torch": torch.__version__, "threads": 1}


def test_auto_compiles_where_the_verdicts_measured_it_faster(tmp_path):
    model = tiny_model()
    params = sum(p.numel() for p in model.parameters())
    table = tmp_path / "verdicts.csv"
    assert compilation.resolve_compile("auto", model, table) == (
        False, f"compile=auto: no measured verdict for cpu and {compilation.size_bucket(params)} parameters")
    compilation.write_verdict(_row("cuda", params, 2.0, 1.0), table)  # another device's row
    assert not compilation.resolve_compile("auto", model, table)[0]
    compilation.write_verdict(_row("cpu", params, 2.0, 1.0), table)
    assert compilation.resolve_compile("auto", model, table) == (
        True, "compile=auto: on cpu, <10M parameters (s), the compiled step measured 2.00x eager")
    compilation.write_verdict(_row("cpu", params, 1.0, 1.25), table)  # a new measurement replaces the row
    assert compilation.resolve_compile("auto", model, table)[0] is False
    assert len(compilation.read_verdicts(table)) == 2
    assert compilation.resolve_compile("true", model, table) == (True, "compile=true")
    with upstream_torch.dynamo_config(disable=True):  # TORCH_COMPILE_DISABLE: eager, and no flex
        assert not compilation.resolve_compile("auto", model, table)[0]
        assert attention.resolve_kernel("auto", torch.device("cpu")) is attention.SDPA


def test_the_sdpa_kernel_runs_eager_under_compile():
    """sdpa reads how many pages it gathers on the host, which no whole graph takes: its steps run
    eager (ragged on the CPU), with no compilation and no warning."""
    model, tok = tiny_parathinker()
    engine = ParaThinkerEngine(model, tok, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.generate(["Find the number of ways."], num_paths=2, max_new_tokens=4, summary_max_tokens=2,
                        attention="sdpa")
    assert engine.compile and engine.last_stats["compiled"] is False and engine.last_stats["compilations"] == 0


def test_the_committed_verdicts_are_measurements():
    rows = compilation.read_verdicts()
    assert {(r["device"], r["size_bucket"]) for r in rows} >= {("cpu", "<10M"), ("cpu", "10M-1B")}
    for r in rows:
        assert r["speedup"] == pytest.approx(r["eager_s"] / r["compiled_s"], rel=1e-3)
        assert r["compile"] == str(r["speedup"] > 1).lower()
        assert r["size_bucket"] == compilation.size_bucket(r["params"])


def test_inductor_caches_under_the_package_cache_unless_set(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert compilation.use_package_inductor_cache() == cache_root() / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", upstream_torch.inductor_default_cache_dir())  # inductor's own
    assert compilation.use_package_inductor_cache() == cache_root() / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    assert compilation.use_package_inductor_cache() == tmp_path


# -- compiling, in processes of their own ------------------------------------------------------

SCENARIOS = REPO_ROOT / "tests" / "compile_scenarios.py"


def _scenario(*args: str, cache_dir, **env: str) -> dict:
    proc = subprocess.run([sys.executable, str(SCENARIOS), *args], capture_output=True, text=True, timeout=600,
                          cwd=SCENARIOS.parent, env=offline_env(TORCHINDUCTOR_CACHE_DIR=str(cache_dir), **env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


#: each cause of a failed compile: how it is forced, and what the warning names
CAUSES = {"no_cxx": ({"CXX": "/nonexistent/c++"}, "/nonexistent/c++"),
          "unsupported_op": ({}, "compile_scenarios.opaque"),
          "recompile_limit": ({}, "recompile limit exceeded")}


@pytest.fixture(scope="module")
def fallbacks(tmp_path_factory):
    """Each cause's scenario, at once, each with an empty inductor cache of its own."""
    with ThreadPoolExecutor(len(CAUSES)) as pool:
        runs = {cause: pool.submit(_scenario, "fallback", cause, cache_dir=tmp_path_factory.mktemp(cause), **env)
                for cause, (env, _) in CAUSES.items()}
        return {cause: run.result() for cause, run in runs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("cause", CAUSES)
def test_a_failed_compile_warns_once_and_decodes_eager_with_sdpa(fallbacks, cause):
    result, named = fallbacks[cause], CAUSES[cause][1]
    engines = len(result["failures"])  # no_cxx: the compiled step, and an eager step's flex kernel
    assert len(result["warnings"]) == engines, result["warnings"]
    assert all(named in w and "decoding continues eager with attention=sdpa" in w for w in result["warnings"])
    assert all(named in f for f in result["failures"]), result["failures"]
    assert result["same"]  # the same tokens as the eager sdpa engine


TASK = """include: {template}
task: {name}
custom_dataset: !function lm_eval_parathinker.data.load_aime24
repeats: 2
filter_list:
  - name: all
    filter:
      - function: take_first_k
        k: 2
generation_kwargs:
  until: []
  do_sample: true
  temperature: 0.6
  max_gen_toks: {budget}
"""


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    """lm_eval of two tasks with other budgets, compiled, at 2 threads, into an inductor cache of its
    own: (checkpoint, cache folder, results)."""
    tmp = tmp_path_factory.mktemp("two_tasks")
    ckpt, cache, tasks = save_tiny_checkpoint(tmp / "ckpt"), tmp / "inductor", tmp / "tasks"
    tasks.mkdir()
    for name, budget in (("short_budget", 8), ("long_budget", 140)):
        (tasks / f"{name}.yaml").write_text(TASK.format(template=REPO_ROOT / "tasks" / "_parathinker_math_template_yaml",
                                                        name=name, budget=budget))
    _, res = run_lm_eval(["--model", "parathinker", "--model_args",
                          f"pretrained={ckpt},num_paths=2,summary_max_tokens=4,dtype=float32,compile=true",
                          "--tasks", "short_budget,long_budget", "--include_path", str(tasks), "--limit", "2",
                          "--batch_size", "3"], tmp / "out", TORCHINDUCTOR_CACHE_DIR=str(cache), OMP_NUM_THREADS="2")
    return ckpt, cache, res


@pytest.mark.slow
def test_a_run_of_two_tasks_with_other_budgets_compiles_the_step_once(two_tasks):
    """One (slots x P) rectangle: one compilation, whatever the tasks' budgets and numbers of prompts."""
    engine = two_tasks[2]["config"]["parathinker"]["engine"]
    assert engine["compiled"] and engine["compile_failure"] is None
    assert engine["compilations"] == 1 and engine["compile_s"] > 0
    assert set(two_tasks[2]["results"]) == {"short_budget", "long_budget"}


@pytest.mark.slow
def test_compiled_attention_is_right_from_a_cache_warmed_at_another_thread_count(two_tasks):
    """The lm_eval run's cache, written at 2 threads, given to a process at 1 thread compiling the same
    step: tokens and logits against sdpa. CPU kernels are built for a thread count; torch keys its FX
    graphs by it, so this process compiles its own, and this checks that no graph of the other count
    is taken. (A second process at the same count reuses the first one's: eval_workload's compile_s_warm.)"""
    ckpt, cache, _ = two_tasks
    assert any((cache / "fxgraph").rglob("*"))  # written at 2 threads
    result = _scenario("attention", "1", str(ckpt), cache_dir=cache)
    assert result["same"]
    assert result["compile_apart"]  # a response's latency leaves out the compilation (its compile_s)
