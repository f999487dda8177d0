"""ParaThinker parallel decoding on any transformers decoder-only model: the public API.

:class:`ParaThinkerEngine` validates a call, sets up its constants (:class:`step.Plan`) and its KV
pool, and runs the prompts through :class:`scheduler.Scheduler`: continuous batching over
``num_slots`` slots, KV in pages allocated as requests grow (a request's P paths read its
prompt's pages in place, its summary reads every path's pages as they are), one forward per step
for all slots. The layers, from the device up: ``kv_cache`` (the pool), ``attention`` (kernels
that read only the pages a query may see), ``pages`` (who holds which pages), ``step`` (one
step's forward and bookkeeping), ``sampling`` (token rules, slot-independent random streams),
``scheduler`` (the host loop), ``options`` (the options shared with the lm-eval model).

Modes: ``parathinker`` (P paths + summary), ``independent`` (P plain samples sharing one prefill:
majority voting) and ``sequential`` (one plain sample). ``compat`` picks the layout of
:mod:`protocol` (``paper``: as trained; ``official``: as the released vLLM engine runs the released
checkpoint; ``auto``: official when the tokenizer has ``<vllm_pad>``).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .. import protocol
from ..protocol import Compat, ControlTokenIds
from . import step
from .attention import paged_attention_for, resolve_kernel
from .hub_kernels import bypass_kernel_routing
from .kv_cache import PagedKVCache, head_dim
from .options import EngineOptions
from .pages import pages_for
from .recording import LogitsRecorder
from .rope import rope_scaling
from .sampling import SamplingParams, TokenRules, request_seeds
from .scheduler import Finished, Scheduler, SchedulerConfig, StopChecks


@dataclass
class GenerationOutput:
    """What the engine returns for one prompt."""

    prompt_ids: list[int]
    path_ids: list[list[int]]
    path_texts: list[str]
    path_finished: list[bool]  # ended by its own closing token (or EOS / a stop string), not cut
    summary_ids: list[int]  # summary template + generated summary ([] outside parathinker mode)
    summary_text: str
    transcript: str  # the paths, then the summary
    stats: dict = field(default_factory=dict)
    path_logits: list[torch.Tensor] | None = None  # per path: [len, vocab], logits that predicted each next token
    summary_logits: torch.Tensor | None = None  # [len(summary_ids), vocab]


class ParaThinkerEngine:
    """Parallel decoding for a model and tokenizer (see the module docstring).

    ``compile=True`` compiles the decode step with ``torch.compile`` (CUDA graphs on GPU,
    ``mode="reduce-overhead"``; inductor's default mode elsewhere). ``scheduler_class`` runs the
    calls (:class:`scheduler.StaticScheduler`: fixed batches, the benchmarks' baseline).

    >>> engine = ParaThinkerEngine(model, tokenizer)
    >>> out = engine.generate(["What is 2+3?"], num_paths=4, max_new_tokens=512)[0]
    >>> print(out.transcript)
    """

    def __init__(self, model, tokenizer, *, compile: bool = False, scheduler_class: type[Scheduler] = Scheduler):
        self.model = model
        self.tokenizer = tokenizer
        self.compile = compile
        self.scheduler_class = scheduler_class
        self._compiled: Callable | None = None
        self._cache: PagedKVCache | None = None  # the KV pool, kept across calls
        self.last_stats: dict = {}
        eos = tokenizer.eos_token_id
        self.eos_ids = sorted({*(eos if isinstance(eos, list) else [eos])} - {None})
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            self.eos_ids = sorted({*self.eos_ids, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])})

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _control_ids(self) -> ControlTokenIds:
        return ControlTokenIds.from_tokenizer(self.tokenizer)

    def encode(self, prompts: Sequence[str | Sequence[int]], compat: Compat = protocol.PAPER) -> list[list[int]]:
        """Token ids of each prompt: strings as ``compat`` encodes them, id lists as they are."""
        return [compat.prompt_ids(p, self.tokenizer) if isinstance(p, str) else list(p) for p in prompts]

    def release_pool(self) -> None:
        """Free the KV pool kept across calls (the next call allocates one again)."""
        self._cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def compiled_step(self) -> Callable | None:
        """The compiled decode step (compiled once per engine), or None when compile is off."""
        if self.compile and self._compiled is None:
            cuda = self.device.type == "cuda"
            bypass_kernel_routing(self.model)
            # dynamic: one compilation serves any pool and page table; the batch (slots x P) is
            # static (step.step_forward marks it: flex's decoding kernel needs it), one
            # compilation each (CUDA graphs are recorded per shape)
            self._compiled = torch.compile(step.decode_forward, mode="reduce-overhead" if cuda else None, dynamic=True)
        return self._compiled

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        options: EngineOptions | None = None,
        *,
        max_new_tokens: int = 1024,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | Sequence[int] | None = None,
        min_new_tokens: int = 0,
        stop_strings: Sequence[str] = (),
        banned_tokens: Sequence[int] = (),
        num_slots: int | None = None,
        output_logits: bool = False,
        on_output: Callable[[int, GenerationOutput], None] | None = None,
        **option_values,
    ) -> list[GenerationOutput]:
        """Generate for a list of prompts (strings, or token ids used as they are).

        ``options`` (an :class:`EngineOptions`; its fields can also be given as keywords, which
        override it: ``mode``, ``num_paths``, ``termination``, ``summary_max_tokens``,
        ``summary_kv``, ``thought_embedding``, ``positions``, ``compat``, ``attention``,
        ``block_size``, ``num_blocks``, ``max_memory_percent``) say how requests decode.

        ``max_new_tokens`` is the per-path budget (the opening ``<think k>`` included);
        ``min_new_tokens``: no path ends before it has that many tokens (like transformers'
        ``min_new_tokens``; useful to make an untrained model think in training-free mode).
        ``stop_strings`` end a plain sample (independent/sequential) or the summary; they make
        the host read tokens at every step. ``banned_tokens`` are never sampled.

        ``num_slots`` prompts run at a time (default: all); a finished one's slot is refilled at
        once (with :class:`scheduler.StaticScheduler`: only when every slot is free). ``seed`` (one int, or one
        per prompt) makes sampling repeatable: each prompt's tokens depend on its own seed only,
        not on its slot or its neighbours. ``on_output(i, output)`` is called as prompt i finishes.
        After the call, :attr:`last_stats` holds the KV pool's use and the preemptions.
        """
        opts = EngineOptions.parse(**option_values) if options is None else options.replace(**option_values) \
            if option_values else options
        opts = opts.resolve(self.tokenizer)
        layout, num_paths, parathinker = opts.layout, opts.num_paths, opts.mode == "parathinker"
        ids = self._validate(prompts, opts, max_new_tokens, num_slots)
        template = self.tokenizer(protocol.SUMMARY_TEMPLATE, add_special_tokens=False)["input_ids"] if parathinker else []
        prompt_ids = self.encode(prompts, layout)
        summary_tokens = layout.summary_tokens(opts.summary_max_tokens, len(template)) if parathinker else 0
        self._check_lengths(prompt_ids, opts, max_new_tokens, len(template), summary_tokens)
        plan = self._plan(ids, opts, max_new_tokens, summary_tokens, len(template),
                          SamplingParams(temperature, top_p, top_k), min_new_tokens, banned_tokens)
        slots = min(num_slots or len(prompt_ids), len(prompt_ids))
        page_size = opts.block_size or (128 if self.device.type == "cuda" else 64)
        kernel = resolve_kernel(opts.attention, self.device, page_size=page_size, head_dim=head_dim(self.model.config),
                                dtype=self._dtype)
        cache = self._pool(opts, plan, prompt_ids, len(template), slots, page_size)

        outputs: list[GenerationOutput | None] = [None] * len(prompt_ids)

        def finished(done: Finished) -> None:
            outputs[done.index] = self._output(prompt_ids[done.index], done, template, opts)
            if on_output is not None:
                on_output(done.index, outputs[done.index])

        stops = None
        if stop_strings:
            stops = StopChecks(summary=self._summary_stop_check(stop_strings)) if parathinker \
                else StopChecks(paths=self._stop_check(stop_strings))
        config = SchedulerConfig(
            options=opts, kernel=kernel, num_slots=slots,
            first_tokens=list(ids.think_open[:num_paths]) if parathinker else None, template=template,
            compiled=self.compiled_step(), ragged=self._ragged_steps(), stops=stops,
            recorder=LogitsRecorder() if output_logits else None,
        )
        scheduler = self.scheduler_class(self.model, plan, cache, config)
        rope = layout.rope_parameters(max_new_tokens, self._rope_theta()) if parathinker else None
        with paged_attention_for(self.model), rope_scaling(self.model, rope), _current_device(self.device):
            scheduler.run(prompt_ids, request_seeds(seed, len(prompt_ids)), finished)
        self.last_stats = {"attention": kernel.name, **scheduler.pool.stats.as_dict(cache.bytes_per_token)}
        return outputs

    # -- helpers -------------------------------------------------------------------------

    def _pool(self, opts: EngineOptions, plan: step.Plan, prompt_ids: list[list[int]], template_len: int,
              slots: int, page_size: int) -> PagedKVCache:
        """The KV pool for a call: ``num_blocks`` pages, else as many as ``max_memory_percent`` of
        the free memory holds; never more than every slot's worst case needs. Reused across calls
        when its size is unchanged (a compiled step keeps its shapes and addresses)."""
        cuda = self.device.type == "cuda"
        dtype = self._dtype
        config = self.model.config
        page_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config) * dtype.itemsize \
            * page_size
        summary = template_len + plan.summary_tokens if plan.summary_rules is not None else 0
        worst = max(pages_for(len(p), page_size) for p in prompt_ids) + plan.num_paths * pages_for(plan.budget, page_size) \
            + (pages_for(summary, page_size) if summary else 0)
        held = self._cache
        if opts.num_blocks is not None:
            budget, source = opts.num_blocks - 1, f"num_blocks={opts.num_blocks}"
        else:
            fraction = opts.max_memory_percent or (0.9 if cuda else 0.5)
            free = _free_memory(self.device) + (held.num_pages * page_bytes if held is not None else 0)
            budget = int(fraction * free) // page_bytes
            source = f"max_memory_percent={fraction} of the free memory"
        if worst > budget:
            raise ValueError(
                f"a request needs up to {worst} KV pages of {page_size} tokens ({worst * page_bytes / 2**20:.1f} MiB: "
                f"prompt, {plan.num_paths} paths x max_new_tokens={plan.budget}, summary), but the pool holds "
                f"{budget} ({source}): raise num_blocks or max_memory_percent, or lower max_new_tokens or num_paths"
            )
        num_pages = min(budget, slots * worst) + 1  # + the scratch page
        if held is not None and held.matches(self.model, page_size, self.device, dtype) and (
            held.num_pages == num_pages or (opts.num_blocks is None and num_pages <= held.num_pages <= budget + 1)
        ):
            return held  # a pool at least as large, within the budget
        self.release_pool()  # the old pool first
        self._cache = PagedKVCache(self.model, num_pages, page_size, self.device, dtype)
        return self._cache

    def _ragged_steps(self) -> bool:
        """Steps on the real tokens only: for eager steps on the CPU (a padding query costs a full
        token there)."""
        return not self.compile and self.device.type == "cpu"

    def _plan(self, ids, opts: EngineOptions, budget, summary_tokens, template_len, sampling, min_new_tokens,
              banned_tokens) -> step.Plan:
        device = self.device
        vocab = self.model.get_output_embeddings().weight.shape[0]
        layout, P, parathinker = opts.layout, opts.num_paths, opts.mode == "parathinker"
        if parathinker:
            enders = torch.tensor(ids.path_enders(self.eos_ids if layout.eos_ends_path else ()), device=device)
            stray = torch.tensor(ids.stray_in_path(), device=device)
            pad = self.tokenizer.convert_tokens_to_ids(protocol.PAD) if layout.pad_to_multiple_of else None
            path_rules = TokenRules(enders, torch.tensor(ids.think_close[:P], device=device), stray, ids.think,
                                    min_new_tokens, pad, layout.pad_to_multiple_of)
            # The released engine appends what the summary samples as it is (no stray rewriting).
            summary_rules = TokenRules(enders, ids.summary_close, None if layout.pad_to_multiple_of else stray, ids.think)
            needed = {"first": 1, "half": math.ceil(P / 2), "last": P}[opts.termination]
        else:
            path_rules = TokenRules(torch.tensor(self.eos_ids, device=device), min_tokens=min_new_tokens)
            summary_rules, needed = None, P
        no_summary = torch.zeros(vocab, dtype=torch.bool, device=device)
        never = torch.zeros(vocab, dtype=torch.bool, device=device)
        never[list(banned_tokens)] = True
        return step.Plan(
            num_paths=P,
            budget=budget,
            needed=needed,
            offsets=torch.tensor(protocol.path_offsets([budget] * P, opts.positions == "flattened", stride=budget),
                                 device=device),
            thought_embedding=opts.thought_embedding and parathinker,
            path_rules=path_rules,
            summary_rules=summary_rules,
            summary_tokens=summary_tokens,
            template_len=template_len,
            sampling=sampling,
            banned=torch.stack([path_rules.banned(vocab), summary_rules.banned(vocab) if summary_rules else no_summary])
            | never,
            path_enders=path_rules.ender_mask(vocab),
        )

    def _validate(self, prompts, opts: EngineOptions, max_new_tokens, num_slots) -> ControlTokenIds | None:
        """Check the call's arguments against the model (the options checked themselves); returns
        the control token ids (parathinker mode)."""
        if not prompts:
            raise ValueError("prompts is empty")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompts[{i}] is empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
        if num_slots is not None and num_slots < 1:
            raise ValueError(f"num_slots={num_slots} must be at least 1")
        if opts.mode != "parathinker":
            return None
        layout, num_paths = opts.layout, opts.num_paths
        layout.check_budget(max_new_tokens, "max_new_tokens")
        if layout.pad_to_multiple_of is not None:
            for i, p in enumerate(prompts):
                if not isinstance(p, str) and len(p) % layout.pad_to_multiple_of:
                    raise ValueError(
                        f"prompts[{i}] has {len(p)} token ids; with compat=official a prompt is a multiple of "
                        f"{layout.pad_to_multiple_of} long: pass the text, or ids from protocol.OFFICIAL.prompt_ids"
                    )
        ids = self._control_ids()
        protocol.check_num_paths(num_paths, self.tokenizer, layout)  # options resolved with another tokenizer
        max_segments = getattr(self.model.config, "max_segments", protocol.DEFAULT_MAX_SEGMENTS)
        if num_paths >= max_segments:
            raise ValueError(f"num_paths={num_paths} needs segment ids up to {num_paths}, but max_segments={max_segments}")
        return ids

    def _check_lengths(self, prompt_ids, opts: EngineOptions, budget, template_len, summary_tokens):
        """The summary must have room to generate, and every position must exist."""
        layout, flattened = opts.layout, opts.positions == "flattened"
        if template_len and summary_tokens < 1:
            raise ValueError(
                f"summary_max_tokens leaves no room after the {template_len}-token summary template "
                f"(compat={layout.name} counts the template)"
            )
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is None:
            return
        path_lens = [budget] * (opts.num_paths if flattened else 1)
        last_path = layout.summary_position(max(map(len, prompt_ids)), path_lens, flattened)
        needed = last_path + (template_len + summary_tokens if template_len else 0)
        if needed > limit:
            raise ValueError(
                f"prompt + max_new_tokens={budget} (+ summary) needs {needed} positions, beyond the "
                f"model's max_position_embeddings={limit}"
            )

    def _rope_theta(self) -> float:
        config = self.model.config
        params = getattr(config, "rope_parameters", None) or {}
        return params.get("rope_theta", getattr(config, "rope_theta", 10000.0))

    def _stop_check(self, stop_strings: Sequence[str]):
        """Per step: which paths' text now ends in a stop string (plain samples; reads the tokens)."""
        tail = max(len(s) for s in stop_strings) + 8  # tokens enough to hold any stop string

        def check(state: step.SlotState) -> torch.Tensor:
            hits = []
            for slot, t in enumerate(state.t.tolist()):
                window = state.path_tokens[slot, :, max(0, t + 1 - tail) : t + 1].tolist()
                hits.append([any(s in self.tokenizer.decode(w) for s in stop_strings) for w in window])
            return torch.tensor(hits, device=state.t.device)

        return check

    def _summary_stop_check(self, stop_strings: Sequence[str]):
        """Per step: which summaries' text now contains a stop string (reads the tokens)."""

        def check(state: step.SlotState) -> torch.Tensor:
            texts = [self.tokenizer.decode(row[:n]) for row, n in zip(state.summary_ids.tolist(), state.summary_len.tolist())]
            return torch.tensor([any(s in t for s in stop_strings) for t in texts], device=state.t.device)

        return check

    def _output(self, prompt: list[int], done: Finished, template: list[int], opts: EngineOptions) -> GenerationOutput:
        decode = self.tokenizer.decode
        mode, termination = opts.mode, opts.termination
        paths, finished = done.path_ids, done.path_finished
        if mode != "parathinker":  # plain samples: the EOS that ended a sample is not text
            texts = [decode(p[:-1] if f and p and p[-1] in self.eos_ids else p) for p, f in zip(paths, finished)]
        else:
            texts = [decode(p) for p in paths]
        summary_ids = template + done.summary_ids
        summary_text = decode(summary_ids)
        summary_logits = None if done.summary_logits is None else done.summary_logits[: len(summary_ids)]
        think_tokens = sum(map(len, paths))
        reason = done.reason
        if mode == "parathinker" and reason == "finished":
            reason = {"first": "first_finished", "half": "half_finished", "last": "all_finished"}[termination]
        return GenerationOutput(
            prompt_ids=prompt,
            path_ids=paths,
            path_texts=texts,
            path_finished=finished,
            summary_ids=summary_ids,
            summary_text=summary_text,
            transcript="".join(texts) + summary_text,
            stats={
                "num_paths": opts.num_paths,
                "think_tokens": think_tokens,
                "summary_tokens": len(summary_ids),
                "gen_tokens": think_tokens + len(summary_ids),
                "paths_finished": sum(finished),
                "termination": reason,
                "preemptions": done.preemptions,  # times the request was restarted to free KV pages
                **done.timing,
            },
            path_logits=done.path_logits,
            summary_logits=summary_logits,
        )


def _current_device(device: torch.device) -> contextlib.AbstractContextManager:
    """``device`` as the current CUDA device (nothing elsewhere): torch's own calls during a step
    (flex's kernel configs and split count, CUDA graph capture) read the current device's
    properties, which must be the model's when it is on another GPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _free_memory(device: torch.device) -> int:
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
