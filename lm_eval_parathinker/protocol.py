"""The ParaThinker protocol: the one source of truth that the engine and training both import.

A ParaThinker sequence is

    prompt | <think1> path 1 </think1> | ... | <thinkP> path P </thinkP> | <summary> ... </summary>

* control tokens: ``<think1>``..``<thinkN>``, ``</think1>``..``</thinkN>``, ``<summary>``,
  ``</summary>`` in the official order (open/close interleaved, then the summary pair), so that
  added to a DeepSeek-R1-Distill-Qwen tokenizer they get the official ids 151665..151682;
* blocks: every token belongs to the prompt (block 0), to a path (block = its control index k)
  or to the summary (block ``SUMMARY_BLOCK``, -1: the summary's one id in the engine and in
  training);
* segment ids (which thought embedding T(i) is added, :func:`segment_id` of the block): prompt 0,
  path k -> k, summary 0 (the row released checkpoints were trained with);
* positions: prompt 0..Lp-1, token j of every path at Lp+j (all paths overlap), summary token s
  at Lp + max_k(len_k) + s;
* attention: causal, plus the two-phase rule of :func:`may_attend`.

Two layouts of that sequence are legitimate (:class:`Compat`): ``paper``, the method as trained
(summary at Lp + max_k len_k), and ``official``, what the released vLLM engine feeds the released
checkpoint (``<vllm_pad>`` padding to whole vLLM KV pages, EOS as an ordinary token, summary at
2 Lp + max_k len_k, YaRN for long budgets; see :data:`OFFICIAL`).
"""

from __future__ import annotations

import functools
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

# The math tasks' doc_to_text (tasks/_parathinker_math_template_yaml; a test keeps the two equal):
# the question that the paper layout wraps in build_prompt, in training as at evaluation.
TASK_QUESTION = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


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


def num_control_paths(tokenizer) -> int:
    """K, the paths a tokenizer's control tokens can open: it has ``<think1>``, ``</think1>``, ...,
    ``<thinkK>``, ``</thinkK>`` (0: a plain tokenizer). The one source of the limit on ``num_paths``."""
    vocab = tokenizer.get_vocab()
    count = 0
    while think_open(count + 1) in vocab and think_close(count + 1) in vocab:
        count += 1
    return count


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


PAD = "<vllm_pad>"  # the released tokenizer's padding token (id 151683, after the control tokens)
COMPAT_CHOICES = ("auto", "paper", "official")


@dataclass(frozen=True)
class Compat:
    """One layout of the protocol: every point where the released engine differs from training.

    ``paper`` is the method as trained; ``official`` reproduces the released vLLM fork (method
    notes section 8.1), whose behaviour the released checkpoint has learned to expect.
    """

    name: str
    pad_to_multiple_of: int | None  # prompt and every path padded with PAD to a multiple of it (vLLM's KV page, its block)
    extra_bos: bool  # vLLM re-tokenizes the example's decoded prompt, which adds a second BOS
    question_alone: bool  # the template gets the problem text alone, not the task's doc_to_text
    eos_ends_path: bool  # official: ignore_eos, EOS is an ordinary token
    summary_after_prompt_twice: bool  # <summary> at 2 Lp + max len_k (vLLM's position offset)
    summary_cap_counts_template: bool  # summary_max_tokens counts from <summary>, template included
    yarn_above: int | None  # per-path budget above which the example enables YaRN
    max_paths: int | None  # the most paths it runs (None: as many as the tokenizer has control tokens)

    def question(self, problem: str) -> str:
        """The question put into :func:`build_prompt` for a benchmark problem."""
        return problem if self.question_alone else TASK_QUESTION.format(problem=problem)

    def padded(self, length: int) -> int:
        """``length`` rounded up to ``pad_to_multiple_of`` (unchanged without one)."""
        return length if self.pad_to_multiple_of is None else -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of

    def prompt_ids(self, text: str, tokenizer) -> list[int]:
        """Token ids of a prompt string, as this layout feeds them to the model.

        paper: as lm-eval's HFLM encodes (the tokenizer's special tokens, unless the text already
        starts with BOS). official: the example's pipeline, ``BOS BOS template PAD...`` with the
        length a multiple of vLLM's KV page size (the second BOS is vLLM's, added when it re-tokenizes
        the decoded prompt).
        """
        bos = tokenizer.bos_token
        ids = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
        if self.pad_to_multiple_of is None:
            return ids
        lead = ids[:1] if self.extra_bos and ids[:1] == [tokenizer.bos_token_id] else []
        ids = lead + ids
        return ids + [tokenizer.convert_tokens_to_ids(PAD)] * (self.padded(len(ids)) - len(ids))

    def check_budget(self, budget: int, name: str) -> None:
        """Refuse a per-path budget (the argument ``name``) that is not a multiple of the padding."""
        if self.pad_to_multiple_of and budget % self.pad_to_multiple_of:
            raise ValueError(f"{name}={budget} (the per-path budget) must be a multiple of {self.pad_to_multiple_of} "
                             f"with compat={self.name} (the released engine asserts it)")

    def summary_position(self, prompt_len: int, path_lens: Sequence[int], flattened: bool = False,
                         stride: int | None = None) -> int:
        """Position of ``<summary>``: Lp + max_k len_k as trained, 2 Lp + max_k len_k in the released engine."""
        gap = prompt_len if self.summary_after_prompt_twice else 0
        return prompt_len + gap + summary_offset(path_lens, flattened, stride)

    def summary_tokens(self, summary_max_tokens: int, template_len: int) -> int:
        """How many tokens the summary may generate after its forced template."""
        return summary_max_tokens - (template_len if self.summary_cap_counts_template else 0)

    def rope_parameters(self, budget: int, rope_theta: float) -> dict | None:
        """The YaRN rope configuration the official example sets for a per-path ``budget`` (None: no
        scaling). No ``attention_factor``: vLLM drops the example's 1.0 and scales cos/sin by
        0.1 ln(factor) + 1, which is also what transformers infers from ``factor``."""
        if self.yarn_above is None or budget <= self.yarn_above:
            return None
        return {
            "rope_type": "yarn",
            "rope_theta": rope_theta,
            "factor": budget / self.yarn_above,
            "original_max_position_embeddings": OFFICIAL_YARN_ORIGINAL_MAX_POSITIONS,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
        }


OFFICIAL_YARN_ORIGINAL_MAX_POSITIONS = 9280  # the example's "max_prompt_len + max_reasoning_path_len + max_summary_len"

PAPER = Compat("paper", pad_to_multiple_of=None, extra_bos=False, question_alone=False, eos_ends_path=True,
               summary_after_prompt_twice=False, summary_cap_counts_template=False,
               yarn_above=None, max_paths=None)
OFFICIAL = Compat("official", pad_to_multiple_of=16, extra_bos=True, question_alone=True, eos_ends_path=False,
                  summary_after_prompt_twice=True, summary_cap_counts_template=True,
                  yarn_above=8192, max_paths=DEFAULT_NUM_CONTROL_PATHS)  # <think1>..<think8>
#: the layouts by name (``auto`` is not one: it is resolved from a tokenizer)
LAYOUTS = {layout.name: layout for layout in (PAPER, OFFICIAL)}


def check_compat_name(compat: str) -> str:
    if compat not in COMPAT_CHOICES:
        raise ValueError(f"compat={compat!r} is not one of {', '.join(COMPAT_CHOICES)}")
    return compat


def resolve_compat(compat: str, tokenizer) -> Compat:
    """``auto``: the released engine's layout when the tokenizer has PAD (the released checkpoint's
    does), the training layout otherwise. ``official`` needs PAD and the control tokens."""
    check_compat_name(compat)
    vocab = tokenizer.get_vocab()
    if compat == "auto":
        return OFFICIAL if PAD in vocab else PAPER
    if compat == "paper":
        return PAPER
    missing = [t for t in [*control_tokens(), PAD] if t not in vocab]
    if missing:
        raise ValueError(
            f"compat=official needs the released checkpoint's tokenizer, but this one lacks {missing} "
            "(use compat=paper, or a checkpoint trained with training.sft --compat official)"
        )
    return OFFICIAL


def check_num_paths(num_paths: int, tokenizer, layout: Compat) -> None:
    """Refuse more paths than there are control tokens to open them: the tokenizer's
    ``<think1>``..``<thinkK>`` (a plain tokenizer: the released 8 that training-free mode adds,
    :func:`lm_eval_parathinker.checkpoint.add_parathinker_parts`), and no more than the released
    engine's 8 with ``compat=official``."""
    if layout.max_paths is not None and num_paths > layout.max_paths:
        raise ValueError(f"num_paths={num_paths} is beyond the released engine's {layout.max_paths} paths "
                         f"({think_open(1)}..{think_open(layout.max_paths)}), which compat={layout.name} reproduces: "
                         "use compat=paper for more paths, on a checkpoint with more control tokens")
    have = num_control_paths(tokenizer)
    limit = have or DEFAULT_NUM_CONTROL_PATHS
    if num_paths > limit:
        tokens = f"{think_open(1)}..{think_open(limit)}"
        has = f"the tokenizer has {tokens}" if have else f"training-free mode gives a plain checkpoint the released {tokens}"
        raise ValueError(f"num_paths={num_paths} needs {think_open(num_paths)}, but {has}: use a checkpoint with "
                         f"{num_paths} control tokens (python -m training.sft --num-control-tokens {num_paths})")


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
    def from_tokenizer(cls, tokenizer) -> ControlTokenIds:
        """The ids in ``tokenizer``: every ``<think k>`` it has (:func:`num_control_paths`), at least one."""
        vocab = tokenizer.get_vocab()
        count = num_control_paths(tokenizer)
        missing = [t for t in control_tokens(max(count, 1)) if t not in vocab]
        if missing:
            raise ValueError(
                f"tokenizer lacks the ParaThinker control tokens {missing}; call "
                "lm_eval_parathinker.thought_embedding.add_control_tokens(model, tokenizer) first"
            )
        return cls(
            think_open=tuple(vocab[think_open(k)] for k in range(1, count + 1)),
            think_close=tuple(vocab[think_close(k)] for k in range(1, count + 1)),
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

    def path_enders(self, eos_ids: Sequence[int] = ()) -> list[int]:
        """Tokens that end a path (each is rewritten to that path's own </think k>); the official
        engine's stop list has no EOS."""
        enders = [*self.think_close, self.summary_close, *eos_ids]
        return enders + ([self.think_end] if self.think_end is not None else [])


def may_attend(query_block: torch.Tensor, key_block: torch.Tensor) -> torch.Tensor:
    """The two-phase rule (causality and padding are the caller's): every block sees the prompt
    and itself; the summary sees everything."""
    return (query_block == key_block) | (key_block == PROMPT_BLOCK) | (query_block == SUMMARY_BLOCK)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive float mask that eager and sdpa attention both take."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


# -- training batches: rows of one or more records (documents), right-padded ------------------

PAD_DOCUMENT = -1  # document id of the padding at the end of a row
FLEX_TILE = 128  # FlexAttention's default tile (its BLOCK_SIZE): rows are padded to a multiple of it


def two_phase_mask_mod(block_ids: torch.Tensor, document_ids: torch.Tensor):
    """The training attention rule as a FlexAttention ``mask_mod(b, h, q, kv)`` over a batch of
    rows (``[B, L]`` block and document ids): causal, within one document (a packed row holds
    several records), and :func:`may_attend` between blocks. Padding forms its own document, so
    every query row keeps at least itself (no fully masked row, no NaN) and no real token sees a pad."""

    def mask_mod(b, h, q, kv):
        same_document = document_ids[b, q] == document_ids[b, kv]
        return (kv <= q) & same_document & may_attend(block_ids[b, q], block_ids[b, kv])

    return mask_mod


def two_phase_dense_mask(block_ids: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
    """:func:`two_phase_mask_mod` materialised as a ``[B, 1, L, L]`` boolean mask (True: attend),
    on the ids' device (SDPA and eager attention)."""
    B, L = block_ids.shape
    device = block_ids.device
    b = torch.arange(B, device=device)[:, None, None, None]
    q = torch.arange(L, device=device)[None, None, :, None]
    kv = torch.arange(L, device=device)[None, None, None, :]
    return two_phase_mask_mod(block_ids, document_ids)(b, 0, q, kv)


@functools.cache
def _compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    # Compiled, the mask is evaluated block by block and never materialised as [L, L].
    return torch.compile(create_block_mask)


def two_phase_block_mask(block_ids: torch.Tensor, document_ids: torch.Tensor, tile: int = FLEX_TILE):
    """:func:`two_phase_mask_mod` as a FlexAttention ``BlockMask`` on the ids' device: tiles of
    ``tile`` x ``tile`` tokens that the rule masks entirely are skipped by the kernel."""
    B, L = block_ids.shape
    create = _compiled_create_block_mask()
    return create(two_phase_mask_mod(block_ids, document_ids), B, None, L, L, device=block_ids.device,
                  BLOCK_SIZE=tile)


def segment_id(block: torch.Tensor, thought_embedding: bool = True) -> torch.Tensor:
    """Thought-embedding row of each token's ``block``: prompt and summary (``SUMMARY_BLOCK``) 0,
    path k -> k. Row 0 for the summary is what released checkpoints were trained with."""
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
    compat: Compat = PAPER,
) -> SequenceLayout:
    """Layout of ``prompt | path 1 | ... | path P | summary`` packed in one row.

    ``path_indices`` are the control indices of the paths in packed order (default 1..P; the
    training extrapolation trick renames some of them). ``flattened`` positions put path i at
    ``Lp + (i-1) * path_stride`` (back to back when no stride is given); the engine uses its
    per-path budget as the stride. ``compat`` places the summary (:meth:`Compat.summary_position`).
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
    start = compat.summary_position(prompt_len, path_lens, flattened, path_stride)
    positions.append(start + torch.arange(summary_len))
    block_ids = torch.cat(blocks).long()
    return SequenceLayout(
        block_ids=block_ids,
        segment_ids=segment_id(block_ids, thought_embedding),
        position_ids=torch.cat(positions).long(),
    )


# -- reading a finished sequence back: where its prompt, paths and summary lie ----------------


class MalformedSequence(ValueError):
    """A sequence that breaks the protocol; the message names the defect."""


@dataclass(frozen=True)
class PathSpan:
    """Where path ``index`` lies in a sequence: ``<think k>`` at ``start``, ``</think k>`` at
    ``close``, and whatever follows the closer (``<vllm_pad>``...) up to ``end`` (exclusive)."""

    index: int
    start: int
    close: int
    end: int


@dataclass(frozen=True)
class SequenceSplit:
    """Blocks of ``prompt | <think1> ... | ... | <summary> ...``: the prompt is ``[0, prompt_end)``,
    the summary ``[summary_start, length)``."""

    prompt_end: int
    paths: tuple[PathSpan, ...]
    summary_start: int


def split_sequence(hits: Sequence[tuple[int, object]], opens: Sequence, closes: Sequence, summary_open) -> SequenceSplit:
    """Split a sequence by its control tokens. ``hits`` are the (position, token) of every control
    token in order; tokens are token ids (``opens`` = :attr:`ControlTokenIds.think_open`...) or text
    pieces (``opens`` = the ``<think k>`` strings), so ids and transcript text share this reader.

    The prompt is everything before the first ``<think k>`` (it may spell ``<summary> </summary>``,
    as the official instruction does). Then paths ``<think1>``, ``<think2>``... in order, each
    closed by its own ``</think k>``, and exactly one ``<summary>``. Raises
    :class:`MalformedSequence` naming the first defect.
    """
    opener = {t: k for k, t in enumerate(opens, 1)}
    closer = {t: k for k, t in enumerate(closes, 1)}
    token_at = dict(hits)
    starts = [i for i, t in hits if t in opener]
    if not starts:
        raise MalformedSequence(f"no {think_open(1)}: a sequence needs at least one path")
    first = starts[0]
    if stray := next((t for i, t in hits if i < first and t in closer), None):
        raise MalformedSequence(f"{think_close(closer[stray])} in the prompt (before {think_open(opener[token_at[first]])})")
    summaries = [i for i, t in hits if i > first and t == summary_open]
    if len(summaries) != 1:
        raise MalformedSequence(f"{len(summaries)} {SUMMARY_OPEN} after the paths (expected one)")
    summary = summaries[0]
    if late := next((t for i, t in hits if i > summary and (t in opener or t in closer)), None):
        name = think_open(opener[late]) if late in opener else think_close(closer[late])
        raise MalformedSequence(f"{name} after {SUMMARY_OPEN}")
    spans = []
    for j, (start, end) in enumerate(zip(starts, [*starts[1:], summary]), 1):
        k = opener[token_at[start]]
        if k != j:
            raise MalformedSequence(f"path {j} opens with {think_open(k)} (paths must be {think_open(1)}, "
                                    f"{think_open(2)}, ... in order)")
        inner = [(i, closer[t]) for i, t in hits if start < i < end and t in closer]
        if [c for _, c in inner] != [k]:
            found = ", ".join(think_close(c) for _, c in inner) or "nothing"
            raise MalformedSequence(f"{think_open(k)} must be closed by one {think_close(k)} before the next "
                                    f"block (found {found})")
        spans.append(PathSpan(k, start, inner[0][0], end))
    return SequenceSplit(prompt_end=first, paths=tuple(spans), summary_start=summary)

