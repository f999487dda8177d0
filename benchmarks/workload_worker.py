"""One timed run of the ``eval_workload`` benchmark, in a process of its own.

    python -P benchmarks/workload_worker.py SPEC.json VARIANT --package-root DIR

The parent (:func:`benchmarks.batching.bench_eval_workload`) saves a checkpoint and a
:class:`WorkloadSpec` once, then starts this script once per timed run with ``$PYTHONPATH`` naming
the package to measure: today's (the repository) or the original engine's (a git worktree of
commit ca50159). ``-P`` keeps the script's folder off ``sys.path``, so ``lm_eval_parathinker`` is
whichever ``$PYTHONPATH`` names; the run checks that it is.

The script loads the checkpoint with that package's ``load_parathinker_model``, bans EOS and the
control tokens and forces each prompt's path closer at its chosen step (:func:`ban_tokens`,
:func:`force_token_at`), runs the ``slots`` longest prompts once untimed (the warm-up: the full
batch compiles there), then times one pass over every prompt and prints one JSON line: ``seconds``
(the pass, less its steps that compiled), ``tokens`` (generated), ``warmup_s``, ``compile_s`` (the
seconds of the steps that compiled something, warm-up and pass, as the engine's ``last_stats``
reports them; 0 for the original engine, which compiles nothing) and ``timed_compile_s`` (those in
the pass).

Variants: ``original`` (ca50159's ``ParaThinkerEngine``: static batches of ``slots`` prompts, one
``generate`` call each, the next batch when the whole batch has ended), ``eager`` and ``compiled``
(today's engine, continuous batching through ``slots`` slots, ``compile=False`` / ``compile=True``).

It imports only the standard library and torch at module level (transformers and the package once it
runs), so the parent and the benchmarks' harness import its hooks and spec from here too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

VARIANTS = ("original", "eager", "compiled")


@dataclass(frozen=True)
class WorkloadSpec:
    """What every run of one workload does: the checkpoint, the prompts and their forced think lengths."""

    checkpoint: str  # save_pretrained folder: model (thought embeddings under the official names) and tokenizer
    device: str
    dtype: str
    threads: int
    prompts: list[list[int]]
    lengths: list[int]  # think tokens per path of each prompt, the closer included
    paths: int
    budget: int  # tokens per path
    slots: int
    summary_tokens: int
    num_control_paths: int
    banned: list[int]  # never generated: EOS and every control token
    closer: int  # the path closer forced after ``force_position``
    force_position: int

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, path: Path) -> WorkloadSpec:
        return cls(**json.loads(path.read_text()))


# -- hooks that force token counts (the benchmarks' harness uses them too) ---------------------


def ban_tokens(model: torch.nn.Module, token_ids: Sequence[int]) -> None:
    """Make ``token_ids`` impossible to generate (forces fixed-length runs, engine and baseline alike)."""
    banned = torch.tensor(sorted(token_ids), device=next(model.parameters()).device)

    def hook(module, args, output):
        return output.index_fill(-1, banned, float("-inf"))

    model.get_output_embeddings().register_forward_hook(hook)


@contextlib.contextmanager
def force_token_at(model: torch.nn.Module, position: int, token: int):
    """While active, the model predicts ``token`` (and nothing else) after any query at ``position``
    (without a host round trip: the step stays as it is in a real run)."""
    seen = {}
    pre = model.register_forward_pre_hook(lambda m, a, kw: seen.update(positions=kw["position_ids"]), with_kwargs=True)

    def hook(module, args, logits):
        at = seen["positions"][:, -logits.shape[1] :] == position
        only = torch.full_like(logits, float("-inf")).index_fill(-1, torch.tensor([token], device=logits.device), 0.0)
        return torch.where(at[..., None], only, logits)

    post = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        pre.remove()
        post.remove()


# -- the run ----------------------------------------------------------------------------------


def check_package(root: Path) -> None:
    """Fail unless ``lm_eval_parathinker`` was imported from ``root`` (the package this run measures)."""
    import lm_eval_parathinker

    found = Path(lm_eval_parathinker.__file__).resolve()
    if not found.is_relative_to(root.resolve()):
        raise RuntimeError(f"lm_eval_parathinker was imported from {found}, not from {root}: run this script with "
                           f"`python -P` and PYTHONPATH={root}")


def generator(spec: WorkloadSpec, variant: str, model, tokenizer) -> tuple[object, Callable[[list], list]]:
    """(engine, a function that generates for a list of prompts) of ``variant``."""
    from lm_eval_parathinker.engine import ParaThinkerEngine

    kwargs = dict(num_paths=spec.paths, max_new_tokens=spec.budget, summary_max_tokens=spec.summary_tokens,
                  temperature=1.0, seed=0)
    if variant == "original":  # ca50159's engine has no slots: one static batch per call
        engine = ParaThinkerEngine(model, tokenizer, num_control_paths=spec.num_control_paths)
        return engine, lambda prompts: [out for i in range(0, len(prompts), spec.slots)
                                        for out in engine.generate(prompts[i : i + spec.slots], **kwargs)]
    engine = ParaThinkerEngine(model, tokenizer, compile=variant == "compiled")
    return engine, lambda prompts: engine.generate(prompts, num_slots=spec.slots, **kwargs)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """``fn()`` and its wall time, synchronised on GPU."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


def compile_seconds(engine) -> float:
    """Seconds the engine's last call spent in steps that compiled something (0 for an engine that
    does not say: the original compiles nothing)."""
    return getattr(engine, "last_stats", {}).get("compile_s", 0.0)


def run(spec: WorkloadSpec, variant: str) -> dict:
    """Warm up, then time one pass over the workload; the result line's fields."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    from lm_eval_parathinker.thought_embedding import load_parathinker_model

    logging.disable_progress_bar()
    torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    model = load_parathinker_model(spec.checkpoint, dtype=getattr(torch, spec.dtype), attn_implementation="sdpa")
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(spec.checkpoint)
    ban_tokens(model, spec.banned)
    engine, generate = generator(spec, variant, model, tokenizer)
    # the warm-up: as many prompts as slots, the longest ones (the KV pool and the page table's
    # width follow the longest request): the full rectangle of slots x P compiles here
    longest = sorted(spec.prompts, key=len)[-spec.slots :]
    with force_token_at(model, spec.force_position, spec.closer):
        _, warmup_s = timed(lambda: generate(longest), device)
        compile_s = compile_seconds(engine)
        outs, seconds = timed(lambda: generate(spec.prompts), device)
    # a shape the warm-up did not meet compiles inside the timed pass (eager: flex's kernel again, for
    # dynamic sizes, as fewer slots run at the end): the engine times the steps that compiled, and
    # that time moves from the pass's seconds to compile_s
    late_s = compile_seconds(engine)
    if [len(o.path_ids[0]) for o in outs] != spec.lengths:
        raise RuntimeError(f"{variant}: the forced think lengths did not hold")
    return {"variant": variant, "seconds": seconds - late_s, "tokens": sum(o.stats["gen_tokens"] for o in outs),
            "warmup_s": warmup_s, "compile_s": compile_s + late_s, "timed_compile_s": late_s}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", type=Path, help="the workload (WorkloadSpec as JSON)")
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--package-root", type=Path, required=True, help="where lm_eval_parathinker must come from")
    args = parser.parse_args(argv)
    check_package(args.package_root)
    print(json.dumps(run(WorkloadSpec.read(args.spec), args.variant)), flush=True)


if __name__ == "__main__":
    main()
