"""ParaThinker SFT (LoRA or full) on transformers' ``Trainer``.

    python -m training.sft --model BASE --data train.jsonl --output OUT [--full | --lora ...] [TrainingArguments]
    torchrun --nproc_per_node 4 -m training.sft ...    (or accelerate launch --config_file training/configs/...)

Before any peft wrapping the model gets the control tokens (``add_control_tokens``) and the
thought-embedding tables (from the checkpoint when it has them, else N(0, 0.02) as the official
training fork), so the hooks survive ``merge_and_unload``. Both modes train the tables and the
control tokens' embedding/output rows; LoRA mode freezes the rest of the base (peft
``trainable_token_indices`` for the rows). The result in OUT loads with
``lm_eval --model parathinker --model_args pretrained=OUT`` (merged, official format) or, with
``--save-adapter``, ``pretrained=BASE,peft=OUT`` (adapter + ``thought_embeddings.safetensors``).
``--layout sequential`` trains the plain-sample baseline instead: no control tokens, no tables,
a plain model for ``lm_eval --model hf``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from lm_eval_parathinker.embedded import resolve_pretrained
from lm_eval_parathinker.formats import Format, TrainedFormat, get_format
from lm_eval_parathinker.protocol import (
    DEFAULT_NUM_CONTROL_PATHS,
    FLEX_TILE,
    ControlTokenIds,
    num_control_paths,
)
from lm_eval_parathinker.thought_embedding import (
    add_control_tokens,
    attach_thought_embeddings,
    load_thought_embeddings,
    quiet_unexpected_tables,
    read_thought_embeddings,
    thought_embedding_tables,
)

from .arguments import parse_args, training_layout
from .batching import Collator, SFTDataset
from .data import DataError, run_cli
from .fork_layouts import ForkBuilder, ForkCollator, ForkReader, add_format_tokens, trained_instruction
from .released import TokenizedBuilder
from .sequence import SequenceBuilder, SequentialBuilder
from .sources import Form, open_source, read_items
from .trainer import EpochCallback, LossLogCallback, ParaThinkerTrainer

logger = logging.getLogger("training.sft")

TABLE_INIT_STD = 0.02  # the official training fork's init


# -- model ------------------------------------------------------------------------------------


def attention_implementation(requested: str, device: torch.device, dense: bool = False) -> str:
    """``auto``: FlexAttention with the protocol's BlockMask on CUDA (masked blocks skipped), SDPA
    with the dense mask elsewhere (FlexAttention has no backward pass on the CPU) and for rows
    that carry a dense mask (``dense``: a format's)."""
    if requested == "auto":
        return "flex_attention" if device.type == "cuda" and not dense else "sdpa"
    if requested == "flex_attention" and device.type == "cpu":
        raise DataError("--attn-implementation flex_attention: FlexAttention has no backward pass on the CPU; use sdpa")
    return requested


def load_base(model_name: str, *, layout: str = "parathinker", pad: bool = False, attn_implementation: str = "sdpa",
              num_control_paths: int = DEFAULT_NUM_CONTROL_PATHS, fmt: Format | None = None):
    """(model, tokenizer), unwrapped. A forking format ``fmt``: with its tags (those the tokenizer
    lacks added). ParaThinker layout: with the control tokens ``<think1>``..``<thinkK>`` for K =
    ``num_control_paths`` (those the tokenizer lacks are added; and ``<vllm_pad>`` when ``pad``)
    and the thought-embedding tables attached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name)
    with quiet_unexpected_tables():
        model = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch.float32, attn_implementation=attn_implementation)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if fmt is not None:
        add_format_tokens(model, tokenizer, fmt)
        return model, tokenizer
    if layout == "sequential":
        return model, tokenizer
    add_control_tokens(model, tokenizer, num_control_paths, pad=pad)
    if Path(model_name).is_dir() and read_thought_embeddings(model_name):
        load_thought_embeddings(model, model_name)
    else:
        attach_thought_embeddings(model)
        for table in thought_embedding_tables(model):
            torch.nn.init.normal_(table.weight, std=TABLE_INIT_STD)
    return model, tokenizer


def _module_name(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module).rsplit(".", 1)[-1]


def trained_token_ids(tokenizer, fmt: Format | None) -> list[int]:
    """The tokens whose embedding (and untied output) rows LoRA trains: a format's tags, or
    ParaThinker's control tokens."""
    if fmt is not None:
        return sorted(tokenizer.convert_tokens_to_ids(list(fmt.tokens)))
    ids = ControlTokenIds.from_tokenizer(tokenizer)
    return sorted([*ids.think_open, *ids.think_close, ids.summary_open, ids.summary_close])


def wrap_lora(model, rank: int, alpha: int, targets: str, token_ids: list[int] | None = None):
    """LoRA on ``targets``; the embedding (and untied output) rows of ``token_ids`` (the control
    tokens or a format's tags) and the thought-embedding tables are trainable too (peft
    ``trainable_token_indices``); the rest is frozen."""
    from peft import LoraConfig, get_peft_model

    rows = None
    if token_ids:
        rows = {_module_name(model, model.get_input_embeddings()): token_ids}
        if not model.config.get_text_config().tie_word_embeddings:
            rows[_module_name(model, model.get_output_embeddings())] = token_ids
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


# -- data -------------------------------------------------------------------------------------


def fork_layout(args: argparse.Namespace) -> str:
    """The layout of a format's rows (:data:`training.fork_layouts.LAYOUTS`) that the flags name."""
    return "sequential" if args.layout == "sequential" else args.compat


def build_builder(args: argparse.Namespace, tokenizer, form: Form, *, extrapolate: bool):
    """The sequence builder of ``--format`` and ``--layout`` for rows in ``form`` (``extrapolate``:
    rename paths with ``--extrapolate-prob``)."""
    if args.format != "parathinker":
        logger.info("sequence layout: %s, %s", args.format, fork_layout(args))
        return ForkBuilder(tokenizer, get_format(args.format), fork_layout(args), max_length=args.max_length)
    if args.layout == "sequential":
        if form is not Form.RECORDS:
            raise DataError(f"--layout sequential needs multi-path records (problem, answer, paths), not {form.value}")
        logger.info("sequence layout: sequential (each path a plain sample)")
        return SequentialBuilder(tokenizer, max_path_tokens=args.max_path_tokens, max_length=args.max_length,
                                 max_paths=args.max_paths)
    compat = training_layout(args, tokenizer)
    paths = num_control_paths(tokenizer)
    logger.info("sequence layout: parathinker, compat=%s, control tokens <think1>..<think%d>, <summary> at %s", compat.name,
                paths, "2 Lp + max Lk" if compat.summary_after_prompt_twice else "Lp + max Lk")
    if compat.max_paths is not None and paths > compat.max_paths:
        raise DataError(f"the tokenizer has {paths} control paths, but compat={compat.name} decodes at most the released "
                        f"engine's {compat.max_paths}: train with --compat paper")
    if args.max_paths > paths:
        raise DataError(f"--max-paths {args.max_paths} is more than the tokenizer's {paths} control paths "
                        "(--num-control-tokens)")
    prob = args.extrapolate_prob if extrapolate else 0.0
    if form is Form.TOKENIZED:
        if args.max_path_tokens is not None:
            raise DataError("--max-path-tokens cuts paths of text data; pre-tokenized rows are trained as stored")
        return TokenizedBuilder(tokenizer, compat=compat, max_length=args.max_length, max_paths=args.max_paths,
                                extrapolate_prob=prob)
    return SequenceBuilder(
        tokenizer, compat=compat, max_path_tokens=args.max_path_tokens, max_length=args.max_length,
        max_paths=args.max_paths, extrapolate_prob=prob,
    )


def build_dataset(spec: str, args: argparse.Namespace, tokenizer, *, split: str, extrapolate: bool, seed: int) -> SFTDataset:
    """The rows of ``--data`` / ``--eval-data`` (``split``: the split taken from a DatasetDict or hub id)."""
    source = open_source(spec, split=split)
    logger.info("%s: %s, %s, %d rows", spec, source.origin, source.form.value, len(source.rows))
    builder = build_builder(args, tokenizer, source.form, extrapolate=extrapolate)
    reader = ForkReader(builder.fmt, tokenizer, builder.layout) if isinstance(builder, ForkBuilder) else None
    items, bad = read_items(source, tokenizer, model=args.model, skip_bad_rows=args.skip_bad_rows, fork_reader=reader)
    if bad:
        logger.warning("%s: %d of %d rows are malformed and skipped (--skip-bad-rows)", spec, bad, len(source.rows))
    try:
        dataset = SFTDataset(items, builder, packing=args.packing, seed=seed)
    except ValueError as e:
        raise DataError(f"{spec}: {e}") from e
    if dataset.skipped:
        logger.warning("%s: %d of %d samples do not fit --max-length=%s and are skipped", spec, dataset.skipped,
                       dataset.num_candidates, args.max_length)
    if reader is not None:  # one sample per row
        plain = sum(builder.fmt.trigger not in item.response for item in items)
        logger.info("%s: training on %d of %d rows (%d malformed, %d longer than --max-length; %d of the rows read "
                    "have no fork: trained as sequential responses)", spec, len(dataset.units), len(source.rows), bad,
                    dataset.skipped, plain)
    if args.packing:
        fill = dataset.num_tokens / (len(dataset) * args.max_length)
        logger.info("%s: %d samples packed into %d rows of at most %d tokens (%.0f%% filled)", spec,
                    len(dataset.units), len(dataset), args.max_length, 100 * fill)
    return dataset


# -- checkpoints and the result ---------------------------------------------------------------


def resume_checkpoint(out: Path, resume: bool | str) -> str | None:
    """The checkpoint to resume from: the newest complete ``OUT/checkpoint-*`` (``--resume``) or the
    given one (``--resume_from_checkpoint PATH``); a checkpoint of the pre-Trainer loop is refused."""
    if not resume:
        return None
    if resume is True:
        found = get_last_checkpoint(str(out)) if out.is_dir() else None
        if found is None:
            raise DataError(f"{out}: --resume given but there is no checkpoint-*/")
    else:
        found = resume
    state = Path(found) / "trainer_state.json"
    if not state.is_file():
        raise DataError(f"{found}: not a checkpoint (no trainer_state.json)")
    if "global_step" not in json.loads(state.read_text()):
        raise DataError(f"{found}: written by the training loop used before the Trainer rebuild; such "
                        "checkpoints cannot resume (start a new run)")
    return str(found)


def save_final(trainer: ParaThinkerTrainer, tokenizer, out: Path, *, adapter: bool, merge: bool,
               trained: TrainedFormat | None = None) -> None:
    """The loadable result in OUT. Files go to a tmp dir, then move in with the file that makes the
    dir loadable (config.json / adapter_config.json) last and any old one removed first.
    ``merge``: LoRA merged into the base (needs whole weights: not under FSDP / ZeRO-3); else
    ``Trainer.save_model`` (which gathers sharded weights; for LoRA the adapter and the tables).
    ``trained``: a format's record (:data:`formats.CHECKPOINT_FILE`), beside the tokenizer."""
    main = trainer.is_world_process_zero()
    tmp = out / ".final.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    trainer.accelerator.wait_for_everyone()
    if not merge:
        trainer.save_model(str(tmp))
    elif main:
        trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    if main:
        if trained is not None:
            trained.save(tmp)
        marker = "adapter_config.json" if adapter else "config.json"
        for stale in ("config.json", "adapter_config.json"):
            (out / stale).unlink(missing_ok=True)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == marker):
            os.replace(f, out / f.name)
        tmp.rmdir()
    trainer.accelerator.wait_for_everyone()


# -- run ----------------------------------------------------------------------------------------


def build_trainer(args: argparse.Namespace, training_args: TrainingArguments) -> tuple[ParaThinkerTrainer, str | None]:
    """The trainer of a command line and the checkpoint to resume from. Data and the resume point
    are checked before any output is written: bad input leaves nothing."""
    out = Path(args.output)
    logger.info("recipe: %s; effective TrainingArguments (saved as OUT/training_args.bin):\n%s",
                args.recipe or "none", training_args.to_json_string())
    set_seed(training_args.seed)  # the tables' and LoRA's initialisation
    fmt = get_format(args.format) if args.format != "parathinker" else None
    attention = attention_implementation(args.attn_implementation, training_args.device, dense=fmt is not None)
    logger.info("attention: %s", attention)
    model, tokenizer = load_base(resolve_pretrained(args.model), layout=args.layout, pad=args.compat == "official" and fmt is None,
                                 attn_implementation=attention, num_control_paths=args.num_control_tokens, fmt=fmt)
    train_set = build_dataset(args.data, args, tokenizer, split="train", extrapolate=True, seed=training_args.seed)
    eval_set = (build_dataset(args.eval_data, args, tokenizer, split="test", extrapolate=False, seed=training_args.seed)
                if args.eval_data else None)
    checkpoint = resume_checkpoint(out, args.resume)
    out.mkdir(parents=True, exist_ok=True)
    if not args.full:
        tokens = trained_token_ids(tokenizer, fmt) if fmt is not None or thought_embedding_tables(model) else None
        model = wrap_lora(model, args.lora_rank, args.lora_alpha, args.lora_target_modules, tokens)
    if fmt is not None:
        collator = ForkCollator(tokenizer.pad_token_id)
    else:
        collator = Collator(tokenizer.pad_token_id, pad_to_multiple_of=FLEX_TILE if attention == "flex_attention" else None,
                            segment_ids=args.layout == "parathinker")
    trainer = ParaThinkerTrainer(
        model=model, args=training_args, data_collator=collator, train_dataset=train_set, eval_dataset=eval_set,
        processing_class=tokenizer, callbacks=[EpochCallback(train_set), LossLogCallback(out)],
    )
    logger.info("effective batch: %d rows per optimizer step (%d processes x batch %d x accumulation %d)",
                training_args.world_size * training_args.per_device_train_batch_size
                * training_args.gradient_accumulation_steps, training_args.world_size,
                training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps)
    return trainer, checkpoint


def train(args: argparse.Namespace, training_args: TrainingArguments) -> Path:
    trainer, checkpoint = build_trainer(args, training_args)
    trainer.train(resume_from_checkpoint=checkpoint)
    out = Path(args.output)
    trained = None
    if args.format != "parathinker":
        layout = fork_layout(args)
        trained = TrainedFormat(args.format, "official" if layout == "official" else "paper",
                                trained_instruction(trainer.train_dataset.records))
    save_final(trainer, trainer.processing_class, out, adapter=args.save_adapter,
               merge=not args.full and not args.save_adapter, trained=trained)
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, training_args = parse_args(argv)
    return run_cli(lambda: train(args, training_args))


if __name__ == "__main__":
    sys.exit(main())
