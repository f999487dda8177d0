"""The benchmarks of memory and scheduling: the KV pages held against the tokens, and a preempting
pool against a large one (``memory``); today's engine against the original one on an
evaluation-like workload, eager and compiled, each run in a process of its own (``eval_workload``).
Each returns the CSV it wrote; its ``plot_*`` draws its rows.

``eval_workload`` also writes the compile verdicts that ``compile=auto`` reads
(:mod:`lm_eval_parathinker.engine.compilation`): one row per shape, eager against compiled, into
the package's ``compile_verdicts.csv`` when the run writes the repository's ``results/`` (and is
not ``--smoke``), else into ``compile_verdicts.csv`` beside the run's other outputs, so a smoke run
or a run elsewhere never touches the committed table.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import workload_worker
from benchmarks.harness import NUM_CONTROL_PATHS, PRESETS, Bench, Workload, alternate, banned_tokens
from benchmarks.workload_worker import VARIANTS, WorkloadSpec
from lm_eval_parathinker import protocol
from lm_eval_parathinker.engine import compilation

REPO_ROOT = Path(__file__).resolve().parents[1]
#: the original engine (static batches, before continuous batching and the compiled step): issue 31's baseline
ORIGINAL_COMMIT = "ca50159"
#: where its git worktree is made (gitignored)
ORIGINAL_ROOT = REPO_ROOT / ".bench" / ORIGINAL_COMMIT


def _cuda_peak_extra(fn: Callable[[], object], device: str) -> int:
    """Peak CUDA memory allocated on ``device`` while ``fn`` runs, minus the memory allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def bench_memory(b: Bench) -> Path:
    """KV memory of P-path decoding: the pages held at peak against the tokens they held (within
    one page per segment), the pool, the theoretical KV (the prompt once + P paths) and
    ``generate``'s (P copies of the prompt); on CUDA also both sides' measured peak above the
    loaded model (the CPU has no allocator statistics that track live tensors). Then a run whose
    slots' worst cases add up to 4x the pool (it preempts) against the same run with a large pool:
    the outputs must be the same."""
    p = b.preset
    prompt = b.prompt(p.prompt_len)
    n, per_token = p.memory_budget, b.kv_bytes_per_token
    cuda = torch.device(b.device).type == "cuda"
    rows = []
    mb = 2**20
    for paths in p.memory_paths:
        b.engine.release_pool()  # the run allocates its own pool

        def run():
            return b.engine.generate([prompt], mode="independent", num_paths=paths, max_new_tokens=n,
                                     temperature=1.0, seed=0)

        if cuda:
            engine_peak = _cuda_peak_extra(run, b.device)
        else:
            run()
        stats = b.engine.last_stats
        slack = stats["kv_peak_bytes"] - stats["kv_peak_tokens"] * per_token
        assert slack <= (1 + paths) * stats["kv_page_size"] * per_token, stats  # one page per segment
        row = {"run": f"P={paths}", "paths": paths, "tokens_per_path": n,
               "kv_theory_mb": per_token * (p.prompt_len + paths * n) / mb,
               "hf_kv_mb": per_token * paths * (p.prompt_len + n) / mb, "kv_pool_mb": stats["kv_pool_bytes"] / mb,
               "kv_peak_mb": stats["kv_peak_bytes"] / mb, "kv_peak_tokens_mb": stats["kv_peak_tokens"] * per_token / mb,
               "page_mb": stats["kv_page_size"] * per_token / mb, "segments": 1 + paths, "preemptions": 0,
               "same_outputs": ""}
        if cuda:
            row["engine_extra_mb"] = engine_peak / mb
            row["hf_extra_mb"] = _cuda_peak_extra(lambda: b.hf_generate(prompt, paths, n), b.device) / mb
        rows.append(row)
    rows.append(_oversubscribed_row(b))

    return b.write("memory", rows, plot_memory)


def plot_memory(ax, rows: list[dict]) -> None:
    sel = [r for r in rows if r["run"].startswith("P=")]
    x = [r["paths"] for r in sel]
    ax.plot(x, [r["kv_theory_mb"] for r in sel], "--", color="grey", label="KV of the tokens (prompt once)")
    ax.plot(x, [r["kv_peak_mb"] for r in sel], "^-", label="KV pages held at peak")
    ax.plot(x, [r["hf_kv_mb"] for r in sel], "s:", label="generate's KV (P prompt copies)")
    if "engine_extra_mb" in sel[0]:  # measured on CUDA
        ax.plot(x, [r["engine_extra_mb"] for r in sel], "o-", label="engine peak - before")
        ax.plot(x, [r["hf_extra_mb"] for r in sel], "s-", label="generate peak - before")
    ax.set(xlabel="paths P", ylabel="KV memory (MiB)")


def _oversubscribed_row(b: Bench) -> dict:
    prompts_n, paths, budget, slots = b.preset.oversubscribed
    prompts = [b.prompt(b.preset.prompt_len // 2 + 8 * i, seed=i) for i in range(prompts_n)]
    # small pages: requests grow page by page, so all slots fill up before the pool runs out; on
    # CUDA pages that torch's flex kernels take at any head size and dtype (attention.flex_reads_pages)
    ps = 16 if torch.device(b.device).type == "cpu" else 128
    kwargs = dict(mode="independent", num_paths=paths, max_new_tokens=budget, temperature=1.0, seed=0,
                  num_slots=slots, block_size=ps)
    large = b.engine.generate(prompts, **kwargs)
    worst = max(math.ceil(len(q) / ps) for q in prompts) + paths * math.ceil(budget / ps)
    pool = max(worst, slots * worst // 4)  # the slots' worst cases add up to (about) 4x the pool
    small = b.engine.generate(prompts, num_blocks=pool + 1, **kwargs)
    stats, mb = b.engine.last_stats, 2**20
    same = [o.path_ids for o in small] == [o.path_ids for o in large]
    assert same, "a preempting run gave other outputs than a large pool"
    assert stats["preemptions"] > 0, "the small pool did not run short"
    return {"run": f"{slots} slots x worst case = {slots * worst / pool:.1f} x pool", "paths": paths,
            "tokens_per_path": budget, "kv_theory_mb": "", "hf_kv_mb": "", "kv_pool_mb": stats["kv_pool_bytes"] / mb,
            "kv_peak_mb": stats["kv_peak_bytes"] / mb,
            "kv_peak_tokens_mb": stats["kv_peak_tokens"] * b.kv_bytes_per_token / mb,
            "page_mb": ps * b.kv_bytes_per_token / mb, "segments": slots * (1 + paths),
            "preemptions": stats["preemptions"], "same_outputs": same}


def workload_lengths(w: Workload, seed: int = 0) -> list[int]:
    """Think-stage lengths (tokens per path, the closer included) of a workload: log-normal around
    ``median`` (a long tail, as reasoning lengths are), within [4, budget]."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.randn(w.prompts, generator=g) * 0.9 + math.log(w.median)
    return [int(min(max(round(math.exp(x)), 4), w.budget)) for x in draws.tolist()]


def bench_eval_workload(b: Bench) -> Path:
    """Problems per minute on an evaluation-like workload (each of the preset's ``workloads``: the
    tiny shape, where host work dominates a step, and a real one): ParaThinker requests whose think
    stages end after long-tailed numbers of steps, through ``slots`` slots. Prompt i is
    ``budget - L_i`` tokens longer than the shortest, so that its paths reach position
    F = shortest + budget - 2 after L_i - 1 tokens: a hook forces the closer there (first-finish
    after L_i tokens per path) with no knowledge of slots, requests or engine.

    Variants (:mod:`benchmarks.workload_worker`): ``original``, the engine of commit ca50159 (static
    batches of ``slots`` prompts) imported from a git worktree of that commit; ``eager`` and
    ``compiled``, today's engine with continuous batching, ``compile=False`` / ``True``. Every timed
    run is a new process (alternating, ``repeats`` rounds, the fastest counts) that loads the same
    checkpoint, warms up untimed on the longest prompts (most compilation happens there; what the
    timed pass still compiles leaves its seconds for the compile time), then times one pass over
    every prompt. Both engines run the paper layout: the original knows no ``compat=official``
    (its position offsets and padding would be other work). One fresh inductor cache serves the
    whole run, so the first compiled process compiles cold (``compile_s_cold``) and the second
    warm (``compile_s_warm``); neither is in ``seconds``.

    Per shape it writes the compile verdict, eager against compiled (:func:`verdicts_path` says
    where), and marks ``default`` the row that verdict makes ``compile=auto`` run."""
    packages = {"original": original_package(), "eager": REPO_ROOT, "compiled": REPO_ROOT}
    verdicts = verdicts_path(b)
    b.engine.release_pool()  # the workers need the device's memory
    rows = []
    with tempfile.TemporaryDirectory(prefix="eval_workload-") as tmp:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor"), "TOKENIZERS_PARALLELISM": "false"}
        for w in b.preset.workloads:
            bench = b if w.shape == b.preset.shape else Bench.create(b.preset, b.device, b.dtype, b.output, b.compile,
                                                                     w.shape)
            best, runs = run_variants(save_workload(bench, w, Path(tmp) / w.shape), w, packages, env)
            b.warmup_s += sum(r["warmup_s"] for results in runs.values() for r in results)
            verdict = verdict_row(bench, w, best, runs["compiled"])
            compilation.write_verdict(verdict, verdicts)
            rows += workload_rows(w, best, runs, verdict)

    return b.write("eval_workload", rows, plot_eval_workload)


def plot_eval_workload(ax, rows: list[dict]) -> None:
    colors = {"original": "grey", "eager": "C0", "compiled": "C1"}
    x = range(len(rows))
    ax.bar(x, [r["speedup_vs_original"] for r in rows], color=[colors[r["variant"]] for r in rows])
    for i, r in enumerate(rows):
        ax.annotate(f"{r['speedup_vs_original']:.2f}x\n{r['problems_per_min']:.0f}/min", (i, r["speedup_vs_original"]),
                    ha="center", va="bottom", fontsize=7)
    ax.margins(y=0.2)  # room for the labels above the bars
    labels = [f"{r['shape']}\n{r['variant']}" + ("\n(default)" if str(r["default"]) == "True" else "") for r in rows]
    ax.set_xticks(x, labels, fontsize=7)
    ax.set(ylabel="problems per minute / original engine's")


def run_variants(spec: Path, w: Workload, packages: dict[str, Path], env: dict[str, str]
                 ) -> tuple[dict[str, float], dict[str, list[dict]]]:
    """Each variant's best seconds and every run's result line, in order: a new process per run,
    the variants alternating, ``w.repeats`` rounds."""
    runs = {variant: [] for variant in VARIANTS}

    def run(variant: str) -> float:
        result = run_worker(spec, variant, packages[variant], env)
        runs[variant].append(result)
        print(f"# eval_workload {w.shape} {variant}: {result['seconds']:.2f} s (warm-up {result['warmup_s']:.1f} s; "
              f"compiling {result['compile_s']:.1f} s, {result['timed_compile_s']:.1f} s of it in the timed pass)",
              flush=True)
        return result["seconds"]

    return alternate({variant: lambda v=variant: run(v) for variant in VARIANTS}, w.repeats), runs


def original_package() -> Path:
    """The package root of the original engine (:data:`ORIGINAL_COMMIT`): a git worktree at
    :data:`ORIGINAL_ROOT`, made the first time (under a lock: test workers may ask at once)."""
    marker = ORIGINAL_ROOT / "lm_eval_parathinker" / "engine.py"  # the engine was one module then
    ORIGINAL_ROOT.parent.mkdir(exist_ok=True)
    with open(ORIGINAL_ROOT.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file():
            return ORIGINAL_ROOT
        git = ["git", "-C", str(REPO_ROOT), "worktree"]
        try:  # prune: forget a worktree whose folder was deleted, so that add can make it again
            subprocess.run([*git, "prune"], check=True, capture_output=True, text=True)
            subprocess.run([*git, "add", "--detach", str(ORIGINAL_ROOT), ORIGINAL_COMMIT], check=True,
                           capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as error:
            why = (getattr(error, "stderr", None) or str(error)).strip()
            raise RuntimeError(
                f"eval_workload runs the original engine (commit {ORIGINAL_COMMIT}) from a git worktree at "
                f"{ORIGINAL_ROOT}, which could not be made: {why}. It needs git and the repository's history "
                f"(a shallow clone: git fetch --unshallow); without them, copy that commit's files there.") from error
    return ORIGINAL_ROOT


def verdicts_path(b: Bench) -> Path:
    """Where this run's compile verdicts go: the package's table for a real run into the repository's
    ``results/``, else beside the run's outputs."""
    real = b.preset is not PRESETS["smoke"] and b.output.resolve() == (REPO_ROOT / "results").resolve()
    if real:
        return compilation.VERDICTS_CSV
    b.output.mkdir(parents=True, exist_ok=True)
    return b.output / "compile_verdicts.csv"


def save_workload(b: Bench, w: Workload, folder: Path) -> Path:
    """The checkpoint (``b``'s model and tokenizer, thought embeddings under the official names) and
    the spec of ``w`` in ``folder``; returns the spec's path."""
    lengths = workload_lengths(w)
    b.model.save_pretrained(folder)
    b.tokenizer.save_pretrained(folder)
    spec = WorkloadSpec(
        checkpoint=str(folder), device=b.device, dtype=b.dtype_name, threads=torch.get_num_threads(),
        prompts=[b.prompt(w.prompt_len + w.budget - n, seed=i) for i, n in enumerate(lengths)], lengths=lengths,
        paths=w.paths, budget=w.budget, slots=w.slots, summary_tokens=w.summary, num_control_paths=NUM_CONTROL_PATHS,
        banned=banned_tokens(b.tokenizer), closer=protocol.ControlTokenIds.from_tokenizer(b.tokenizer).think_close[0],
        force_position=w.prompt_len + w.budget - 2)
    spec.write(folder / "workload.json")
    return folder / "workload.json"


def run_worker(spec: Path, variant: str, package: Path, env: dict[str, str]) -> dict:
    """One timed run of ``variant`` in a new process importing the package at ``package``: its result line."""
    pythonpath = os.pathsep.join(filter(None, [str(package), env.get("PYTHONPATH")]))
    command = [sys.executable, "-P", workload_worker.__file__, str(spec), variant, "--package-root", str(package)]
    proc = subprocess.run(command, env={**env, "PYTHONPATH": pythonpath}, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise RuntimeError(f"eval_workload: the {variant} run failed (exit {proc.returncode}; its errors above)")
    return json.loads(proc.stdout.splitlines()[-1])


def verdict_row(b: Bench, w: Workload, best: dict[str, float], compiled: list[dict]) -> dict:
    """The compile verdict of ``w``'s model (:data:`compilation.VERDICT_COLUMNS`): compile where faster."""
    params = sum(t.numel() for t in b.model.parameters())
    speedup = best["eager"] / best["compiled"]
    return {"device": torch.device(b.device).type, "size_bucket": compilation.size_bucket(params), "shape": w.shape,
            "params": params, "eager_s": best["eager"], "compiled_s": best["compiled"], "speedup": speedup,
            "compile_s": compiled[0]["compile_s"], "compile": "true" if speedup > 1 else "false",
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def workload_rows(w: Workload, best: dict[str, float], runs: dict[str, list[dict]], verdict: dict) -> list[dict]:
    """One row per variant of ``w``; every run must have generated the same tokens (the same work)."""
    tokens = {r["tokens"] for results in runs.values() for r in results}
    if len(tokens) != 1:
        raise RuntimeError(f"eval_workload {w.shape}: the runs generated different numbers of tokens {sorted(tokens)}")
    (generated,) = tokens
    lengths = workload_lengths(w)
    compile_s = [r["compile_s"] for r in runs["compiled"]]  # cold (the first process), then warm
    default = "compiled" if verdict["compile"] == "true" else "eager"  # what compile=auto picks
    rows = []
    for variant, seconds in best.items():
        compiled = variant == "compiled"
        rows.append({"shape": w.shape, "variant": variant, "prompts": w.prompts, "paths": w.paths, "slots": w.slots,
                     "budget": w.budget, "mean_think_len": sum(lengths) / len(lengths), "max_think_len": max(lengths),
                     "seconds": seconds, "problems_per_min": 60 * w.prompts / seconds,
                     "gen_tokens_per_s": generated / seconds, "speedup_vs_original": best["original"] / seconds,
                     "compile_s_cold": compile_s[0] if compiled else "",
                     "compile_s_warm": compile_s[1] if compiled and len(compile_s) > 1 else "",
                     "threads": verdict["threads"], "default": variant == default})
    return rows
