"""Tiny random models and a word-level tokenizer, built from a config (no hub), for fast tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer, Tokenizer, processors
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config

from lm_eval_parathinker import formats, protocol
from lm_eval_parathinker.thought_embedding import add_control_tokens, attach_thought_embeddings, thought_embedding_tables

#: the offline benchmark data: $PARATHINKER_DATA_DIR, else shared/data beside the checkout
DATA_DIR = Path(os.environ.get("PARATHINKER_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")

SPECIAL = ["<pad>", "<eos>", protocol.THINK_OPEN, protocol.THINK_CLOSE]
# Byte-level BPE (lossless on any text; transformers rebuilds Qwen checkpoints' tokenizers as
# byte-level BPE, so a word-level one would not survive save/load).
CORPUS = [
    protocol.SUMMARY_TEMPLATE,
    "Find the number of ways. Let x be the answer, so x = 3 + 4 and \\boxed{7}.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
CONFIGS = {"qwen2": Qwen2Config, "llama": LlamaConfig, "qwen3": Qwen3Config}
VOCAB_SIZE = 320  # room for the 18 control tokens without resizing


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=290, min_frequency=1, special_tokens=SPECIAL, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe.to_str()), eos_token="<eos>",
                                  pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_official_tokenizer() -> PreTrainedTokenizerFast:
    """Shaped like the released checkpoint's tokenizer: it adds a BOS to every text, knows the
    official prompt's role tokens (so build_prompt gives the official template), then the control
    tokens and ``<vllm_pad>`` in the official order (add them with ``add_control_tokens(pad=True)``)."""
    tok = tiny_tokenizer()
    tok.add_tokens(["<bos>", protocol.OFFICIAL_USER, protocol.OFFICIAL_ASSISTANT], special_tokens=True)
    tok.bos_token = "<bos>"
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    return tok


def tiny_model(arch: str = "qwen2", seed: int = 0, max_position_embeddings: int = 4096,
               vocab_size: int = VOCAB_SIZE) -> torch.nn.Module:
    config = CONFIGS[arch](
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=1,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def tiny_parathinker(arch: str = "qwen2", seed: int = 0, table_std: float = 0.5, official: bool = False,
                     max_position_embeddings: int = 4096,
                     num_control_paths: int = protocol.DEFAULT_NUM_CONTROL_PATHS):
    """(model, tokenizer) with the control tokens for ``num_control_paths`` paths and random
    (non-zero) thought embeddings; ``official``: the released checkpoint's tokenizer shape (BOS,
    role tokens, ``<vllm_pad>``)."""
    model = tiny_model(arch, seed, max_position_embeddings)
    tok = tiny_official_tokenizer() if official else tiny_tokenizer()
    add_control_tokens(model, tok, num_control_paths, pad=official)
    attach_thought_embeddings(model)
    torch.manual_seed(seed + 1)
    for table in thought_embedding_tables(model):
        torch.nn.init.normal_(table.weight, std=table_std)
    return model, tok


def save_tiny_checkpoint(path: str | Path, arch: str = "qwen2", parathinker: bool = True, official: bool = False,
                         exact_vocab: bool = False, num_control_paths: int = protocol.DEFAULT_NUM_CONTROL_PATHS) -> Path:
    """A tiny checkpoint directory: official ParaThinker format (``official``: with the released
    tokenizer's shape; ``num_control_paths``: its control tokens), or a plain model + tokenizer
    (``exact_vocab``: one embedding row per token, so adding the control tokens grows the embeddings)."""
    if parathinker:
        model, tok = tiny_parathinker(arch, official=official, num_control_paths=num_control_paths)
    else:
        tok = tiny_tokenizer()
        model = tiny_model(arch, vocab_size=len(tok) if exact_vocab else VOCAB_SIZE)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def tiny_format_model(name: str, arch: str = "qwen2", seed: int = 0, eager: float = 0.0):
    """(model, tokenizer) of a forking format's checkpoint: the format's tags as special tokens, no
    ParaThinker parts. ``eager`` > 0 makes the model write the format's tags (and digits and
    colons, which outlines need) often: every token's residual stream carries a constant
    dimension, which the tags' output rows read with weight ``eager``."""
    fmt = formats.get_format(name)
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(fmt.tokens)})
    model = tiny_model(arch, seed)
    if eager:
        # what opens and counts a fork (its outline's tag, a number, a colon), then what closes paths
        items = [t for t in fmt.tokens if fmt.outline_pattern and t in fmt.outline_pattern]  # <Outline>, <plan>
        texts = [fmt.trigger] if fmt.outline_open is None else [fmt.outline_open, *items, fmt.trigger, "1", ":"]
        ids = [tok(t, add_special_tokens=False)["input_ids"][0] for t in texts]
        with torch.no_grad():
            model.get_input_embeddings().weight[:, 0] = 1.0
            model.get_output_embeddings().weight[ids, 0] = eager
            model.get_output_embeddings().weight[tok.convert_tokens_to_ids(fmt.path_close), 0] = eager * 0.8
    return model, tok


def save_tiny_format_checkpoint(path: str | Path, name: str, eager: float = 0.0) -> Path:
    """A tiny checkpoint directory of a forking format (:func:`tiny_format_model`)."""
    model, tok = tiny_format_model(name, eager=eager)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)
