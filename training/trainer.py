"""transformers' ``Trainer`` for ParaThinker rows, and the callbacks of ``training.sft``.

:class:`ParaThinkerTrainer` changes four things of the stock trainer:

* each batch's attention mask is built on the model's device from the collated block and document
  ids by :mod:`lm_eval_parathinker.protocol` (:func:`model_inputs`): a FlexAttention ``BlockMask``
  for ``attn_implementation="flex_attention"``, else the dense boolean mask (additive for eager);
  a forking format's, from its fork and path ids (:func:`training.fork_layouts.allowed_mask`);
* a LoRA checkpoint also holds the thought-embedding tables (``thought_embeddings.safetensors``),
  which peft does not save, and resuming loads them;
* a checkpoint is written under a hidden staging folder and renamed to ``checkpoint-N`` once
  complete, so an interrupted save never looks like a checkpoint;
* the loss is the model's own (token mean over the labelled tokens of the optimizer step).
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from lm_eval_parathinker import protocol
from lm_eval_parathinker.checkpoint import ADAPTER_TABLES_FILE
from lm_eval_parathinker.thought_embedding import load_thought_embeddings, thought_embedding_tables
from lm_eval_parathinker.upstream.transformers import attn_implementation
from lm_eval_parathinker.upstream.transformers_trainer import TrainerShim

from .fork_layouts import allowed_mask

STAGING_DIR = ".checkpoint.tmp"
LOSS_CSV = "loss.csv"
LOSS_COLUMNS = ["step", "epoch", "loss", "lr", "grad_norm", "eval_loss"]


def model_inputs(batch: dict[str, torch.Tensor], attn_implementation: str) -> dict:
    """The model's keyword arguments for a collated batch: its ids, positions, labels and segment
    ids, and the protocol's mask for ``attn_implementation``, built on the batch's device."""
    inputs = {k: v for k, v in batch.items() if k not in ("block_ids", "document_ids", "fork_ids", "path_ids")}
    documents = batch["document_ids"]
    if "fork_ids" in batch:  # a forking format's rows (training.fork_layouts)
        allowed = allowed_mask(batch["fork_ids"], batch["path_ids"], documents)
    elif attn_implementation == "flex_attention":
        inputs["attention_mask"] = protocol.two_phase_block_mask(batch["block_ids"], documents)
    else:
        allowed = protocol.two_phase_dense_mask(batch["block_ids"], documents)
    if "attention_mask" not in inputs:
        # sdpa takes the boolean mask as is; eager adds the mask to the scores
        inputs["attention_mask"] = allowed if attn_implementation == "sdpa" else protocol.additive_mask(allowed, torch.float32)
    return {**inputs, "use_cache": False}


def forward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training forward's logits for a collated batch (labels left out)."""
    inputs = model_inputs(batch, attn_implementation(model.config))
    inputs.pop("labels", None)
    return model(**inputs).logits


def thought_table_state(model) -> dict[str, torch.Tensor]:
    """The tables under the official key names."""
    return {
        f"model.layers.{i}.self_attn.seg_embeddings.weight": t.weight.detach().cpu().contiguous()
        for i, t in enumerate(thought_embedding_tables(model))
    }


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written ``tmp`` dir to ``final`` (os.replace; an old one is removed first)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


class ParaThinkerTrainer(TrainerShim):
    """``Trainer`` (through :class:`~lm_eval_parathinker.upstream.transformers_trainer.TrainerShim`,
    which names its checkpoint steps) on the rows of :class:`training.batching.Collator` (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._staging = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = model_inputs(inputs, attn_implementation(self.model.config))
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    # -- checkpoints ---------------------------------------------------------------------------

    def _has_lora_tables(self) -> bool:
        return hasattr(self.model, "peft_config") and bool(thought_embedding_tables(self.model))

    def save_model_files(self, output_dir: str | None, state_dict=None) -> None:
        super().save_model_files(output_dir, state_dict)
        if self.args.should_save and self._has_lora_tables():
            from safetensors.torch import save_file

            save_file(thought_table_state(self.model),
                      os.path.join(output_dir or self.args.output_dir, ADAPTER_TABLES_FILE))

    def load_checkpoint_files(self, resume_from_checkpoint: str, model=None) -> None:
        super().load_checkpoint_files(resume_from_checkpoint, model)
        if self._has_lora_tables() and (Path(resume_from_checkpoint) / ADAPTER_TABLES_FILE).is_file():
            load_thought_embeddings(self.model, resume_from_checkpoint)
            for table in thought_embedding_tables(self.model):  # loading the adapter may have frozen them
                table.weight.requires_grad_(True)

    def checkpoint_parent(self, trial) -> str:
        run_dir = super().checkpoint_parent(trial)
        return os.path.join(run_dir, STAGING_DIR) if self._staging else run_dir

    def write_checkpoint(self, model, trial) -> None:
        """The stock checkpoint, written into ``OUT/.checkpoint.tmp/`` and renamed into ``OUT/``."""
        run_dir = Path(self.checkpoint_parent(trial))
        staging = run_dir / STAGING_DIR
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # the leftovers of an interrupted save
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            self.write_stock_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if self.state.best_model_checkpoint == str(staging / name):
                self.state.best_model_checkpoint = str(run_dir / name)
                self.state.save_to_json(str(staging / name / "trainer_state.json"))
            replace_dir(staging / name, run_dir / name)
            staging.rmdir()
            rotate_checkpoints(str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()


# -- callbacks ------------------------------------------------------------------------------------


class EpochCallback(TrainerCallback):
    """Tells the datasets which epoch runs (their extrapolation renaming depends on it). The
    Trainer's sampler has its own ``set_epoch``, so accelerate would not call the dataset's."""

    def __init__(self, *datasets):
        self.datasets = [d for d in datasets if d is not None]

    def on_epoch_begin(self, args, state, control, **kwargs):
        for dataset in self.datasets:
            dataset.set_epoch(int(state.epoch or 0))


def loss_rows(log_history: list[dict]) -> list[dict]:
    """One row per logged step of the trainer's log history: training loss, LR, gradient norm and,
    where an evaluation ran at that step, the eval loss."""
    rows: dict[int, dict] = {}
    for entry in log_history:
        if "loss" not in entry and "eval_loss" not in entry:
            continue  # the run summary (train_runtime, ...)
        row = rows.setdefault(entry["step"], dict.fromkeys(LOSS_COLUMNS, ""))
        row.update(step=entry["step"], epoch=entry["epoch"])
        if "loss" in entry:
            row.update(loss=entry["loss"], lr=entry.get("learning_rate", ""), grad_norm=entry.get("grad_norm", ""))
        if "eval_loss" in entry:
            row["eval_loss"] = entry["eval_loss"]
    return [rows[s] for s in sorted(rows)]


def write_loss_csv(rows: list[dict], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOSS_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def plot_loss(rows: list[dict], path: Path, title: str = "ParaThinker SFT") -> None:
    """The training (and eval) loss of ``loss.csv`` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    train = [r for r in rows if r["loss"] != ""]
    ax.plot([int(r["step"]) for r in train], [float(r["loss"]) for r in train], marker=".", label="training loss")
    evals = [r for r in rows if r["eval_loss"] != ""]
    if evals:
        ax.plot([int(r["step"]) for r in evals], [float(r["eval_loss"]) for r in evals], marker="o", label="eval loss")
        ax.legend()
    ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


class LossLogCallback(TrainerCallback):
    """``OUT/loss.csv`` rewritten from the log history at every log (so per step), ``OUT/loss.png``
    at the end; on the main process only."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOSS_CSV

    def on_log(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_loss_csv(loss_rows(state.log_history), self.path)

    def on_train_end(self, args, state, control, **kwargs):
        rows = loss_rows(state.log_history)
        if state.is_world_process_zero and rows:
            plot_loss(rows, self.path.with_suffix(".png"))
