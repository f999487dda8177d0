"""The engine's attention kernel for sdpa models: GQA without copying K/V to every query head.

transformers' sdpa path copies K/V to every query head (``repeat_kv``) whenever a mask is given,
which the engine does at every decode step, over the whole used cache row. Here the query heads
that share a KV head are folded into the query axis instead, and SDPA runs on the cache's KV heads
as they are. Long queries (prefill, reprefill) keep transformers' path.
"""

from __future__ import annotations

import contextlib

import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PACKED_SDPA = "parathinker_packed_sdpa"
PACKED_MAX_QUERIES = 256  # beyond (prefill, reprefill), the mask copied per KV group would cost more than repeat_kv


def packed_gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA on the cache's K/V heads as they are: the query heads sharing a KV head are folded
    into the query axis. (transformers' sdpa path copies K/V to every query head with
    ``repeat_kv`` whenever a mask is given, i.e. at every engine step, over the whole row.)
    Used for decode-sized queries (the engine always passes its [B, 1, Q, K] mask); longer ones
    go to transformers' sdpa."""
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
