"""ParaThinker native parallel thinking for the lm-evaluation-harness.

The public names load lazily, so ``import lm_eval_parathinker`` (run at every Python start-up by
the lm-eval hook) stays free of torch and transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ParaThinkerEngine": "engine",
    "GenerationOutput": "engine",
    "build_prompt": "protocol",
    "load_parathinker_model": "thought_embedding",
    "attach_thought_embeddings": "thought_embedding",
    "load_thought_embeddings": "thought_embedding",
    "add_control_tokens": "thought_embedding",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
