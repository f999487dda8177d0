"""The engine's options: one definition for ``ParaThinkerEngine.generate`` keywords and for the
model args of ``lm_eval --model parathinker``, and their only validator.

:class:`EngineOptions` lists every option that shapes how a request is decoded and is fixed for a
model (the lm-eval model takes each as a model arg of the same name, except ``mode``, which its
``method`` sets; the generation budget, the sampling settings and the stop strings come per
request, from lm-eval's gen_kwargs). Its fields are validated on construction, and
:meth:`EngineOptions.parse` builds one from model-arg strings (``num_paths=8``,
``thought_embedding=false``), converting by each field's type. ``compat`` is the layout's name as
requested (a model arg); :meth:`EngineOptions.resolve` sets ``layout``, the :class:`protocol.Compat`
it names (``auto`` read from a tokenizer), once, checking what the layout cannot run; the resolved
options then travel down to the kernels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import formats, protocol
from .attention import KERNELS
from .sampling import SamplingParams

MODES = ("parathinker", "independent", "sequential")
TERMINATIONS = ("first", "half", "last")
DEFAULT_NUM_PATHS = 8
SUMMARY_KV = ("reuse", "reprefill")
POSITIONS = ("aligned", "flattened")


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass(frozen=True)
class EngineOptions:
    """How the engine decodes (see docs/model-args.md for each option's meaning)."""

    mode: str = field(default="parathinker", metadata={"choices": MODES, "model_arg": False})
    # parathinker, or a format whose model forks itself (formats.py; the lm-eval model detects it from the tokenizer)
    format: str = field(default="parathinker", metadata=_choices(*formats.FORMAT_CHOICES))
    max_paths: int = formats.DEFAULT_MAX_PATHS  # a fork asking for more paths is refused (format=multiverse)
    num_paths: int | None = None  # paths per request (plain samples for independent); None: 8 (1 for sequential)
    termination: str = field(default="first", metadata=_choices(*TERMINATIONS))
    summary_max_tokens: int = 128
    summary_kv: str = field(default="reuse", metadata=_choices(*SUMMARY_KV))
    thought_embedding: bool = True
    positions: str = field(default="aligned", metadata=_choices(*POSITIONS))
    compat: str = field(default="auto", metadata=_choices(*protocol.COMPAT_CHOICES))  # the layout's name
    attention: str = field(default="auto", metadata=_choices(*KERNELS))  # decode-step kernel over the KV pages
    # vLLM's names: block_size is the tokens per KV page, num_blocks the KV pool's size in pages
    block_size: int | None = None  # None: 128 on CUDA, 64 elsewhere
    num_blocks: int | None = None  # None: from max_memory_percent
    max_memory_percent: float | None = None  # fraction of free memory for the pool (None: 0.9 on CUDA, 0.5 on CPU)
    # the layout ``compat`` names, set by resolve() (not a model arg; None: not resolved yet)
    layout: protocol.Compat | None = field(default=None, metadata={"model_arg": False}, repr=False)

    #: options that size the KV pool and never change a response (a smaller pool preempts and
    #: restarts requests, which then produce what they would have)
    POOL_SIZE = ("num_blocks", "max_memory_percent")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(f"{f.name}={value!r} is not one of {', '.join(choices)}")
        self._resolve_num_paths()
        for name, low in (("num_paths", 1), ("summary_max_tokens", 1), ("block_size", 1), ("num_blocks", 2),
                          ("max_paths", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{name}={value} must be at least {low}")
        if self.max_memory_percent is not None and not 0 < self.max_memory_percent <= 1:
            raise ValueError(f"max_memory_percent={self.max_memory_percent} must be in (0, 1]")
        if self.compat == "official" and self.mode != "parathinker":
            raise ValueError(f"compat='official' applies to parathinker decoding only (method=parathinker), not "
                             f"mode={self.mode!r}")
        if self.layout is not None and self.layout.pad_to_multiple_of is not None and self.positions == "flattened":
            raise ValueError("positions=flattened has no equivalent in the released engine (compat=official): use "
                             "compat=paper")

    def _resolve_num_paths(self) -> None:
        """The one place the default number of paths is set: one for sequential, the format's for a
        format with a fixed count (Parallel-R1: 2), none where the model counts them, else 8."""
        if self.format != "parathinker":
            self._check_format()
            fmt = formats.get_format(self.format)
            if fmt.counted and self.num_paths is not None:
                raise ValueError(f"num_paths={self.num_paths} has no meaning with format={self.format}: its model "
                                 "writes how many paths each fork has (max_paths caps them)")
            if not fmt.counted and self.num_paths is None:
                object.__setattr__(self, "num_paths", fmt.fixed_paths)
            return
        if self.mode == "sequential":
            if self.num_paths not in (None, 1):
                raise ValueError(f"num_paths={self.num_paths!r} has no meaning for sequential decoding (one path); "
                                 "omit it")
            object.__setattr__(self, "num_paths", 1)
        elif self.num_paths is None:
            object.__setattr__(self, "num_paths", DEFAULT_NUM_PATHS)

    def _check_format(self) -> None:
        """A forking format decodes by its own rules: ParaThinker's options that mean nothing there
        are refused (docs/formats.md has the table)."""
        if self.mode != "parathinker":
            raise ValueError(f"format={self.format} is a way of decoding of its own: it takes no mode={self.mode} "
                             "(independent and sequential samples run the model as a plain one, format=parathinker)")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        meaningless = [name for name in ("termination", "summary_max_tokens", "summary_kv", "positions",
                                         "thought_embedding") if getattr(self, name) != defaults[name]]
        if meaningless:
            raise ValueError(f"{', '.join(meaningless)} apply to ParaThinker's decoding, not to format={self.format}, "
                             "whose model forks and joins by its own rules: omit them")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The options' names as model args (``mode`` is not one: the lm-eval model's ``method`` sets it)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("model_arg", True))

    def resolve(self, tokenizer) -> EngineOptions:
        """These options with ``layout`` set: the one ``compat`` names (``auto``: read from
        ``tokenizer``; the baselines decode in ``paper``), checked (:meth:`with_layout`; parathinker's
        ``num_paths`` against the tokenizer's control tokens, :func:`protocol.check_num_paths`)."""
        if self.mode != "parathinker":
            return self.with_layout(protocol.PAPER)
        if self.format != "parathinker":  # prompts encoded as lm-eval encodes them; the fork layout is `official`
            formats.check_tokens(formats.get_format(self.format), tokenizer.get_vocab())
            return self.with_layout(protocol.PAPER)
        layout = protocol.resolve_compat(self.compat, tokenizer)
        protocol.check_num_paths(self.num_paths, tokenizer, layout)
        return self.with_layout(layout)

    def with_layout(self, layout: protocol.Compat) -> EngineOptions:
        """These options decoding with ``layout``, refusing what it cannot run."""
        return dataclasses.replace(self, layout=layout)

    @property
    def fork_official(self) -> bool:
        """A forking format's layout: its released engine's (``official``, and ``auto``: what its
        released models were run with) or its training layout (``paper``)."""
        return self.compat != "paper"

    def args(self) -> dict[str, Any]:
        """The options as model-arg values, as the results JSON records them."""
        return {name: getattr(self, name) for name in self.names()}

    @classmethod
    def parse(cls, **values: Any) -> EngineOptions:
        """From model-arg values (strings or typed), converted by field type; unknown names are
        an error (``layout`` too: :meth:`resolve` sets it)."""
        unknown = sorted(set(values) - ({f.name for f in dataclasses.fields(cls)} - {"layout"}))
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; known: {', '.join(cls.names())}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        return cls(**{name: _convert(name, value, types[name]) for name, value in values.items()})

    def replace(self, **changes: Any) -> EngineOptions:
        """A copy with ``changes`` (model-arg values, converted as :meth:`parse` does); its layout is
        kept unless the changes name another ``compat`` or ``mode`` (then it is resolved again)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "layout"}
        changed = self.parse(**{**values, **changes})
        if self.layout is None or {"compat", "mode"} & set(changes):
            return changed
        return changed.with_layout(self.layout)


@dataclass(frozen=True)
class CallSettings:
    """What one engine call asks besides its options: the budget, the sampling, the stops (see
    :meth:`generate.ParaThinkerEngine.generate` for each)."""

    max_new_tokens: int = 1024  # per path, the opening <think k> included
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | Sequence[int] | None = None
    min_new_tokens: int = 0
    stop_strings: Sequence[str] = ()
    banned_tokens: Sequence[int] = ()
    num_slots: int | None = None
    output_logits: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.num_slots is not None and self.num_slots < 1:
            raise ValueError(f"num_slots={self.num_slots} must be at least 1")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k)

    @classmethod
    def names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))


def _convert(name: str, value: Any, annotation: str) -> Any:
    """A model-arg value as the field's type (``annotation``: the field's type as written)."""
    optional = annotation.endswith("| None")
    kind = annotation.split("|")[0].strip()
    if value is None or (optional and str(value).strip().lower() in ("none", "")):
        if not optional:
            raise ValueError(f"{name} needs a value")
        return None
    if kind == "bool":
        return as_bool(name, value)
    if kind in ("int", "float"):
        try:
            number = float(value) if kind == "float" else int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}={value!r} is not {'a number' if kind == 'float' else 'an integer'}") from None
        return number
    return value


def as_bool(name: str, value: Any) -> bool:
    """A model-arg boolean (``true``/``false``, ``1``/``0``, ``yes``/``no``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"{name}={value!r} is not a boolean (true/false)")
