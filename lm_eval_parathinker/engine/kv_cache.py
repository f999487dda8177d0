"""The KV pool: every layer's keys and values in fixed-size pages, as one tensor per layer.

Layer l's keys are ``keys[l]`` of shape [1, Hkv, num_pages * page_size, D]: page p is columns
``p * page_size`` to ``(p + 1) * page_size`` of it, so a kernel can read pages in place (the
layout FlexAttention takes), and column ``c`` is token ``c % page_size`` of page
``c // page_size``. Which pages belong to whom is :mod:`pages`' business; ``fill`` counts the
tokens written into each page, which bounds what a partial page shows.

A forward takes :meth:`PagedKVCache.write` of the columns its tokens go to as its cache: every
attention layer calls its :meth:`PoolWrite.update`, as it calls a transformers ``Cache``, which
writes the layer's new keys and values and returns the layer's pool; how the queries read it
comes with the forward's ``reads`` (:mod:`attention`). :func:`pool_pages` sizes a call's pool.
"""

from __future__ import annotations

import inspect
import os

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


def bytes_per_token(config, dtype: torch.dtype) -> int:
    """KV bytes of one token, every layer's keys and values."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config) * dtype.itemsize


class PagedKVCache:
    """The pool's tensors (see the module docstring); :meth:`write` makes a forward's cache."""

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
        self.bytes_per_token = bytes_per_token(config, dtype)
        self.no_mask = torch.zeros(1, 1, 1, 1, device=device)  # a 4-D mask makes transformers skip mask creation
        self._table: torch.Tensor | None = None  # the slots' page lists (page_table)
        self.argument = cache_argument(model)  # how the model's forward takes this cache

    def page_table(self, slots: int, blocks: int, max_pages: int) -> torch.Tensor:
        """The device table of the slots' page lists for a call, every entry the scratch page: one
        tensor for every call of the same shape, kept with the pool, so that a compiled step
        reads it at the same address (CUDA graphs re-record for a new one)."""
        shape = (slots, blocks, max_pages)
        if self._table is None or self._table.shape != shape:
            self._table = torch.empty(shape, dtype=torch.long, device=self.fill.device)
        return self._table.fill_(SCRATCH_PAGE)

    def mark_static(self) -> None:
        """Fixed addresses for CUDA graphs (as transformers' StaticCache does): the pages, their
        fill counts and the page table."""
        for t in [*self.keys, *self.values, self.fill, self._table]:
            upstream_torch.mark_static_address(t)

    def mark_growable(self) -> None:
        """Any number of pages, and any page table width, for a compiled step without CUDA graphs:
        a larger pool or a longer call reuses its compilation."""
        for t in [*self.keys, *self.values]:
            upstream_torch.mark_dynamic(t, 2)
        upstream_torch.mark_dynamic(self.fill, 0)
        upstream_torch.mark_dynamic(self._table, 2)

    def matches(self, model, page_size: int, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this pool's pages suit a call with these settings (pools are reused across calls)."""
        return (self.page_size, self.keys[0].device, self.keys[0].dtype, len(self.keys)) == (
            page_size, device, dtype, model.config.num_hidden_layers)

    def reusable(self, num_pages: int, limit: int, exact: bool) -> bool:
        """Whether a call that wants ``num_pages`` pages (at most ``limit``) can use this pool, of
        matching pages: one of that size, or with ``exact`` off one at least as large within the limit."""
        return self.num_pages == num_pages or (not exact and num_pages <= self.num_pages <= limit)

    def write(self, columns: torch.Tensor, written: torch.Tensor) -> PoolWrite:
        """The cache of a forward that writes its tokens ([B0, Q]) into ``columns`` (flat pool
        columns; ``written`` marks real tokens). Counts them in ``fill`` at once: how the queries
        read (the forward's ``reads``) may depend on it."""
        page, offset = columns.flatten() // self.page_size, columns.flatten() % self.page_size
        # tokens are appended in order: a page now holds up to its last written offset
        self.fill.scatter_reduce_(0, page, torch.where(written.flatten(), offset + 1, self.fill[page]), "amax",
                                  include_self=False)
        return PoolWrite(self, columns.flatten())


class PoolWrite:
    """One forward's view of the pool: duck-types the part of transformers' ``Cache`` that
    attention layers call, ``update``."""

    def __init__(self, pool: PagedKVCache, columns: torch.Tensor):
        self.pool, self.columns = pool, columns

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write this forward's K/V (``[B0, Hkv, Q, D]``, rotated, thought embedding included) into
        their columns and return the layer's pool (the forward's ``reads`` say what each query sees)."""
        keys, values = self.pool.keys[layer_idx], self.pool.values[layer_idx]
        for pool, new in ((keys, key_states), (values, value_states)):
            flat = new.transpose(0, 1).reshape(1, new.shape[1], -1, new.shape[-1])  # [1, Hkv, B0 * Q, D]
            pool.index_copy_(2, self.columns, flat.to(pool.dtype))
        return keys, values


def pool_pages(worst: int, slots: int, page_size: int, token_bytes: int, device: torch.device, *,
               num_blocks: int | None, max_memory_percent: float | None, held_pages: int,
               whole: bool = False, typical: int | None = None) -> tuple[int, int]:
    """The pages of a call's pool (the scratch page included), and the most it may hold: a
    request needs up to ``worst`` pages, ``slots`` run at once. The limit is ``num_blocks``
    pages, else ``max_memory_percent`` of the free memory (counting the ``held_pages`` of the
    pool held now); never more than every slot's worst case needs (``typical``, where a request's
    tree has no bounded size: what one is given), unless ``whole``: the limit."""
    page_bytes = page_size * token_bytes
    if num_blocks is not None:
        budget, source = num_blocks - 1, f"num_blocks={num_blocks}"
    else:
        fraction = max_memory_percent or (0.9 if device.type == "cuda" else 0.5)
        budget = int(fraction * (free_memory(device) + held_pages * page_bytes)) // page_bytes
        source = f"max_memory_percent={fraction} of the free memory"
    if worst > budget:
        raise ValueError(
            f"a request needs up to {worst} KV pages of {page_size} tokens ({worst * page_bytes / 2**20:.1f} MiB: "
            f"its prompt, paths and summary at their longest), but the pool holds {budget} ({source}): raise "
            "num_blocks or max_memory_percent, or lower max_new_tokens or num_paths"
        )
    return (budget if whole else min(budget, slots * (typical or worst))) + 1, budget + 1


def free_memory(device: torch.device) -> int:
    """Bytes free for the KV pool: the device's free memory on CUDA, the system's available
    memory elsewhere."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
