"""ParaThinker SFT (LoRA or full) with plain PyTorch + accelerate.

    python -m training.sft --model BASE --data train.jsonl --output OUT [--full | --lora ...]
    accelerate launch --config_file training/configs/ddp.yaml -m training.sft ...

Before any peft wrapping the model gets the control tokens (``add_control_tokens``) and the
thought-embedding tables (from the checkpoint when it has them, else N(0, 0.02) as the official
training fork), so the hooks survive ``merge_and_unload``. Both modes train the tables and the
control tokens' embedding/output rows; LoRA mode freezes the rest of the base (peft
``trainable_token_indices`` for the rows). The result in OUT loads with
``lm_eval --model parathinker --model_args pretrained=OUT`` (merged, official format) or, with
``--save-adapter``, ``pretrained=BASE,peft=OUT`` (adapter + ``thought_embeddings.safetensors``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lm_eval_parathinker.protocol import COMPAT_CHOICES, ControlTokenIds, resolve_compat
from lm_eval_parathinker.thought_embedding import (
    add_control_tokens,
    attach_thought_embeddings,
    load_thought_embeddings,
    quiet_unexpected_tables,
    read_thought_embeddings,
    thought_embedding_tables,
)

from .data import DataError, load_records, run_cli
from .sequence import IGNORE_INDEX, Collator, MultiPathDataset, SequenceBuilder

logger = logging.getLogger("training.sft")

DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
TABLES_FILE = "thought_embeddings.safetensors"
STATE_FILE = "trainer_state.json"
LOSS_CSV = "loss.csv"
TABLE_INIT_STD = 0.02  # the official training fork's init


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.sft", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="base model: hub id or local dir")
    p.add_argument("--data", required=True, help="multi-path JSONL (see the README, section Training)")
    p.add_argument("--output", required=True, help="output dir (final model, checkpoint-*/, loss.csv)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="full", action="store_false", help="LoRA fine-tuning (default)")
    mode.add_argument("--full", dest="full", action="store_true", help="full fine-tuning")
    p.set_defaults(full=False)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-target-modules", default=DEFAULT_LORA_TARGETS, help="comma-separated module names")
    p.add_argument("--learning-rate", type=float, default=None, help="default 1e-5 full (official), 1e-4 LoRA")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--max-grad-norm", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--max-length", type=int, default=None, help="drop trailing paths (keep 2) to fit; else skip")
    p.add_argument("--max-path-tokens", type=int, default=None, help="per-path budget incl. <think k> and </think k>")
    p.add_argument("--max-paths", type=int, default=6, help="paths used per problem (official data: up to 6)")
    p.add_argument("--extrapolate-prob", type=float, default=0.3)
    p.add_argument("--compat", choices=COMPAT_CHOICES, default="auto",
                   help="sequence layout: paper (as the method is trained), official (as the released vLLM engine "
                        "runs the released checkpoint: adds <vllm_pad>), auto (official if the tokenizer has <vllm_pad>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the last OUT/checkpoint-*")
    p.add_argument("--save-adapter", action="store_true", help="save a PEFT adapter instead of merged weights")
    p.add_argument("--save-steps", type=int, default=0, help="checkpoint every N optimizer steps (0: only at the end)")
    p.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N optimizer steps (0: all epochs)")
    args = p.parse_args(argv)
    if args.save_adapter and args.full:
        p.error("--save-adapter needs LoRA mode (not --full)")
    for name in ("epochs", "batch_size", "gradient_accumulation_steps", "lora_rank"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0.0 <= args.extrapolate_prob <= 1.0:
        p.error("--extrapolate-prob must be in [0, 1]")
    if args.learning_rate is None:
        args.learning_rate = 1e-5 if args.full else 1e-4
    return args


# -- model ------------------------------------------------------------------------------------


def load_base(model_name: str, dtype: torch.dtype = torch.float32, pad: bool = False):
    """(model, tokenizer) with control tokens (and ``<vllm_pad>`` when ``pad``) and thought-embedding
    tables attached, unwrapped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name)
    with quiet_unexpected_tables():
        model = AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    add_control_tokens(model, tokenizer, pad=pad)
    if Path(model_name).is_dir() and read_thought_embeddings(model_name):
        load_thought_embeddings(model, model_name)
    else:
        attach_thought_embeddings(model)
        for table in thought_embedding_tables(model):
            torch.nn.init.normal_(table.weight, std=TABLE_INIT_STD)
    return model, tokenizer


def _module_name(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module).rsplit(".", 1)[-1]


def wrap_lora(model, tokenizer, rank: int, alpha: int, targets: str):
    """LoRA on ``targets``; the control tokens' embedding (and untied output) rows and the
    thought-embedding tables are trainable, everything else of the base frozen."""
    from peft import LoraConfig, get_peft_model

    ids = ControlTokenIds.from_tokenizer(tokenizer)
    control = sorted([*ids.think_open, *ids.think_close, ids.summary_open, ids.summary_close])
    rows = {_module_name(model, model.get_input_embeddings()): control}
    if not model.config.get_text_config().tie_word_embeddings:
        rows[_module_name(model, model.get_output_embeddings())] = control
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=[t.strip() for t in targets.split(",") if t.strip()],
        trainable_token_indices=rows,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    for table in thought_embedding_tables(peft_model):
        table.weight.requires_grad_(True)
    return peft_model


def forward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training forward: packed rows with protocol positions, segments and the 4-D mask."""
    return model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=batch["attention_mask"],
        segment_ids=batch["segment_ids"],
        use_cache=False,
    ).logits


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def thought_table_state(model) -> dict[str, torch.Tensor]:
    """The tables under the official key names."""
    return {
        f"model.layers.{i}.self_attn.seg_embeddings.weight": t.weight.detach().cpu().contiguous()
        for i, t in enumerate(thought_embedding_tables(model))
    }


# -- checkpoints ------------------------------------------------------------------------------


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written ``tmp`` dir to ``final`` (os.replace; an old one is removed first)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def _fresh_tmp(out: Path, name: str) -> Path:
    tmp = out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (with their state file), oldest first."""
    found = [d for d in out.glob("checkpoint-*") if (d / STATE_FILE).is_file() and d.name[11:].isdigit()]
    return sorted(found, key=lambda d: int(d.name[11:]))


def save_training_state(accelerator, out: Path, state: dict, keep: int) -> None:
    """OUT/checkpoint-STEP: trainable weights, optimizer, RNG (accelerate) and the loop position;
    written to a tmp dir and renamed, so a half-written one never looks complete."""
    name = f"checkpoint-{state['step']}"
    tmp = _fresh_tmp(out, name) if accelerator.is_main_process else out / f".{name}.tmp"
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state))
        _replace_dir(tmp, out / name)
        for old in checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _only_trainable(models, weights, output_dir) -> None:
    """accelerate save hook: keep only the trainable tensors (LoRA checkpoints stay small)."""
    for i, model in enumerate(models):
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        weights[i] = {k: v for k, v in weights[i].items() if k in names}


def save_final(model, tokenizer, out: Path, adapter: bool, state_dict: dict | None = None) -> None:
    """The loadable result in OUT. Files go to a tmp dir, then move in with the file that makes
    the dir loadable (config.json / adapter_config.json) last and any old one removed first.
    ``state_dict``: the gathered full weights of a sharded (FSDP / ZeRO-3) full fine-tune."""
    tmp = _fresh_tmp(out, "final")
    if adapter:
        from safetensors.torch import save_file

        model.save_pretrained(tmp)
        save_file(thought_table_state(model), str(tmp / TABLES_FILE))
        marker = "adapter_config.json"
    else:
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        model.save_pretrained(tmp, state_dict=state_dict)
        marker = "config.json"
    tokenizer.save_pretrained(tmp)
    for stale in ("config.json", "adapter_config.json"):
        (out / stale).unlink(missing_ok=True)
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == marker):
        os.replace(f, out / f.name)
    tmp.rmdir()


# -- loop -------------------------------------------------------------------------------------


def _load_loss_log(path: Path, upto: int) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if int(r["step"]) <= upto]


def _write_loss_log(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "epoch", "loss", "lr"])
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def plot_loss(rows: list[dict], path: Path) -> None:
    """The loss curve of ``loss.csv`` as a PNG beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], marker=".")
    ax.set(xlabel="optimizer step", ylabel="training loss", title="ParaThinker SFT")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def build_dataset(args, tokenizer) -> MultiPathDataset:
    records = load_records(args.data)
    compat = resolve_compat(args.compat, tokenizer)
    logger.info("sequence layout: compat=%s", compat.name)
    builder = SequenceBuilder(
        tokenizer, compat=compat, max_path_tokens=args.max_path_tokens, max_length=args.max_length,
        max_paths=args.max_paths,
    )
    dataset = MultiPathDataset(records, builder, extrapolate_prob=args.extrapolate_prob, seed=args.seed)
    if dataset.skipped:
        logger.warning("%d of %d records do not fit --max-length=%s and are skipped", dataset.skipped, len(records), args.max_length)
    return dataset


def train(args: argparse.Namespace) -> Path:
    from accelerate import Accelerator, DistributedType
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    out = Path(args.output)
    accelerator = Accelerator(
        mixed_precision="bf16" if args.bf16 else "no", gradient_accumulation_steps=args.gradient_accumulation_steps
    )
    set_seed(args.seed)
    model, tokenizer = load_base(args.model, pad=args.compat == "official")
    dataset = build_dataset(args, tokenizer)  # before any output is written: bad data leaves nothing
    out.mkdir(parents=True, exist_ok=True)
    if args.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not args.full:
        model = wrap_lora(model, tokenizer, args.lora_rank, args.lora_alpha, args.lora_target_modules)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    collate = Collator(tokenizer.pad_token_id, torch.bfloat16 if args.bf16 else torch.float32)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False, collate_fn=collate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_save_state_pre_hook(_only_trainable)

    state = {"step": 0, "epoch": 0, "batches_done": 0}
    if args.resume:
        found = checkpoints(out)
        if not found:
            raise DataError(f"{out}: --resume given but no checkpoint-*/ with {STATE_FILE} found")
        accelerator.load_state(str(found[-1]), strict=False)
        state = json.loads((found[-1] / STATE_FILE).read_text())
        logger.info("resumed from %s (step %d)", found[-1], state["step"])
    log_path = out / LOSS_CSV
    log_rows = _load_loss_log(log_path, state["step"]) if args.resume else []

    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    total = steps_per_epoch * args.epochs if not args.max_steps else min(args.max_steps, steps_per_epoch * args.epochs)
    bar = tqdm(total=total, initial=state["step"], desc="sft", disable=not accelerator.is_main_process)
    model.train()
    losses: list[float] = []
    for epoch in range(state["epoch"], args.epochs):
        dataset.start_epoch(epoch)
        skip = state["batches_done"] if epoch == state["epoch"] else 0
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for done, batch in enumerate(batches, start=skip + 1):
            with accelerator.accumulate(model):
                loss = lm_loss(forward_logits(model, batch), batch["labels"])
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(accelerator.gather(loss.detach()).mean().item())
            if not accelerator.sync_gradients:
                continue
            state = {"step": state["step"] + 1, "epoch": epoch, "batches_done": done}
            if done == len(loader):
                state.update(epoch=epoch + 1, batches_done=0)
            log_rows.append({"step": state["step"], "epoch": epoch, "loss": sum(losses) / len(losses), "lr": args.learning_rate})
            losses = []
            bar.update(1)
            bar.set_postfix(loss=f"{log_rows[-1]['loss']:.4f}")
            if accelerator.is_main_process:
                _write_loss_log(log_path, log_rows)
            last = state["step"] >= total
            if (args.save_steps and state["step"] % args.save_steps == 0) or last:
                save_training_state(accelerator, out, state, args.save_total_limit)
            if last:
                break
        if state["step"] >= total:
            break
    bar.close()
    accelerator.wait_for_everyone()
    sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    # Sharded weights must be gathered on every rank; merging LoRA needs them whole (use DDP).
    state_dict = accelerator.get_state_dict(model) if sharded and args.full else None
    if accelerator.is_main_process:
        save_final(accelerator.unwrap_model(model), tokenizer, out, args.save_adapter, state_dict)
        if log_rows:
            plot_loss(log_rows, out / "loss.png")
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    return run_cli(lambda: train(args))


if __name__ == "__main__":
    sys.exit(main())
