"""Run an experiment's points through lm-eval's Python API, one ``ParaThinkerLM`` per checkpoint.

Each point is the ``lm_eval`` run of :meth:`config.Point.lm_eval_settings`, run in this process:
lm-eval's :meth:`EvaluatorConfig.from_config` (what ``lm_eval run --config`` reads) turns them into the
run's settings, ``simple_evaluate`` runs it (as lm-eval's CLI calls it: :func:`evaluate_like_the_cli`)
on the checkpoint's shared model (switched to the point's args with
:meth:`ParaThinkerLM.configure`, so the weights load once per checkpoint and the engine, with its
compiled step and KV pool, is kept), and lm-eval's ``EvaluationTracker`` writes its results JSON and
samples as the CLI does.

A point writes into ``<folder>.partial``, renamed to its folder once complete: a point's folder
exists only when the point is done. A rerun skips the done points and generates, in the others, only
the responses missing from the sweep's response journal, so a killed sweep continues where it stopped.
"""

from __future__ import annotations

import gc
import os
import random
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

from .. import protocol
from ..checkpoint import adapter_tokenizer
from ..embedded import resolve_pretrained
from ..harness.model import ParaThinkerLM
from ..scoring import judge
from .config import ConfigError, Experiment, Point, check_point_layout, switchable

PARTIAL = ".partial"


def evaluator_config(point: Point, output_path: Path | None = None):
    """The point's settings as lm-eval builds them from a ``--config`` file (lm-eval's
    ``EvaluatorConfig``: typed model args, gen_kwargs, seeds, metadata merged with the model args)."""
    from lm_eval.config.evaluate_config import EvaluatorConfig

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "point.yaml"
        path.write_text(yaml.safe_dump(point.lm_eval_settings(output_path)), encoding="utf-8")
        try:
            return EvaluatorConfig.from_config(path)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{point.entry}: lm_eval refuses these settings: {e}") from None


def is_done(point: Point) -> bool:
    return point.output_dir.is_dir()


def _tokenizer(model_args: dict):
    """A checkpoint's tokenizer, loaded without its weights (the one ``ParaThinkerLM`` would use)."""
    from transformers import AutoTokenizer

    revision = model_args.get("revision", "main")
    source = model_args.get("tokenizer") or adapter_tokenizer(model_args.get("peft"), revision) \
        or resolve_pretrained(model_args.get("pretrained"))
    return AutoTokenizer.from_pretrained(source, revision=revision,
                                         trust_remote_code=bool(model_args.get("trust_remote_code", False)))


def check(experiment: Experiment, tokenizers: bool = True) -> None:
    """Everything that can be checked before any weights load: every point's ``lm_eval`` arguments,
    and (``tokenizers``) each ``parathinker`` point's layout with its checkpoint's tokenizer
    (``compat=auto`` resolved, ``compat=official`` needs the released tokenizer's tokens)."""
    for point in experiment.points:
        evaluator_config(point)
    if not tokenizers:
        return
    for name, args in experiment.checkpoints.items():
        parathinker = [p for p in experiment.points if p.checkpoint == name and p.method == "parathinker"]
        if parathinker:
            tokenizer = _tokenizer(args)
            for point in parathinker:
                check_point_layout(point, tokenizer)


def _seed_like_simple_evaluate(seed: list) -> None:
    """The global seeds ``simple_evaluate`` sets before it builds a model from its args, so the shared
    model is built as a point's own run builds it (resizing the embeddings for added tokens draws
    random rows)."""
    from lm_eval.utils import set_torch_seed

    for value, apply in zip(seed, (random.seed, np.random.seed, set_torch_seed)):
        if value is not None:
            apply(value)


def load_model(points: list[Point]) -> ParaThinkerLM:
    """The model of one checkpoint for all its points (its points in the whole config, done or not,
    so that a rerun builds the same one). With a ``parathinker`` point among them it is built with
    that point's args (the control tokens and thought embeddings then in place for every point;
    the baselines never sample the token rows this adds: see :meth:`ParaThinkerLM.configure`)."""
    from lm_eval.api.registry import get_model

    first = next((p for p in points if p.method == "parathinker"), points[0])
    cfg = evaluator_config(first)
    _seed_like_simple_evaluate(cfg.seed)
    extra = {"batch_size": cfg.batch_size, "device": cfg.device}  # as simple_evaluate builds a model
    return get_model(cfg.model).create_from_arg_obj(cfg.model_args, extra)


def warm_up(lm: ParaThinkerLM) -> float:
    """Run the engine once at the shapes of the point ``lm`` is configured for (its mode, paths and
    slots, each slot a prompt), untimed in the point, as the benchmarks warm up before each timed
    call: the one-time costs of a shape (the first forwards at a batch size, compilation with
    ``compile=true``) then land in no point's ``think_s`` or ``latency_s``. Returns its seconds.
    The tokens of a request depend on its own seed only: no point changes."""
    start = time.perf_counter()
    options, slots = lm.options, lm.batch_size_per_gpu
    if options.fork_format is not None:
        prompt, tokens = options.fork_format.build_prompt("warm up", lm.tokenizer), 2
    elif options.method == "parathinker":
        prompt = protocol.build_prompt("warm up", lm.tokenizer)
        tokens = lm.compat.pad_to_multiple_of or 2
    else:
        prompt, tokens = lm.tok_encode("warm up"), 2
    # seed=0: no draw from torch's global generator
    lm.engine.generate([prompt] * slots, options.engine, max_new_tokens=tokens, num_slots=slots, seed=0)
    return time.perf_counter() - start


def _tasks(cfg) -> list[str]:
    """``--tasks`` as a list of names (as EvaluatorConfig.process_tasks splits it)."""
    tasks = [cfg.tasks] if isinstance(cfg.tasks, str) else cfg.tasks
    return [name for entry in tasks for name in entry.split(",")]


def _task_manager(cfg):
    """The TaskManager of the CLI for this point (its metadata: the model args merged with --metadata).
    lm-eval's own tasks are indexed (about 15 s a point) only when the point has a task that is not ours."""
    from lm_eval.tasks import TaskManager

    ours = TaskManager(include_path=cfg.include_path, include_defaults=False, metadata=cfg.metadata)
    if all(ours.match_tasks([task]) for task in _tasks(cfg)):
        return ours
    return TaskManager(include_path=cfg.include_path, metadata=cfg.metadata)


def run_point(lm: ParaThinkerLM, point: Point, report: Callable[[str], None] = print) -> dict:
    """Run one point on the shared model, after a warm-up at its shapes (its seconds reported apart);
    returns its results (as saved)."""
    partial = point.output_dir.with_name(point.output_dir.name + PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)  # left by a killed run
    cfg = evaluator_config(point, partial)
    lm.configure(**switchable(cfg.model_args), batch_size=cfg.batch_size)
    report(f"  warm-up at the point's shapes: {warm_up(lm):.1f} s (not in its think_s or latency_s)")
    results = evaluate_like_the_cli(lm, cfg)
    os.replace(partial, point.output_dir)
    return results


def evaluate_like_the_cli(lm: ParaThinkerLM, cfg) -> dict:
    """Run ``cfg`` on the shared model and save its results and samples, as lm-eval's CLI does.

    lm-eval has no public function that runs a config on a given model object, so this mirrors
    its CLI (:func:`lm_eval_parathinker.upstream.lm_eval.cli_evaluate_source`): the one place that follows
    lm-eval's private code, and tests/test_experiments.py fails when that call's keywords change."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    cfg.hf_hub_log_args["output_path"] = cfg.output_path
    if os.environ.get("HF_TOKEN"):
        cfg.hf_hub_log_args["token"] = os.environ["HF_TOKEN"]
    tracker = EvaluationTracker(**cfg.hf_hub_log_args)
    results = simple_evaluate(
        model=lm, model_args=cfg.model_args, tasks=_tasks(cfg), num_fewshot=cfg.num_fewshot,
        batch_size=cfg.batch_size, max_batch_size=cfg.max_batch_size, device=cfg.device, use_cache=cfg.use_cache,
        cache_requests=cfg.cache_requests.get("cache_requests", False),
        rewrite_requests_cache=cfg.cache_requests.get("rewrite_requests_cache", False),
        delete_requests_cache=cfg.cache_requests.get("delete_requests_cache", False),
        limit=cfg.limit, samples=cfg.samples, check_integrity=cfg.check_integrity, write_out=cfg.write_out,
        log_samples=cfg.log_samples, evaluation_tracker=tracker, system_instruction=cfg.system_instruction,
        apply_chat_template=cfg.apply_chat_template, fewshot_as_multiturn=cfg.fewshot_as_multiturn,
        gen_kwargs=cfg.gen_kwargs, task_manager=_task_manager(cfg), verbosity=cfg.verbosity,
        predict_only=cfg.predict_only, random_seed=cfg.seed[0], numpy_random_seed=cfg.seed[1],
        torch_random_seed=cfg.seed[2], fewshot_random_seed=cfg.seed[3],
        confirm_run_unsafe_code=cfg.confirm_run_unsafe_code, metadata=cfg.metadata,
    )  # fmt: skip
    # What the CLI records: the model by its registry name (simple_evaluate names a model object by
    # its checkpoint), and that name as the tracker's model source.
    results["config"]["model"] = cfg.model
    tracker.general_config_tracker.model_source = cfg.model
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for task_name in results["configs"]:
        tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    return results


def _summary(results: dict) -> str:
    parts = []
    for task, metrics in results["results"].items():
        tokens = metrics.get("gen_tokens,all")
        parts.append(f"{task} pass@1 {metrics.get('pass_at_1,all', float('nan')):.3f}"
                     + (f", {tokens:.0f} tokens per response" if tokens is not None else ""))
    return "; ".join(parts)


def run(experiment: Experiment, report: Callable[[str], None] = print) -> dict[str, int]:
    """Run every point that is not done, checkpoint by checkpoint (each loaded once, only if it has
    points to run); returns how many points ran, were skipped as done, and model loads."""
    check(experiment)
    counts = {"ran": 0, "done": 0, "loads": 0}
    total = len(experiment.points)
    position = {id(p): i for i, p in enumerate(experiment.points, 1)}
    for name in experiment.checkpoints:
        points = [p for p in experiment.points if p.checkpoint == name]
        pending = [p for p in points if not is_done(p)]
        counts["done"] += len(points) - len(pending)
        if not pending:
            continue
        report(f"checkpoint {name}: loading {experiment.checkpoints[name]['pretrained']} once for {len(pending)} "
               f"point(s) ({len(points) - len(pending)} done before)")
        lm = load_model(points)
        counts["loads"] += 1
        judge("1", "2")  # the grading worker's start, in no point's time
        for point in pending:
            start = time.perf_counter()
            report(f"[{position[id(point)]}/{total}] {point.sweep}: {point.title}")
            try:
                results = run_point(lm, point, report)
            except Exception:
                report(f"experiments: the point {point.sweep}: {point.title} ({point.entry}) failed; the points done "
                       "so far are kept, and a rerun continues from here")
                raise
            counts["ran"] += 1
            report(f"[{position[id(point)]}/{total}] {point.sweep}: {point.title}: {_summary(results)} "
                   f"({time.perf_counter() - start:.0f} s) -> {point.output_dir}")
        del lm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return counts


def describe(experiment: Experiment) -> str:
    """The grid as ``--dry-run`` prints it: each point, its state, and its ``lm_eval`` command."""
    lines = [f"{experiment.path}: {len(experiment.points)} points in {len(experiment.sweeps())} sweeps, "
             f"{len(experiment.checkpoints)} checkpoint(s), each loaded once; output in {experiment.output_path}"]
    for sweep, points in experiment.sweeps().items():
        lines.append(f"\n{sweep} ({points[0].kind}, {len(points)} points):")
        for point in points:
            state = "done" if is_done(point) else "to run"
            note = ""
            if point.method == "parathinker" and point.model_args.get("compat", "auto") == "auto":
                note = "  [compat=auto: resolved from the tokenizer when the run starts]"
            paths = point.num_paths if point.num_paths is not None else "?"  # counted by the model as it forks
            lines.append(f"  {point.checkpoint:<10} {point.title:<32} {point.method:<11} P={paths:<3} "
                         f"B={point.max_gen_toks:<6} batch {point.batch_size:<3} {state}{note}")
            lines.append("      " + shlex.join(["lm_eval", *point.lm_eval_args()]))
    return "\n".join(lines)


__all__ = ["check", "evaluator_config", "describe", "evaluate_like_the_cli", "is_done", "load_model", "run", "run_point",
           "warm_up"]
