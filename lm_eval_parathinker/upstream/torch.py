"""torch internals: dynamo's static marks, recompile limit, counters and errors, inductor's
FlexAttention probes, and ``BlockMask``'s tensor list. Guarded by tests/test_upstream.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention.flex_attention import BlockMask


def mark_static(x: torch.Tensor, dim: int | None = None) -> None:
    """Dynamo: compile for ``x``'s size in ``dim`` (None: every dim) instead of a symbolic one. The
    engine's rectangular steps keep one batch size, so the compiled step specializes on it (and
    flex picks its decoding kernel, which needs an integer batch)."""
    torch._dynamo.mark_static(x, dim)


def mark_dynamic(x: torch.Tensor, dim: int) -> None:
    """Dynamo: compile for any size of ``x`` in ``dim`` (it specializes a tensor reached through an
    argument's attributes on its first size otherwise)."""
    torch._dynamo.mark_dynamic(x, dim)


def mark_static_address(x: torch.Tensor) -> None:
    """Dynamo: ``x`` keeps its address across calls (as transformers' StaticCache marks its
    tensors), so a CUDA graph of the compiled step reads the KV pages in place."""
    torch._dynamo.mark_static_address(x)


_limit_on = False  # a recompile_limit block is active (nested ones change nothing)


@contextlib.contextmanager
def recompile_limit(at_least: int) -> Iterator[None]:
    """Dynamo's ``recompile_limit`` at least ``at_least``, and an error past it
    (``fail_on_recompile_limit_hit``) instead of running the function uncompiled, while the
    block runs: uncompiled FlexAttention computes wrong attention, not just slow attention."""
    global _limit_on
    if _limit_on:
        yield
        return
    config = torch._dynamo.config
    before = config.recompile_limit, config.fail_on_recompile_limit_hit
    config.recompile_limit, config.fail_on_recompile_limit_hit = max(before[0], at_least), True
    _limit_on = True
    try:
        yield
    finally:
        config.recompile_limit, config.fail_on_recompile_limit_hit = before
        _limit_on = False


def compile_enabled() -> bool:
    """Whether ``torch.compile`` compiles in this process (``TORCH_COMPILE_DISABLE=1`` turns every
    compiled function into the plain one: for FlexAttention, wrong attention)."""
    return not torch._dynamo.config.disable


def inductor_default_cache_dir() -> str:
    """The folder inductor caches into when ``$TORCHINDUCTOR_CACHE_DIR`` is unset, which it then sets
    the variable to itself (importing its code cache does)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return default_cache_dir()


def compile_counters():
    """dynamo's counters (``stats``/``unique_graphs``: graphs compiled so far in this process,
    ``graph_break``, ``frames``/``ok``, ...)."""
    from torch._dynamo.utils import counters

    return counters


def compile_errors() -> tuple[type[BaseException], ...]:
    """What compiling can raise (dynamo and inductor failures, a C++ compiler missing or failing,
    the recompile limit under ``fail_on_recompile_limit_hit``); not errors of the compiled code's run."""
    from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException
    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler

    return TorchDynamoException, FailOnRecompileLimitHit, CppCompileError, InvalidCxxCompiler


def compile_error_cause(error: BaseException) -> str:
    """What caused a compile error, briefly: the innermost error (dynamo wraps inductor's, which wraps
    the compiler's), its first line and dynamo's explanation line where it gives one."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    explained = [line for line in lines[1:] if line.startswith("Explanation:")]
    text = " ".join(lines[:1] + explained[:1])
    return f"{type(error).__name__}: {text[:400]}"


def cpu_flex_supported() -> bool:
    """inductor's own test whether its compiled CPU FlexAttention runs on this machine (an x86
    CPU with AVX2); torch has no public probe."""
    from torch._inductor.kernel.flex.flex_cpu import check_cpu_supported

    return check_cpu_supported()


def cuda_flex_configs(head_dim: int, dtype: torch.dtype) -> tuple[list, list]:
    """The configs inductor's template heuristics choose for FlexAttention on the current CUDA
    device (by compute capability): the forward kernel's and the decoding kernel's, each with
    ``block_m``/``block_n``. The engine checks that its KV pages fit their blocks."""
    from torch._inductor.virtualized import V

    return (V.choices.get_flex_attention_fwd_configs(head_dim, dtype, "cuda"),
            V.choices.get_flex_decode_configs(head_dim, dtype, "cuda"))


class CpuFlexThreads:
    """The CPU thread count compiled FlexAttention runs with in this process. inductor builds a
    CPU flex kernel for the thread count of its compilation (torch 2.13), and a process that
    compiles at one count and then at another can get kernels that compute wrong attention: the
    first count that chose flex is kept, and another one is refused."""

    def __init__(self) -> None:
        self.threads: int | None = None

    def conflict(self) -> int | None:
        """The count flex ran with, when torch now uses another; None when flex may run."""
        return self.threads if self.threads not in (None, torch.get_num_threads()) else None

    def claim(self) -> None:
        """Flex runs at torch's thread count now: keep it for the rest of the process."""
        self.threads = torch.get_num_threads()


#: the one record per process (inductor's kernels are per process)
CPU_FLEX_THREADS = CpuFlexThreads()


def block_mask_tensors(block_mask: BlockMask) -> list[torch.Tensor]:
    """The tensors a ``BlockMask`` holds (its ``_TENSOR_ATTRS``, the list torch's own ``to()``
    moves), to measure its memory."""
    tensors = (getattr(block_mask, name) for name in block_mask._TENSOR_ATTRS)
    return [t for t in tensors if isinstance(t, torch.Tensor)]


# -- for the tests' inspection of compilation ------------------------------------------------------


def compilations(fn) -> int:
    """How many compiled versions dynamo holds for function ``fn`` in this process."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(fn.__code__))


def dynamo_config(**settings) -> contextlib.AbstractContextManager:
    """dynamo's config set to ``settings`` while the block runs (e.g. ``recompile_limit=3``)."""
    return torch._dynamo.config.patch(**settings)


def recompile_limit_hit() -> type[Exception]:
    """The error dynamo raises past ``recompile_limit`` under ``fail_on_recompile_limit_hit``."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    return FailOnRecompileLimitHit
