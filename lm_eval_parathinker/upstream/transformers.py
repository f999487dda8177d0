"""transformers internals: a model's attention implementation and the load report's ignore list
(the ``Trainer``'s are in :mod:`.transformers_trainer`, which only training
imports). Guarded by tests/test_upstream.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def attn_implementation(config: PretrainedConfig) -> str:
    """The attention implementation a model of ``config`` runs (``sdpa``, ``flex_attention``, ...):
    the training forward builds the mask that implementation takes. transformers has no public
    getter."""
    return config._attn_implementation


@contextlib.contextmanager
def attention_implementation(config: PretrainedConfig, name: str) -> Iterator[None]:
    """Run a model of ``config`` with the attention function registered as ``name`` while the block
    runs, then restore it. ``set_attn_implementation`` would validate and reconfigure every
    submodule for good; the engine only swaps the function the attention layers look up per call."""
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


@contextlib.contextmanager
def unexpected_keys_ignored(pattern: str) -> Iterator[None]:
    """While the block runs, ``from_pretrained`` of every model class leaves weights matching
    ``pattern`` out of its "unexpected keys" report (the class-wide
    ``_keys_to_ignore_on_load_unexpected``, each model class's own list otherwise)."""
    from transformers import PreTrainedModel

    before = PreTrainedModel._keys_to_ignore_on_load_unexpected
    PreTrainedModel._keys_to_ignore_on_load_unexpected = [pattern] + list(before or [])
    try:
        yield
    finally:
        PreTrainedModel._keys_to_ignore_on_load_unexpected = before

