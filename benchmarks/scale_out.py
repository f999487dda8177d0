"""Data-parallel evaluation throughput: one ``lm_eval --model parathinker`` command on 1 process and
on 2 (``accelerate launch --multi_gpu`` with ``ACCELERATE_USE_CPU=1``: CPU processes, gloo), one
thread each, on a tiny random model.

    python -m benchmarks.scale_out            # results/bench_scale_out.{csv,png,md}
    python -m benchmarks.scale_out --smoke    # a few requests: checks that it runs

``requests_per_min``: responses generated per minute from the moment the ranks open the journal
(generation starts) to the moment every response is journaled, read by polling the journal files;
``wall_s``: the whole launch (imports, lm-eval's task index, model load, results). The two sides
alternate, and each row is the best of ``--repeats`` runs (3).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.distributed.elastic.utils.distributed import get_free_port
from transformers import AutoModelForCausalLM

from benchmarks.harness import SHAPES, build_tokenizer, write_results
from lm_eval_parathinker.thought_embedding import add_control_tokens

SIDES = (1, 2)  # processes
TIMEOUT = 1800  # seconds one launch may take


def tiny_checkpoint(folder: Path) -> Path:
    """The engine benchmarks' tiny random Llama with the control tokens, saved to ``folder``."""
    tokenizer = build_tokenizer()
    config_cls, kwargs = SHAPES["tiny"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_cls(**kwargs, eos_token_id=tokenizer.eos_token_id,
                                                        pad_token_id=tokenizer.pad_token_id))
    add_control_tokens(model, tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def command(processes: int, checkpoint: Path, journal_dir: Path, out: Path, limit: int, repeats: int,
            max_gen_toks: int, port: int) -> list[str]:
    """The launch: plain ``python -m lm_eval_parathinker`` on one process, ``accelerate launch`` on more."""
    if processes == 1:
        launch = [sys.executable, "-m", "lm_eval_parathinker"]
    else:
        launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
                  str(processes), "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
                  "--dynamo_backend", "no", "-m", "lm_eval_parathinker"]
    model_args = f"pretrained={checkpoint},num_paths=2,summary_max_tokens=8,attention=sdpa,journal_dir={journal_dir}"
    return [*launch, "--model", "parathinker", "--model_args", model_args, "--tasks", "amc23", "--limit", str(limit),
            "--gen_kwargs", f"max_gen_toks={max_gen_toks},min_new_tokens={max_gen_toks},do_sample=true,seed=7",
            "--metadata", json.dumps({"repeats": repeats}), "--batch_size", "4", "--output_path", str(out)]


def _journaled(journal_dir: Path) -> int:
    return sum(len(Path(p).read_bytes().splitlines()) for p in glob.glob(str(journal_dir / "*" / "rank*.jsonl")))


def run_once(processes: int, checkpoint: Path, folder: Path, args: argparse.Namespace, port: int) -> dict:
    """One launch, timed: the whole of it, and its generation (by polling the journal)."""
    journal_dir, total = folder / "journal", args.limit * args.repeats
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = command(processes, checkpoint, journal_dir, folder / "out", args.limit, args.repeats, args.max_gen_toks, port)
    start = time.monotonic()
    with open(folder / "launch.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        opened = done = None
        while proc.poll() is None and time.monotonic() - start < TIMEOUT:
            if opened is None and glob.glob(str(journal_dir / "*" / "fingerprint.json")):
                opened = time.monotonic()
            if done is None and opened is not None and _journaled(journal_dir) >= total:
                done = time.monotonic()
            time.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    wall = time.monotonic() - start
    if proc.returncode != 0 or opened is None or done is None:
        raise RuntimeError(f"{processes} process(es) failed ({proc.returncode}); see {folder / 'launch.log'}")
    return {"processes": processes, "threads_per_process": 1, "requests": total, "generation_s": done - opened,
            "requests_per_min": 60 * total / (done - opened), "wall_s": wall}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale_out", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few requests, one run per side")
    parser.add_argument("--repeats", type=int, default=None, help="samples per problem (default 4; smoke 2)")
    parser.add_argument("--limit", type=int, default=None, help="amc23 problems (default 40; smoke 3)")
    parser.add_argument("--max-gen-toks", type=int, default=None, help="tokens per path (default 32; smoke 8)")
    parser.add_argument("--runs", type=int, default=None, help="runs per side, alternating (default 3; smoke 1)")
    parser.add_argument("--output", type=Path, default=Path("results"), help="directory for the CSV/PNG/MD files")
    args = parser.parse_args(argv)
    defaults = {"repeats": 2, "limit": 3, "max_gen_toks": 8, "runs": 1} if args.smoke else \
        {"repeats": 4, "limit": 40, "max_gen_toks": 32, "runs": 3}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    runs: dict[int, list[dict]] = {n: [] for n in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = tiny_checkpoint(Path(tmp) / "model")
        for i in range(args.runs):  # alternate the sides: a busy moment hurts both alike
            for n in SIDES:
                folder = Path(tmp) / f"run-{i}-{n}"
                folder.mkdir()
                runs[n].append(run_once(n, checkpoint, folder, args, get_free_port()))
    rows = [max(runs[n], key=lambda r: r["requests_per_min"]) for n in SIDES]
    for r in rows:
        r["speedup"] = r["requests_per_min"] / rows[0]["requests_per_min"]
        r["runs"] = args.runs

    def plot(ax, rows):
        ax.bar([f"{r['processes']} process{'es' if r['processes'] > 1 else ''}" for r in rows],
               [r["requests_per_min"] for r in rows])
        ax.set(ylabel="requests / min (generation, best of runs)")

    return write_results(args.output / "bench_scale_out", "scale_out", rows, plot,
                         f"lm_eval --model parathinker, tiny model, CPU, 1 thread per process ({args.limit} "
                         f"problems x {args.repeats})")


if __name__ == "__main__":
    main()
