"""lm-eval internals on the model side: HFLM's, behind :class:`HFLMShim`, and the CLI's call of
``simple_evaluate`` that the experiments runner mirrors. (The start-up hook's task loading is in
:mod:`.lm_eval_tasks`, which must not import lm-eval.) Guarded by tests/test_upstream.py."""

from __future__ import annotations

import inspect
from typing import Any

from lm_eval.models.huggingface import HFLM


class HFLMShim(HFLM):
    """``HFLM`` with the internals the ``parathinker`` model needs as public names. HFLM's
    sanctioned override points (``_create_model``, ``_model_generate``) are overridden directly;
    every other internal is one override or accessor here."""

    def _create_tokenizer(self, *args: Any, **kwargs: Any) -> None:
        self.create_tokenizer(*args, **kwargs)

    def create_tokenizer(self, pretrained, tokenizer, *args: Any, **kwargs: Any) -> None:
        """Load the tokenizer (HFLM's ``_create_tokenizer``, which it calls before loading the
        model, with ``revision`` among its keywords): override to choose another one."""
        HFLM._create_tokenizer(self, pretrained, tokenizer, *args, **kwargs)

    def set_model(self, model) -> None:
        """Replace the model HFLM holds (its ``_model``), e.g. by the model wrapped in an adapter
        after loading; read it back with HFLM's ``model``."""
        self._model = model


def cli_evaluate_source() -> str:
    """The source of lm-eval's CLI function that calls ``simple_evaluate`` (``Run._execute``):
    lm-eval has no public function that runs a config on a model object, so the experiments
    runner mirrors that call, and a test compares their keywords."""
    from lm_eval._cli.run import Run

    return inspect.getsource(Run._execute)
