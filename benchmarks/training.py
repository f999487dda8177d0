"""Training benchmarks: the attention mask, one long training step, and training throughput.

    python -m benchmarks.training --threads 2          # CPU: training_attention, training_throughput
    python -m benchmarks.training --device cuda --dtype bfloat16 --only training_step,training_throughput,training_attention
    python -m benchmarks.training --smoke              # tiny shapes, CPU, seconds (what the tests run)

Each benchmark writes ``results/bench_<name>[_<device>].csv`` (with its Markdown table, ``.md``) and ``.png``
and prints its table:

* ``training_attention``: the two-phase mask of one row of ``L`` tokens (28,672: the official
  cutoff) holding a prompt, P paths and a summary: memory of the dense mask (boolean, as the
  trainer builds it for SDPA, and the float32 additive mask the accelerate loop used) against
  the FlexAttention ``BlockMask``, the fraction of 128 x 128 blocks that attention computes, and
  the time to build each mask (the BlockMask compiled, timed after its first call, which compiles);
* ``training_step``: one forward + backward of the Qwen2-1.5B shape (bfloat16, activation
  checkpointing) on one row of 16K and 28K tokens, SDPA with the dense mask vs FlexAttention with
  the BlockMask: time and peak memory; and a gradient check of FlexAttention against SDPA on one
  batch (float32, two layers of the same shape: compiled flex has had wrong-gradient bugs for
  some masks). CUDA only, except ``--smoke`` (CPU: flex has no backward there, so its side is a
  forward and the check compares logits);
* ``training_throughput``: ``training.sft``'s trainer on the first records of the converted maj8
  data (``training.make_data convert``), without and with ``--packing``: real (non-pad) tokens
  per second, best of ``repeats`` alternating runs. A small random model with the SmolLM2
  tokenizer on the CPU (dense mask: a longer row costs quadratically more attention, so there is
  no target), the Qwen2-1.5B shape with FlexAttention on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from benchmarks.harness import SHAPES, build_tokenizer, write_results
from lm_eval_parathinker import protocol
from lm_eval_parathinker.thought_embedding import add_control_tokens, attach_thought_embeddings, thought_embedding_tables
from lm_eval_parathinker.upstream import torch as upstream_torch
from lm_eval_parathinker.upstream.transformers import attn_implementation
from training.batching import Collator
from training.sequence import pack
from training.trainer import model_inputs

BENCHMARKS = ("training_attention", "training_throughput", "training_step")
SHAPES = {**SHAPES, "small": (LlamaConfig, dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                                                tie_word_embeddings=True))}
MAJ8 = "train/qwen25math_maj8_samples.jsonl"


@dataclass(frozen=True)
class Preset:
    attention_length: int  # training_attention: row length, paths, prompt and summary lengths
    attention_paths: tuple[int, ...]
    attention_prompt: int
    attention_summary: int
    step_shape: str  # training_step: model shape, row lengths, paths per row, grad check length
    step_lengths: tuple[int, ...]
    step_paths: int
    check_length: int
    throughput_shape: str  # training_throughput: model shape, records, per-path budget, paths, packed row
    throughput_records: int
    throughput_path_tokens: int
    throughput_paths: int
    throughput_pack_length: int
    repeats: int


PRESETS = {
    "smoke": Preset(1024, (2, 4), 64, 64, "tiny", (256, 512), 4, 256, "tiny", 4, 64, 2, 2048, 1),
    "cpu": Preset(28672, (2, 4, 6, 8), 256, 1024, "qwen2-1.5b", (16384, 28672), 6, 8192, "small", 8, 256, 4, 4096, 3),
    "gpu": Preset(28672, (2, 4, 6, 8), 256, 1024, "qwen2-1.5b", (16384, 28672), 6, 8192, "qwen2-1.5b", 48, 2048, 6,
                  28672, 2),
}


@dataclass
class Bench:
    preset: Preset
    device: torch.device
    dtype: torch.dtype
    output: Path
    data_dir: Path

    @property
    def suffix(self) -> str:
        return "" if self.device.type == "cpu" else f"_{self.device.type}"

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn) -> tuple[object, float]:
        self.sync()
        t0 = time.perf_counter()
        result = fn()
        self.sync()
        return result, time.perf_counter() - t0

    def write(self, name: str, rows: list[dict], plot, title: str) -> Path:
        return write_results(self.output / f"bench_{name}{self.suffix}", name, rows, plot, f"{title} ({self.device.type})")


def row_layout(length: int, paths: int, prompt: int, summary: int) -> protocol.SequenceLayout:
    """One row of exactly ``length`` tokens: prompt, ``paths`` equal paths, and the summary (with the rest)."""
    path_len = (length - prompt - summary) // paths
    return protocol.sequence_layout(prompt, [path_len] * paths, length - prompt - paths * path_len)


def _ids(layout: protocol.SequenceLayout, device) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = layout.block_ids[None].to(device)
    return blocks, torch.zeros_like(blocks)  # one document


def _block_mask_bytes(block_mask) -> int:
    return sum(t.numel() * t.element_size() for t in upstream_torch.block_mask_tensors(block_mask))


def _best(b: Bench, fn, repeats: int) -> float:
    return min(b.timed(fn)[1] for _ in range(repeats))


# -- training_attention ----------------------------------------------------------------------


def bench_training_attention(b: Bench) -> Path:
    p, mib = b.preset, 2**20
    rows = []
    for paths in p.attention_paths:
        layout = row_layout(p.attention_length, paths, p.attention_prompt, p.attention_summary)
        blocks, docs = _ids(layout, b.device)
        _, first_call_s = b.timed(lambda: protocol.two_phase_block_mask(blocks, docs))  # compiles at a new length
        block_mask = protocol.two_phase_block_mask(blocks, docs)
        dense = protocol.two_phase_dense_mask(blocks, docs)
        n = p.attention_length // protocol.FLEX_TILE
        # the BlockMask's block map must be the dense mask's: a block is computed iff any pair in it attends
        tiles = dense.view(1, 1, n, protocol.FLEX_TILE, n, protocol.FLEX_TILE).any(dim=(3, 5))
        assert torch.equal(block_mask.to_dense().bool(), tiles), "BlockMask and dense mask disagree"
        computed = int(tiles.sum())
        rows.append({
            "length": p.attention_length, "paths": paths, "path_len": int((layout.block_ids == 1).sum()),
            "summary_len": int((layout.block_ids == protocol.SUMMARY_BLOCK).sum()),
            "dense_bool_mib": dense.numel() * dense.element_size() / mib,
            "dense_fp32_mib": dense.numel() * 4 / mib,  # the additive mask of the accelerate loop, same elements
            "block_mask_mib": _block_mask_bytes(block_mask) / mib,
            "blocks_computed": computed / n**2,
            "of_causal_blocks": computed / (n * (n + 1) // 2),
            "dense_build_s": _best(b, lambda: protocol.two_phase_dense_mask(blocks, docs), p.repeats),
            "block_build_s": _best(b, lambda: protocol.two_phase_block_mask(blocks, docs), p.repeats),
            "block_first_call_s": first_call_s,  # with the compilation when the length is new
        })
        del dense, tiles

    return b.write("training_attention", rows, plot_training_attention, f"training mask, L = {p.attention_length}")


def plot_training_attention(ax, rows: list[dict]) -> None:
    x = [r["paths"] for r in rows]
    ax.plot(x, [r["blocks_computed"] for r in rows], marker="o", label="blocks computed (of all)")
    ax.plot(x, [r["of_causal_blocks"] for r in rows], marker="s", label="blocks computed (of causal)")
    ax.set(xlabel="paths P", ylabel="fraction of 128x128 blocks", ylim=(0, 1))
    mem = rows[0]
    ax.text(0.02, 0.04, f"mask memory: dense bool {mem['dense_bool_mib']:.0f} MiB, fp32 "
            f"{mem['dense_fp32_mib']:.0f} MiB, BlockMask {mem['block_mask_mib']:.2f} MiB", transform=ax.transAxes, fontsize=7)


# -- training_step ---------------------------------------------------------------------------


def _step_model(shape: str, device, dtype, layers: int | None = None):
    config_cls, kwargs = SHAPES[shape]
    kwargs = {**kwargs, **({"num_hidden_layers": layers} if layers else {})}
    config = config_cls(**kwargs, max_position_embeddings=32768, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).to(device)
    attach_thought_embeddings(model)
    with torch.no_grad():
        for table in thought_embedding_tables(model):
            table.weight.normal_(std=0.02)
    return model.train()


def _step_batch(length: int, paths: int, vocab: int, device) -> dict[str, torch.Tensor]:
    """A collated batch of one random-token row: prompt 256, ``paths`` paths, summary 512 (and the rest)."""
    layout = row_layout(length, paths, 256 if length > 2048 else 32, 512 if length > 2048 else 32)
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(2, vocab, (length,), generator=g)
    blocks = layout.block_ids
    ex = pack(ids[blocks == 0].tolist(), [ids[blocks == k].tolist() for k in range(1, paths + 1)],
              ids[blocks == protocol.SUMMARY_BLOCK].tolist(), trained=[True] * int((blocks != 0).sum()))
    batch = Collator(0, pad_to_multiple_of=protocol.FLEX_TILE)([(ex,)])
    return {k: v.to(device) for k, v in batch.items()}


def _loss_step(model, batch, attention: str, backward: bool) -> torch.Tensor:
    model.set_attn_implementation(attention)
    with torch.set_grad_enabled(backward):
        out = model(**model_inputs(batch, attention))
    if backward:
        out.loss.backward()
    return out.logits


def bench_training_step(b: Bench) -> Path:
    p = b.preset
    flex_backward = b.device.type != "cpu"  # FlexAttention has no backward pass on the CPU
    model = _step_model(p.step_shape, b.device, b.dtype)
    # transformers 5.17 spells it gradient_checkpointing_enable (renamed later, kept as deprecated)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    rows = []
    for length in p.step_lengths:
        batch = _step_batch(length, p.step_paths, model.config.vocab_size, b.device)
        for attention in ("sdpa", "flex_attention"):
            backward = attention == "sdpa" or flex_backward

            def step():
                model.zero_grad(set_to_none=True)
                _loss_step(model, batch, attention, backward)

            step()  # warm-up: compilation, kernel selection
            model.zero_grad(set_to_none=True)
            if b.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(b.device)
                base = torch.cuda.memory_allocated(b.device)
            _, seconds = b.timed(step)
            peak = (torch.cuda.max_memory_allocated(b.device) - base) / 2**30 if b.device.type == "cuda" else float("nan")
            rows.append({"check": "step", "length": length, "paths": p.step_paths, "attention": attention,
                         "pass": "forward+backward" if backward else "forward (CPU)", "seconds": seconds,
                         "peak_gib": peak, "max_rel_diff": float("nan")})
    del model
    rows.append(_gradient_check(b, flex_backward))

    return b.write("training_step", rows, plot_training_step, f"training step, {p.step_shape}, {str(b.dtype)[6:]}")


def plot_training_step(ax, rows: list[dict]) -> None:
    steps = [r for r in rows if r["check"] == "step"]
    for attention in ("sdpa", "flex_attention"):
        mine = [r for r in steps if r["attention"] == attention]
        ax.plot([r["length"] for r in mine], [r["seconds"] for r in mine], marker="o", label=f"{attention} ({mine[0]['pass']})")
    ax.set(xlabel="row length (tokens)", ylabel="seconds per step")
    check = rows[-1]
    ax.text(0.02, 0.9, f"{check['pass']} check at L={check['length']}: max rel diff {check['max_rel_diff']:.1e}",
            transform=ax.transAxes, fontsize=7)


def _gradient_check(b: Bench, backward: bool) -> dict:
    """FlexAttention against SDPA on one batch in float32 (two layers of the step's shape): every
    parameter's gradient, or on the CPU the logits; max |flex - sdpa| / max |sdpa|."""
    p = b.preset
    model = _step_model(p.step_shape, b.device, torch.float32, layers=2)
    batch = _step_batch(p.check_length, p.step_paths, model.config.vocab_size, b.device)
    results = {}
    for attention in ("sdpa", "flex_attention"):
        model.zero_grad(set_to_none=True)
        logits = _loss_step(model, batch, attention, backward)
        results[attention] = [q.grad.clone() for q in model.parameters()] if backward else [logits.detach()]
    diff = max(((f - s).abs().max() / s.abs().max().clamp_min(1e-30)).item()
               for f, s in zip(results["flex_attention"], results["sdpa"]))
    return {"check": "flex_vs_sdpa", "length": p.check_length, "paths": p.step_paths, "attention": "both",
            "pass": "gradients" if backward else "logits (CPU)", "seconds": float("nan"), "peak_gib": float("nan"),
            "max_rel_diff": diff}


# -- training_throughput ---------------------------------------------------------------------


def _throughput_inputs(b: Bench, folder: Path) -> tuple[Path, Path]:
    """The first records of the converted maj8 data, and a random model of the preset's shape with
    a real tokenizer (SmolLM2's; the tiny test tokenizer for --smoke), saved to ``folder``."""
    from training.data import convert, write_jsonl_atomic

    records, _ = convert(b.data_dir / MAJ8)
    data = folder / "maj8.jsonl"
    write_jsonl_atomic(records[: b.preset.throughput_records], data)
    if b.preset.throughput_shape == "tiny":
        tokenizer = build_tokenizer()
    else:
        from transformers import AutoTokenizer

        from lm_eval_parathinker.embedded import ensure_embedded_checkpoint

        tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_checkpoint())
    config_cls, kwargs = SHAPES[b.preset.throughput_shape]
    config = config_cls(**kwargs, max_position_embeddings=32768, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    add_control_tokens(model, tokenizer)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return data, folder / "model"


def _throughput_run(b: Bench, data: Path, model: Path, out: Path, packing: bool) -> dict:
    from training.arguments import parse_args as sft_args
    from training.sft import build_trainer

    p = b.preset
    argv = ["--model", str(model), "--data", str(data), "--output", str(out), "--full", "--epochs", "1",
            "--max-paths", str(p.throughput_paths), "--max-path-tokens", str(p.throughput_path_tokens),
            "--save_strategy", "no", "--disable_tqdm", "true", "--dataloader_pin_memory", "false"]
    argv += ["--use_cpu", "true"] if b.device.type == "cpu" else []
    argv += ["--bf16"] if b.dtype == torch.bfloat16 else []
    argv += ["--packing", "--max-length", str(p.throughput_pack_length)] if packing else []
    args, training_args = sft_args(argv)
    trainer, _ = build_trainer(args, training_args)
    dataset = trainer.train_dataset
    _, seconds = b.timed(trainer.train)
    return {"packing": packing, "attention": attn_implementation(trainer.model.config), "records": len(dataset.units),
            "rows": len(dataset), "optimizer_steps": trainer.state.global_step, "tokens": dataset.num_tokens,
            "seconds": seconds, "tokens_per_s": dataset.num_tokens / seconds}


def bench_training_throughput(b: Bench) -> Path:
    runs: dict[bool, list[dict]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        data, model = _throughput_inputs(b, Path(tmp))
        for i in range(b.preset.repeats):  # alternate the two sides; the fastest run of each counts
            for packing in (False, True):
                runs[packing].append(_throughput_run(b, data, model, Path(tmp) / f"run-{i}-{packing}", packing))
    rows = [max(runs[packing], key=lambda r: r["tokens_per_s"]) for packing in (False, True)]
    for r in rows:
        r["runs"] = b.preset.repeats
        r["ratio_to_unpacked"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]

    return b.write("training_throughput", rows, plot_training_throughput, f"SFT on maj8, {b.preset.throughput_shape}")


def plot_training_throughput(ax, rows: list[dict]) -> None:
    ax.bar(["one record per row", "packed"], [r["tokens_per_s"] for r in rows])
    ax.set(ylabel="real (non-pad) tokens per second (best of runs)")


RUNNERS = {"training_attention": bench_training_attention, "training_throughput": bench_training_throughput,
           "training_step": bench_training_step}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="training_step and throughput dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and lengths on the CPU: checks that it runs")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(BENCHMARKS)} (default: "
                                                     "training_step only on CUDA or with --smoke)")
    parser.add_argument("--output", type=Path, default=Path("results"), help="directory for the CSV/PNG files")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("PARATHINKER_DATA_DIR", "../shared/data")),
                        help="the shared data folder (train/qwen25math_maj8_samples.jsonl)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    default = BENCHMARKS if cuda or args.smoke else ("training_attention", "training_throughput")
    args.only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else list(default)
    unknown = [n for n in args.only if n not in RUNNERS]
    if unknown or not args.only:
        parser.error(f"--only: unknown benchmark(s) {unknown or args.only}; choose from {', '.join(BENCHMARKS)}")
    if cuda and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    if "training_step" in args.only and not (cuda or args.smoke):
        parser.error("training_step needs --device cuda (or --smoke): FlexAttention has no backward pass on the CPU")
    if args.smoke and cuda:
        parser.error("--smoke runs on the CPU")
    if "training_throughput" in args.only and not (args.data_dir / MAJ8).is_file():
        parser.error(f"--data-dir {args.data_dir}: no {MAJ8}")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    return args


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset = PRESETS["smoke" if args.smoke else ("gpu" if device.type == "cuda" else "cpu")]
    bench = Bench(preset, device, args.dtype, args.output, args.data_dir)
    print(f"# training benchmarks on {device} ({args.dtype}, {torch.get_num_threads()} CPU threads): {json.dumps(args.only)}")
    return [RUNNERS[name](bench) for name in args.only]


if __name__ == "__main__":
    main()
