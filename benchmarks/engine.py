"""Engine benchmarks on random-initialised models of real shapes (no download).

    python -m benchmarks.engine --threads 2                      # CPU, SmolLM2-135M shape, float32
    python -m benchmarks.engine --device cuda --dtype bfloat16   # Qwen2-1.5B shape (benchmarks/gpu.sh)
    python -m benchmarks.engine --smoke --only width,vs_hf       # tiny shape, seconds

Each benchmark times the engine and its baseline in the same process and writes
``results/bench_<name>[_<device>].csv`` and ``.png``:

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
  through ``num_slots`` slots: lockstep static batches vs continuous batching on the same kernels
  (and, with ``--compile``, the compiled decode step), on the tiny shape and on the preset's shape;
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

Every timed call first runs once at its own shapes, untimed (:meth:`Bench.warm_up`): the engine
compiles its step and flex's kernel per batch size, and CUDA graphs are recorded per shape and per
KV pool, which would otherwise land in the measured window. ``decode_step``, ``path_length`` and
``vs_hf`` report those first calls' seconds (compilation and CUDA graph capture included) in
their own columns, and every benchmark prints its total.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer, Tokenizer
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from lm_eval_parathinker import protocol
from lm_eval_parathinker.engine import ParaThinkerEngine
from lm_eval_parathinker.engine.kv_cache import cache_argument, head_dim
from lm_eval_parathinker.engine.scheduler import Scheduler, StaticScheduler
from lm_eval_parathinker.thought_embedding import add_control_tokens, attach_thought_embeddings

BENCHMARKS = ("width", "vs_hf", "path_length", "attention", "summary", "length", "memory", "eval_workload",
              "decode_step")
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
    prompt_len: int = 256
    width_paths: tuple[int, ...] = (1, 2, 4, 8, 16)
    width_budget: int = 32
    path_lengths: tuple[int, ...] = (128, 1024, 2048)  # vs_hf, path_length, attention
    window: int = 64  # tokens timed per path at a filled length (a path no longer than it runs whole)
    vs_hf_paths: int = 8
    vs_hf_whole: int = 128  # vs_hf: paths up to this long run whole, prefill included (longer: the window)
    vs_hf_repeats: int = 2
    e2e_summary: int = 8  # ParaThinker end to end: summary tokens after the template
    path_length_paths: tuple[int, ...] = (1, 8)
    attention_slots: int = 1
    attention_window: int = 16
    summary_paths: tuple[int, ...] = (2, 8)
    summary_lens: tuple[int, ...] = (128, 512)
    summary_tokens: int = 8
    length_contexts: tuple[int, ...] = (128, 512, 1024)
    length_steps: int = 8
    memory_paths: tuple[int, ...] = (1, 8, 16)
    memory_budget: int = 32
    oversubscribed: tuple[int, int, int, int] = (8, 4, 48, 4)  # prompts, P, per-path budget, slots
    workload_prompts: int = 32  # eval_workload: prompts, shortest prompt, P, per-path budget, slots, median think length
    workload_prompt_len: int = 64
    workload_paths: int = 8
    workload_budget: int = 128
    workload_slots: int = 4
    workload_median: int = 24
    workload_repeats: int = 2  # runs of each variant, alternating; the fastest counts (noisy machines)
    workload_shapes: tuple[str, ...] = ("tiny", "smollm2-135m")
    step_slots: int = 4  # decode_step: slots x P paths at each length, steps timed
    step_paths: int = 8
    step_lengths: tuple[int, ...] = (128, 1024)
    step_window: int = 16


PRESETS = {
    "smoke": Preset("tiny", prompt_len=8, width_paths=(1, 2), width_budget=4, path_lengths=(8, 24), window=4,
                    vs_hf_paths=2, vs_hf_whole=8, vs_hf_repeats=1, e2e_summary=2, path_length_paths=(1, 2),
                    attention_window=2, summary_paths=(2,),
                    summary_lens=(8,), summary_tokens=2, length_contexts=(16, 32), length_steps=2,
                    memory_paths=(2,), memory_budget=8, oversubscribed=(4, 2, 48, 4), workload_prompts=6,
                    workload_prompt_len=8, workload_paths=2, workload_budget=16, workload_slots=2,
                    workload_median=4, workload_repeats=1, workload_shapes=("tiny",), step_slots=2, step_paths=2,
                    step_lengths=(8,), step_window=2),
    # CPU grid, sized for a 2-core box (make bench under 20 minutes)
    "cpu": Preset("smollm2-135m"),
    # one GPU: the paper's lengths (4K and 16K tokens per path, filled), in one short script
    "gpu": Preset("qwen2-1.5b", width_paths=(1, 8), width_budget=512, path_lengths=(4096,), window=128,
                  path_length_paths=(1, 8), attention_slots=8, attention_window=32, summary_paths=(8,),
                  summary_lens=(4096,), summary_tokens=32, length_contexts=(1024, 4096), length_steps=32,
                  memory_paths=(8,), memory_budget=512, oversubscribed=(16, 8, 256, 8), workload_prompts=32,
                  workload_budget=1024, workload_slots=8, workload_median=192, workload_repeats=1,
                  workload_shapes=("qwen2-1.5b",), step_slots=8, step_paths=8, step_lengths=(4096, 16384),
                  step_window=32),
}


# -- setup ---------------------------------------------------------------------------------


def build_model(shape: str, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    config_cls, kwargs = SHAPES[shape]
    config = config_cls(**kwargs, max_position_embeddings=40960, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).eval()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level tokenizer: the engine needs it only for control ids, EOS and the
    summary template (prompts are token ids)."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([protocol.SUMMARY_TEMPLATE], vocab_size=300, min_frequency=1,
                            special_tokens=["<pad>", "<eos>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe.to_str()), eos_token="<eos>", pad_token="<pad>")


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


class FilledScheduler(Scheduler):
    """A scheduler whose requests start with every path ``filled`` tokens long: their pages are
    allocated (keys and values zeros) before the first step, so the steps that follow cost what
    steps at that length cost."""

    filled = 0

    def _prefill(self, slot: int, request: int) -> None:
        super()._prefill(slot, request)
        n, ps = self.filled, self.pool.page_size
        if not n:
            return
        for k in range(self.plan.num_paths):
            if not self.pool.grow(slot, k + 1, n):
                raise RuntimeError("the pool cannot hold the filled paths")
            pages = self.pool.pages(slot, k + 1)
            self.cache.fill[pages] = ps
            self.cache.fill[pages[-1]] = n - (len(pages) - 1) * ps
        self.pool.flush()
        self.state.start(slot, t=n, lengths=n)
        self.busy[slot].t = n


@contextlib.contextmanager
def paths_filled(engine: ParaThinkerEngine, tokens: int):
    """While active, the engine's calls start every path ``tokens`` long (see :class:`FilledScheduler`)."""
    scheduler = engine.scheduler_class
    engine.scheduler_class = type("Filled", (FilledScheduler,), {"filled": tokens})
    try:
        yield
    finally:
        engine.scheduler_class = scheduler


def window(length: int, size: int) -> tuple[int, int]:
    """(first token, tokens) of the window timed for paths of ``length`` tokens: the whole path when
    it is no longer than ``size``, else ``size`` tokens around its middle."""
    if length <= size:
        return 0, length
    return length // 2 - size // 2, size


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
    hf_seconds: dict = field(default_factory=dict)  # (P, length) -> generate's time for the window
    warmup_s: float = 0.0  # seconds of first calls at the timed shapes so far (warm_up)

    @classmethod
    def create(cls, preset: Preset, device: str, dtype: torch.dtype, output: Path, compile: bool = False,
               shape: str | None = None) -> Bench:
        model, tok = build_model(shape or preset.shape, device, dtype), build_tokenizer()
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

    def warm_up(self, fn: Callable[[], object]) -> float:
        """Run ``fn`` once, untimed for the benchmark, at the shapes of the timed call that follows
        (compilations and CUDA graph captures happen here); returns its seconds."""
        seconds = self.timed(fn)[1]
        self.warmup_s += seconds
        return seconds

    def sync(self) -> None:
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)

    def think(self, prompts: list[list[int]], paths: int, length: int, size: int, engine: ParaThinkerEngine | None = None,
              **kwargs) -> tuple[list, float]:
        """The think stage's window for paths of ``length`` tokens: (outputs, seconds of the window's
        steps, the slowest request's)."""
        start, tokens = window(length, size)
        engine = engine or self.engine
        with paths_filled(engine, start):
            outs = engine.generate(prompts, num_paths=paths, max_new_tokens=start + tokens,
                                                    temperature=1.0, seed=0, summary_max_tokens=1, **kwargs)
        return outs, max(o.stats["think_s"] for o in outs)

    @torch.inference_mode()
    def hf_generate(self, prompt: list[int], num_sequences: int, new_tokens: int, filled: int = 0) -> torch.Tensor:
        """transformers' own sampling loop, exactly ``new_tokens`` per sequence; ``filled``: after a
        cache of zeros holding ``filled`` tokens of each sequence beyond the prompt."""
        ids = torch.tensor([prompt + self.prompt(filled, seed=1)], device=self.device).expand(num_sequences, -1)
        cache = None
        if filled:
            config = self.model.config
            cache = DynamicCache(config=config)
            for layer in range(config.num_hidden_layers):
                zeros = torch.zeros(num_sequences, config.num_key_value_heads, ids.shape[1] - 1, head_dim(config),
                                    device=self.device, dtype=self.dtype)
                cache.update(zeros, zeros.clone(), layer)
        # filled: one cache row per sequence; else one prompt, num_return_sequences copies (one prefill)
        inputs = ids if filled else ids[:1]
        out = self.model.generate(
            input_ids=inputs, attention_mask=torch.ones_like(inputs), **{cache_argument(self.model): cache}, do_sample=True,
            temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=1 if filled else num_sequences,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        assert out.shape == (num_sequences, ids.shape[1] + new_tokens), out.shape
        return out

    def write(self, name: str, rows: list[dict], plot: Callable[[object], None]) -> Path:
        """``bench_<name>.csv`` and ``.png``; prints the rows as a table."""
        title = f"{name} ({self.preset.shape}, {self.device}, {self.dtype_name})"
        return write_results(self.output / f"bench_{name}{self.suffix}", name, rows, plot, title)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def kv_bytes_per_token(self) -> int:
        config = self.model.config
        return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config) * self.dtype.itemsize

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.parameters())


def alternate(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Each variant's best time over ``repeats`` rounds, the variants alternating within a round."""
    best = {name: math.inf for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            best[name] = min(best[name], run())
    return best


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


def memory_bandwidth(b: Bench, mib: int = 512) -> float:
    """Bytes per second of a large device copy (read + write), measured now."""
    x = torch.empty(mib << 20, dtype=torch.uint8, device=b.device)
    y = torch.empty_like(x)
    y.copy_(x)  # warm-up
    _, seconds = b.timed(lambda: [y.copy_(x) for _ in range(5)])
    return 2 * 5 * x.numel() / seconds


# -- benchmarks ----------------------------------------------------------------------------


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

    def plot(ax):
        ax.plot([r["paths"] for r in rows], [r["ratio_to_p1"] for r in rows], "o-", label="engine")
        ax.plot([r["paths"] for r in rows], [r["paths"] for r in rows], "--", color="grey", label="P x (sequential)")
        ax.set(xscale="log", xlabel="paths P", ylabel="think latency / latency at P = 1")

    return b.write("width", rows, plot)


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

    def plot(ax):
        labels = [f"{r['mode']}\nP={r['paths']} L={r['tokens_per_path']}" for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["engine_tok_s"] for r in rows], 0.4, label="engine")
        ax.bar([i + 0.2 for i in x], [r["hf_tok_s"] for r in rows], 0.4, label="model.generate")
        for i, r in enumerate(rows):
            ax.annotate(f"{r['speedup']:.2f}x", (i, max(r["engine_tok_s"], r["hf_tok_s"])), ha="center", va="bottom",
                        fontsize=7)
        ax.set_xticks(list(x), labels, fontsize=6)
        ax.set(ylabel="generated tokens / s (the window)")

    return b.write("vs_hf", rows, plot)


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

    def plot(ax):
        for paths in p.path_length_paths:
            ax.plot([r["tokens_per_path"] for r in rows], [1000 * r[f"s_per_token_p{paths}"] for r in rows], "o-",
                    label=f"P = {paths}")
        ax.set(xscale="log", xlabel="tokens per path", ylabel="ms per generated token (think stage)")

    return b.write("path_length", rows, plot)


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

    def plot(ax):
        for kernel in kernels:
            ax.plot([r["tokens_per_path"] for r in rows], [r[f"{kernel}_ms_per_step"] for r in rows], "o-",
                    label=kernel)
        ax.set(xscale="log", xlabel="tokens per path", ylabel="ms per decode step")

    return b.write("attention", rows, plot)


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

    def plot(ax):
        for paths in p.summary_paths:
            sel = [r for r in rows if r["paths"] == paths]
            ax.plot([r["tokens_per_path"] for r in sel], [r["speedup"] for r in sel], "o-", label=f"P={paths}")
        ax.set(xscale="log", xlabel="tokens per path", ylabel="reprefill time / reuse time")

    return b.write("summary", rows, plot)


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

    def plot(ax):
        ax.plot([r["context"] for r in rows], [r["engine_ms_per_step"] for r in rows], "o-", label="engine")
        ax.plot([r["context"] for r in rows], [r["hf_ms_per_step"] for r in rows], "s-", label="DynamicCache loop")
        ax.set(xscale="log", xlabel="context (tokens)", ylabel="ms per decode step")

    return b.write("length", rows, plot)


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

    def plot(ax):
        sel = [r for r in rows if r["run"].startswith("P=")]
        x = [r["paths"] for r in sel]
        ax.plot(x, [r["kv_theory_mb"] for r in sel], "--", color="grey", label="KV of the tokens (prompt once)")
        ax.plot(x, [r["kv_peak_mb"] for r in sel], "^-", label="KV pages held at peak")
        ax.plot(x, [r["hf_kv_mb"] for r in sel], "s:", label="generate's KV (P prompt copies)")
        if cuda:
            ax.plot(x, [r["engine_extra_mb"] for r in sel], "o-", label="engine peak - before")
            ax.plot(x, [r["hf_extra_mb"] for r in sel], "s-", label="generate peak - before")
        ax.set(xlabel="paths P", ylabel="MiB")

    return b.write("memory", rows, plot)


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

    def plot(ax):
        labels = [f"{r['shape']}\n{r['scheduling']}" for r in rows]
        ax.bar(range(len(rows)), [r["speedup_vs_static"] for r in rows])
        for i, r in enumerate(rows):
            ax.annotate(f"{r['speedup_vs_static']:.2f}x\n{r['problems_per_min']:.0f}/min", (i, r["speedup_vs_static"]),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set(ylabel="problems per minute / static batches'")

    return b.write("eval_workload", rows, plot)


def _workload_rows(b: Bench, shape: str) -> list[dict]:
    p = b.preset
    lengths = workload_lengths(p)
    prompts = [b.prompt(p.workload_prompt_len + p.workload_budget - n, seed=i) for i, n in enumerate(lengths)]
    closer = protocol.ControlTokenIds.from_tokenizer(b.tokenizer, NUM_CONTROL_PATHS).think_close[0]
    kwargs = dict(num_paths=p.workload_paths, max_new_tokens=p.workload_budget, summary_max_tokens=p.summary_tokens,
                  temperature=1.0, seed=0, num_slots=p.workload_slots)
    variants = [("static", ParaThinkerEngine(b.model, b.tokenizer, NUM_CONTROL_PATHS, scheduler_class=StaticScheduler)),
                ("continuous", b.engine)]
    if b.compile:
        variants.append(("continuous+compile", ParaThinkerEngine(b.model, b.tokenizer, NUM_CONTROL_PATHS, compile=True)))
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


def bench_decode_step(b: Bench) -> Path:
    """One decode step of ``step_slots`` slots x ``step_paths`` paths (independent samples, paths
    filled to each length) against reading the weights and the KV pages the slots hold once."""
    p = b.preset
    bandwidth = memory_bandwidth(b)
    prompts = [b.prompt(p.prompt_len, seed=i) for i in range(p.step_slots)]
    engines = [("eager", b.engine)]
    if b.compile:
        engines.append(("compiled", ParaThinkerEngine(b.model, b.tokenizer, NUM_CONTROL_PATHS, compile=True)))
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

    def plot(ax):
        for name, _ in engines:
            sel = [r for r in rows if r["step"] == name]
            ax.plot([r["tokens_per_path"] for r in sel], [r["step_ms"] for r in sel], "o-", label=f"{name} step")
        sel = [r for r in rows if r["step"] == "eager"]
        ax.plot([r["tokens_per_path"] for r in sel], [r["roofline_ms"] for r in sel], "--", color="grey",
                label="weights + KV read once")
        ax.set(xlabel="tokens per path", ylabel="ms per step")

    return b.write("decode_step", rows, plot)


RUNNERS = {"width": bench_width, "vs_hf": bench_vs_hf, "path_length": bench_path_length, "attention": bench_attention,
           "summary": bench_summary, "length": bench_length, "memory": bench_memory,
           "eval_workload": bench_eval_workload, "decode_step": bench_decode_step}


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
    paths = []
    for name in args.only:
        started, warmed = time.perf_counter(), bench.warmup_s
        paths.append(RUNNERS[name](bench))
        print(f"# {name}: {time.perf_counter() - started:.0f} s, of which {bench.warmup_s - warmed:.0f} s first calls at "
              "the timed shapes (compilation, CUDA graph capture)")
    return paths


if __name__ == "__main__":
    main()
