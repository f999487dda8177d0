"""The upstream internals the package uses (lm_eval_parathinker/upstream/): each one still exists,
with the parameters the package passes it, and none is used outside its upstream module.

A failure names the internal: an upstream release dropped or changed it, so the function of
lm_eval_parathinker/upstream/ that uses it needs a look (the model: the experiments runner's check
of lm-eval's CLI call, tests/test_experiments.py)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

from helpers import REPO_ROOT
from tiny import tiny_model, tiny_tokenizer

PACKAGE = REPO_ROOT / "lm_eval_parathinker"
UPSTREAM = PACKAGE / "upstream"
SCANNED = [PACKAGE, REPO_ROOT / "training", REPO_ROOT / "benchmarks"]
LIBRARIES = ("torch", "transformers", "lm_eval", "kernels", "tokenizers")

#: every private name of an upstream the package touches (a dotted path from the library), and the
#: parameters the package passes it, in order (None: not called)
GUARDED: dict[str, tuple[str, ...] | None] = {
    # torch: lm_eval_parathinker/upstream/torch.py
    "torch._dynamo.mark_static": ("t", "index"),
    "torch._dynamo.mark_static_address": ("t",),
    "torch._dynamo.mark_dynamic": ("t", "index"),
    "torch._inductor.runtime.cache_dir_utils.default_cache_dir": (),
    "torch._dynamo.config.disable": None,
    "torch._dynamo.exc.TorchDynamoException": None,
    "torch._inductor.exc.CppCompileError": None,
    "torch._inductor.exc.InvalidCxxCompiler": None,
    "torch._dynamo.config.recompile_limit": None,
    "torch._dynamo.config.fail_on_recompile_limit_hit": None,
    "torch._dynamo.config.patch": None,
    "torch._inductor.kernel.flex.flex_cpu.check_cpu_supported": (),
    "torch._inductor.virtualized.V.choices.get_flex_attention_fwd_configs": ("head_dim", "dtype", "device_type"),
    "torch._inductor.virtualized.V.choices.get_flex_decode_configs": ("head_dim", "dtype", "device_type"),
    "torch.nn.attention.flex_attention.BlockMask._TENSOR_ATTRS": None,
    "torch._dynamo.eval_frame._debug_get_cache_entry_list": ("code",),
    "torch._dynamo.utils.counters": None,
    "torch._dynamo.exc.FailOnRecompileLimitHit": None,
    # transformers: upstream/transformers.py, upstream/transformers_trainer.py
    "transformers.PretrainedConfig._attn_implementation": None,
    "transformers.PreTrainedModel._keys_to_ignore_on_load_unexpected": None,
    "transformers.Trainer._save": ("self", "output_dir", "state_dict"),
    "transformers.Trainer._load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),
    "transformers.Trainer._get_output_dir": ("self", "trial"),
    "transformers.Trainer._save_checkpoint": ("self", "model", "trial"),
    # lm-eval: upstream/lm_eval.py, upstream/lm_eval_tasks.py
    "lm_eval.models.huggingface.HFLM._create_tokenizer": ("self", "pretrained", "tokenizer", "revision"),
    "lm_eval.tasks._factory.TaskFactory._load_full_config": ("self", "entry", "overrides"),
    "lm_eval.tasks._index.log": None,
    "lm_eval._cli.run.Run._execute": ("args",),
}
#: private attributes of upstream objects that are set at run time, each checked by the test named
RUN_TIME: dict[str, str] = {
    "_model": "test_hflm_shim_names_hflms_internals",
    "_rank": "test_hflm_shim_names_hflms_internals",
    "_world_size": "test_hflm_shim_names_hflms_internals",
    "__wrapped__": "test_kernels_routing_wrapper_wraps_the_forward",
}


def _resolve(path: str):
    """The object at ``path``: the longest importable module, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


@pytest.mark.parametrize("path", sorted(GUARDED))
def test_the_upstream_internal_still_exists(path):
    try:
        obj = _resolve(path)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"{path} is gone ({e!r}): lm_eval_parathinker/upstream/ relies on it")
    expected = GUARDED[path]
    if expected is not None:
        names = tuple(inspect.signature(obj).parameters)
        assert names[: len(expected)] == expected, (
            f"{path} takes {names}, and lm_eval_parathinker/upstream/ passes {expected}")


def test_the_task_index_warns_through_the_logger_we_filter():
    from lm_eval.tasks import _index

    from lm_eval_parathinker.upstream import lm_eval_tasks

    assert _index.log.name == lm_eval_tasks.INDEX_LOGGER, "lm-eval's task index logs through another logger"
    assert "overrides existing task" in inspect.getsource(_index), "lm-eval's task index changed its override warning"


def test_hflm_shim_names_hflms_internals():
    """HFLM loads the tokenizer through the shim's ``create_tokenizer``, keeps the model in
    ``_model`` (``set_model`` replaces it, HFLM's ``model`` reads it), and its ``rank`` and
    ``world_size`` read ``_rank`` and ``_world_size`` (the shim sets them for data parallelism)."""
    from lm_eval_parathinker.upstream.lm_eval import HFLMShim

    calls = []

    class Recording(HFLMShim):
        def create_tokenizer(self, pretrained, tokenizer, *args, **kwargs):
            calls.append(kwargs.get("revision"))
            super().create_tokenizer(pretrained, tokenizer, *args, **kwargs)

    model, other = tiny_model(), tiny_model(seed=1)
    lm = Recording(pretrained=model, tokenizer=tiny_tokenizer(), revision="main")
    assert calls == ["main"] and lm.tokenizer is not None, "HFLM no longer loads its tokenizer by _create_tokenizer"
    assert lm.model is model, "HFLM no longer keeps the model it was given"
    lm.set_model(other)
    assert lm.model is other, "HFLM's model does not read _model"
    # the shim's data parallelism sets these two under accelerate launch (tests/test_scale_out.py)
    assert (lm.rank, lm.world_size) == (0, 1)
    lm._rank, lm._world_size = 1, 2
    assert (lm.rank, lm.world_size) == (1, 2), "HFLM's rank and world_size no longer read _rank and _world_size"


def test_kernels_routing_wrapper_wraps_the_forward():
    """transformers' attention classes route their forward through kernels' wrapper, whose
    ``__wrapped__`` is the class's own forward; a plain forward is no wrapper."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2MLP

    from lm_eval_parathinker.upstream.kernels import undecorated_forward

    forward = undecorated_forward(Qwen2Attention.forward)
    assert forward is not None and forward.__qualname__ == "Qwen2Attention.forward", (
        "kernels' routing wrapper no longer wraps Qwen2Attention.forward (__wrapped__, globals in kernels)")
    assert undecorated_forward(Qwen2MLP.forward) is None


def test_trainer_shim_routes_each_step_to_its_public_name():
    """Trainer's checkpoint steps, called as Trainer calls them, reach the shim's public methods."""
    from lm_eval_parathinker.upstream.transformers_trainer import TrainerShim

    steps = {"_save": "save_model_files", "_load_from_checkpoint": "load_checkpoint_files",
             "_get_output_dir": "checkpoint_parent", "_save_checkpoint": "write_checkpoint"}
    reached = []

    class Recording(TrainerShim):
        def __init__(self):  # no training run: only the routing
            pass

    for public in steps.values():
        setattr(Recording, public, lambda self, *a, _name=public, **k: reached.append(_name))
    shim = Recording()
    shim._save("out")
    shim._load_from_checkpoint("ckpt")
    shim._get_output_dir(None)
    shim._save_checkpoint(None, None)
    assert reached == list(steps.values())


# -- no private upstream name outside lm_eval_parathinker/upstream/ -------------------------------


def _private(name: str) -> bool:
    return name == "__wrapped__" or (name.startswith("_") and not name.startswith("__") and name != "_parathinker")


def _upstream_path(text: str) -> bool:
    """``text`` is a dotted path into an upstream library with a private part (``torch._dynamo``)."""
    parts = text.split(".")
    return parts[0] in LIBRARIES and any(_private(p) for p in parts[1:])


def _private_names(path: Path, names: set[str]) -> list[tuple[int, str]]:
    """Where ``path`` uses a private upstream name: an import of a private module or name, an
    attribute of an upstream module's private part, an attribute or method named as one of
    ``names``, a string naming one."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            paths = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            paths = [alias.name for alias in node.names]
        elif isinstance(node, ast.Attribute):
            paths = [f"{ast.unparse(node.value)}.{node.attr}"]
            if node.attr in names:
                found.append((node.lineno, paths[0]))
                continue
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in names:
            found.append((node.lineno, f"def {node.name}"))
            continue
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            paths = [node.value] if re.fullmatch(r"[\w.]+", node.value) else []
            if node.value in names:
                found.append((node.lineno, repr(node.value)))
                continue
        else:
            continue
        found += [(node.lineno, p) for p in paths if _upstream_path(p)]
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def _guarded_names() -> set[str]:
    """The private names of :data:`GUARDED` and :data:`RUN_TIME` other than modules (``_dynamo``
    is only looked for in dotted paths: ``torch._dynamo``)."""
    names = set(RUN_TIME)
    for path in GUARDED:
        parts = path.split(".")
        names |= {p for i, p in enumerate(parts) if _private(p) and not _is_module(".".join(parts[: i + 1]))}
    return names


def test_no_upstream_internal_outside_the_upstream_modules():
    names = _guarded_names()
    offenders = sorted({f"{path.relative_to(REPO_ROOT)}:{line}: {what}"
                        for root in SCANNED for path in root.rglob("*.py") if UPSTREAM not in path.parents
                        for line, what in _private_names(path, names)})
    assert not offenders, ("private upstream names outside lm_eval_parathinker/upstream/ (add a function there, "
                           "and its guard to tests/test_upstream.py):\n" + "\n".join(offenders))


def test_every_internal_of_the_upstream_modules_is_guarded():
    """Each private name the upstream modules use is in :data:`GUARDED` or :data:`RUN_TIME`, so a
    new one comes with its guard."""
    guarded = {part for path in GUARDED for part in path.split(".")} | set(RUN_TIME)
    unguarded = []
    for path in sorted(UPSTREAM.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute):
                parts = [node.attr]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                parts = [*node.module.split("."), *(alias.name for alias in node.names)]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"[\w.]+", node.value):
                parts = node.value.split(".")
            else:
                continue
            unguarded += [f"{path.name}:{node.lineno}: {p}" for p in parts if _private(p) and p not in guarded]
    assert not unguarded, unguarded


def test_the_scan_finds_private_names(tmp_path):
    """The scan above sees each kind of use (a broken scan would pass vacuously)."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import torch._dynamo\n"
        "from torch._inductor.virtualized import V\n"
        "from lm_eval.tasks import _index\n"
        "torch._dynamo.mark_static(x)\n"
        "n = config._attn_implementation\n"
        "class T(Trainer):\n    def _save(self): super()._save()\n"
        "log = 'lm_eval.tasks._index'\n"
        "f = getattr(g, '__wrapped__')\n"
        "self._engine = self._create_model()\n"  # ours and HFLM's sanctioned override: fine
    )
    found = [line for line, _ in _private_names(sample, _guarded_names())]
    assert sorted(set(found)) == [1, 2, 3, 4, 5, 7, 8, 9], found
