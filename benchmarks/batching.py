"""The benchmarks of memory and scheduling: the KV pages held against the tokens, and a preempting
pool against a large one (``memory``); continuous batching against static batches on an
evaluation-like workload (``eval_workload``). Each returns the CSV it wrote; its ``plot_*`` draws
its rows."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.harness import Bench, Preset, alternate, force_token_at
from lm_eval_parathinker import protocol
from lm_eval_parathinker.engine import ParaThinkerEngine
from lm_eval_parathinker.engine.scheduler import StaticScheduler


def _cuda_peak_extra(fn: Callable[[], object], device: str) -> int:
    """Peak CUDA memory allocated on ``device`` while ``fn`` runs, minus the memory allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def workload_lengths(p: Preset, seed: int = 0) -> list[int]:
    """Think-stage lengths (tokens per path, the closer included) of the eval workload: log-normal
    around ``workload_median`` (a long tail, as reasoning lengths are), within [4, budget]."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.randn(p.workload_prompts, generator=g) * 0.9 + math.log(p.workload_median)
    return [int(min(max(round(math.exp(x)), 4), p.workload_budget)) for x in draws.tolist()]


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


def bench_eval_workload(b: Bench) -> Path:
    """Problems per minute on an evaluation-like workload: ``workload_prompts`` ParaThinker requests
    whose think stages end after long-tailed numbers of steps, through ``workload_slots`` slots, on
    each of ``workload_shapes`` (the tiny one: host work dominates a step). Prompt i is
    ``budget - L_i`` tokens longer than the shortest (``workload_prompt_len``), so that its paths
    reach position F = shortest + budget - 2 after L_i - 1 tokens: a hook forces the closer there
    (first-finish after L_i tokens per path) with no knowledge of slots or requests. Each variant
    runs ``workload_repeats`` times, alternating with the others; the fastest counts. Static and
    continuous scheduling run the same kernels: the ratio measures scheduling alone."""
    rows = []
    for shape in b.preset.workload_shapes:
        bench = b if shape == b.preset.shape else Bench.create(b.preset, b.device, b.dtype, b.output, b.compile, shape)
        rows += _workload_rows(bench, shape)
        if bench is not b:
            b.warmup_s += bench.warmup_s

    return b.write("eval_workload", rows, plot_eval_workload)


def plot_eval_workload(ax, rows: list[dict]) -> None:
    labels = [f"{r['shape']}\n{r['scheduling']}" for r in rows]
    ax.bar(range(len(rows)), [r["speedup_vs_static"] for r in rows])
    for i, r in enumerate(rows):
        ax.annotate(f"{r['speedup_vs_static']:.2f}x\n{r['problems_per_min']:.0f}/min", (i, r["speedup_vs_static"]),
                    ha="center", va="bottom", fontsize=7)
    ax.margins(y=0.2)  # room for the labels above the bars
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set(ylabel="problems per minute / static batches'")


def _workload_rows(b: Bench, shape: str) -> list[dict]:
    p = b.preset
    lengths = workload_lengths(p)
    prompts = [b.prompt(p.workload_prompt_len + p.workload_budget - n, seed=i) for i, n in enumerate(lengths)]
    closer = protocol.ControlTokenIds.from_tokenizer(b.tokenizer).think_close[0]
    kwargs = dict(num_paths=p.workload_paths, max_new_tokens=p.workload_budget, summary_max_tokens=p.summary_tokens,
                  temperature=1.0, seed=0, num_slots=p.workload_slots)
    variants = [("static", ParaThinkerEngine(b.model, b.tokenizer, scheduler_class=StaticScheduler)),
                ("continuous", b.engine)]
    if b.compile:
        variants.append(("continuous+compile", ParaThinkerEngine(b.model, b.tokenizer, compile=True)))
    results = {}

    def run(engine: ParaThinkerEngine) -> float:
        outs, took = b.timed(lambda: engine.generate(prompts, **kwargs))
        assert [len(o.path_ids[0]) for o in outs] == lengths, "the forced think lengths did not hold"
        results["tokens"] = sum(o.stats["gen_tokens"] for o in outs)  # the same in every run
        return took

    # warm-ups at the timed shapes: as many slots, the longest prompts (the page table's width and
    # the KV pool follow the longest request)
    longest = sorted(prompts, key=len)[-p.workload_slots :]
    with force_token_at(b.model, p.workload_prompt_len + p.workload_budget - 2, closer):
        for _, engine in variants:
            b.warm_up(lambda: engine.generate(longest, **kwargs))
        best = alternate({name: lambda e=engine: run(e) for name, engine in variants},
                         p.workload_repeats)
    rows = [{"shape": shape, "scheduling": name, "prompts": len(prompts), "paths": p.workload_paths,
             "slots": p.workload_slots, "mean_think_len": sum(lengths) / len(lengths), "max_think_len": max(lengths),
             "seconds": seconds, "problems_per_min": 60 * len(prompts) / seconds,
             "gen_tokens_per_s": results["tokens"] / seconds} for name, seconds in best.items()]
    for r in rows:
        r["speedup_vs_static"] = rows[0]["seconds"] / r["seconds"]
    return rows
