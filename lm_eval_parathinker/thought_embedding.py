"""Thought embeddings T(i) on stock transformers models, and the official checkpoint format.

Each attention layer gets ``self_attn.seg_embeddings = nn.Embedding(max_segments, head_dim)``
(the official parameter name, so ``save_pretrained`` writes
``model.layers.{i}.self_attn.seg_embeddings.weight`` and the released checkpoint loads
unchanged). Forward hooks add T(segment) to the keys (output of ``k_norm`` where the model has
one, else of ``k_proj``) and to the values (output of ``v_proj``): after the projections,
before RoPE, queries untouched, one vector shared by every KV head. The segment ids travel as
the ``segment_ids`` keyword of the model's forward, which transformers passes down to every
attention module (so gradient checkpointing's recomputation sees them too); without it every
token is segment 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .protocol import DEFAULT_MAX_SEGMENTS, DEFAULT_NUM_CONTROL_PATHS, PAD, control_tokens
from .upstream import transformers as upstream_transformers

logger = logging.getLogger(__name__)

TABLE_NAME = "seg_embeddings"
_TABLE_KEY = re.compile(r"layers\.(\d+)\.self_attn\.seg_embeddings\.weight$")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    found = [
        m
        for name, m in model.named_modules()
        if name.endswith("self_attn") and hasattr(m, "k_proj") and hasattr(m, "v_proj")
    ]
    if not found:
        raise ValueError(f"{type(model).__name__} has no `self_attn` modules with k_proj/v_proj")
    return found


def _remember_segments(attn: nn.Module, args, kwargs) -> None:
    attn._parathinker_segment_ids = kwargs.get("segment_ids")


def _thought_vectors(attn: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """T(segment) for every token of the current forward: [B, L, head_dim] (or [1, 1, head_dim])."""
    table: nn.Embedding = getattr(attn, TABLE_NAME)
    seg = getattr(attn, "_parathinker_segment_ids", None)
    if seg is None:
        return table.weight[0].to(like.dtype)[None, None]
    return table(seg.to(table.weight.device)).to(like.dtype)


def _add_to_heads(attn: nn.Module, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    t = _thought_vectors(attn, output)
    if output.dim() == 4:  # k_norm output: [B, L, H_kv, D]
        return output + t.unsqueeze(2)
    shape = output.shape  # projection output: [B, L, H_kv * D]
    return (output.view(*shape[:-1], -1, t.shape[-1]) + t.unsqueeze(-2)).view(shape)


def attach_thought_embeddings(model: nn.Module, max_segments: int = DEFAULT_MAX_SEGMENTS) -> None:
    """Give every attention layer a zero-initialised thought-embedding table and its hooks.

    Idempotent. Zero tables make the model compute exactly what the stock model computes
    (training-free mode); load or train the tables afterwards.
    """
    for attn in attention_modules(model):
        if hasattr(attn, TABLE_NAME):
            continue
        weight = attn.k_proj.weight
        table = nn.Embedding(max_segments, attn.head_dim, device=weight.device, dtype=weight.dtype)
        nn.init.zeros_(table.weight)
        attn.add_module(TABLE_NAME, table)
        attn.register_forward_pre_hook(_remember_segments, with_kwargs=True)
        key_out = attn.k_norm if hasattr(attn, "k_norm") else attn.k_proj
        key_out.register_forward_hook(partial(_add_to_heads, attn))
        attn.v_proj.register_forward_hook(partial(_add_to_heads, attn))
    model.config.max_segments = max_segments


def thought_embedding_tables(model: nn.Module) -> list[nn.Embedding]:
    """The per-layer tables, in layer order (empty if none are attached)."""
    return [getattr(a, TABLE_NAME) for a in attention_modules(model) if hasattr(a, TABLE_NAME)]


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    return sorted(path.glob("*.safetensors"))


def local_dir(name: str | None, revision: str | None, patterns: list[str]) -> Path | None:
    """``name`` as a local directory: itself, or its hub snapshot (files matching ``patterns``)."""
    if name is None:
        return None
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline without a cached snapshot, or not a hub repo
        logger.warning("Could not resolve %s to a local directory: %s", name, e)
        return None


def read_thought_embeddings(path: str | Path) -> dict[int, torch.Tensor]:
    """Layer index -> table, read from the safetensors files of a checkpoint directory."""
    from safetensors import safe_open

    tables: dict[int, torch.Tensor] = {}
    for file in _checkpoint_files(Path(path)):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if match := _TABLE_KEY.search(key):
                    tables[int(match.group(1))] = f.get_tensor(key)
    return tables


def load_thought_embeddings(model: nn.Module, path: str | Path | None) -> bool:
    """Attach thought embeddings to ``model`` and fill them from checkpoint ``path``.

    Returns True when the checkpoint had them. Without them the tables stay zero
    (training-free mode) and one warning says so.
    """
    folder = local_dir(str(path), None, ["*.json", "*.safetensors"]) if path is not None else None
    tables = read_thought_embeddings(folder) if folder is not None else {}
    max_segments = next(iter(tables.values())).shape[0] if tables else getattr(
        model.config, "max_segments", DEFAULT_MAX_SEGMENTS
    )
    attach_thought_embeddings(model, max_segments)
    if not tables:
        logger.warning(
            "No thought embeddings (seg_embeddings) in %s: using zero tables (training-free "
            "mode). Results are not those of a trained ParaThinker model.",
            path,
        )
        return False
    layers = thought_embedding_tables(model)
    if sorted(tables) != list(range(len(layers))):
        raise ValueError(
            f"{path}: thought embeddings for layers {sorted(tables)} do not match the model's "
            f"{len(layers)} layers"
        )
    with torch.no_grad():
        for i, table in enumerate(layers):
            table.weight.copy_(tables[i].to(table.weight.dtype))
    return True


def add_control_tokens(
    model: nn.Module, tokenizer, num_control_paths: int = DEFAULT_NUM_CONTROL_PATHS, pad: bool = False
) -> list[str]:
    """Add the control tokens the tokenizer lacks, in the official order; returns those added.
    ``pad`` also adds the released tokenizer's ``<vllm_pad>`` after them (the ``official`` layout).

    The embedding matrix is resized only when the tokenizer outgrows it (as the official recipe:
    Qwen's padded rows already hold the new ids).
    """
    vocab = tokenizer.get_vocab()
    new = [t for t in control_tokens(num_control_paths) + ([PAD] if pad else []) if t not in vocab]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    return new


def quiet_unexpected_tables() -> contextlib.AbstractContextManager[None]:
    """While loading with ``from_pretrained``, don't report the tables as unexpected weights:
    :func:`load_thought_embeddings` reads them right after."""
    return upstream_transformers.unexpected_keys_ignored(TABLE_NAME)


def load_parathinker_model(path: str | Path, **from_pretrained_kwargs):
    """``AutoModelForCausalLM.from_pretrained`` plus the checkpoint's thought embeddings."""
    from transformers import AutoModelForCausalLM

    with quiet_unexpected_tables():
        model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    load_thought_embeddings(model, path)
    return model
