"""The model args of ``lm_eval --model parathinker``, defined and checked here, once.

A run's model args are the fields of :class:`RunOptions` (``method``, ``compile``, ``journal_dir``,
``resume``) and those of :class:`~lm_eval_parathinker.engine.EngineOptions` (``num_paths``,
``termination``, ..., each checked there), plus ``batch_size`` (:func:`slots`). Every other model
arg is HFLM's. :meth:`RunOptions.pop` takes ours out of what lm-eval hands over and validates all
of them before anything loads. See docs/model-args.md for each one's meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import embedded, formats
from ..checkpoint import check_checkpoint_arg
from ..engine import EngineOptions
from ..engine.compilation import default_compile, parse_compile
from ..engine.options import as_bool
from . import journal

METHODS = ("parathinker", "sequential", "majority")
#: how the engine decodes each method (majority: independent samples, voted on by the harness)
ENGINE_MODE = {"parathinker": "parathinker", "sequential": "sequential", "majority": "independent"}


@dataclass(frozen=True)
class RunOptions:
    """A run's options: the method and the engine's options, checked (see the module docstring)."""

    method: str = "parathinker"
    compile: str = field(default_factory=default_compile)  # auto/true/false: torch.compile the decode step
    journal_dir: Path = field(default_factory=lambda: journal.default_dir().absolute())  # the response journal
    resume: bool = True  # reuse the journal's responses (and journal new ones)
    engine: EngineOptions = field(default_factory=EngineOptions)
    engine_args: dict = field(default_factory=dict, compare=False, repr=False)  # as given: resolve() may detect the format
    trained: formats.TrainedFormat | None = None  # the checkpoint's record of its format training (resolve() reads it)

    #: the model args of this class (the engine's are EngineOptions.names())
    OWN_ARGS = ("method", "compile", "journal_dir", "resume")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every model arg these options take."""
        return (*cls.OWN_ARGS, *EngineOptions.names())

    @classmethod
    def parse(cls, method: str = "parathinker", compile: Any = None, journal_dir: str | Path | None = None,
              resume: Any = True, **engine_args: Any) -> RunOptions:
        """From model-arg values (strings or typed)."""
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not one of {', '.join(METHODS)}")
        if method != "parathinker" and engine_args.get("format", "parathinker") != "parathinker":
            raise ValueError(f"format={engine_args['format']} is a way of decoding of its own: it takes no "
                             f"method={method} (the baselines run the checkpoint as a plain model: omit format)")
        return cls(
            method=method,
            compile=default_compile() if compile is None else parse_compile(compile),
            journal_dir=(Path(journal_dir).expanduser() if journal_dir else journal.default_dir()).absolute(),
            resume=as_bool("resume", resume),
            engine=EngineOptions.parse(mode=ENGINE_MODE[method], **engine_args),
            engine_args=dict(engine_args),
        )

    def check_journal(self) -> None:
        """Prove the journal folder writable (with ``resume``): before any weights load."""
        if self.resume:
            journal.check_writable(self.journal_dir)

    @classmethod
    def pop(cls, model_args: dict[str, Any]) -> RunOptions:
        """Take these options' model args out of ``model_args`` (what remains is HFLM's)."""
        return cls.parse(**{name: model_args.pop(name) for name in cls.names() if name in model_args})

    def resolve(self, tokenizer) -> RunOptions:
        """With the engine's layout resolved (``compat=auto`` read from ``tokenizer``), checked. Without
        a ``format`` model arg, ``method=parathinker`` decodes in the format the tokenizer's tokens
        name (a Parallel-R1, Multiverse or NPR checkpoint's: :func:`formats.detect_format`); a
        checkpoint of ``training.sft --format`` names its format, layout and instruction itself
        (:class:`formats.TrainedFormat`, read from the tokenizer's folder; model args given win)."""
        engine, trained = self.engine, None
        if self.method == "parathinker" and engine.layout is None:
            trained = formats.TrainedFormat.load(getattr(tokenizer, "name_or_path", None) or "")
            if trained is not None:  # trained by training.sft --format: its format and layout, unless given
                engine = EngineOptions.parse(mode=engine.mode, **{"format": trained.format, "compat": trained.compat,
                                                                  **self.engine_args})
            elif "format" not in self.engine_args:
                detected = formats.detect_format(tokenizer.get_vocab())
                if detected != engine.format:
                    engine = EngineOptions.parse(mode=engine.mode, format=detected, **self.engine_args)
        return RunOptions(self.method, self.compile, self.journal_dir, self.resume, engine.resolve(tokenizer),
                          self.engine_args, trained if trained is not None else self.trained)

    @property
    def parathinker(self) -> bool:
        """ParaThinker's own decoding: ``method=parathinker`` on a ParaThinker checkpoint (no forking format)."""
        return self.method == "parathinker" and self.engine.format == "parathinker"

    @property
    def fork_format(self) -> formats.Format | None:
        """The format whose model forks itself, when the run decodes one (None: ParaThinker or a baseline)."""
        name = self.engine.format
        if self.method != "parathinker" or name == "parathinker":
            return None
        fmt = formats.get_format(name)
        return self.trained.apply(fmt) if self.trained is not None and self.trained.format == name else fmt

    def info(self) -> dict:
        """Flat, as the results JSON records them."""
        return {"method": self.method, "compile": self.compile, **self.engine.args()}


def slots(batch_size: Any) -> int:
    """``batch_size`` as the engine's number of slots (a number of prompts)."""
    if str(batch_size).startswith("auto"):
        raise ValueError("batch_size=auto is not supported by --model parathinker: pass a number of prompts")
    try:
        count = int(batch_size)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size={batch_size!r} is not a number of prompts") from None
    if count < 1:
        raise ValueError(f"batch_size={count} must be at least 1")
    return count


def check_hflm_args(pretrained: Any, hflm_args: dict[str, Any]) -> None:
    """The HFLM args this model reads or restricts, checked before anything loads: ``pretrained`` and
    ``peft`` (a local path must exist), ``batch_size`` (:func:`slots`), ``think_end_token`` (text)."""
    slots(hflm_args.get("batch_size", 1))
    think_end = hflm_args.get("think_end_token")
    if isinstance(think_end, int) or str(think_end or "").isdigit():
        raise ValueError("think_end_token must be given as a string (not a token id) for --model parathinker")
    if not isinstance(pretrained, str) and pretrained is not None:
        raise ValueError("pretrained must be a checkpoint path, a hub id or 'embedded'")
    check_checkpoint_arg("pretrained", pretrained if not embedded.is_embedded(pretrained) else None)
    check_checkpoint_arg("peft", hflm_args.get("peft"))
