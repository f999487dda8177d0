"""Engine benchmarks on random-initialised models of real shapes (no download).

    python -m benchmarks.engine                      # CPU, SmolLM2-135M shape, float32
    python -m benchmarks.engine --device cuda --dtype bfloat16   # Qwen2-1.5B shape
    python -m benchmarks.engine --smoke --only width,vs_hf       # tiny shape, seconds

Each benchmark times the engine and its baseline in the same process and writes
``results/bench_<name>[_<device>].csv`` and ``.png``:

* ``width``: think-stage latency for P paths at a fixed per-path budget, as a ratio to P = 1;
* ``vs_hf``: the engine against ``model.generate`` (P samples via ``num_return_sequences``, and
  P = 1), same model, prompt, dtype, sampling and number of tokens;
* ``summary``: summary stage with the paths' KV reused in place vs recomputed (``reprefill``);
* ``length``: per-step decode time as the context grows, engine vs a transformers DynamicCache loop;
* ``memory``: peak memory against weights + the theoretical KV size;
* ``eval_workload``: an evaluation-like workload (many prompts, think stages of long-tailed
  lengths) through ``num_slots`` slots: lockstep static batches vs continuous batching
  (and, with ``--compile``, the compiled decode step);
* ``decode_step``: time of one decode step of ``slots x P`` paths against the time to read the
  weights and the KV in use once from memory (bandwidth measured in the same run).

Token counts are forced: a hook on the LM head bans EOS and every control token, so every path
runs to its budget and runs are comparable; ``eval_workload`` also forces each prompt's paths to
close at a chosen step.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from lm_eval_parathinker import protocol
from lm_eval_parathinker.engine import ParaThinkerEngine, step
from lm_eval_parathinker.engine.attention import packed_attention
from lm_eval_parathinker.engine.kv_cache import SlotKVCache
from lm_eval_parathinker.thought_embedding import add_control_tokens, attach_thought_embeddings

BENCHMARKS = ("width", "vs_hf", "summary", "length", "memory", "eval_workload", "decode_step")
NUM_CONTROL_PATHS = 16  # width goes up to P = 16

SHAPES = {
    "tiny": (LlamaConfig, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)),
    "smollm2-135m": (LlamaConfig, dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                       num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                       tie_word_embeddings=True)),
    "qwen2-1.5b": (Qwen2Config, dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                     num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                     tie_word_embeddings=True)),
}


@dataclass(frozen=True)
class Preset:
    """Model shape and the grid of every benchmark."""

    shape: str
    prompt_len: int
    width_paths: tuple[int, ...]
    width_budget: int
    vs_hf_paths: tuple[int, ...]  # 1 = sequential, > 1 = independent samples
    vs_hf_budget: int
    e2e_paths: int  # ParaThinker end to end (think + summary) against generate(num_return_sequences)
    e2e_budget: int
    e2e_summary: int
    summary_paths: tuple[int, ...]
    summary_lens: tuple[int, ...]
    summary_tokens: int
    length_contexts: tuple[int, ...]
    length_steps: int
    memory_paths: tuple[int, ...]
    memory_budget: int
    workload_prompts: int  # eval_workload: prompts, shortest prompt, P, per-path budget, slots, median think length
    workload_prompt_len: int
    workload_paths: int
    workload_budget: int
    workload_slots: int
    workload_median: int
    workload_repeats: int  # runs of each variant, alternating; the fastest counts (noisy machines)
    step_slots: int  # decode_step: slots x P paths, steps timed
    step_paths: int
    step_budget: int


PRESETS = {
    "smoke": Preset("tiny", 8, (1, 2), 4, (1, 2), 4, 2, 4, 2, (2,), (8,), 2, (16, 32), 2, (2,), 8,
                    6, 8, 2, 16, 2, 4, 1, 2, 2, 8),
    # CPU grid, sized for a 2-core box (a forward runs at ~40 prompt tokens/s there): short
    # budgets, summary at P = 2, 8 and up to 512 tokens per path, contexts up to 1024, a
    # 256-token prompt for vs_hf. The end-to-end row is P = 8 x 128 = 1024 generated think tokens.
    "cpu": Preset("smollm2-135m", 256, (1, 2, 4, 8, 16), 32, (1, 8), 128, 8, 128, 8,
                  (2, 8), (128, 512), 8, (128, 512, 1024), 8, (1, 8, 16), 32,
                  32, 64, 8, 128, 4, 24, 2, 4, 8, 16),
    "gpu": Preset("qwen2-1.5b", 256, (1, 2, 4, 8, 16), 2048, (1, 8), 2048, 8, 2048, 128,
                  (2, 4, 8, 16), (256, 512, 1024, 2048), 128, (128, 512, 1024, 2048, 4096), 32, (1, 8, 16), 2048,
                  32, 128, 8, 2048, 4, 384, 1, 4, 8, 512),
}


# -- setup ---------------------------------------------------------------------------------


def build_model(shape: str, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    config_cls, kwargs = SHAPES[shape]
    config = config_cls(**kwargs, max_position_embeddings=32768, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).eval()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level tokenizer: the engine needs it only for control ids, EOS and the
    summary template (prompts are token ids)."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([protocol.SUMMARY_TEMPLATE], vocab_size=300, min_frequency=1,
                            special_tokens=["<pad>", "<eos>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>", pad_token="<pad>")


def ban_tokens(model: torch.nn.Module, token_ids: Sequence[int]) -> None:
    """Make ``token_ids`` impossible to generate (forces fixed-length runs, engine and baseline alike)."""
    banned = torch.tensor(sorted(token_ids), device=next(model.parameters()).device)

    def hook(module, args, output):
        return output.index_fill(-1, banned, float("-inf"))

    model.get_output_embeddings().register_forward_hook(hook)


@contextlib.contextmanager
def force_token_at(model: torch.nn.Module, position: int, token: int):
    """While active, the model predicts ``token`` (and nothing else) after any query at ``position``
    (without a host round trip: the step stays as it is in a real run)."""
    seen = {}
    pre = model.register_forward_pre_hook(lambda m, a, kw: seen.update(positions=kw["position_ids"]), with_kwargs=True)

    def hook(module, args, logits):
        at = seen["positions"][:, -logits.shape[1] :] == position
        only = torch.full_like(logits, float("-inf")).index_fill(-1, torch.tensor([token], device=logits.device), 0.0)
        return torch.where(at[..., None], only, logits)

    post = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        pre.remove()
        post.remove()


@dataclass
class Bench:
    """Everything a benchmark needs: one model, its tokenizer and engine, and where to write."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerFast
    engine: ParaThinkerEngine
    preset: Preset
    device: str
    dtype: torch.dtype
    output: Path
    suffix: str
    compile: bool = False  # also time the compiled decode step
    hf_seconds: dict = field(default_factory=dict)  # (P, tokens per path) -> generate's time

    @classmethod
    def create(cls, preset: Preset, device: str, dtype: torch.dtype, output: Path, compile: bool = False) -> Bench:
        model, tok = build_model(preset.shape, device, dtype), build_tokenizer()
        add_control_tokens(model, tok, NUM_CONTROL_PATHS)
        attach_thought_embeddings(model)  # zero tables: same cost as trained ones
        ids = protocol.ControlTokenIds.from_tokenizer(tok, NUM_CONTROL_PATHS)
        ban_tokens(model, [tok.eos_token_id, ids.summary_open, ids.summary_close, *ids.think_open, *ids.think_close])
        engine = ParaThinkerEngine(model, tok, num_control_paths=NUM_CONTROL_PATHS)
        suffix = "" if device == "cpu" else f"_{torch.device(device).type}"
        return cls(model, tok, engine, preset, device, dtype, output, suffix, compile)

    def prompt(self, length: int, seed: int = 0) -> list[int]:
        """Random token ids above the tokenizer's own (never a control token)."""
        g = torch.Generator().manual_seed(seed)
        low = len(self.tokenizer)
        return torch.randint(low, self.model.config.vocab_size, (length,), generator=g).tolist()

    def timed(self, fn: Callable[[], object]) -> tuple[object, float]:
        """Wall time of ``fn()``, synchronised on GPU."""
        self.sync()
        t0 = time.perf_counter()
        result = fn()
        self.sync()
        return result, time.perf_counter() - t0

    def sync(self) -> None:
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize()

    def hf_generate(self, prompt: list[int], num_sequences: int, new_tokens: int) -> torch.Tensor:
        """transformers' own sampling loop, exactly ``new_tokens`` per sequence."""
        ids = torch.tensor([prompt], device=self.device)
        out = self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
            top_p=1.0, num_return_sequences=num_sequences, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
        )
        assert out.shape == (num_sequences, len(prompt) + new_tokens), out.shape
        return out

    def write(self, name: str, rows: list[dict], plot: Callable[[object], None]) -> Path:
        """``bench_<name>.csv`` and ``.png``; prints the rows as a table."""
        title = f"{name} ({self.preset.shape}, {self.device}, {self.dtype_name})"
        return write_results(self.output / f"bench_{name}{self.suffix}", name, rows, plot, title)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def write_results(stem: Path, name: str, rows: list[dict], plot: Callable[[object], None], title: str) -> Path:
    """``stem.csv`` (the rows) and ``stem.png`` (``plot``); prints the rows as a table."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    save_plot(plot, stem.with_suffix(".png"), title)
    print_table(name, rows)
    return stem.with_suffix(".csv")


def save_plot(plot: Callable[[object], None], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    plot(ax)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(name: str, rows: list[dict]) -> None:
    cols = list(rows[0])
    cells = [[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n== {name}")
    for line in [cols, *cells]:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths)))
    sys.stdout.flush()


# -- benchmarks ----------------------------------------------------------------------------


def bench_width(b: Bench) -> Path:
    """Think-stage latency for P paths at a fixed per-path budget, relative to P = 1."""
    p, n = b.preset, b.preset.width_budget
    prompt = b.prompt(p.prompt_len)
    b.engine.generate([prompt], num_paths=2, max_new_tokens=2, summary_max_tokens=1)  # warm-up
    rows = []
    for paths in p.width_paths:
        out = b.engine.generate([prompt], num_paths=paths, max_new_tokens=n, summary_max_tokens=1)[0]
        assert out.stats["think_tokens"] == paths * n, out.stats
        rows.append({"paths": paths, "tokens_per_path": n, "think_s": out.stats["think_s"]})
    for r in rows:
        r["ratio_to_p1"] = r["think_s"] / rows[0]["think_s"]
        r["think_tokens_per_s"] = r["paths"] * n / r["think_s"]

    def plot(ax):
        ax.plot([r["paths"] for r in rows], [r["ratio_to_p1"] for r in rows], "o-", label="engine")
        ax.plot([r["paths"] for r in rows], [r["paths"] for r in rows], "--", color="grey", label="P x (sequential)")
        ax.set(xscale="log", xlabel="paths P", ylabel="think latency / latency at P = 1")

    return b.write("width", rows, plot)


def bench_vs_hf(b: Bench) -> Path:
    """Engine vs ``model.generate``: P samples (num_return_sequences) and P = 1, plus ParaThinker
    end to end (think + summary) against the same number of generate samples."""
    p = b.preset
    prompt = b.prompt(p.prompt_len)
    b.hf_generate(prompt, 2, 2)  # warm-up
    b.engine.generate([prompt], mode="independent", num_paths=2, max_new_tokens=2, temperature=1.0, seed=0)
    rows = []
    for paths in p.vs_hf_paths:
        mode = "sequential" if paths == 1 else "independent"
        rows.append(_vs_hf_row(b, prompt, mode, paths, p.vs_hf_budget, 0))
    rows.append(_vs_hf_row(b, prompt, "parathinker", p.e2e_paths, p.e2e_budget, p.e2e_summary))

    def plot(ax):
        labels = [f"{r['mode']}\nP={r['paths']} N={r['tokens_per_path']}" for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["engine_tok_s"] for r in rows], 0.4, label="engine")
        ax.bar([i + 0.2 for i in x], [r["hf_tok_s"] for r in rows], 0.4, label="model.generate")
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set(ylabel="generated tokens / s")

    return b.write("vs_hf", rows, plot)


def _vs_hf_row(b: Bench, prompt: list[int], mode: str, paths: int, n: int, summary: int) -> dict:
    if (paths, n) not in b.hf_seconds:  # the end-to-end row reuses the independent row's baseline
        b.hf_seconds[paths, n] = b.timed(lambda: b.hf_generate(prompt, paths, n))[1]
    hf_s = b.hf_seconds[paths, n]
    outs, engine_s = b.timed(lambda: b.engine.generate(
        [prompt], mode=mode, num_paths=paths, max_new_tokens=n, summary_max_tokens=max(summary, 1),
        temperature=1.0, seed=0,
    ))
    stats = outs[0].stats
    tokens = paths * n  # the generate baseline's count; the engine's summary comes on top
    assert stats["think_tokens"] == tokens, stats
    return {
        "mode": mode, "paths": paths, "tokens_per_path": n, "summary_tokens": stats["summary_tokens"],
        "engine_s": engine_s, "hf_s": hf_s, "engine_tok_s": tokens / engine_s, "hf_tok_s": tokens / hf_s,
        "speedup": hf_s / engine_s, "engine_time_ratio": engine_s / hf_s,
    }


def bench_summary(b: Bench) -> Path:
    """Summary stage (template prefill + ``summary_tokens`` decode steps) with the paths' KV
    reused in place vs recomputed first (``reprefill``), on a cache filled with P x L tokens."""
    p = b.preset
    _summary_times(b, 2, 4, 2)  # warm-up
    rows = []
    for paths in p.summary_paths:
        for length in p.summary_lens:
            reuse_s, reprefill_s = _summary_times(b, paths, length, p.summary_tokens)
            rows.append({"paths": paths, "tokens_per_path": length, "summary_tokens": p.summary_tokens,
                         "reuse_s": reuse_s, "reprefill_s": reprefill_s, "speedup": reprefill_s / reuse_s})

    def plot(ax):
        for paths in p.summary_paths:
            sel = [r for r in rows if r["paths"] == paths]
            ax.plot([r["tokens_per_path"] for r in sel], [r["speedup"] for r in sel], "o-", label=f"P={paths}")
        ax.set(xscale="log", xlabel="tokens per path", ylabel="reprefill time / reuse time")

    return b.write("summary", rows, plot)


def _summary_times(b: Bench, paths: int, length: int, summary_tokens: int) -> tuple[float, float]:
    """The summary stage on a cache row holding a prompt and ``paths`` paths of ``length`` tokens
    (interleaved as the think stage leaves them), as the scheduler runs it: the template in one
    forward, then one forward per summary token; ``reprefill`` first recomputes prompt + paths."""
    lp = b.preset.prompt_len
    template = torch.tensor(b.tokenizer(protocol.SUMMARY_TEMPLATE, add_special_tokens=False)["input_ids"],
                            device=b.device)
    n = lp + paths * length
    tokens = torch.tensor([b.prompt(lp) + b.prompt(paths * length, seed=1)], device=b.device)
    steps = torch.arange(paths * length, device=b.device)
    interleaved_blocks = torch.cat([torch.zeros(lp, dtype=torch.long, device=b.device), steps % paths + 1])[None]
    interleaved_pos = torch.cat([torch.arange(lp, device=b.device), lp + steps // paths])[None]
    cache = SlotKVCache(b.model, 1, n + template.numel() + summary_tokens, b.device, b.dtype)
    order = torch.cat([torch.arange(lp, device=b.device), lp + (steps % paths) * length + steps // paths])
    packed = (tokens[:, order.argsort()], interleaved_pos[:, order.argsort()], interleaved_blocks[:, order.argsort()])

    def fill(ids, positions, blocks, chunk=512):  # chunks bound the [Q, K] mask
        for start in range(0, n, chunk):
            cols = torch.arange(start, min(start + chunk, n), device=b.device)[None]
            step.forward(b.model, cache, slice(0, 1), ids[:, cols[0]], cols, positions[:, cols[0]],
                         blocks[:, cols[0]], torch.ones_like(cols, dtype=torch.bool), int(cols[0, -1]) + 1, True,
                         last_only=True)

    def summarize():
        cols = n + torch.arange(template.numel(), device=b.device)[None]
        pos = lp + length + torch.arange(template.numel(), device=b.device)[None]
        logits = step.forward(b.model, cache, slice(0, 1), template[None], cols, pos,
                              torch.full_like(cols, protocol.SUMMARY_BLOCK), torch.ones_like(cols, dtype=torch.bool),
                              n + template.numel(), True, last_only=True)
        for i in range(summary_tokens):
            col = torch.tensor([[n + template.numel() + i]], device=b.device)
            logits = step.forward(b.model, cache, slice(0, 1), logits[:, -1].argmax(-1, keepdim=True), col,
                                  col - n + lp + length, torch.full_like(col, protocol.SUMMARY_BLOCK),
                                  torch.ones_like(col, dtype=torch.bool), int(col) + 1, True)

    with torch.inference_mode(), packed_attention(b.model):  # as inside generate
        fill(tokens, interleaved_pos, interleaved_blocks)
        _, reuse_s = b.timed(summarize)
        _, reprefill_s = b.timed(lambda: (fill(*packed), summarize()))
    return reuse_s, reprefill_s


def bench_length(b: Bench) -> Path:
    """Mean per-step decode time after a prompt of ``context`` tokens: engine (preallocated
    cache) vs a greedy loop over transformers' DynamicCache."""
    p = b.preset
    steps = p.length_steps
    _hf_step_time(b, b.prompt(8), 2)  # warm-up
    b.engine.generate([b.prompt(8)], mode="sequential", max_new_tokens=2)
    rows = []
    for context in p.length_contexts:
        prompt = b.prompt(context)
        out = b.engine.generate([prompt], mode="sequential", max_new_tokens=steps)[0]
        engine_ms = 1000 * out.stats["think_s"] / steps  # one forward per new token
        hf_ms = 1000 * _hf_step_time(b, prompt, steps)
        rows.append({"context": context, "steps": steps, "engine_ms_per_step": engine_ms,
                     "hf_ms_per_step": hf_ms, "speedup": hf_ms / engine_ms})

    def plot(ax):
        ax.plot([r["context"] for r in rows], [r["engine_ms_per_step"] for r in rows], "o-", label="engine")
        ax.plot([r["context"] for r in rows], [r["hf_ms_per_step"] for r in rows], "s-", label="DynamicCache loop")
        ax.set(xscale="log", xlabel="context (tokens)", ylabel="ms per decode step")

    return b.write("length", rows, plot)


@torch.inference_mode()
def _hf_step_time(b: Bench, prompt: list[int], steps: int) -> float:
    out = b.model(input_ids=torch.tensor([prompt], device=b.device), use_cache=True, logits_to_keep=1)
    cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)

    def loop():
        nonlocal token
        for _ in range(steps):
            step = b.model(input_ids=token, cache=cache, use_cache=True)
            token = step.logits[:, -1].argmax(-1, keepdim=True)

    return b.timed(loop)[1] / steps


def bench_memory(b: Bench) -> Path:
    """Peak memory of P-path decoding (engine and generate) against weights + theoretical KV."""
    p = b.preset
    prompt = b.prompt(p.prompt_len)
    n = p.memory_budget
    config = b.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * b.dtype.itemsize
    weights = sum(t.numel() * t.element_size() for t in b.model.parameters())
    rows = []
    for paths in p.memory_paths:
        kv_theory = kv_per_token * (p.prompt_len + paths * n)  # the prompt's KV stored once
        engine_peak = _peak_extra(b, lambda: b.engine.generate([prompt], mode="independent", num_paths=paths,
                                                                max_new_tokens=n, temperature=1.0, seed=0))
        hf_peak = _peak_extra(b, lambda: b.hf_generate(prompt, paths, n))
        mb = 2**20
        rows.append({"paths": paths, "tokens_per_path": n, "weights_mb": weights / mb, "kv_theory_mb": kv_theory / mb,
                     "engine_extra_mb": engine_peak / mb, "hf_extra_mb": hf_peak / mb,
                     "engine_peak_over_theory": (weights + engine_peak) / (weights + kv_theory),
                     "hf_peak_over_theory": (weights + hf_peak) / (weights + kv_theory)})

    def plot(ax):
        x = [r["paths"] for r in rows]
        ax.plot(x, [r["kv_theory_mb"] for r in rows], "--", color="grey", label="theoretical KV")
        ax.plot(x, [r["engine_extra_mb"] for r in rows], "o-", label="engine peak - before")
        ax.plot(x, [r["hf_extra_mb"] for r in rows], "s-", label="generate peak - before")
        ax.set(xlabel="paths P", ylabel="MiB above the loaded model")

    return b.write("memory", rows, plot)


def _peak_extra(b: Bench, fn: Callable[[], object]) -> int:
    """Peak memory while ``fn`` runs minus memory before it (CUDA allocator, or sampled RSS)."""
    if torch.device(b.device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    _mmap_threshold(64 << 10)  # so that the RSS tracks live tensors, not heap reused from earlier runs
    try:
        return _rss_peak_during(fn)
    finally:
        _mmap_threshold(128 << 10)


def _mmap_threshold(size: int) -> None:
    """glibc serves allocations of ``size`` bytes and more by mmap (freeing them returns them to
    the OS; its default is 128 KiB, raised dynamically up to 32 MiB)."""
    import ctypes

    M_MMAP_THRESHOLD = -3
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, size)


def _rss() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_peak_during(fn: Callable[[], object], interval_s: float = 0.002) -> int:
    before = peak = _rss()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak, _rss()) - before


def workload_lengths(p: Preset, seed: int = 0) -> list[int]:
    """Think-stage lengths (tokens per path, the closer included) of the eval workload: log-normal
    around ``workload_median`` (a long tail, as reasoning lengths are), within [4, budget]."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.randn(p.workload_prompts, generator=g) * 0.9 + math.log(p.workload_median)
    return [int(min(max(round(math.exp(x)), 4), p.workload_budget)) for x in draws.tolist()]


def bench_eval_workload(b: Bench) -> Path:
    """Problems per minute on an evaluation-like workload: ``workload_prompts`` ParaThinker requests
    whose think stages end after long-tailed numbers of steps, through ``workload_slots`` slots.
    Prompt i is ``budget - L_i`` tokens longer than the shortest (``workload_prompt_len``), so that
    its paths reach position F = shortest + budget - 2 after L_i - 1 tokens: a hook forces the
    closer there (first-finish after L_i tokens per path) with no knowledge of slots or requests.
    Each variant runs ``workload_repeats`` times, alternating with the others; the fastest counts."""
    p = b.preset
    lengths = workload_lengths(p)
    prompts = [b.prompt(p.workload_prompt_len + p.workload_budget - n, seed=i) for i, n in enumerate(lengths)]
    closer = protocol.ControlTokenIds.from_tokenizer(b.tokenizer, NUM_CONTROL_PATHS).think_close[0]
    kwargs = dict(num_paths=p.workload_paths, max_new_tokens=p.workload_budget, summary_max_tokens=p.summary_tokens,
                  temperature=1.0, seed=0, num_slots=p.workload_slots)
    variants = [("static", "static", b.engine), ("continuous", "continuous", b.engine)]
    if b.compile:
        variants.append(("continuous+compile", "continuous",
                         ParaThinkerEngine(b.model, b.tokenizer, NUM_CONTROL_PATHS, compile=True)))
    seconds = {name: [] for name, _, _ in variants}
    with force_token_at(b.model, p.workload_prompt_len + p.workload_budget - 2, closer):
        b.engine.generate(prompts[:2], **{**kwargs, "max_new_tokens": 2})  # warm-up
        for name, scheduling, engine in variants:
            if engine.compile:  # compile outside the timing
                engine.generate(prompts[:p.workload_slots], scheduling=scheduling, **kwargs)
        for _ in range(p.workload_repeats):
            for name, scheduling, engine in variants:
                outs, took = b.timed(lambda: engine.generate(prompts, scheduling=scheduling, **kwargs))
                assert [len(o.path_ids[0]) for o in outs] == lengths, "the forced think lengths did not hold"
                seconds[name].append(took)
    tokens = sum(o.stats["gen_tokens"] for o in outs)  # the same in every run
    rows = [{"scheduling": name, "prompts": len(prompts), "paths": p.workload_paths, "slots": p.workload_slots,
             "mean_think_len": sum(lengths) / len(lengths), "max_think_len": max(lengths), "seconds": min(times),
             "problems_per_min": 60 * len(prompts) / min(times), "gen_tokens_per_s": tokens / min(times)}
            for name, times in seconds.items()]
    for r in rows:
        r["speedup_vs_static"] = rows[0]["seconds"] / r["seconds"]

    def plot(ax):
        ax.bar([r["scheduling"] for r in rows], [r["problems_per_min"] for r in rows])
        for i, r in enumerate(rows):
            ax.annotate(f"{r['speedup_vs_static']:.2f}x", (i, r["problems_per_min"]), ha="center", va="bottom")
        ax.set(ylabel="problems / minute")

    return b.write("eval_workload", rows, plot)


def memory_bandwidth(b: Bench, mib: int = 512) -> float:
    """Bytes per second of a large device copy (read + write), measured now."""
    x = torch.empty(mib << 20, dtype=torch.uint8, device=b.device)
    y = torch.empty_like(x)
    y.copy_(x)  # warm-up
    _, seconds = b.timed(lambda: [y.copy_(x) for _ in range(5)])
    return 2 * 5 * x.numel() / seconds


def bench_decode_step(b: Bench) -> Path:
    """One decode step of ``step_slots`` slots x ``step_paths`` paths (independent samples, so
    every step is a think step) against reading the weights and the KV in use once from memory."""
    p = b.preset
    config = b.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * b.dtype.itemsize
    weights = sum(t.numel() * t.element_size() for t in b.model.parameters())
    bandwidth = memory_bandwidth(b)
    prompts = [b.prompt(p.prompt_len, seed=i) for i in range(p.step_slots)]
    kwargs = dict(mode="independent", num_paths=p.step_paths, max_new_tokens=p.step_budget, temperature=1.0, seed=0,
                  num_slots=p.step_slots)
    engines = [("eager", b.engine)]
    if b.compile:
        engines.append(("compiled", ParaThinkerEngine(b.model, b.tokenizer, NUM_CONTROL_PATHS, compile=True)))
    # mean KV in use over the steps: every slot's prompt and the P paths so far
    mean_tokens = p.step_slots * (p.prompt_len + p.step_paths * (p.step_budget + 1) / 2)
    roofline_s = (weights + mean_tokens * kv_per_token) / bandwidth
    rows = []
    for name, engine in engines:
        engine.generate(prompts, **kwargs)  # warm-up (and compilation)
        outs, seconds = b.timed(lambda: engine.generate(prompts, **kwargs))
        step_s = (seconds - sum(o.stats["prefill_s"] for o in outs)) / p.step_budget
        rows.append({"step": name, "slots": p.step_slots, "paths": p.step_paths, "steps": p.step_budget,
                     "weights_mb": weights / 2**20, "mean_kv_mb": mean_tokens * kv_per_token / 2**20,
                     "bandwidth_gb_s": bandwidth / 1e9, "step_ms": 1000 * step_s, "roofline_ms": 1000 * roofline_s,
                     "ratio_to_roofline": step_s / roofline_s})

    def plot(ax):
        ax.bar([r["step"] for r in rows], [r["step_ms"] for r in rows], label="decode step")
        ax.axhline(rows[0]["roofline_ms"], color="grey", ls="--", label="weights + KV read once")
        ax.set(ylabel="ms per step")

    return b.write("decode_step", rows, plot)


RUNNERS = {"width": bench_width, "vs_hf": bench_vs_hf, "summary": bench_summary, "length": bench_length,
           "memory": bench_memory, "eval_workload": bench_eval_workload, "decode_step": bench_decode_step}


# -- command line --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (SmolLM2-135M shape) or cuda[:i] (Qwen2-1.5B shape)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--smoke", action="store_true", help="tiny shape and budgets: checks that it runs")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--output", type=Path, default=Path("results"), help="directory for the CSV/PNG files")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="also time the compiled decode step (eval_workload, decode_step)")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in args.only if name not in RUNNERS]
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
    return [RUNNERS[name](bench) for name in args.only]


if __name__ == "__main__":
    main()
