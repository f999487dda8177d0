"""The benchmarks' harness: model shapes and the grids of every benchmark (``Preset``, ``Workload``),
random models with forced token counts (the hooks live in :mod:`benchmarks.workload_worker`), paths
filled before the timed window, timing (warm-ups, alternation, best of runs) and the outputs (CSV
with its Markdown table, PNG, terminal table).
The benchmarks themselves: :mod:`benchmarks.decoding`, :mod:`benchmarks.batching`; the command
line: :mod:`benchmarks.engine`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from tokenizers import ByteLevelBPETokenizer, Tokenizer
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from benchmarks.workload_worker import ban_tokens
from lm_eval_parathinker import protocol
from lm_eval_parathinker.engine import ParaThinkerEngine
from lm_eval_parathinker.engine.kv_cache import cache_argument, head_dim
from lm_eval_parathinker.engine.scheduler import Scheduler
from lm_eval_parathinker.plotting import save_png
from lm_eval_parathinker.tables import markdown_table, write_table
from lm_eval_parathinker.thought_embedding import add_control_tokens, attach_thought_embeddings

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
class Workload:
    """``eval_workload`` on one model shape: ``prompts`` ParaThinker requests of ``paths`` paths,
    ``budget`` tokens per path, think lengths log-normal around ``median`` (a long tail up to the
    budget), through ``slots`` slots; the shortest prompt ``prompt_len`` tokens; ``summary`` tokens
    after the template; each variant ``repeats`` times, alternating, a process each (the fastest counts)."""

    shape: str
    prompts: int
    paths: int
    budget: int
    slots: int
    median: int
    repeats: int
    prompt_len: int = 64
    summary: int = 8


#: the host-bound workload (the tiny shape, issue 31's) and a smaller one on the SmolLM2 shape (2 cores)
CPU_WORKLOADS = (Workload("tiny", prompts=96, paths=8, budget=256, slots=4, median=48, repeats=3),
                 Workload("smollm2-135m", prompts=16, paths=8, budget=128, slots=4, median=24, repeats=2))


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
    workloads: tuple[Workload, ...] = CPU_WORKLOADS
    step_slots: int = 4  # decode_step: slots x P paths at each length, steps timed
    step_paths: int = 8
    step_lengths: tuple[int, ...] = (128, 1024)
    step_window: int = 16


PRESETS = {
    "smoke": Preset("tiny", prompt_len=8, width_paths=(1, 2), width_budget=4, path_lengths=(8, 24), window=4,
                    vs_hf_paths=2, vs_hf_whole=8, vs_hf_repeats=1, e2e_summary=2, path_length_paths=(1, 2),
                    attention_window=2, summary_paths=(2,),
                    summary_lens=(8,), summary_tokens=2, length_contexts=(16, 32), length_steps=2,
                    memory_paths=(2,), memory_budget=8, oversubscribed=(4, 2, 48, 4),
                    workloads=(Workload("tiny", prompts=6, paths=2, budget=16, slots=2, median=4, repeats=1,
                                        prompt_len=8, summary=2),),
                    step_slots=2, step_paths=2, step_lengths=(8,), step_window=2),
    # CPU grid, sized for a 2-core box (make bench under 20 minutes)
    "cpu": Preset("smollm2-135m"),
    # one GPU: the paper's lengths (4K and 16K tokens per path, filled), in one short script
    "gpu": Preset("qwen2-1.5b", width_paths=(1, 8), width_budget=512, path_lengths=(4096,), window=128,
                  path_length_paths=(1, 8), attention_slots=8, attention_window=32, summary_paths=(8,),
                  summary_lens=(4096,), summary_tokens=32, length_contexts=(1024, 4096), length_steps=32,
                  memory_paths=(8,), memory_budget=512, oversubscribed=(16, 8, 256, 8),
                  # one process a variant (gpu.sh's minutes go mostly to starting them and compiling;
                  # the compile time with a warm cache is measured on the CPU)
                  workloads=(Workload("qwen2-1.5b", prompts=16, paths=8, budget=512, slots=8, median=96, repeats=1,
                                      summary=32),),
                  step_slots=8, step_paths=8, step_lengths=(4096, 16384), step_window=32),
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


def banned_tokens(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """EOS and every control token: what a benchmark's model never generates (paths run to their budget)."""
    ids = protocol.ControlTokenIds.from_tokenizer(tokenizer)
    return [tokenizer.eos_token_id, ids.summary_open, ids.summary_close, *ids.think_open, *ids.think_close]


class FilledScheduler(Scheduler):
    """A scheduler whose requests start with every path ``filled`` tokens long: their pages are
    allocated (keys and values zeros) before the first step, so the steps that follow cost what
    steps at that length cost."""

    filled = 0

    def prefill(self, slot: int, request: int) -> None:
        super().prefill(slot, request)
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
        ban_tokens(model, banned_tokens(tok))
        engine = ParaThinkerEngine(model, tok, compile=False)  # benchmarks say what they run
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

    def write(self, name: str, rows: list[dict], plot: Plot) -> Path:
        """``bench_<name>.csv`` (with ``.md``) and ``.png``; prints the rows as a table."""
        return write_results(self.output / f"bench_{name}{self.suffix}", name, rows, plot, self.title(name))

    def title(self, name: str) -> str:
        return plot_title(name, self.preset.shape, self.device, self.dtype_name)

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


def plot_title(name: str, shape: str, device: str, dtype: str) -> str:
    """A benchmark picture's title: the benchmark, the model shape, the device and dtype."""
    return f"{name} ({shape}, {device}, {dtype})"


def alternate(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Each variant's best time over ``repeats`` rounds, the variants alternating within a round."""
    best = {name: math.inf for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            best[name] = min(best[name], run())
    return best


#: a benchmark's picture: draws its rows (as written, or read back from its CSV) on one axes
Plot = Callable[[object, list[dict]], None]


class Benchmark(NamedTuple):
    """A benchmark: ``run`` times it and writes its outputs (returns the CSV), ``plot`` draws its rows."""

    run: Callable[[Bench], Path]
    plot: Plot


def write_results(stem: Path, name: str, rows: list[dict], plot: Plot, title: str) -> Path:
    """``stem.csv`` (the rows; ``stem.md``, their Markdown table, beside it) and ``stem.png``
    (``plot``); prints the rows as a table."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_table(rows, stem.with_suffix(".csv"), list(rows[0]))
    draw(plot, rows, stem.with_suffix(".png"), title)
    print_table(name, rows)
    return stem.with_suffix(".csv")


def draw(plot: Plot, rows: list[dict], path: Path, title: str) -> None:
    """``plot`` of ``rows`` as the PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    plot(ax, rows)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def log_x(ax, values: Sequence[float]) -> None:
    """A log x axis ticked at the grid's own values, written out (no minor labels to crowd it)."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log")
    ticks = sorted(set(values))
    ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
    ax.xaxis.set_minor_locator(NullLocator())


def print_table(name: str, rows: list[dict]) -> None:
    """The rows as their Markdown table, on the terminal."""
    print(f"\n== {name}\n{markdown_table(rows, list(rows[0]))}", flush=True)
