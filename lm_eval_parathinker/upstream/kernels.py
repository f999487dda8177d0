"""kernels internals: the forward its routing wrapper wraps. Guarded by tests/test_upstream.py.

Where the ``kernels`` package is installed (transformers 5.25 requires it), attention classes
decorated with ``use_kernelized_func`` wrap their forward in kernels' ``new_forward`` (made with
``functools.wraps``), which routes a function (RoPE) to a per-model wrapper through a module-level
context variable. The engine's compiled step calls the undecorated forward instead
(:mod:`lm_eval_parathinker.engine.hub_kernels` says why).
"""

from __future__ import annotations

from collections.abc import Callable


def undecorated_forward(forward: Callable) -> Callable | None:
    """The forward that kernels' routing wrapper ``forward`` wraps (its ``__wrapped__``), or None
    when ``forward`` is not such a wrapper (``functools.wraps`` copies the name and module of the
    wrapped forward; the wrapper's globals stay kernels')."""
    module = getattr(forward, "__globals__", {}).get("__name__", "")
    if module.split(".")[0] != "kernels":
        return None
    return getattr(forward, "__wrapped__", None)
