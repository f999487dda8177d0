"""Rope scaling for one generation, through transformers' own rope functions.

The released engine runs long per-path budgets with YaRN (``protocol.Compat.rope_parameters``).
transformers computes a model's inverse frequencies and cos/sin scale once, in its rotary
embedding module, from ``config.rope_parameters``; :func:`rope_scaling` recomputes both with
``ROPE_INIT_FUNCTIONS`` for another rope configuration and restores them afterwards, so no
modeling code is forked and the model is unchanged outside the ``with`` statement.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def rotary_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that turn positions into cos/sin (``inv_freq`` and ``attention_scaling``)."""
    return [m for m in model.modules() if hasattr(m, "inv_freq") and hasattr(m, "attention_scaling")]


@contextlib.contextmanager
def rope_scaling(model: torch.nn.Module, rope_parameters: dict | None) -> Iterator[None]:
    """Run ``model`` with ``rope_parameters`` (a transformers rope configuration) instead of its own.

    ``None`` changes nothing. The buffers are overwritten in place, so their addresses (and any
    compiled graph reading them) stay valid.
    """
    if rope_parameters is None:
        yield
        return
    config = copy.deepcopy(model.config)
    config.rope_parameters = dict(rope_parameters)
    saved = []
    for module in rotary_modules(model):
        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](config, module.inv_freq.device)
        saved.append((module, module.inv_freq.clone(), module.attention_scaling))
        module.inv_freq.copy_(inv_freq)
        module.attention_scaling = scale
    try:
        yield
    finally:
        for module, inv_freq, scale in saved:
            module.inv_freq.copy_(inv_freq)
            module.attention_scaling = scale
