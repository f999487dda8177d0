"""Shared test helpers for lm_eval runs in subprocesses (offline data, tiny checkpoints from tiny.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from tiny import DATA_DIR, save_tiny_checkpoint

from lm_eval_parathinker.engine import ParaThinkerEngine
from lm_eval_parathinker.engine.attention import flex_available

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
__all__ = ["CPU_KERNELS", "DATA_DIR", "REPO_ROOT", "TIMED_METRICS", "by_doc", "eager_engine", "journal_entries", "kill_when",
           "lm_eval_cmd", "OUR_TASKS_LM_EVAL", "offline_env", "run_lm_eval", "run_lm_evals", "samples_by_doc", "tiny_hf_aime24_run"]
#: the attention kernels the engine runs on this CPU with this torch (compiled flex from torch 2.13)
CPU_KERNELS = ["flex", "sdpa"] if flex_available(torch.device("cpu")) else ["sdpa"]
#: subprocesses of tiny models: one thread (OpenMP spinning costs a lot on a busy shared box)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def eager_engine(model, tokenizer, **kwargs) -> ParaThinkerEngine:
    """The engine the tests use: the decode step eager, whatever the engine's default, so that only
    the compile tests (marked slow) compile it, by asking for ``compile=True``."""
    return ParaThinkerEngine(model, tokenizer, **{"compile": False, **kwargs})


#: lm-eval's command line with our tasks only (lm-eval's index of its ~15,000 built-in task files
#: costs every process about 10 s on 2 cores)
OUR_TASKS_LM_EVAL = REPO_ROOT / "tests" / "lm_eval_our_tasks.py"


def lm_eval_cmd(builtin_tasks: bool = False) -> list[str]:
    """``lm_eval`` as a subprocess: with ``builtin_tasks``, the console script of this environment
    (lm-eval's tasks indexed, as a user's run; falls back to ``python -m lm_eval``), else the same
    command line with our tasks only (tests that check nothing about lm-eval's own tasks)."""
    if not builtin_tasks:
        return [sys.executable, str(OUR_TASKS_LM_EVAL)]
    exe = VENV_BIN / "lm_eval"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lm_eval"]


def offline_env(**extra: str) -> dict:
    """Environment for subprocess runs: offline hub, our data folder, no tokenizer threads."""
    env = dict(os.environ)
    env.update(
        PARATHINKER_DATA_DIR=str(DATA_DIR),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


def journal_entries(root: str | os.PathLike) -> list[dict]:
    """The whole records of the response journals under ``root`` (not a line being written)."""
    import glob
    import json

    entries = []
    for path in glob.glob(str(Path(root) / "**" / "rank*.jsonl"), recursive=True):
        for line in Path(path).read_bytes().split(b"\n"):
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
    return entries


#: wall-clock statistics: excluded when runs are compared
TIMED_METRICS = ("latency_s", "think_s")


def by_doc(samples_of_task: list[dict]) -> dict[str, dict]:
    """doc_hash -> what must not change: the responses and the metrics (wall-clock ones excluded)."""
    return {
        s["doc_hash"]: {
            "resps": [[str(r) for r in rs] for rs in s["resps"]],
            "metrics": {m: s[m] for m in s["metrics"] if not m.startswith(TIMED_METRICS)},
        }
        for s in samples_of_task
    }


def samples_by_doc(out: str | os.PathLike) -> dict[str, dict]:
    """task -> :func:`by_doc` of the samples files an lm_eval run wrote under ``out``."""
    import glob
    import json

    found = {}
    for path in glob.glob(str(Path(out) / "**" / "samples_*.jsonl"), recursive=True):
        task = Path(path).name.split("_")[1]
        found[task] = by_doc([json.loads(line) for line in Path(path).read_text().splitlines()])
    return found


def kill_when(cmd: list[str], ready, what: str, timeout: float = 300) -> None:
    """Start ``cmd`` (offline, one thread) and SIGKILL it as soon as ``ready()``; fails if it ends
    first or ``what`` has not happened within ``timeout`` seconds."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=offline_env(**ONE_THREAD), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"{cmd[1:3]} ended ({proc.returncode}) before {what}"
            assert time.monotonic() < deadline, f"not {what} within {timeout} s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


def run_lm_eval(args: list[str], out_dir: str | os.PathLike, timeout: float = 300, builtin_tasks: bool = False,
                **env: str):
    """Run ``lm_eval`` (:func:`lm_eval_cmd`) in a subprocess with ``offline_env``; returns
    (CompletedProcess, results dict)."""
    (run,) = run_lm_evals([(args, out_dir)], timeout, builtin_tasks, **env)
    return run


def run_lm_evals(runs: list[tuple[list[str], str | os.PathLike]], timeout: float = 300, builtin_tasks: bool = False,
                 **env: str) -> list:
    """:func:`run_lm_eval` for each ``(args, out_dir)``, all at once: a tiny model's run is mostly
    start-up on one core, so independent runs overlap on the second."""
    import glob
    import json
    import subprocess
    import tempfile

    started = []
    for args, out_dir in runs:
        cmd = lm_eval_cmd(builtin_tasks) + list(args) + ["--output_path", str(out_dir)]
        stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        started.append((subprocess.Popen(cmd, env=offline_env(**env), stdout=stdout, stderr=stderr, text=True),
                        stdout, stderr, out_dir))
    results = []
    try:
        for proc, stdout, stderr, out_dir in started:
            proc.wait(timeout=timeout)
            stdout.seek(0), stderr.seek(0)
            done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout.read(), stderr.read())
            if done.returncode != 0:
                raise AssertionError(f"lm_eval failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
            files = sorted(glob.glob(os.path.join(str(out_dir), "**", "results_*.json"), recursive=True))
            assert files, f"no results JSON under {out_dir}"
            with open(files[-1], encoding="utf-8") as f:
                results.append((done, json.load(f)))
    finally:
        for proc, stdout, stderr, _ in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            stdout.close(), stderr.close()
    return results


_RUN_CACHE: dict = {}


def tiny_hf_aime24_run(tmp_root: str | os.PathLike):
    """Once per test process: a real ``lm_eval --model hf --tasks aime24 --limit 2`` run on a tiny Llama.

    Returns (output dir, results dict); the run's console output is kept in ``<output dir>/lm_eval.log``.
    Shared by test_tasks and test_leaderboard to keep the suite fast.
    """
    if "hf" not in _RUN_CACHE:
        root = Path(tmp_root)
        ckpt = save_tiny_checkpoint(root / "tiny_llama", "llama", parathinker=False)
        out = root / "runs"
        proc, res = run_lm_eval(
            [
                "--model", "hf",
                "--model_args", f"pretrained={ckpt},dtype=float32",
                "--tasks", "aime24",
                "--limit", "2",
                "--gen_kwargs", "max_gen_toks=8",
                "--metadata", '{"repeats": 2}',
                "--device", "cpu",
                "--log_samples",
            ],
            out,
            builtin_tasks=True,  # test_tasks checks that ours win over lm-eval's aime24
        )
        (out / "lm_eval.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
        _RUN_CACHE["hf"] = (out, res)
    return _RUN_CACHE["hf"]
