"""transformers' ``Trainer`` internals: the checkpoint steps the training subclass changes, behind
:class:`TrainerShim` (apart from :mod:`.transformers`: importing ``Trainer`` is slow, and only
training needs it). Guarded by tests/test_upstream.py."""

from __future__ import annotations

from transformers import Trainer


class TrainerShim(Trainer):
    """``Trainer`` with the checkpoint steps the training subclass changes as public methods;
    each private override below only calls one of them.

    * :meth:`save_model_files`: writing the model's files of a checkpoint (``_save``);
    * :meth:`load_checkpoint_files`: loading them to resume (``_load_from_checkpoint``);
    * :meth:`checkpoint_parent`: the folder a checkpoint is written into (``_get_output_dir``);
    * :meth:`write_checkpoint`: one whole checkpoint (``_save_checkpoint``), and
      :meth:`write_stock_checkpoint`, the stock one.
    """

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        self.save_model_files(output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self.load_checkpoint_files(resume_from_checkpoint, model)

    def _get_output_dir(self, trial) -> str:
        return self.checkpoint_parent(trial)

    def _save_checkpoint(self, model, trial) -> None:
        self.write_checkpoint(model, trial)

    def save_model_files(self, output_dir: str | None, state_dict=None) -> None:
        Trainer._save(self, output_dir, state_dict)

    def load_checkpoint_files(self, checkpoint: str, model=None) -> None:
        Trainer._load_from_checkpoint(self, checkpoint, model)

    def checkpoint_parent(self, trial) -> str:
        return Trainer._get_output_dir(self, trial)

    def write_checkpoint(self, model, trial) -> None:
        self.write_stock_checkpoint(model, trial)

    def write_stock_checkpoint(self, model, trial) -> None:
        Trainer._save_checkpoint(self, model, trial)
