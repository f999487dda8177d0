"""A preallocated KV cache with one row per slot, in which the paths of a request share its row.

Row s holds the request running in slot s, column by column: its prompt, then its paths
interleaved step by step (column ``Lp + t * P + (k - 1)`` is token t of path k), then its summary.
The summary attends to the paths' KV in place: no copy and no recomputation. The last column of
every row is a scratch column that absorbs the writes of padding queries (an idle slot, a path
that is done, the unused queries of a summary row); it is never read.

Besides K and V, each column records its block (protocol.PROMPT_BLOCK, path index or
protocol.SUMMARY_BLOCK) and whether it holds a real token; the attention mask is derived from
these on the device. A forward reads the first ``key_len`` columns of its rows: the scheduler
picks that length from a few buckets, so a compiled step sees few shapes.

A forward's queries come either as a rectangle ``[rows, Q]`` (static shapes: the compiled step,
the prefills) or, in a ragged step, as one flat ``[1, N]`` list of real tokens whose rows are
given per token (attention then runs row by row: see ``attention.per_row_sdpa``).
"""

from __future__ import annotations

import torch

from ..protocol import additive_mask, may_attend


class SlotKVCache:
    """Duck-types the part of transformers' ``Cache`` that attention layers call: ``update``."""

    def __init__(self, model, num_slots: int, capacity: int, device: torch.device, dtype: torch.dtype):
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (num_slots, config.num_key_value_heads, capacity + 1, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.block = torch.zeros(num_slots, capacity + 1, dtype=torch.long, device=device)
        self.valid = torch.zeros(num_slots, capacity + 1, dtype=torch.bool, device=device)
        self.capacity = capacity
        self.scratch = capacity
        self.slots = torch.arange(num_slots, device=device)
        # the forward in flight (set by write)
        self._rows: slice = slice(None)
        self._query_rows = self._columns = self._query_blocks = None
        self._ragged = False
        self.key_len = 0

    def mark_static(self) -> None:
        """Fixed addresses for CUDA graphs (as transformers' StaticCache does)."""
        for t in [*self.keys, *self.values, self.block, self.valid]:
            torch._dynamo.mark_static_address(t)

    def clear(self, slot: int) -> None:
        """Forget the row's previous request before a new one is prefilled into it."""
        self.valid[slot] = False

    def write(self, rows: slice, columns: torch.Tensor, blocks: torch.Tensor, valid: torch.Tensor, key_len: int,
              query_rows: torch.Tensor | None = None) -> None:
        """Record the tokens about to be forwarded into ``columns`` ([B, Q]) of ``rows``, which
        then attend to their first ``key_len`` columns. ``query_rows`` ([1, N], a ragged step):
        the row of each token, ``rows`` then being all of them."""
        self._ragged = query_rows is not None
        self._query_rows = query_rows if self._ragged else self.slots[rows][:, None].expand_as(columns)
        self.block[self._query_rows, columns] = blocks
        self.valid[self._query_rows, columns] = valid
        self._rows, self._columns, self._query_blocks, self.key_len = rows, columns, blocks, key_len

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive [B, 1, Q, key_len] mask of the forward in flight: real keys, not after the
        query in the row, allowed by the two-phase rule."""
        n = self.key_len
        columns = torch.arange(n, device=self.block.device)
        # the keys' metadata: [B, 1, K] per row of a rectangle, [1, N, K] per token of a ragged step
        key_rows = self._query_rows if self._ragged else self.slots[self._rows][:, None]
        key_block = self.block[key_rows[..., None], columns]
        key_valid = self.valid[key_rows[..., None], columns]
        causal = columns <= self._columns[:, :, None]
        allowed = key_valid & causal & may_attend(self._query_blocks[:, :, None], key_block)
        # Column 0 (the prompt's first token) is visible to every real query anyway; opening it
        # to padding queries keeps their softmax finite (an all-masked row gives NaN).
        allowed = allowed | (columns == 0)
        return additive_mask(allowed, dtype)[:, None]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write this forward's K/V (already rotated, thought embedding included) into its columns
        and return the rows' first ``key_len`` columns."""
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[self._query_rows, :, self._columns] = key_states.transpose(1, 2).to(k.dtype)
        v[self._query_rows, :, self._columns] = value_states.transpose(1, 2).to(v.dtype)
        return k[self._rows, :, : self.key_len], v[self._rows, :, : self.key_len]
