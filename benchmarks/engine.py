"""Engine benchmarks on random-initialised models of real shapes (no download).

    python -m benchmarks.engine --threads 2                      # CPU, SmolLM2-135M shape, float32
    python -m benchmarks.engine --device cuda --dtype bfloat16   # Qwen2-1.5B shape (benchmarks/gpu.sh)
    python -m benchmarks.engine --smoke --only width,vs_hf       # tiny shape, seconds

Each benchmark times the engine and its baseline (in the same process, except ``eval_workload``) and
writes ``results/bench_<name>[_<device>].csv`` (its Markdown table beside it, ``.md``) and ``.png``:

* ``width``: think-stage latency for P paths at a fixed per-path budget, as a ratio to P = 1;
* ``vs_hf``: the engine against ``model.generate`` (P samples via ``num_return_sequences``) as paths
  grow, same model, prompt, dtype, sampling and number of tokens; plus P = 1 and ParaThinker end to
  end (think + summary) at the shortest length;
* ``path_length``: seconds per generated token of the ParaThinker think stage as paths grow, P = 8
  and P = 1;
* ``attention``: the decode step with each attention kernel (``flex``, ``sdpa``) as paths grow;
* ``summary``: summary stage with the paths' KV reused in place vs recomputed (``reprefill``);
* ``length``: per-step decode time as the context grows, engine vs a transformers DynamicCache loop;
* ``memory``: peak memory against weights + the theoretical KV size; the KV pages held at peak against
  the tokens they hold; a run whose slots' worst cases add up to 4x the pool (preempting) against the
  same run with a large pool (outputs must be identical);
* ``eval_workload``: an evaluation-like workload (many prompts, think stages of long-tailed lengths)
  through ``num_slots`` slots, on the tiny shape and the SmolLM2 shape: the original engine (commit
  ca50159, static batches, from a git worktree under ``.bench/``) against today's, eager and
  compiled (continuous batching), each timed run a process of its own, the compile time apart;
  it writes the compile verdicts ``compile=auto`` reads (:mod:`benchmarks.batching`);
* ``decode_step``: one decode step of ``slots x P`` paths at a path length against the time to read
  the weights and the KV pages the slots hold once from memory (bandwidth measured in the same run).

Long paths are *filled*: a request starts with every path already ``t0`` tokens long (its pages
allocated, their keys and values zeros, as a transformers cache of zeros is for ``generate``) and
the timed window is the tokens that follow, so a 2,048-token point costs a window of steps, not
2,048 of them. A window centred on the middle of a path of L tokens costs what a whole path of L
tokens costs per token when a step's cost grows linearly with the context, as attention's does.

Token counts are forced: a hook on the LM head bans EOS and every control token, so every path
runs to its budget and runs are comparable; ``eval_workload`` also forces each prompt's paths to
close at a chosen step.

Every timed call first runs once at its own shapes, untimed (:meth:`harness.Bench.warm_up`): the engine
compiles its step and flex's kernel per batch size, and CUDA graphs are recorded per shape and per
KV pool, which would otherwise land in the measured window. ``decode_step``, ``path_length`` and
``vs_hf`` report those first calls' seconds (compilation and CUDA graph capture included) in
their own columns, and every benchmark prints its total. ``eval_workload``'s processes warm up on
the longest prompts of the workload; what a timed pass still compiles (a batch size the warm-up did
not meet) leaves its seconds for ``compile_s_cold`` / ``compile_s_warm``, the compiled variant's
compile time with a cold and a warm inductor cache (one fresh cache for the run).

The command line is here; the shared machinery in :mod:`benchmarks.harness`, the benchmarks in
:mod:`benchmarks.decoding` and :mod:`benchmarks.batching`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks import batching, decoding
from benchmarks.harness import PRESETS, Bench, Benchmark

#: each benchmark: what runs it (writes its CSV, Markdown table and PNG), and what draws its rows
BENCHMARKS = {
    "width": Benchmark(decoding.bench_width, decoding.plot_width),
    "vs_hf": Benchmark(decoding.bench_vs_hf, decoding.plot_vs_hf),
    "path_length": Benchmark(decoding.bench_path_length, decoding.plot_path_length),
    "attention": Benchmark(decoding.bench_attention, decoding.plot_attention),
    "summary": Benchmark(decoding.bench_summary, decoding.plot_summary),
    "length": Benchmark(decoding.bench_length, decoding.plot_length),
    "memory": Benchmark(batching.bench_memory, batching.plot_memory),
    "eval_workload": Benchmark(batching.bench_eval_workload, batching.plot_eval_workload),
    "decode_step": Benchmark(decoding.bench_decode_step, decoding.plot_decode_step),
}


# -- command line --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (SmolLM2-135M shape) or cuda[:i] (Qwen2-1.5B shape)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--smoke", action="store_true", help="tiny shape and budgets: checks that it runs")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--output", type=Path, default=Path("results"), help="directory for the CSV/PNG files")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the compiled decode step in decode_step (eval_workload always does)")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in args.only if name not in BENCHMARKS]
    if unknown or not args.only:
        parser.error(f"--only: unknown benchmark(s) {unknown or args.only}; choose from {', '.join(BENCHMARKS)}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    return args


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS["smoke" if args.smoke else ("cpu" if args.device == "cpu" else "gpu")]
    bench = Bench.create(preset, args.device, getattr(torch, args.dtype), args.output, args.compile)
    print(f"# {preset.shape} on {args.device} ({args.dtype}, {torch.get_num_threads()} CPU threads)")
    paths = []
    for name in args.only:
        started, warmed = time.perf_counter(), bench.warmup_s
        paths.append(BENCHMARKS[name].run(bench))
        print(f"# {name}: {time.perf_counter() - started:.0f} s, of which {bench.warmup_s - warmed:.0f} s first calls at "
              "the timed shapes (compilation, CUDA graph capture)")
    return paths


if __name__ == "__main__":
    main()
