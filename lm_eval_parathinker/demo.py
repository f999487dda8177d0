"""``make demo``: sequential vs majority vs ParaThinker on the embedded model, end to end through lm_eval.

    python -m lm_eval_parathinker.demo --data-dir DIR --output results

Runs ``python -m lm_eval --model parathinker`` three times (``method=sequential``, ``majority`` and
``parathinker``, the last two with ``--num-paths`` paths) on the first ``--limit`` AIME 2024
problems of the offline data in DIR (one sample per problem, ``--max-gen-toks`` tokens per path,
``--min-new-tokens`` for every method, ``--apply_chat_template``, ``--log_samples``), then writes ``OUTPUT/leaderboard.csv`` (its Markdown table beside it, ``.md``) and ``OUTPUT/leaderboard.png`` and prints
the pass@1 table with its 95% intervals; then compares the three runs pairwise on their problems
(``leaderboard --compare``) into ``OUTPUT/comparisons.csv`` (and ``.md``) and ``OUTPUT/comparisons.png``.
Run outputs (results JSON, sample logs) go to ``OUTPUT/runs/demo/<method>/``.
The embedded SmolLM2-135M-Instruct is a tiny general chat model run training-free: the demo shows
the pipeline, not ParaThinker's accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import embedded, leaderboard

METHODS = ("sequential", "majority", "parathinker")
TASK = "aime24"


def lm_eval_command(method: str, args: argparse.Namespace, out_dir: Path) -> list[str]:
    """The ``python -m lm_eval`` command line of one method."""
    model_args = f"pretrained={embedded.EMBEDDED_NAME},method={method},dtype=float32"
    if method != "sequential":
        model_args += f",num_paths={args.num_paths}"
    return [
        sys.executable, "-m", "lm_eval",
        "--model", "parathinker",
        "--model_args", model_args,
        "--tasks", TASK,
        "--limit", str(args.limit),
        "--metadata", json.dumps({"repeats": 1}),
        "--gen_kwargs", f"max_gen_toks={args.max_gen_toks},min_new_tokens={args.min_new_tokens}",
        "--apply_chat_template",  # an instruct model: without its template it answers nothing
        "--batch_size", str(args.limit),
        "--device", "cpu",
        "--log_samples",
        "--output_path", str(out_dir),
    ]  # fmt: skip


def run_env(data_dir: Path) -> dict:
    env = dict(os.environ, PARATHINKER_DATA_DIR=str(data_dir))
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.setdefault(key, "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m lm_eval_parathinker.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, type=Path, help=f"folder with {TASK}.jsonl (offline data)")
    ap.add_argument("--output", default=Path("results"), type=Path, help="where the leaderboard goes (default: %(default)s)")
    ap.add_argument("--limit", type=int, default=3, help="number of AIME 2024 problems (default: %(default)s)")
    ap.add_argument("--num-paths", type=int, default=4, help="paths of majority and parathinker (default: %(default)s)")
    ap.add_argument("--max-gen-toks", type=int, default=256, help="token budget per path (default: %(default)s)")
    ap.add_argument(
        "--min-new-tokens", type=int, default=32,
        help="no path ends before this many tokens (default: %(default)s): untrained for ParaThinker, the "
        "embedded model closes every path right after <think k> otherwise",
    )
    args = ap.parse_args(argv)
    if not (args.data_dir / f"{TASK}.jsonl").is_file():
        ap.error(f"--data-dir {args.data_dir}: no {TASK}.jsonl there")
    for name in ("limit", "num_paths", "max_gen_toks"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = args.output / "runs" / "demo"
    shutil.rmtree(runs, ignore_errors=True)  # the leaderboard must reflect this run only
    print(f"embedded model: {embedded.ensure_embedded_checkpoint()}", flush=True)
    start = time.perf_counter()
    for method in METHODS:
        t0 = time.perf_counter()
        cmd = lm_eval_command(method, args, runs / method)
        print(f"\n=== {method}: {' '.join(cmd[1:])}", flush=True)
        code = subprocess.run(cmd, env=run_env(args.data_dir.resolve())).returncode
        if code != 0:
            print(f"demo: lm_eval failed for method={method} (exit {code}); no leaderboard written", file=sys.stderr)
            return code
        print(f"=== {method}: {time.perf_counter() - t0:.0f} s", flush=True)
    rows = leaderboard.collect(runs)
    csv_path, png_path = args.output / "leaderboard.csv", args.output / "leaderboard.png"
    leaderboard.write_csv(rows, csv_path)
    leaderboard.plot(rows, png_path)
    print("\n" + leaderboard.format_table(rows))
    compared_csv, compared_png = args.output / "comparisons.csv", args.output / "comparisons.png"
    comparisons, refusals = leaderboard.write_comparisons(runs, compared_csv, compared_png)
    print("\n" + leaderboard.format_comparisons(comparisons))
    if refusals:  # the three runs share their problems: a refusal is a bug worth failing on
        print("\n".join(f"demo: {r}" for r in refusals), file=sys.stderr)
        return 1
    print(f"\ndemo took {time.perf_counter() - start:.0f} s; wrote {csv_path}, {png_path}, {compared_csv} and "
          f"{compared_png} (samples under {runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
