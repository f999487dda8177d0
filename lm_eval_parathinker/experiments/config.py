"""An experiment config (YAML) expanded into its points, each one ``lm_eval --model parathinker`` run.

A config names its checkpoints (model args), the run settings shared by every point (tasks,
``--limit``, ``--metadata``, sampling ``gen_kwargs``, ...) and its sweeps. A sweep has a ``kind``
(``scaling``, ``width`` or ``ablations``: which picture and table it makes) and a list of ``runs``;
in a run, a list value is an axis, and a run stands for every combination of its axes::

    checkpoints:
      tiny: {pretrained: embedded, dtype: float32}
    tasks: [aime24]
    gen_kwargs: {do_sample: true, temperature: 0.5, top_p: 1.0}
    sweeps:
      scaling:
        kind: scaling
        runs:
          - {method: sequential, max_gen_toks: [64, 128]}
          - {method: parathinker, num_paths: [2, 4], max_gen_toks: 64}

Everything is checked here, before any weights load; a bad entry raises :class:`ConfigError` naming
the file, the line and the entry (``sweeps.scaling.runs[1].num_paths``). What needs a checkpoint's
tokenizer (``compat=auto``) is checked again by the runner when the tokenizer is at hand.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import protocol
from ..engine import EngineOptions
from ..harness.options import ENGINE_MODE, RunOptions

KINDS = ("scaling", "width", "ablations")
#: run settings that the top level sets for every point and a sweep may override
SETTINGS = ("tasks", "limit", "metadata", "batch_size")
TOP_KEYS = frozenset({"output_path", "checkpoints", "sweeps", "gen_kwargs", "apply_chat_template", "seed", "device",
                      *SETTINGS})
SWEEP_KEYS = frozenset({"kind", "checkpoint", "runs", *SETTINGS})
#: the ParaThinker model args a run may set (the checkpoint's are its defaults), besides its budget
RUN_ARGS = ("method", *EngineOptions.names())
RUN_KEYS = frozenset({"label", "checkpoint", "max_gen_toks", *RUN_ARGS})
#: model args the experiment sets itself
MANAGED_ARGS = ("journal_dir",)
#: the model args that ParaThinkerLM.configure switches; the others need the checkpoint loaded again
SWITCHABLE = frozenset(RunOptions.names())
DEFAULTS = {"tasks": None, "limit": None, "metadata": None, "batch_size": 1, "device": None, "seed": None,
            "apply_chat_template": False}
#: the short names of the axes in point names and labels
SHORT = {"num_paths": "P", "max_gen_toks": "B"}


class ConfigError(ValueError):
    """A bad experiment config; the message names the file, the line and the entry."""


@dataclass(frozen=True)
class Point:
    """One grid point: an ``lm_eval --model parathinker`` run, and where it belongs in the pictures."""

    sweep: str
    kind: str
    run: int  # index of its run in the sweep
    label: str  # the run's label (default: the method)
    axes: dict[str, Any]  # this point's value of each axis of its run
    checkpoint: str
    model_args: dict[str, Any]  # the checkpoint's model args, then the run's (lm-eval's --model_args)
    gen_kwargs: dict[str, Any]  # the sampling settings and the per-path budget max_gen_toks
    tasks: tuple[str, ...]
    limit: int | float | None
    metadata: dict | None
    batch_size: int
    device: str | None
    seed: Any
    apply_chat_template: bool
    entry: str  # where the point comes from: "FILE:LINE: sweeps.NAME.runs[i]"
    output_dir: Path = field(compare=False)

    @property
    def method(self) -> str:
        return self.model_args.get("method", "parathinker")

    @property
    def shown_method(self) -> str:
        return shown_method(self.model_args)

    @property
    def num_paths(self) -> int | None:
        """Paths per request (per fork for a forking format; None where its model counts them)."""
        return EngineOptions.parse(mode=ENGINE_MODE[self.method], num_paths=self.model_args.get("num_paths"),
                                   format=self.model_args.get("format", "parathinker")).num_paths

    @property
    def max_gen_toks(self) -> int:
        return int(self.gen_kwargs["max_gen_toks"])

    @property
    def name(self) -> str:
        """Its folder name: readable, plus a hash of everything that defines it."""
        parts = [self.checkpoint, self.label, *(f"{SHORT.get(k, k)}{v}" for k, v in self.axes.items()
                                               if k not in ("method", "checkpoint"))]
        identity = [{k: v for k, v in self.model_args.items() if k not in MANAGED_ARGS}, self.gen_kwargs, self.tasks,
                    self.limit, self.metadata, self.batch_size, self.device, self.seed, self.apply_chat_template]
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "-".join(map(str, parts))) + "-" + digest

    @property
    def title(self) -> str:
        """The point in words: its run's label and its axis values (``re-prefill P=4``)."""
        values = [f"{SHORT.get(k, k)}={v}" for k, v in self.axes.items() if (k, v) != ("method", self.label)]
        return " ".join([self.label, *values])

    def lm_eval_settings(self, output_path: Path | None = None) -> dict[str, Any]:
        """The run of this point alone as lm-eval's settings (the keys of ``lm_eval run --config``),
        valued as lm-eval's command line gives them; ``output_path``: its folder."""
        settings = {"model": "parathinker", "model_args": _args_string(self.model_args), "tasks": ",".join(self.tasks),
                    "gen_kwargs": _args_string(self.gen_kwargs), "batch_size": str(self.batch_size),
                    "device": self.device, "limit": None if self.limit is None else float(self.limit),
                    "metadata": self.metadata or None, "seed": self.seed,
                    "apply_chat_template": self.apply_chat_template or None, "log_samples": True,
                    "output_path": str(output_path or self.output_dir)}
        return {key: value for key, value in settings.items() if value is not None}

    def lm_eval_args(self, output_path: Path | None = None) -> list[str]:
        """The same run as the arguments of ``lm_eval``."""
        args: list[str] = []
        for key, value in self.lm_eval_settings(output_path).items():
            if value is True:
                args.append(f"--{key}")
            elif isinstance(value, dict):
                args += [f"--{key}", json.dumps(value, sort_keys=True)]
            else:
                args += [f"--{key}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
        return args


@dataclass(frozen=True)
class Experiment:
    """A checked config: its checkpoints' model args and every point, in config order."""

    path: Path
    output_path: Path
    checkpoints: dict[str, dict[str, Any]]
    points: list[Point]

    def sweeps(self) -> dict[str, list[Point]]:
        """The points of each sweep, in config order."""
        found: dict[str, list[Point]] = {}
        for point in self.points:
            found.setdefault(point.sweep, []).append(point)
        return found


def shown_method(model_args: dict[str, Any]) -> str:
    """The method as labels, tables and the leaderboard name it: a forking format's name, else the method."""
    method, fork_format = model_args.get("method", "parathinker"), model_args.get("format", "parathinker")
    return fork_format if method == "parathinker" and fork_format != "parathinker" else method


def switchable(model_args: dict[str, Any]) -> dict[str, Any]:
    """The model args that :meth:`ParaThinkerLM.configure` switches (not pretrained, dtype, peft, ...)."""
    return {k: v for k, v in model_args.items() if k in SWITCHABLE}


def _args_string(args: dict[str, Any]) -> str:
    """``k=v,k2=v2`` as ``--model_args`` / ``--gen_kwargs`` take it (booleans as true/false)."""
    return ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in args.items())


# -- reading the YAML with line numbers ------------------------------------------------------


def _node_lines(node: yaml.Node, path: tuple = ()) -> Iterator[tuple[tuple, int]]:
    """(entry path, line) of every node; a mapping entry is at its key's line."""
    yield path, node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            entry = (*path, key.value)
            yield entry, key.start_mark.line + 1
            for sub, line in _node_lines(value, entry):
                if sub != entry:
                    yield sub, line
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _node_lines(item, (*path, i))


class _Where:
    """Names entries of one file in error messages: ``FILE:LINE: sweeps.scaling.runs[1].num_paths``."""

    def __init__(self, path: Path, lines: dict[tuple, int]) -> None:
        self.path, self.lines = path, lines

    @staticmethod
    def dotted(entry: tuple) -> str:
        text = ""
        for part in entry:
            text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
        return text or "(top level)"

    def __call__(self, entry: tuple) -> str:
        probe = entry
        while probe and probe not in self.lines:
            probe = probe[:-1]
        return f"{self.path}:{self.lines.get(probe, 1)}: {self.dotted(entry)}"

    def error(self, entry: tuple, message: str) -> ConfigError:
        return ConfigError(f"{self(entry)}: {message}")


def _read(path: Path) -> tuple[dict, _Where]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the experiment config: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    where = _Where(path, dict(_node_lines(node)) if node is not None else {})
    if not isinstance(data, dict):
        raise where.error((), "the config must be a mapping (checkpoints, sweeps, ...)")
    return data, where


# -- validation ------------------------------------------------------------------------------


def _mapping(value: Any, entry: tuple, where: _Where, allowed: frozenset | None = None) -> dict:
    if not isinstance(value, dict):
        raise where.error(entry, f"must be a mapping, not {type(value).__name__}")
    if allowed is not None:
        for key in value:
            if key not in allowed:
                raise where.error((*entry, key), f"unknown key {key!r}; known: {', '.join(sorted(allowed))}")
    return value


def _positive_int(value: Any, entry: tuple, where: _Where) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise where.error(entry, f"{value!r} must be a positive integer")
    return value


def _check_settings(settings: dict, entry: tuple, where: _Where) -> None:
    """The run settings a sweep or the top level sets (types only; tasks are checked by the runner)."""
    tasks = settings.get("tasks")
    if tasks is not None and (not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks)):
        raise where.error((*entry, "tasks"), "must be a non-empty list of task names")
    limit = settings.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise where.error((*entry, "limit"), f"{limit!r} must be a positive number (as --limit)")
    if settings.get("metadata") is not None:
        _mapping(settings["metadata"], (*entry, "metadata"), where)
    if "batch_size" in settings:
        _positive_int(settings["batch_size"], (*entry, "batch_size"), where)


def _check_value(key: str, value: Any, entry: tuple, where: _Where) -> None:
    """A model-arg or gen-kwarg value must survive lm-eval's ``k=v,...`` strings."""
    if isinstance(value, (dict, list)) or "," in str(value):
        raise where.error(entry, f"{key}={value!r}: a value of --model_args / --gen_kwargs cannot hold a "
                                 "list, a mapping or a comma")


def _check_point(point: Point, where_run: str, tokenizer=None) -> None:
    """The point's ParaThinker args and budget, as the model checks them: with its checkpoint's
    ``tokenizer``, in the resolved layout; without, in the layout it names (``auto``: not yet)."""
    try:
        options = RunOptions.parse(**switchable(point.model_args))
        engine = options.engine
        if tokenizer is not None:  # as the model resolves it (a forking format read from the tokenizer too)
            engine = options.resolve(tokenizer).engine
        elif options.method == "parathinker" and engine.format == "parathinker" and engine.compat in protocol.LAYOUTS:
            engine = engine.with_layout(protocol.LAYOUTS[engine.compat])
        if engine.layout is not None:
            engine.layout.check_budget(point.max_gen_toks, "max_gen_toks")
    except ValueError as e:
        raise ConfigError(f"{where_run} ({point.title}): {e}") from None


@functools.lru_cache(maxsize=2)
def _task_names(include_defaults: bool) -> frozenset[str]:
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager(include_defaults=include_defaults).all_tasks)


def _known_tasks(tasks: list[str]) -> frozenset[str]:
    """The task names lm-eval knows: ours first; lm-eval's own (about 15 s to index) only when needed."""
    ours = _task_names(False)
    return ours if set(tasks) <= ours else _task_names(True)


def _expand(run: dict) -> Iterator[tuple[dict, dict]]:
    """(values, axes) of every combination of a run's list values, in order."""
    axes = [k for k, v in run.items() if isinstance(v, list)]
    for combo in itertools.product(*(run[k] for k in axes)):
        values = dict(run)
        values.update(zip(axes, combo))
        yield values, dict(zip(axes, combo))


def load(path: str | Path, output_path: str | Path | None = None) -> Experiment:
    """Read and check an experiment config; ``output_path`` overrides the config's."""
    path = Path(path)
    data, where = _read(path)
    _mapping(data, (), where, TOP_KEYS)
    _check_settings(data, (), where)
    out = output_path if output_path is not None else data.get("output_path")
    if out is None:
        raise where.error(("output_path",), "missing: where the points' results and the pictures go")
    out = Path(out).expanduser().absolute()

    checkpoints = _mapping(data.get("checkpoints") or {}, ("checkpoints",), where)
    if not checkpoints:
        raise where.error(("checkpoints",), "missing: name at least one checkpoint (its model args)")
    for name, args in checkpoints.items():
        _mapping(args, ("checkpoints", name), where)
        if "pretrained" not in args:
            raise where.error(("checkpoints", name), "missing pretrained (a checkpoint path, a hub id or embedded)")
        for key, value in args.items():
            if key in MANAGED_ARGS or key == "max_gen_toks":
                raise where.error(("checkpoints", name, key), f"{key} is set by the experiment, not per checkpoint")
            _check_value(key, value, ("checkpoints", name, key), where)

    gen_kwargs = _mapping(data.get("gen_kwargs") or {}, ("gen_kwargs",), where)
    for key, value in gen_kwargs.items():
        _check_value(key, value, ("gen_kwargs", key), where)
    if "apply_chat_template" in data and not isinstance(data["apply_chat_template"], bool):
        raise where.error(("apply_chat_template",), "must be true or false")

    sweeps = _mapping(data.get("sweeps") or {}, ("sweeps",), where)
    if not sweeps:
        raise where.error(("sweeps",), "missing: at least one sweep")
    points: list[Point] = []
    for sweep_name, sweep in sweeps.items():
        points += _sweep_points(str(sweep_name), sweep, data, checkpoints, gen_kwargs, out, where)
    names = {}
    for point in points:  # the same point twice in one sweep would share a folder
        if (point.sweep, point.name) in names:
            raise ConfigError(f"{point.entry}: the same point as {names[(point.sweep, point.name)]}")
        names[(point.sweep, point.name)] = point.entry
    return Experiment(path, out, checkpoints, points)


def _sweep_points(name: str, sweep: Any, data: dict, checkpoints: dict, gen_kwargs: dict, out: Path,
                  where: _Where) -> list[Point]:
    entry = ("sweeps", name)
    sweep = _mapping(sweep, entry, where, SWEEP_KEYS)
    kind = sweep.get("kind")
    if kind not in KINDS:
        raise where.error((*entry, "kind"), f"{kind!r} is not one of {', '.join(KINDS)}")
    _check_settings(sweep, entry, where)
    settings = {**DEFAULTS, **{k: data[k] for k in DEFAULTS if k in data},
                **{k: sweep[k] for k in SETTINGS if k in sweep}}
    if kind == "width":  # think-stage latency alone, with no neighbour decoding beside the request
        if "batch_size" in sweep and sweep["batch_size"] != 1:
            raise where.error((*entry, "batch_size"), "a width sweep runs one request at a time: batch_size 1")
        settings["batch_size"] = 1
    tasks_entry = (*entry, "tasks") if "tasks" in sweep else ("tasks",)
    if not settings["tasks"]:
        raise where.error(tasks_entry, "no tasks: set tasks at the top level or in the sweep")
    unknown = [t for t in settings["tasks"] if t not in _known_tasks(settings["tasks"])]
    if unknown:
        raise where.error(tasks_entry, f"unknown task(s) {unknown} (see `lm_eval ls tasks`)")
    runs = sweep.get("runs")
    if not isinstance(runs, list) or not runs:
        raise where.error((*entry, "runs"), "must be a non-empty list of runs")
    default_checkpoint = sweep.get("checkpoint", next(iter(checkpoints)) if len(checkpoints) == 1 else None)
    points = []
    for i, run in enumerate(runs):
        run_entry = (*entry, "runs", i)
        run = _mapping(run, run_entry, where, RUN_KEYS)
        for key, value in run.items():
            if isinstance(value, list) and (not value or key == "label"):
                raise where.error((*run_entry, key), "an axis must list at least one value" if value else
                                  "label cannot be an axis")
            for v in value if isinstance(value, list) else [value]:
                _check_value(key, v, (*run_entry, key), where)
        for values, axes in _expand(run):
            points.append(_point(name, kind, i, values, axes, default_checkpoint, checkpoints, gen_kwargs,
                                 settings, out, run_entry, where))
    return points


def _point(sweep: str, kind: str, index: int, values: dict, axes: dict, default_checkpoint: str | None,
           checkpoints: dict, gen_kwargs: dict, settings: dict, out: Path, run_entry: tuple,
           where: _Where) -> Point:
    checkpoint = values.get("checkpoint", default_checkpoint)
    if checkpoint is None:
        raise where.error((*run_entry, "checkpoint"), f"which checkpoint? ({', '.join(map(str, checkpoints))})")
    if checkpoint not in checkpoints:
        raise where.error((*run_entry, "checkpoint"), f"{checkpoint!r} is not one of the checkpoints "
                                                      f"({', '.join(map(str, checkpoints))})")
    budget = values.get("max_gen_toks", gen_kwargs.get("max_gen_toks"))
    if budget is None:
        raise where.error((*run_entry, "max_gen_toks"), "missing: the per-path budget (here or in gen_kwargs)")
    _positive_int(budget, (*run_entry, "max_gen_toks"), where)
    journal_dir = out / "journal" / sweep  # a sweep's responses (and their timings) are its own
    model_args = {**checkpoints[checkpoint], **{k: values[k] for k in RUN_ARGS if k in values},
                  "journal_dir": str(journal_dir)}
    point = Point(
        sweep=sweep, kind=kind, run=index, label=str(values.get("label", shown_method(model_args))), axes=axes,
        checkpoint=str(checkpoint), model_args=model_args, gen_kwargs={**gen_kwargs, "max_gen_toks": budget},
        tasks=tuple(settings["tasks"]), limit=settings["limit"], metadata=settings["metadata"],
        batch_size=settings["batch_size"], device=settings["device"], seed=settings["seed"],
        apply_chat_template=settings["apply_chat_template"],
        entry=where(run_entry), output_dir=out,
    )
    _check_point(point, point.entry)
    return dataclasses.replace(point, output_dir=out / "points" / sweep / point.name)


def check_point_layout(point: Point, tokenizer) -> None:
    """Check a point again with its checkpoint's tokenizer at hand (``compat=auto`` resolved)."""
    _check_point(point, point.entry, tokenizer)


__all__ = ["ConfigError", "Experiment", "KINDS", "Point", "check_point_layout", "load", "switchable"]
