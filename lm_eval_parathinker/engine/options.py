"""The engine's options: one definition for ``ParaThinkerEngine.generate`` keywords and for the
model args of ``lm_eval --model parathinker``.

:class:`EngineOptions` lists every option that shapes how a request is decoded and is fixed for a
model (the lm-eval model takes each as a model arg of the same name; the generation budget, the
sampling settings and the stop strings come per request, from lm-eval's gen_kwargs). Its fields
are validated on construction, and :meth:`EngineOptions.parse` builds one from model-arg strings
(``num_paths=8``, ``thought_embedding=false``), converting by each field's type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .. import protocol
from .attention import KERNELS

TERMINATIONS = ("first", "half", "last")
SUMMARY_KV = ("reuse", "reprefill")
POSITIONS = ("aligned", "flattened")


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass(frozen=True)
class EngineOptions:
    """How the engine decodes (see the README, "Model args", for each option's meaning)."""

    num_paths: int = 8  # paths per request (plain samples in the baselines)
    termination: str = field(default="first", metadata=_choices(*TERMINATIONS))
    summary_max_tokens: int = 128
    summary_kv: str = field(default="reuse", metadata=_choices(*SUMMARY_KV))
    thought_embedding: bool = True
    positions: str = field(default="aligned", metadata=_choices(*POSITIONS))
    compat: str = field(default="auto", metadata=_choices(*protocol.COMPAT_CHOICES))
    attention: str = field(default="auto", metadata=_choices(*KERNELS))  # decode-step kernel over the KV pages
    block_size: int | None = None  # tokens per KV page (None: 128 on CUDA, 64 elsewhere)
    num_blocks: int | None = None  # KV pool size in pages (None: from max_memory_percent)
    max_memory_percent: float | None = None  # fraction of free memory for the pool (None: 0.9 on CUDA, 0.5 on CPU)

    #: options that size the KV pool and never change a response (a smaller pool preempts and
    #: restarts requests, which then produce what they would have)
    POOL_SIZE = ("num_blocks", "max_memory_percent")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(f"{f.name}={value!r} is not one of {', '.join(choices)}")
        for name, low in (("num_paths", 1), ("summary_max_tokens", 1), ("block_size", 1), ("num_blocks", 2)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{name}={value} must be at least {low}")
        if self.max_memory_percent is not None and not 0 < self.max_memory_percent <= 1:
            raise ValueError(f"max_memory_percent={self.max_memory_percent} must be in (0, 1]")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def parse(cls, **values: Any) -> EngineOptions:
        """From model-arg values (strings or typed), converted by field type; unknown names are
        an error."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; known: {', '.join(cls.names())}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        return cls(**{name: _convert(name, value, types[name]) for name, value in values.items()})

    def replace(self, **changes: Any) -> EngineOptions:
        return self.parse(**{**dataclasses.asdict(self), **changes})


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
