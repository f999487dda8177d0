"""The decoding benchmarks: latency as paths widen (``width``) and lengthen (``path_length``),
against ``model.generate`` (``vs_hf``) and a DynamicCache loop (``length``), the attention kernels
(``attention``), the summary stage's KV reuse (``summary``), and one decode step against reading
its bytes once (``decode_step``). Each returns the CSV it wrote; its ``plot_*`` draws its rows."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.harness import Bench, alternate, log_x, paths_filled, window
from lm_eval_parathinker.engine import ParaThinkerEngine
from lm_eval_parathinker.engine.kv_cache import cache_argument


@torch.inference_mode()
def _hf_step_time(b: Bench, prompt: list[int], steps: int) -> float:
    out = b.model(input_ids=torch.tensor([prompt], device=b.device), use_cache=True, logits_to_keep=1)
    argument = cache_argument(b.model)
    cache, token = getattr(out, argument), out.logits[:, -1].argmax(-1, keepdim=True)

    def loop():
        nonlocal token
        for _ in range(steps):
            step = b.model(input_ids=token, **{argument: cache}, use_cache=True)
            token = step.logits[:, -1].argmax(-1, keepdim=True)

    return b.timed(loop)[1] / steps

def memory_bandwidth(b: Bench, mib: int = 512) -> float:
    """Bytes per second of a large device copy (read + write), measured now."""
    x = torch.empty(mib << 20, dtype=torch.uint8, device=b.device)
    y = torch.empty_like(x)
    y.copy_(x)  # warm-up
    _, seconds = b.timed(lambda: [y.copy_(x) for _ in range(5)])
    return 2 * 5 * x.numel() / seconds



def bench_width(b: Bench) -> Path:
    """Think-stage latency for P paths at a fixed per-path budget, relative to P = 1."""
    p, n = b.preset, b.preset.width_budget
    prompt = b.prompt(p.prompt_len)
    rows = []
    for paths in p.width_paths:
        kwargs = dict(num_paths=paths, max_new_tokens=n, summary_max_tokens=1)
        b.warm_up(lambda: b.engine.generate([prompt], **kwargs))
        out = b.engine.generate([prompt], **kwargs)[0]
        assert out.stats["think_tokens"] == paths * n, out.stats
        rows.append({"paths": paths, "tokens_per_path": n, "think_s": out.stats["think_s"]})
    for r in rows:
        r["ratio_to_p1"] = r["think_s"] / rows[0]["think_s"]
        r["think_tokens_per_s"] = r["paths"] * n / r["think_s"]

    return b.write("width", rows, plot_width)


def plot_width(ax, rows: list[dict]) -> None:
    ax.plot([r["paths"] for r in rows], [r["ratio_to_p1"] for r in rows], "o-", label="engine")
    ax.plot([r["paths"] for r in rows], [r["paths"] for r in rows], "--", color="grey", label="P x (sequential)")
    log_x(ax, [r["paths"] for r in rows])
    ax.set(xlabel="paths P", ylabel="think-stage seconds / seconds at P = 1")


def bench_vs_hf(b: Bench) -> Path:
    """Engine vs ``model.generate``: P independent samples as paths grow (short paths whole, long
    ones over the same window of tokens on both sides), then P = 1 and ParaThinker end to end at
    the shortest length."""
    p = b.preset
    prompt = b.prompt(p.prompt_len)
    b.hf_generate(prompt, 2, 2)  # warm-up (the engine warms up at each row's shapes)
    rows = [_vs_hf_row(b, prompt, "independent", p.vs_hf_paths, n) for n in p.path_lengths]
    rows.append(_vs_hf_row(b, prompt, "sequential", 1, p.path_lengths[0]))
    rows.append(_vs_hf_row(b, prompt, "parathinker", p.vs_hf_paths, p.path_lengths[0], p.e2e_summary))

    return b.write("vs_hf", rows, plot_vs_hf)


def plot_vs_hf(ax, rows: list[dict]) -> None:
    """Tokens per second of each side, each pair marked with the engine's speedup; a row's ticks say
    what was timed (the whole run, or a window of steps of long paths)."""
    labels = [f"{r['mode']}\nP={r['paths']} L={r['tokens_per_path']}\n{r['timed']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["engine_tok_s"] for r in rows], 0.4, label="engine")
    ax.bar([i + 0.2 for i in x], [r["hf_tok_s"] for r in rows], 0.4, label="model.generate")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['speedup']:.2f}x", (i, max(r["engine_tok_s"], r["hf_tok_s"])), ha="center", va="bottom",
                    fontsize=7)
    ax.margins(y=0.15)  # room for the speedups above the bars
    ax.set_xticks(list(x), labels, fontsize=6)
    ax.set(ylabel="generated tokens per second\n(of the whole run, or of the window)")


def _vs_hf_row(b: Bench, prompt: list[int], mode: str, paths: int, length: int, summary: int = 0) -> dict:
    """One row: both sides generate ``paths`` x ``length`` tokens after the prompt, the whole run
    (prefill included) for paths up to ``vs_hf_whole`` tokens; longer paths time a window of
    ``window`` tokens around the middle (paths filled before it: steps only, on both sides). Best
    of ``vs_hf_repeats`` runs, the two sides alternating, after a first engine call at the row's
    shapes (``engine_warmup_s``)."""
    p = b.preset
    start, tokens = (0, length) if length <= p.vs_hf_whole else window(length, p.window)
    seen = {}

    def engine_run() -> float:
        with paths_filled(b.engine, start):
            outs, took = b.timed(lambda: b.engine.generate(
                [prompt], mode=mode, num_paths=paths, max_new_tokens=start + tokens,
                summary_max_tokens=max(summary, 1), temperature=1.0, seed=0))
        seen.update(outs[0].stats)
        assert seen["think_tokens"] == paths * (start + tokens), seen
        return seen["think_s"] if start else took  # a window: the think stage's steps only

    warmup_s = b.warm_up(engine_run)
    runs = {"engine": engine_run}
    if (paths, length) not in b.hf_seconds:  # the parathinker row reuses the independent row's baseline
        runs["hf"] = lambda: b.timed(lambda: b.hf_generate(prompt, paths, tokens, filled=start))[1]
    best = alternate(runs, p.vs_hf_repeats)
    hf_s = b.hf_seconds.setdefault((paths, length), best.get("hf"))
    engine_s = best["engine"]
    generated = paths * tokens  # the generate baseline's count; the engine's summary comes on top
    return {
        "mode": mode, "paths": paths, "tokens_per_path": length, "timed": "window" if start else "whole run",
        "window_start": start, "window_tokens": tokens, "summary_tokens": seen["summary_tokens"],
        "engine_s": engine_s, "hf_s": hf_s, "engine_tok_s": generated / engine_s, "hf_tok_s": generated / hf_s,
        "speedup": hf_s / engine_s, "engine_warmup_s": warmup_s,
    }


def bench_path_length(b: Bench) -> Path:
    """Seconds per generated token of the ParaThinker think stage for paths of each length (its
    middle window), at P = 8 and P = 1, as a ratio to the shortest length and P8 / P1."""
    p = b.preset
    prompt = b.prompt(p.prompt_len)
    rows = []
    for length in p.path_lengths:
        row = {"tokens_per_path": length, "window_tokens": window(length, p.window)[1]}
        for paths in p.path_length_paths:
            row[f"warmup_s_p{paths}"] = b.warm_up(lambda: b.think([prompt], paths, length, p.window))
            _, seconds = b.think([prompt], paths, length, p.window)
            row[f"s_per_token_p{paths}"] = seconds / (paths * row["window_tokens"])
        rows.append(row)
    top, low = max(p.path_length_paths), min(p.path_length_paths)
    for r in rows:
        r[f"ratio_to_first_p{top}"] = r[f"s_per_token_p{top}"] / rows[0][f"s_per_token_p{top}"]
        r[f"think_latency_p{top}_over_p{low}"] = r[f"s_per_token_p{top}"] * top / (r[f"s_per_token_p{low}"] * low)

    return b.write("path_length", rows, plot_path_length)


def plot_path_length(ax, rows: list[dict]) -> None:
    widths = [int(c.removeprefix("s_per_token_p")) for c in rows[0] if c.startswith("s_per_token_p")]
    for paths in widths:
        ax.plot([r["tokens_per_path"] for r in rows], [1000 * r[f"s_per_token_p{paths}"] for r in rows], "o-",
                label=f"P = {paths}")
    log_x(ax, [r["tokens_per_path"] for r in rows])
    ax.set(xlabel="tokens per path", ylabel="ms per generated token (think stage)")


def bench_attention(b: Bench) -> Path:
    """The decode step with each attention kernel over the KV pages, as paths grow (independent
    P = 8 samples; best of 2 alternating runs): what the CPU default is chosen by."""
    from lm_eval_parathinker.engine.attention import flex_available

    p = b.preset
    prompts = [b.prompt(p.prompt_len, seed=i) for i in range(p.attention_slots)]
    kernels = ["flex", "sdpa"] if flex_available(torch.device(b.device)) else ["sdpa"]
    for kernel in kernels:  # the timed slots and paths (flex compiles per batch size)
        b.warm_up(lambda: b.think(prompts, p.vs_hf_paths, 4, 4, mode="independent", attention=kernel))
    rows = []
    for length in p.path_lengths:
        tokens = window(length, p.attention_window)[1]
        best = alternate({kernel: lambda k=kernel: b.think(prompts, p.vs_hf_paths, length, p.attention_window,
                                                             mode="independent", attention=k)[1]
                          for kernel in kernels}, repeats=2)
        row = {"tokens_per_path": length, "slots": len(prompts), "paths": p.vs_hf_paths}
        row.update({f"{kernel}_ms_per_step": 1000 * best[kernel] / tokens for kernel in kernels})
        if len(kernels) == 2:
            row["sdpa_over_flex"] = best["sdpa"] / best["flex"]
        rows.append(row)

    return b.write("attention", rows, plot_attention)


def plot_attention(ax, rows: list[dict]) -> None:
    for kernel in [c.removesuffix("_ms_per_step") for c in rows[0] if c.endswith("_ms_per_step")]:
        ax.plot([r["tokens_per_path"] for r in rows], [r[f"{kernel}_ms_per_step"] for r in rows], "o-", label=kernel)
    log_x(ax, [r["tokens_per_path"] for r in rows])
    ax.set(xlabel="tokens per path", ylabel="ms per decode step")


def bench_summary(b: Bench) -> Path:
    """Summary stage (template + ``summary_tokens`` steps) after P paths of L tokens (filled), with
    the paths' KV reused in place vs recomputed first (``reprefill``)."""
    p = b.preset
    prompt = b.prompt(p.prompt_len)

    def summary_s(paths: int, length: int, summary_kv: str) -> float:
        with paths_filled(b.engine, length - 1):  # one think step, then the summary
            out = b.engine.generate([prompt], num_paths=paths, max_new_tokens=length, summary_kv=summary_kv,
                                    summary_max_tokens=p.summary_tokens, termination="first")[0]
        return out.stats["summary_s"]

    rows = []
    for paths in p.summary_paths:
        b.warm_up(lambda: summary_s(paths, 4, "reprefill"))  # the timed paths (flex compiles per batch size)
        for length in p.summary_lens:
            reuse_s, reprefill_s = summary_s(paths, length, "reuse"), summary_s(paths, length, "reprefill")
            rows.append({"paths": paths, "tokens_per_path": length, "reuse_s": reuse_s, "reprefill_s": reprefill_s,
                         "speedup": reprefill_s / reuse_s})

    return b.write("summary", rows, plot_summary)


def plot_summary(ax, rows: list[dict]) -> None:
    for paths in dict.fromkeys(r["paths"] for r in rows):
        sel = [r for r in rows if r["paths"] == paths]
        ax.plot([r["tokens_per_path"] for r in sel], [r["speedup"] for r in sel], "o-", label=f"P={paths}")
    log_x(ax, [r["tokens_per_path"] for r in rows])
    ax.set(xlabel="tokens per path", ylabel="summary-stage seconds, reprefill / reuse")


def bench_length(b: Bench) -> Path:
    """Mean per-step decode time after a prompt of ``context`` tokens: engine vs a greedy loop over
    transformers' DynamicCache."""
    p = b.preset
    steps = p.length_steps
    _hf_step_time(b, b.prompt(8), 2)  # warm-up
    b.warm_up(lambda: b.engine.generate([b.prompt(8)], mode="sequential", max_new_tokens=2))  # one query, as timed
    rows = []
    for context in p.length_contexts:
        prompt = b.prompt(context)
        out = b.engine.generate([prompt], mode="sequential", max_new_tokens=steps)[0]
        engine_ms = 1000 * out.stats["think_s"] / steps  # one forward per new token
        hf_ms = 1000 * _hf_step_time(b, prompt, steps)
        rows.append({"context": context, "steps": steps, "engine_ms_per_step": engine_ms,
                     "hf_ms_per_step": hf_ms, "speedup": hf_ms / engine_ms})

    return b.write("length", rows, plot_length)


def plot_length(ax, rows: list[dict]) -> None:
    ax.plot([r["context"] for r in rows], [r["engine_ms_per_step"] for r in rows], "o-", label="engine")
    ax.plot([r["context"] for r in rows], [r["hf_ms_per_step"] for r in rows], "s-", label="DynamicCache loop")
    log_x(ax, [r["context"] for r in rows])
    ax.set(xlabel="context (tokens)", ylabel="ms per decode step")


def bench_decode_step(b: Bench) -> Path:
    """One decode step of ``step_slots`` slots x ``step_paths`` paths (independent samples, paths
    filled to each length) against reading the weights and the KV pages the slots hold once."""
    p = b.preset
    bandwidth = memory_bandwidth(b)
    prompts = [b.prompt(p.prompt_len, seed=i) for i in range(p.step_slots)]
    engines = [("eager", b.engine)]
    if b.compile:
        engines.append(("compiled", ParaThinkerEngine(b.model, b.tokenizer, compile=True)))
    rows = []
    for name, engine in engines:
        for length in p.step_lengths:
            start, tokens = window(length, p.step_window)
            warmup_s = b.warm_up(lambda: b.think(prompts, p.step_paths, length, p.step_window, engine, mode="independent"))
            _, seconds = b.think(prompts, p.step_paths, length, p.step_window, engine, mode="independent")
            step_s = seconds / tokens
            held = p.step_slots * (p.prompt_len + p.step_paths * (start + tokens / 2))  # tokens held, mid-window
            roofline_s = (b.weight_bytes + held * b.kv_bytes_per_token) / bandwidth
            rows.append({"step": name, "slots": p.step_slots, "paths": p.step_paths, "tokens_per_path": start,
                         "weights_mb": b.weight_bytes / 2**20, "kv_mb": held * b.kv_bytes_per_token / 2**20,
                         "bandwidth_gb_s": bandwidth / 1e9, "step_ms": 1000 * step_s, "roofline_ms": 1000 * roofline_s,
                         "ratio_to_roofline": step_s / roofline_s, "warmup_s": warmup_s})

    return b.write("decode_step", rows, plot_decode_step)


def plot_decode_step(ax, rows: list[dict]) -> None:
    for name in dict.fromkeys(r["step"] for r in rows):
        sel = [r for r in rows if r["step"] == name]
        ax.plot([r["tokens_per_path"] for r in sel], [r["step_ms"] for r in sel], "o-", label=f"{name} step")
    sel = [r for r in rows if r["step"] == "eager"]
    ax.plot([r["tokens_per_path"] for r in sel], [r["roofline_ms"] for r in sel], "--", color="grey",
            label="weights + KV read once")
    ax.set(xlabel="tokens per path (filled)", ylabel="ms per decode step")
