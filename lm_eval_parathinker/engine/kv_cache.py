"""The KV pool: every layer's keys and values in fixed-size pages, as one tensor per layer.

Layer l's keys are ``keys[l]`` of shape [1, Hkv, num_pages * page_size, D]: page p is columns
``p * page_size`` to ``(p + 1) * page_size`` of it, so a kernel can read pages in place (the
layout FlexAttention takes), and column ``c`` is token ``c % page_size`` of page
``c // page_size``. Which pages belong to whom is :mod:`pages`' business; ``fill`` counts the
tokens written into each page, which bounds what a partial page shows.

A forward first calls :meth:`PagedKVCache.begin` with the columns its tokens are written to, then
sets ``reads``, how its queries read (:mod:`attention`); every attention layer then calls
:meth:`update`, as it calls a transformers ``Cache``, which writes the layer's new keys and values
and returns what the queries attend to.
"""

from __future__ import annotations

import inspect

import torch

from ..upstream import torch as upstream_torch
from .pages import SCRATCH_PAGE


def cache_argument(model) -> str:
    """The keyword a model's forward takes its KV cache by: ``cache`` in newer transformers 5
    releases, ``past_key_values`` in older ones (which would ignore ``cache`` and attend to the
    step's own keys only)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def head_dim(config) -> int:
    """A model's attention head size (from its transformers config)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class PagedKVCache:
    """Duck-types the part of transformers' ``Cache`` that attention layers call: ``update``."""

    def __init__(self, model, num_pages: int, page_size: int, device: torch.device, dtype: torch.dtype):
        config = model.config
        shape = (1, config.num_key_value_heads, num_pages * page_size, head_dim(config))
        # zeros, not empty: a kernel multiplies the masked tail of a partial page by a zero weight,
        # which must not meet a NaN left in uninitialised memory
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.fill = torch.zeros(num_pages, dtype=torch.long, device=device)
        self.num_pages, self.page_size = num_pages, page_size
        self.groups = config.num_attention_heads // config.num_key_value_heads  # query heads per KV head
        self.bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * shape[-1] * dtype.itemsize
        self.no_mask = torch.zeros(1, 1, 1, 1, device=device)  # a 4-D mask makes transformers skip mask creation
        self._columns: torch.Tensor | None = None
        self._table: torch.Tensor | None = None  # the slots' page lists (page_table)
        self.reads = None  # how the queries of the forward in flight read (set after begin)
        self.argument = cache_argument(model)  # how the model's forward takes this cache

    def page_table(self, slots: int, segments: int, max_pages: int) -> torch.Tensor:
        """The device table of the slots' page lists for a call, every entry the scratch page: one
        tensor for every call of the same shape, kept with the pool, so that a compiled step
        reads it at the same address (CUDA graphs re-record for a new one)."""
        shape = (slots, segments, max_pages)
        if self._table is None or self._table.shape != shape:
            self._table = torch.empty(shape, dtype=torch.long, device=self.fill.device)
        return self._table.fill_(SCRATCH_PAGE)

    def mark_static(self) -> None:
        """Fixed addresses for CUDA graphs (as transformers' StaticCache does): the pages, their
        fill counts and the page table."""
        for t in [*self.keys, *self.values, self.fill, self._table]:
            upstream_torch.mark_static_address(t)

    def matches(self, model, page_size: int, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this pool's pages suit a call with these settings (pools are reused across calls)."""
        return (self.page_size, self.keys[0].device, self.keys[0].dtype, len(self.keys)) == (
            page_size, device, dtype, model.config.num_hidden_layers)

    def begin(self, columns: torch.Tensor, written: torch.Tensor) -> None:
        """The next forward writes its tokens ([B0, Q]) into ``columns`` (flat pool columns;
        ``written`` marks real tokens). Counts them in ``fill`` at once: how the queries read
        (``reads``, set next) may depend on it."""
        page, offset = columns.flatten() // self.page_size, columns.flatten() % self.page_size
        # tokens are appended in order: a page now holds up to its last written offset
        self.fill.scatter_reduce_(0, page, torch.where(written.flatten(), offset + 1, self.fill[page]), "amax",
                                  include_self=False)
        self._columns = columns.flatten()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write this forward's K/V (``[B0, Hkv, Q, D]``, rotated, thought embedding included) into
        their columns and return what its queries attend to."""
        out = []
        for pool, new in ((self.keys[layer_idx], key_states), (self.values[layer_idx], value_states)):
            flat = new.transpose(0, 1).reshape(1, new.shape[1], -1, new.shape[-1])  # [1, Hkv, B0 * Q, D]
            pool.index_copy_(2, self._columns, flat.to(pool.dtype))
            out.append(self.reads.keys(pool, new))
        return out[0], out[1]
