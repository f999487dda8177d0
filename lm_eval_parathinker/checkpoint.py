"""Loading a checkpoint for ParaThinker: control tokens, thought-embedding tables, adapters.

The lm-eval model loads the weights with HFLM, then :func:`add_parathinker_parts` gives them what
ParaThinker decoding needs: the tokenizer's tokens fitted into the embeddings, the control tokens
(added, the embeddings resized only if needed), and the thought embeddings (a checkpoint's or an
adapter's trained tables, else zero tables: training-free ParaThinker). A PEFT adapter is applied
after, so its trained token rows land on the ids it was trained with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from . import protocol
from .thought_embedding import (
    add_control_tokens,
    attach_thought_embeddings,
    load_thought_embeddings,
    local_dir,
    read_thought_embeddings,
)

logger = logging.getLogger(__name__)

#: file of a PEFT adapter directory that holds the trained thought embeddings (official key names)
ADAPTER_TABLES_FILE = "thought_embeddings.safetensors"


def looks_like_local_path(name: str) -> bool:
    """Paths (not hub ids): absolute, relative with ./ ../ ~, or more than one '/'."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def check_checkpoint_arg(arg: str, value: str | None) -> None:
    """Fail early, naming the model arg, when a local checkpoint path does not exist."""
    if value is None or Path(value).expanduser().exists() or not looks_like_local_path(value):
        return
    raise ValueError(f"{arg}={value}: no such checkpoint directory")


def adapter_tokenizer(peft: str | None, revision: str | None) -> str | None:
    """The folder of an adapter that carries its own tokenizer (a trained one has the control tokens)."""
    adapter = local_dir(peft, revision, ["*.json", "*.txt", "*.model"]) if peft is not None else None
    return str(adapter) if adapter is not None and (adapter / "tokenizer_config.json").is_file() else None


def has_control_tokens(tokenizer) -> bool:
    """The tokenizer has ``<think1>``..``<thinkK>`` (K >= 1, their closers) and the summary pair."""
    vocab = tokenizer.get_vocab()
    return all(t in vocab for t in protocol.control_tokens(max(protocol.num_control_paths(tokenizer), 1)))


@dataclass(frozen=True)
class ParaThinkerParts:
    """What :func:`add_parathinker_parts` did to a model."""

    control_tokens_added: list[str]
    baseline_banned: list[int]  # rows created for the added control tokens: the baselines never sample them
    tables_source: str | None  # the folder the trained thought embeddings came from (None: none)

    @property
    def training_free(self) -> bool:
        return bool(self.control_tokens_added) or self.tables_source is None


def add_parathinker_parts(model, tokenizer, pretrained: str, revision: str, peft: str | None,
                          parathinker: bool) -> ParaThinkerParts:
    """Fit the embeddings to ``tokenizer``, add the control tokens (``parathinker``, or when the
    tokenizer has them) and load or attach the thought embeddings (see the module docstring).

    A tokenizer with control tokens keeps the ones it has (they set the limit on ``num_paths``); a
    plain one (training-free mode) gets the released checkpoint's ``<think1>``..``<think8>``."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))  # the tokenizer's own tokens first, as for the checkpoint alone
    rows = model.get_input_embeddings().weight.shape[0]
    paths = protocol.num_control_paths(tokenizer) or protocol.DEFAULT_NUM_CONTROL_PATHS
    added = add_control_tokens(model, tokenizer, paths) if parathinker or has_control_tokens(tokenizer) else []
    # The checkpoint alone has no such tokens, so the baselines never sample the rows created for
    # them (their other rows' logits are untouched).
    banned = [i for i in tokenizer.convert_tokens_to_ids(added) if i >= rows]
    source = _tables_dir(pretrained, revision, peft)
    has_tables = source is not None and bool(read_thought_embeddings(source))
    if has_tables:
        load_thought_embeddings(model, source)
    elif parathinker:
        attach_thought_embeddings(model, getattr(model.config, "max_segments", protocol.DEFAULT_MAX_SEGMENTS))
    if parathinker and (added or not has_tables):
        missing = (["control tokens"] if added else []) + ([] if has_tables else ["thought embeddings"])
        logger.warning(
            "%s has no trained ParaThinker %s: running training-free ParaThinker (control tokens "
            "added, zero thought embeddings). Results are NOT those of a trained ParaThinker model.",
            peft or pretrained,
            " or ".join(missing),
        )
    return ParaThinkerParts(added, banned, str(source) if has_tables else None)


def _tables_dir(pretrained: str, revision: str, peft: str | None) -> Path | None:
    """The adapter dir when it holds thought embeddings, else the checkpoint dir."""
    adapter = local_dir(peft, revision, [ADAPTER_TABLES_FILE]) if peft else None
    if adapter is not None and (adapter / ADAPTER_TABLES_FILE).is_file():
        return adapter
    return local_dir(pretrained, revision, ["*.json", "*.safetensors"])
