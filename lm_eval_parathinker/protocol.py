"""The ParaThinker protocol: the one source of truth that the engine and training both import.

A ParaThinker sequence is

    prompt | <think1> path 1 </think1> | ... | <thinkP> path P </thinkP> | <summary> ... </summary>

* control tokens: ``<think1>``..``<thinkN>``, ``</think1>``..``</thinkN>``, ``<summary>``,
  ``</summary>`` in the official order (open/close interleaved, then the summary pair), so that
  added to a DeepSeek-R1-Distill-Qwen tokenizer they get the official ids 151665..151682;
* blocks: every token belongs to the prompt (block 0), to a path (block = its control index k)
  or to the summary (block ``SUMMARY_BLOCK``);
* segment ids (which thought embedding T(i) is added): prompt 0, path k -> k, summary 0;
* positions: prompt 0..Lp-1, token j of every path at Lp+j (all paths overlap), summary token s
  at Lp + max_k(len_k) + s;
* attention: causal, plus the two-phase rule of :func:`may_attend`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_NUM_CONTROL_PATHS = 8
DEFAULT_MAX_SEGMENTS = 32

SUMMARY_OPEN = "<summary>"
SUMMARY_CLOSE = "</summary>"
# The base reasoning model's own think tokens: a stray control token sampled inside a path is
# replaced by THINK_OPEN, as the official engine does; THINK_CLOSE ends a path like EOS does.
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# Force-fed at the start of the summary stage (official vLLM example, byte for byte).
SUMMARY_TEMPLATE = (
    "<summary>By analyzing multiple reasoning processes above, I concluded that: The final answer is"
)

# The official instruction, byte for byte: the source string uses line continuations inside a
# triple-quoted string (hence the runs of five spaces) and a doubled backslash before boxed.
INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue     and then summarize "
    "the reasoning process to get the final answer. The summary process MUST BE enclosed     "
    "within <summary> </summary> tags. The final answer MUST BE put in \\\\boxed{}."
)
OFFICIAL_USER = "<｜User｜>"
OFFICIAL_ASSISTANT = "<｜Assistant｜>"

PROMPT_BLOCK = 0
SUMMARY_BLOCK = -1


def think_open(k: int) -> str:
    """The token that opens path ``k`` (1-based)."""
    return f"<think{k}>"


def think_close(k: int) -> str:
    """The token that closes path ``k`` (1-based)."""
    return f"</think{k}>"


def control_tokens(num_control_paths: int = DEFAULT_NUM_CONTROL_PATHS) -> list[str]:
    """All control tokens in the official order: <think1>, </think1>, ..., <summary>, </summary>."""
    tokens = []
    for k in range(1, num_control_paths + 1):
        tokens += [think_open(k), think_close(k)]
    return tokens + [SUMMARY_OPEN, SUMMARY_CLOSE]


def is_official_tokenizer(tokenizer) -> bool:
    """True for DeepSeek-R1-Distill style tokenizers, whose prompt format the official model uses."""
    vocab = tokenizer.get_vocab()
    return OFFICIAL_USER in vocab and OFFICIAL_ASSISTANT in vocab


def build_prompt(question: str, tokenizer=None) -> str:
    """The ParaThinker prompt for ``question``.

    Official (DeepSeek-R1-Distill) tokenizers, or no tokenizer: the official template byte for
    byte. Other models: their chat template around the same instruction (plain text when the
    tokenizer has no chat template).
    """
    if tokenizer is None or is_official_tokenizer(tokenizer):
        return f"{OFFICIAL_USER}{question} {INSTRUCTION}{OFFICIAL_ASSISTANT}{THINK_OPEN}"
    content = f"{question} {INSTRUCTION}"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return content + "\n"


@dataclass(frozen=True)
class ControlTokenIds:
    """Token ids of the protocol in one tokenizer."""

    think_open: tuple[int, ...]  # index k-1 -> <think k>
    think_close: tuple[int, ...]
    summary_open: int
    summary_close: int
    think: int | None  # base model's <think>, if it has one
    think_end: int | None  # base model's </think>, if it has one

    @classmethod
    def from_tokenizer(cls, tokenizer, num_control_paths: int = DEFAULT_NUM_CONTROL_PATHS) -> ControlTokenIds:
        vocab = tokenizer.get_vocab()
        missing = [t for t in control_tokens(num_control_paths) if t not in vocab]
        if missing:
            raise ValueError(
                f"tokenizer lacks the ParaThinker control tokens {missing}; call "
                "lm_eval_parathinker.thought_embedding.add_control_tokens(model, tokenizer) first"
            )
        return cls(
            think_open=tuple(vocab[think_open(k)] for k in range(1, num_control_paths + 1)),
            think_close=tuple(vocab[think_close(k)] for k in range(1, num_control_paths + 1)),
            summary_open=vocab[SUMMARY_OPEN],
            summary_close=vocab[SUMMARY_CLOSE],
            think=vocab.get(THINK_OPEN),
            think_end=vocab.get(THINK_CLOSE),
        )

    @property
    def num_control_paths(self) -> int:
        return len(self.think_open)

    def stray_in_path(self) -> list[int]:
        """Tokens a path must not emit: another path's opener or the summary opener."""
        return [*self.think_open, self.summary_open]

    def path_enders(self, eos_ids: Sequence[int]) -> list[int]:
        """Tokens that end a path (each is rewritten to that path's own </think k>)."""
        enders = [*self.think_close, self.summary_close, *eos_ids]
        return enders + ([self.think_end] if self.think_end is not None else [])


def may_attend(query_block: torch.Tensor, key_block: torch.Tensor) -> torch.Tensor:
    """The two-phase rule (causality and padding are the caller's): every block sees the prompt
    and itself; the summary sees everything."""
    return (query_block == key_block) | (key_block == PROMPT_BLOCK) | (query_block == SUMMARY_BLOCK)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive float mask that eager and sdpa attention both take."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def segment_id(block: torch.Tensor, thought_embedding: bool = True) -> torch.Tensor:
    """Thought-embedding index of each token: prompt and summary 0, path k -> k."""
    if not thought_embedding:
        return torch.zeros_like(block)
    return block.clamp(min=0)


def path_offsets(path_lens: Sequence[int], flattened: bool = False, stride: int | None = None) -> list[int]:
    """Position offset of each path's first token relative to the end of the prompt.

    Aligned (ParaThinker): every path starts at the same position. ``flattened`` (the paper's
    ablation): paths follow each other, ``stride`` apart when given (the engine uses its per-path
    budget because lengths are unknown up front), else back to back.
    """
    if not flattened:
        return [0] * len(path_lens)
    offsets, acc = [], 0
    for n in path_lens:
        offsets.append(acc)
        acc += stride if stride is not None else n
    return offsets


def summary_offset(path_lens: Sequence[int], flattened: bool = False, stride: int | None = None) -> int:
    """Position offset (relative to the end of the prompt) of the summary's first token."""
    if not path_lens:
        return 0
    if not flattened:
        return max(path_lens)
    return path_offsets(path_lens, True, stride)[-1] + (stride if stride is not None else path_lens[-1])


@dataclass(frozen=True)
class SequenceLayout:
    """Per-token block, segment and position ids of one packed ParaThinker sequence."""

    block_ids: torch.Tensor  # [L]
    segment_ids: torch.Tensor  # [L]
    position_ids: torch.Tensor  # [L]

    def attention_mask(self) -> torch.Tensor:
        """[L, L] bool: causal over the packed order, plus :func:`may_attend`."""
        n = self.block_ids.numel()
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        return causal & may_attend(self.block_ids[:, None], self.block_ids[None, :])


def sequence_layout(
    prompt_len: int,
    path_lens: Sequence[int],
    summary_len: int,
    *,
    path_indices: Sequence[int] | None = None,
    thought_embedding: bool = True,
    flattened: bool = False,
    path_stride: int | None = None,
) -> SequenceLayout:
    """Layout of ``prompt | path 1 | ... | path P | summary`` packed in one row.

    ``path_indices`` are the control indices of the paths in packed order (default 1..P; the
    training extrapolation trick renames some of them). ``flattened`` positions put path i at
    ``Lp + (i-1) * path_stride`` (back to back when no stride is given); the engine uses its
    per-path budget as the stride.
    """
    indices = list(path_indices) if path_indices is not None else list(range(1, len(path_lens) + 1))
    if len(indices) != len(path_lens):
        raise ValueError(f"path_indices has {len(indices)} entries for {len(path_lens)} paths")
    blocks = [torch.full((prompt_len,), PROMPT_BLOCK)]
    positions = [torch.arange(prompt_len)]
    for k, n, off in zip(indices, path_lens, path_offsets(path_lens, flattened, path_stride)):
        blocks.append(torch.full((n,), k))
        positions.append(prompt_len + off + torch.arange(n))
    blocks.append(torch.full((summary_len,), SUMMARY_BLOCK))
    positions.append(prompt_len + summary_offset(path_lens, flattened, path_stride) + torch.arange(summary_len))
    block_ids = torch.cat(blocks).long()
    return SequenceLayout(
        block_ids=block_ids,
        segment_ids=segment_id(block_ids, thought_embedding),
        position_ids=torch.cat(positions).long(),
    )
