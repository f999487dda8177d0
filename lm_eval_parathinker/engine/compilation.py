"""Whether the decode step is compiled, and running it: ``compile=auto`` from measured verdicts, the
compile time, the persistent cache, and a fallback that is always right.

``compile`` is ``auto`` (the default), ``true`` or ``false`` (:data:`COMPILE_CHOICES`; the default
can be set for every run with ``$PARATHINKER_COMPILE``). ``auto`` compiles where the committed
verdict table (:data:`VERDICTS_CSV`, written by ``python -m benchmarks.engine --only eval_workload``
and, for CUDA, ``benchmarks/gpu.sh``) measured the compiled step faster, for the device type and
the model's size bucket (:func:`size_bucket`); nothing is timed at start, and a device or size
with no measured row decodes eager.

:class:`DecodeStep` runs every decode forward of an engine. Compiled, it is one ``torch.compile``
of :func:`step.decode_forward` (whole graph), one compilation per (slots x P) rectangle for the
process. Its compile time and count go into the engine's stats and the log. If compiling fails (no
C++ compiler for inductor, an operation dynamo cannot compile, the recompile limit), it warns once,
naming the cause, and decodes eager with the ``sdpa`` kernel from then on: the step that failed is
run again that way (writing the same keys and values). The ``flex`` kernel, which an eager step
compiles, falls back the same way. Inductor's compiled kernels persist in
``$TORCHINDUCTOR_CACHE_DIR``, by default the package cache's ``inductor/`` folder
(:func:`use_package_inductor_cache`), so a second process reuses the first one's work.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..files import cache_root
from ..tables import read_csv, write_table
from ..upstream import torch as upstream_torch
from .attention import SDPA, Kernel, compile_limits
from .hub_kernels import bypass_kernel_routing

logger = logging.getLogger(__name__)

COMPILE_CHOICES = ("auto", "true", "false")
COMPILE_ENV = "PARATHINKER_COMPILE"

#: the verdicts, one row per (device, size_bucket): written by the benchmarks, read by compile=auto
VERDICTS_CSV = Path(__file__).with_name("compile_verdicts.csv")
VERDICT_COLUMNS = ("device", "size_bucket", "shape", "params", "eager_s", "compiled_s", "speedup", "compile_s",
                   "compile", "torch", "threads")
#: model sizes (parameters) the verdicts are kept by: upper bounds and names
SIZE_BUCKETS = ((10**7, "<10M"), (10**9, "10M-1B"), (10**10, "1B-10B"), (math.inf, ">=10B"))


def default_compile() -> str:
    """``$PARATHINKER_COMPILE`` (``auto`` when unset): the default of every ``compile`` option."""
    return parse_compile(os.environ.get(COMPILE_ENV) or "auto", COMPILE_ENV)


def parse_compile(value: str | bool, name: str = "compile") -> str:
    """``value`` as one of :data:`COMPILE_CHOICES` (booleans and their usual spellings too)."""
    text = str(value).strip().lower()
    text = {"1": "true", "yes": "true", "0": "false", "no": "false"}.get(text, text)
    if text not in COMPILE_CHOICES:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(COMPILE_CHOICES)}")
    return text


def size_bucket(num_params: int) -> str:
    """The verdict table's name for a model of ``num_params`` parameters."""
    return next(name for bound, name in SIZE_BUCKETS if num_params < bound)


def read_verdicts(path: str | os.PathLike = VERDICTS_CSV) -> list[dict]:
    """The verdict table's rows (none when the file does not exist)."""
    return read_csv(path)[0] if Path(path).exists() else []


def write_verdict(row: dict, path: str | os.PathLike = VERDICTS_CSV) -> None:
    """Put ``row`` (:data:`VERDICT_COLUMNS`) into the table, replacing the row of its device and size."""
    key = (row["device"], row["size_bucket"])
    rows = [r for r in read_verdicts(path) if (r["device"], r["size_bucket"]) != key] + [row]
    write_table(sorted(rows, key=lambda r: (r["device"], r["params"])), path, VERDICT_COLUMNS)


def verdict_for(device: torch.device, num_params: int, path: str | os.PathLike = VERDICTS_CSV) -> dict | None:
    """The measured row for ``device``'s type and a model of ``num_params`` parameters (None: not measured)."""
    bucket = size_bucket(num_params)
    return next((r for r in read_verdicts(path) if (r["device"], r["size_bucket"]) == (device.type, bucket)), None)


def resolve_compile(choice: str, model: torch.nn.Module, verdicts: str | os.PathLike = VERDICTS_CSV) -> tuple[bool, str]:
    """Whether to compile the decode step of ``model`` for ``choice`` (:data:`COMPILE_CHOICES`; ``auto``
    from the ``verdicts`` table), and why."""
    if choice != "auto":
        return choice == "true", f"compile={choice}"
    if not upstream_torch.compile_enabled():
        return False, "compile=auto: torch.compile is disabled in this process"
    device = next(model.parameters()).device
    params = sum(p.numel() for p in model.parameters())
    row = verdict_for(device, params, verdicts)
    if row is None:
        return False, f"compile=auto: no measured verdict for {device.type} and {size_bucket(params)} parameters"
    compiled = str(row["compile"]).lower() == "true"
    return compiled, (f"compile=auto: on {device.type}, {row['size_bucket']} parameters ({row['shape']}), the "
                      f"compiled step measured {row['speedup']:.2f}x eager")


def use_package_inductor_cache() -> Path:
    """Inductor's persistent caches under the package cache (``inductor/``), unless the user set
    ``$TORCHINDUCTOR_CACHE_DIR`` (inductor sets it to its own default when it is imported: that one is
    replaced); returns the folder in use. Its keys include the CPU thread count that kernels are built
    for (torch >= 2.13), so a cache warmed at one count serves another correctly."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, upstream_torch.inductor_default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


@dataclasses.dataclass
class CompileStats:
    """What compiling cost an engine: seconds and graphs (the calls that compiled, timed whole)."""

    seconds: float = 0.0
    graphs: int = 0


class DecodeStep:
    """Runs an engine's decode forwards: compiled or eager, with the fallback (see the module docstring)."""

    def __init__(self, compile: bool, reason: str = ""):
        self.compile, self.reason = compile, reason
        self.failure: str | None = None  # why compiling failed (then: eager, sdpa)
        self.stats = CompileStats()
        self._compiled: Callable | None = None
        use_package_inductor_cache()  # for the eager step's flex kernel too

    @property
    def compiled(self) -> bool:
        """Whether steps run compiled (with the ``flex`` kernel: :meth:`compiles`)."""
        return self.compile and self.failure is None

    def compiles(self, kernel: Kernel) -> bool:
        """Whether steps with ``kernel`` run compiled: with ``flex`` only (``sdpa`` reads how many pages
        it gathers on the host, which no whole graph takes; its steps run eager)."""
        return self.compiled and kernel is not SDPA

    def call_stats(self, before: CompileStats, compiled: bool) -> dict:
        """A call's share of the stats (``before``: a copy of :attr:`stats` from its start; ``compiled``:
        whether its steps were to run compiled), for the engine's ``last_stats``: whether they did, the
        seconds and graphs compiled, and why compiling failed (None: it did not)."""
        return {"compiled": compiled and self.compiled, "compile_s": self.stats.seconds - before.seconds,
                "compilations": self.stats.graphs - before.graphs, "compile_failure": self.failure}

    def __call__(self, forward: Callable, model, cache, batch) -> torch.Tensor:
        """``forward(model, cache, batch)`` (:func:`step.decode_forward`), compiled or eager."""
        if self.failure is not None:
            return forward(model, cache, dataclasses.replace(batch, kernel=SDPA))
        fn = self._function(forward, model) if self.compiles(batch.kernel) else forward
        counters = upstream_torch.compile_counters()["stats"]
        before, start = counters["unique_graphs"], time.perf_counter()
        try:
            with compile_limits():
                logits = fn(model, cache, batch)
        except upstream_torch.compile_errors() as error:
            self._fail(error)
            return self(forward, model, cache, batch)
        if counters["unique_graphs"] != before:
            seconds = time.perf_counter() - start
            self.stats.seconds += seconds
            self.stats.graphs += counters["unique_graphs"] - before
            logger.info("compiled %s for %d queries in %.1f s (%s)", "the decode step" if self.compile else
                        "flex attention for an eager step", batch.queries.real.numel(), seconds, self.reason)
        return logits

    def _function(self, forward: Callable, model) -> Callable:
        if self._compiled is None:
            bypass_kernel_routing(model)
            cuda = next(model.parameters()).device.type == "cuda"
            # whole graph (a break would leave host work between pieces and no CUDA graph); dynamic:
            # one compilation serves any pool and page table; the batch (slots x P) is static
            # (step.step_forward marks it: flex's decoding kernel needs it), one compilation each
            self._compiled = torch.compile(forward, mode="reduce-overhead" if cuda else None, dynamic=True,
                                           fullgraph=True)
        return self._compiled

    def _fail(self, error: BaseException) -> None:
        what = "the decode step" if self.compile else "the flex attention kernel of an eager step"
        self.failure = upstream_torch.compile_error_cause(error)
        message = f"compiling {what} failed ({self.failure}); decoding continues eager with attention=sdpa"
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
