"""Compile scenarios, each in a process of its own (tests/test_compilation.py runs them): a fresh
dynamo, and the inductor cache folder the test chose ($TORCHINDUCTOR_CACHE_DIR). Each prints one
JSON line.

    python tests/compile_scenarios.py fallback no_cxx|unsupported_op|recompile_limit
    python tests/compile_scenarios.py attention THREADS CHECKPOINT

``fallback``: compiling is made to fail for the named cause (``no_cxx``: the test sets ``CXX`` to
a compiler that does not exist); reports the warnings given and whether every engine's tokens
equal the eager ``sdpa`` engine's. ``attention``: CHECKPOINT's compiled step at THREADS CPU threads,
three slots (as the test's lm_eval run), against the eager ``sdpa`` step (tokens and logits), and whether
the first response's times leave out the compilation it waited for.
"""

from __future__ import annotations

import json
import sys
import time
import warnings

import torch
from tiny import tiny_parathinker
from transformers import AutoTokenizer

from lm_eval_parathinker.engine import ParaThinkerEngine, attention
from lm_eval_parathinker.thought_embedding import load_parathinker_model

PROMPTS = ["Find the number of ways.", "Let x be the answer, so x = 3 + 4.", "Please reason step by step."]
CALL = dict(num_paths=2, max_new_tokens=8, summary_max_tokens=4, output_logits=True)


def tokens(outputs) -> list:
    return [(o.path_ids, o.summary_ids) for o in outputs]


def opaque_norm(model) -> None:
    """The model's final norm through a custom operator without a fake (meta) implementation:
    it runs eagerly, and dynamo cannot trace it."""

    @torch.library.custom_op("compile_scenarios::opaque", mutates_args=())
    def opaque(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    norm = model.model.norm
    forward = norm.forward
    norm.forward = lambda hidden: opaque(forward(hidden))


def fallback(cause: str) -> dict:
    model, tok = tiny_parathinker()
    reference = ParaThinkerEngine(model, tok, compile=False)
    if cause == "unsupported_op":
        opaque_norm(model)
    engines = [ParaThinkerEngine(model, tok, compile=True)]
    if cause == "no_cxx":  # an eager step compiles flex's kernel: it falls back too
        engines.append(ParaThinkerEngine(model, tok, compile=False))
    same, failures = True, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cause == "recompile_limit":  # one compilation allowed: the second rectangle is past it
            torch._dynamo.config.recompile_limit = attention.RECOMPILE_LIMIT = 1
            engines[0].generate(PROMPTS[:1], num_slots=1, **CALL)
        for engine in engines:
            got = engine.generate(PROMPTS, num_slots=2, **CALL)
            failures.append(engine.last_stats["compile_failure"])
            same &= tokens(got) == tokens(reference.generate(PROMPTS, num_slots=2, attention="sdpa", **CALL))
            same &= not engine.compile and engine.last_stats["attention"] in ("flex", "sdpa")
    return {"warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
            "failures": failures, "same": same}


def compiled_attention(threads: int, checkpoint: str) -> dict:
    torch.set_num_threads(threads)
    model, tok = load_parathinker_model(checkpoint, dtype=torch.float32), AutoTokenizer.from_pretrained(checkpoint)
    engine = ParaThinkerEngine(model, tok, compile=True)
    start = time.perf_counter()
    compiled = engine.generate(PROMPTS, num_slots=3, attention="flex", **CALL)
    wall, first = time.perf_counter() - start, compiled[0].stats  # the first response was in the step that compiled
    compile_apart = first["compile_s"] == engine.last_stats["compile_s"] > 0 and first["latency_s"] <= wall - first["compile_s"]
    eager = ParaThinkerEngine(model, tok, compile=False).generate(PROMPTS, num_slots=3, attention="sdpa", **CALL)
    close = all(torch.allclose(a, b, atol=1e-4, rtol=0) for x, y in zip(compiled, eager)
                for a, b in zip([*x.path_logits, x.summary_logits], [*y.path_logits, y.summary_logits]))
    return {"same": tokens(compiled) == tokens(eager) and close, "compile_apart": compile_apart}


if __name__ == "__main__":
    what, *args = sys.argv[1:]
    print(json.dumps(fallback(*args) if what == "fallback" else compiled_attention(int(args[0]), args[1])))
