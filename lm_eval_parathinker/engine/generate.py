"""ParaThinker parallel decoding on any transformers decoder-only model: the public API.

:class:`ParaThinkerEngine` runs a call in four steps: encode the prompts, plan the call (its
constants, :meth:`step.Plan.build`, and its KV pool, :func:`kv_cache.pool_pages`), schedule it
(:class:`scheduler.Scheduler`: continuous batching over ``num_slots`` slots, KV in pages allocated
as requests grow, one forward per step for all slots), and assemble each prompt's output
(:func:`assemble`). The layers, from the device up: ``kv_cache`` (the pool), ``attention``
(kernels that read only the pages a query may see), ``pages`` (who holds which pages), ``step``
(one step's forward and bookkeeping), ``sampling`` (token rules, slot-independent random streams),
``stops`` (stop strings), ``scheduler`` (the host loop), ``options`` (the options shared with the
lm-eval model, and the per-call settings).

Modes: ``parathinker`` (P paths + summary), ``independent`` (P plain samples sharing one prefill:
majority voting) and ``sequential`` (one plain sample). ``compat`` picks the layout of
:mod:`protocol` (``paper``: as trained; ``official``: as the released vLLM engine runs the released
checkpoint; ``auto``: official when the tokenizer has ``<vllm_pad>``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import formats, protocol
from ..protocol import Compat, ControlTokenIds
from . import forks, step
from .attention import Kernel, paged_attention_for, resolve_kernel
from .compilation import DecodeStep, default_compile, parse_compile, resolve_compile
from .kv_cache import PagedKVCache, bytes_per_token, head_dim, pool_pages
from .options import CallSettings, EngineOptions
from .pages import request_pages
from .recording import LogitsRecorder
from .rope import rope_scaling
from .sampling import request_seeds
from .scheduler import Finished, Scheduler, SchedulerConfig
from .stops import stop_checks


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
    tree: dict | None = None  # a forking format's response as its tree of forks and paths (forks.tree_json)
    engine_written: list[bool] | None = None  # a forking format's: which response tokens the engine wrote
    root: forks.Thread | None = field(default=None, repr=False)  # a forking format's tree, as the engine built it


class ParaThinkerEngine:
    """Parallel decoding for a model and tokenizer (see the module docstring).

    ``compile`` (``auto``, ``true``/True, ``false``/False; default ``$PARATHINKER_COMPILE``, else
    ``auto``) compiles the decode step with ``torch.compile`` (CUDA graphs on GPU,
    ``mode="reduce-overhead"``; inductor's default mode elsewhere); ``auto`` where the committed
    verdicts measured it faster (:mod:`compilation`). ``scheduler_class`` runs the calls
    (:class:`scheduler.StaticScheduler`: fixed batches, a comparison for continuous batching).

    >>> engine = ParaThinkerEngine(model, tokenizer)
    >>> out = engine.generate(["What is 2+3?"], num_paths=4, max_new_tokens=512)[0]
    >>> print(out.transcript)
    """

    def __init__(self, model, tokenizer, *, compile: str | bool | None = None,
                 scheduler_class: type[Scheduler] = Scheduler):
        self.model = model
        self.tokenizer = tokenizer
        choice = default_compile() if compile is None else parse_compile(compile)
        self.decode_step = DecodeStep(*resolve_compile(choice, model))
        self.scheduler_class = scheduler_class
        self._pool: PagedKVCache | None = None  # the KV pool, kept across calls
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

    @property
    def pool(self) -> PagedKVCache | None:
        """The KV pool kept across calls (None before the first call and after :meth:`release_pool`)."""
        return self._pool

    def _control_ids(self) -> ControlTokenIds:
        return ControlTokenIds.from_tokenizer(self.tokenizer)

    def encode(self, prompts: Sequence[str | Sequence[int]], compat: Compat = protocol.PAPER) -> list[list[int]]:
        """Token ids of each prompt: strings as ``compat`` encodes them, id lists as they are."""
        return [compat.prompt_ids(p, self.tokenizer) if isinstance(p, str) else list(p) for p in prompts]

    def release_pool(self) -> None:
        """Free the KV pool kept across calls (the next call allocates one again)."""
        self._pool = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def compile(self) -> bool:
        """Whether the decode step runs compiled (False after a compile failure: see :mod:`compilation`)."""
        return self.decode_step.compiled

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str | Sequence[int]], options: EngineOptions | None = None,
                 settings: CallSettings | None = None, *, on_output: Callable[[int, GenerationOutput], None] | None = None,
                 **keywords: Any) -> list[GenerationOutput]:
        """Generate for a list of prompts (strings, or token ids used as they are).

        ``options`` (an :class:`EngineOptions`, resolved or not) say how requests decode:
        ``mode``, ``num_paths``, ``termination``, ``summary_max_tokens``, ``summary_kv``,
        ``thought_embedding``, ``positions``, ``compat``, ``attention``, ``block_size`` (tokens per
        KV page), ``num_blocks`` (KV pool pages), ``max_memory_percent``. ``settings`` (a
        :class:`CallSettings`) say what this call asks. Keywords naming either's fields override them.

        ``max_new_tokens`` is the per-path budget (the opening ``<think k>`` included);
        ``min_new_tokens``: no path ends before it has that many tokens (like transformers'
        ``min_new_tokens``; useful to make an untrained model think in training-free mode).
        ``stop_strings`` end a plain sample (independent/sequential) or the summary; they make
        the host read tokens at every step. ``banned_tokens`` are never sampled.
        ``temperature``, ``top_p``, ``top_k``: sampling (greedy at temperature 0).

        ``num_slots`` prompts run at a time (default: all); a finished one's slot is refilled at
        once (with :class:`scheduler.StaticScheduler`: only when every slot is free). ``seed`` (one int, or one
        per prompt) makes sampling repeatable: each prompt's tokens depend on its own seed only,
        not on its slot or its neighbours. ``output_logits``: each output carries its logits.
        ``on_output(i, output)`` is called as prompt i finishes. After the call,
        :attr:`last_stats` holds the KV pool's use and the preemptions.
        """
        opts, call = self._call(options, settings, keywords)
        if opts.format != "parathinker":
            return self._generate_forks(prompts, opts, call, on_output)
        ids = self._validate(prompts, opts, call.max_new_tokens)
        prompt_ids, template = self.encode(prompts, opts.layout), self._template(opts)
        plan = self._plan(opts, call, ids, len(template))
        self._check_lengths(prompt_ids, opts, plan)
        page_size = self._page_size(opts)
        kernel = resolve_kernel(opts.attention, self.device, page_size=page_size,
                                head_dim=head_dim(self.model.config), dtype=self._dtype)
        compiled = self.decode_step.compiles(kernel)
        slots = call.num_slots or len(prompt_ids)
        if not compiled:  # a compiled step keeps its rectangle (slots x P) for every call
            slots = min(slots, len(prompt_ids))
        summary = plan.template_len + plan.summary_tokens if plan.summary_rules is not None else 0
        worst = request_pages(max(map(len, prompt_ids)), plan.num_paths, plan.budget, summary, page_size)
        cache = self._kv_pool(opts, worst, slots, page_size, static=self._static_addresses(compiled))
        config = self._scheduler_config(opts, call, ids, template, slots, kernel, compiled)
        outputs: list[GenerationOutput | None] = [None] * len(prompt_ids)

        def finished(done: Finished) -> None:
            outputs[done.index] = assemble(prompt_ids[done.index], done, template, opts, self.tokenizer, self.eos_ids)
            if on_output is not None:
                on_output(done.index, outputs[done.index])

        scheduler = self.scheduler_class(self.model, plan, cache, config)
        compiled_before = dataclasses.replace(self.decode_step.stats)
        with self._running(opts, call.max_new_tokens):
            scheduler.run(prompt_ids, request_seeds(call.seed, len(prompt_ids)), finished)
        self.last_stats = {"attention": config.kernel.name, **scheduler.pool.stats.as_dict(cache.bytes_per_token),
                           **self.decode_step.call_stats(compiled_before, compiled)}
        return outputs

    def _generate_forks(self, prompts: Sequence[str | Sequence[int]], opts: EngineOptions, call: CallSettings,
                        on_output: Callable[[int, GenerationOutput], None] | None) -> list[GenerationOutput]:
        """A call of a format whose model forks itself (:mod:`forks`): eager steps, one token per
        thread, ``max_new_tokens`` the format's budget (the whole response, or its longest chain)."""
        _check_prompts(prompts)
        fmt = formats.get_format(opts.format)  # its tokens checked when the options were resolved
        if call.min_new_tokens:
            raise ValueError(f"min_new_tokens applies to ParaThinker's paths, not to format={fmt.name}")
        prompt_ids = self.encode(prompts)
        page_size = self._page_size(opts)
        # eager steps: attention=auto reads pages with sdpa (flex would compile its kernel first)
        kernel = resolve_kernel("sdpa" if opts.attention == "auto" else opts.attention, self.device,
                                page_size=page_size, head_dim=head_dim(self.model.config), dtype=self._dtype)
        slots = min(call.num_slots or len(prompt_ids), len(prompt_ids))
        config = forks.ForkConfig(
            format=fmt, official=opts.fork_official, budget=call.max_new_tokens, max_paths=opts.max_paths,
            num_paths=opts.num_paths, sampling=call.sampling, eos_ids=tuple(self.eos_ids), kernel=kernel,
            num_slots=slots, banned=tuple(call.banned_tokens), stop=forks.stop_check(call.stop_strings, self.tokenizer),
            output_logits=call.output_logits)
        longest = max(map(len, prompt_ids))
        cache = self._kv_pool(opts, forks.admission_pages(config, longest, page_size), slots, page_size, static=False,
                              typical=forks.typical_pages(config, longest, page_size))
        scheduler = forks.ForkScheduler(self.model, self.tokenizer, cache, config)
        outputs: list[GenerationOutput | None] = [None] * len(prompt_ids)

        def finished(done: forks.ForkedOutput) -> None:
            outputs[done.index] = assemble_forked(prompt_ids[done.index], done, self.tokenizer)
            if on_output is not None:
                on_output(done.index, outputs[done.index])

        with self._running(opts, call.max_new_tokens):
            scheduler.run(prompt_ids, request_seeds(call.seed, len(prompt_ids)), finished)
        self.last_stats = {"attention": kernel.name, **scheduler.stats.as_dict(cache.bytes_per_token)}
        return outputs

    # -- the steps of a call ---------------------------------------------------------------

    def _call(self, options: EngineOptions | None, settings: CallSettings | None,
              keywords: dict[str, Any]) -> tuple[EngineOptions, CallSettings]:
        """The call's options, resolved (options resolved by the caller, as the harness does, are
        used as they are), and its settings; ``keywords`` override either."""
        per_call = {name: value for name, value in keywords.items() if name in CallSettings.names()}
        option_values = {name: value for name, value in keywords.items() if name not in per_call}
        call = dataclasses.replace(settings or CallSettings(), **per_call)
        if options is None:
            options = EngineOptions.parse(**option_values)
        elif option_values:
            options = options.replace(**option_values)
        return (options if options.layout is not None else options.resolve(self.tokenizer)), call

    def _template(self, opts: EngineOptions) -> list[int]:
        """The summary template's ids ([] without a summary)."""
        if opts.mode != "parathinker":
            return []
        return self.tokenizer(protocol.SUMMARY_TEMPLATE, add_special_tokens=False)["input_ids"]

    def _plan(self, opts: EngineOptions, call: CallSettings, ids: ControlTokenIds | None,
              template_len: int) -> step.Plan:
        pad = self.tokenizer.convert_tokens_to_ids(protocol.PAD) if opts.layout.pad_to_multiple_of else None
        vocab = self.model.get_output_embeddings().weight.shape[0]
        return step.Plan.build(opts, call, ids, self.eos_ids, pad, template_len, vocab, self.device)

    def _scheduler_config(self, opts: EngineOptions, call: CallSettings, ids: ControlTokenIds | None,
                          template: list[int], slots: int, kernel: Kernel, compiled: bool) -> SchedulerConfig:
        static = self._static_addresses(compiled)
        return SchedulerConfig(
            layout=opts.layout, flattened=opts.positions == "flattened", reprefill=opts.summary_kv == "reprefill",
            kernel=kernel, num_slots=slots, first_tokens=None if ids is None else list(ids.think_open[: opts.num_paths]),
            template=template, decode_step=self.decode_step, ragged=self._ragged_steps(compiled),
            static_addresses=static, table_pages=self._table_pages(self._pool.page_size) if static else None,
            stops=stop_checks(call.stop_strings, self.tokenizer, summary=ids is not None),
            recorder=LogitsRecorder() if call.output_logits else None,
        )

    def _kv_pool(self, opts: EngineOptions, worst: int, slots: int, page_size: int, static: bool,
                 typical: int | None = None) -> PagedKVCache:
        """The KV pool for a call (:func:`kv_cache.pool_pages`) whose requests need up to ``worst``
        pages each (``typical``: are given, where that is unbounded). Reused across calls when its
        size suits; ``static``: CUDA graphs read it, it takes its whole budget (:meth:`_static_addresses`)."""
        held = self._pool
        num_pages, limit = pool_pages(worst, slots, page_size, bytes_per_token(self.model.config, self._dtype),
                                      self.device, num_blocks=opts.num_blocks, max_memory_percent=opts.max_memory_percent,
                                      held_pages=0 if held is None else held.num_pages, whole=static, typical=typical)
        if held is not None and held.matches(self.model, page_size, self.device, self._dtype) and held.reusable(
                num_pages, limit, exact=opts.num_blocks is not None):
            return held
        self.release_pool()  # the old pool first
        self._pool = PagedKVCache(self.model, num_pages, page_size, self.device, self._dtype)
        return self._pool

    @contextlib.contextmanager
    def _running(self, opts: EngineOptions, budget: int) -> Iterator[None]:
        """The model as a call runs it: paged attention, the layout's RoPE (parathinker), its device current."""
        rope = opts.layout.rope_parameters(budget, self._rope_theta()) if opts.mode == "parathinker" else None
        with paged_attention_for(self.model), rope_scaling(self.model, rope), _current_device(self.device):
            yield

    def _page_size(self, opts: EngineOptions) -> int:
        """Tokens per KV page: ``block_size``, else 128 on CUDA and 64 elsewhere."""
        return opts.block_size or (128 if self.device.type == "cuda" else 64)

    def _ragged_steps(self, compiled: bool) -> bool:
        """Steps on the real tokens only: for eager steps on the CPU (a padding query costs a full
        token there)."""
        return not compiled and self.device.type == "cpu"

    def _static_addresses(self, compiled: bool) -> bool:
        """Whether the step reads its KV pool and page table at fixed addresses: a compiled step's
        CUDA graphs do. Their shapes are then fixed too (a static input's shape is a guard): the
        pool takes its whole memory budget at once (as vLLM's does) and the table its widest."""
        return compiled and self.device.type == "cuda"

    def _table_pages(self, page_size: int) -> int:
        """The page table's widest: the most pages a block can take (the pool's, or the model's
        positions'), the same for every call on this pool, so that budgets and prompts of any
        length reuse the step's compilation."""
        positions = getattr(self.model.config, "max_position_embeddings", None)
        return min(self._pool.num_pages, math.ceil(positions / page_size)) if positions else self._pool.num_pages

    def _validate(self, prompts: Sequence[str | Sequence[int]], opts: EngineOptions,
                  budget: int) -> ControlTokenIds | None:
        """Check the prompts and the options against the model (the options and settings checked
        themselves); returns the control token ids (parathinker mode)."""
        _check_prompts(prompts)
        if opts.mode != "parathinker":
            return None
        layout, num_paths = opts.layout, opts.num_paths
        layout.check_budget(budget, "max_new_tokens")
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

    def _check_lengths(self, prompt_ids: list[list[int]], opts: EngineOptions, plan: step.Plan) -> None:
        """The summary must have room to generate, and every position must exist."""
        layout, flattened = opts.layout, opts.positions == "flattened"
        budget, template_len, summary_tokens = plan.budget, plan.template_len, plan.summary_tokens
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


def _check_prompts(prompts: Sequence[str | Sequence[int]]) -> None:
    if not prompts:
        raise ValueError("prompts is empty")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}] is empty")


def assemble(prompt: list[int], done: Finished, template: list[int], opts: EngineOptions, tokenizer,
             eos_ids: Sequence[int]) -> GenerationOutput:
    """A finished request as the engine returns it: its ids, texts and statistics."""
    decode = tokenizer.decode
    paths, finished = done.path_ids, done.path_finished
    if opts.mode != "parathinker":  # plain samples: the EOS that ended a sample is not text
        texts = [decode(p[:-1] if f and p and p[-1] in eos_ids else p) for p, f in zip(paths, finished)]
    else:
        texts = [decode(p) for p in paths]
    summary_ids = template + done.summary_ids
    summary_text = decode(summary_ids)
    summary_logits = None if done.summary_logits is None else done.summary_logits[: len(summary_ids)]
    think_tokens = sum(map(len, paths))
    reason = done.reason
    if opts.mode == "parathinker" and reason == "finished":
        reason = {"first": "first_finished", "half": "half_finished", "last": "all_finished"}[opts.termination]
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


def assemble_forked(prompt: list[int], done: forks.ForkedOutput, tokenizer) -> GenerationOutput:
    """A forking format's finished request as the engine returns it: the response as one text (its
    tags and the engine's insertions included), its tree, and the tree's statistics."""
    text = tokenizer.decode(done.ids)
    return GenerationOutput(
        prompt_ids=prompt, path_ids=[done.ids], path_texts=[text], path_finished=[done.root.ended != forks.LENGTH],
        summary_ids=[], summary_text="", transcript=text,
        stats={"gen_tokens": len(done.ids), "termination": done.root.ended, **done.stats},
        tree=forks.tree_json(done.root, tokenizer), engine_written=done.inserted, root=done.root,
    )
