"""A preallocated KV cache in which the paths of a prompt share one row.

Row b holds, column by column: the (left-padded) prompt, then the paths interleaved step by
step (column ``prompt_cols + t * P + (k - 1)`` is token t of path k), then the summary. The
paths' KV is therefore already "concatenated" when the think stage ends: the summary attends to
it in place, with no copy and no recomputation. Every column in use is a prefix of the row, so
attention runs on a view ``[:, :, :length]`` of the buffers, never on the whole allocation.

Besides K and V, each column records its token, block (protocol.PROMPT_BLOCK, path index or
protocol.SUMMARY_BLOCK), position and whether it is real (prompt padding and the tokens a row
keeps producing after its think stage ended are not). The attention mask is derived from these.
"""

from __future__ import annotations

import torch

from .protocol import additive_mask, may_attend


class ParallelKVCache:
    """Duck-types the part of transformers' ``Cache`` that attention layers call: ``update``."""

    def __init__(self, model, batch_size: int, capacity: int, device: torch.device, dtype: torch.dtype):
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (batch_size, config.num_key_value_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        meta = (batch_size, capacity)
        self.token = torch.zeros(meta, dtype=torch.long, device=device)
        self.block = torch.zeros(meta, dtype=torch.long, device=device)
        self.position = torch.zeros(meta, dtype=torch.long, device=device)
        self.valid = torch.zeros(meta, dtype=torch.bool, device=device)
        self.capacity = capacity
        self.length = 0  # columns in use: a prefix of the row
        self._columns: torch.Tensor | None = None  # columns written by the forward in flight

    def write(self, columns: torch.Tensor, tokens, blocks, positions, valid) -> None:
        """Record the metadata of the tokens about to be forwarded into ``columns`` ([Q])."""
        self.token[:, columns] = tokens
        self.block[:, columns] = blocks
        self.position[:, columns] = positions
        self.valid[:, columns] = valid
        self.length = max(self.length, int(columns.max()) + 1)
        self._columns = columns

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive [B, 1, Q, length] mask for the queries in the columns just written: real keys,
        not after the query in the row, allowed by the two-phase rule."""
        cols = self._columns
        n = self.length
        key_block = self.block[:, None, :n]
        query_block = self.block[:, cols, None]
        causal = torch.arange(n, device=cols.device)[None, :] <= cols[:, None]
        allowed = self.valid[:, None, :n] & causal[None] & may_attend(query_block, key_block)
        return additive_mask(allowed, dtype)[:, None]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write this forward's K/V (already rotated, thought embedding included) and return the
        columns in use."""
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k.index_copy_(2, self._columns, key_states.to(k.dtype))
        v.index_copy_(2, self._columns, value_states.to(v.dtype))
        return k[:, :, : self.length], v[:, :, : self.length]
