"""The engine's attention kernel for sdpa models: GQA without copying K/V to every query head.

transformers' sdpa path copies K/V to every query head (``repeat_kv``) whenever a mask is given,
which the engine does at every decode step, over the whole used cache row. Here the query heads
that share a KV head are folded into the query axis instead, and SDPA runs on the cache's KV heads
as they are. Long queries (prefill, reprefill) keep transformers' path.

A ragged step (the scheduler's eager CPU steps: only the real tokens of all slots, ``[1, N]``)
passes ``row_spans``: its tokens come grouped by cache row, and attention runs row by row on
views of the rows, so no padding query is computed and no KV is copied.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PACKED_SDPA = "parathinker_packed_sdpa"
PACKED_MAX_QUERIES = 256  # beyond (prefill, reprefill), the mask copied per KV group would cost more than repeat_kv


def packed_gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, row_spans=None,
                    **kwargs):
    """SDPA on the cache's K/V heads as they are: the query heads sharing a KV head are folded
    into the query axis. (transformers' sdpa path copies K/V to every query head with
    ``repeat_kv`` whenever a mask is given, i.e. at every engine step, over the whole row.)
    Used for decode-sized queries (the engine always passes its [B, 1, Q, K] mask); longer ones
    go to transformers' sdpa. ``row_spans``: see :func:`per_row_sdpa`."""
    if row_spans is not None:
        return per_row_sdpa(module, query, key, value, attention_mask, row_spans, dropout, scaling, **kwargs)
    B, H, Q, D = query.shape
    kv_heads = key.shape[1]
    groups = H // kv_heads
    if Q > PACKED_MAX_QUERIES or groups == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    mask = attention_mask[:, :, None].expand(B, attention_mask.shape[1], groups, Q, attention_mask.shape[-1])
    out = F.scaled_dot_product_attention(
        query.reshape(B, kv_heads, groups * Q, D), key, value,
        attn_mask=mask.reshape(B, attention_mask.shape[1], groups * Q, -1), scale=scaling,
    )
    return out.reshape(B, H, Q, D).transpose(1, 2).contiguous(), None


def per_row_sdpa(module, query, key, value, attention_mask, row_spans, dropout=0.0, scaling=None, **kwargs):
    """A ragged step: ``query`` [1, H, N, D] holds the tokens of several cache rows; each
    ``(row, rows, start, end)`` of ``row_spans`` says that tokens ``start:end`` are ``rows``
    consecutive rows from ``row`` on, as many tokens each. ``key``/``value`` are every row's
    [S, Hkv, K, D], ``attention_mask`` [1, 1, N, K]. Each span attends on views of its rows."""
    outputs = []
    for row, rows, start, end in row_spans:
        q = query[0, :, start:end].unflatten(1, (rows, -1)).transpose(0, 1)  # [rows, H, n, D]
        mask = attention_mask[0, :, start:end].unflatten(1, (rows, -1)).transpose(0, 1)
        out, _ = packed_gqa_sdpa(module, q, key[row : row + rows], value[row : row + rows], mask, dropout, scaling,
                                 **kwargs)
        outputs.append(out.flatten(0, 1)[None])  # [1, rows * n, H, D]
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(PACKED_SDPA, packed_gqa_sdpa)


@contextlib.contextmanager
def packed_attention(model):
    """Run an sdpa model with :func:`packed_gqa_sdpa` (other implementations are left as they are)."""
    config = model.config
    before = config._attn_implementation
    if before == "sdpa":
        config._attn_implementation = PACKED_SDPA
    try:
        yield
    finally:
        config._attn_implementation = before
