"""Start-up hook (run from lm_eval_parathinker.pth): makes plain `lm_eval` see our model and tasks.

lm-eval 0.4.13 has no plugin discovery, so the ``lm_eval_parathinker.pth`` file installed next to the
package imports this module at every Python start-up. It must stay cheap: it imports only the standard
library (no torch, no lm_eval; the lm-eval internals it patches are in
:mod:`lm_eval_parathinker.upstream.lm_eval_tasks`) and installs a post-import hook that acts when
lm-eval itself is imported:

* after ``lm_eval.models`` has run: register the model name ``parathinker`` as the lazy target string
  ``"lm_eval_parathinker.harness.model:ParaThinkerLM"`` (nothing is imported until the model is requested;
  registering *after* ``lm_eval.models`` keeps the built-in ``hf``/``dummy``/... models registered);
* after ``lm_eval.tasks.manager`` has run: patch ``TaskManager.__init__`` so that our task directory is
  scanned right after lm-eval's built-in tasks and before any user ``include_path``. TaskManager lets a
  later path override an earlier one, so our ``aime24``/``aime25`` win over lm-eval's own tasks of the same
  name, while a user's ``--include_path`` still wins over ours. The same hook lets ``--metadata
  '{"repeats": K}'`` change the number of samples per problem of our tasks.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

from lm_eval_parathinker.upstream import lm_eval_tasks

MODEL_NAME = "parathinker"
MODEL_TARGET = "lm_eval_parathinker.harness.model:ParaThinkerLM"
#: filter name used by all our tasks; metric keys look like ``pass_at_1,all``
FILTER_NAME = "all"


def tasks_dir() -> str:
    """Directory holding our task YAMLs, for both layouts.

    Wheel: ``site-packages/lm_eval_parathinker/tasks`` (force-included from the repo's ``tasks/``).
    Editable install / source checkout: ``<repo>/tasks`` next to the package directory.
    """
    pkg = os.path.dirname(os.path.abspath(__file__))
    inside = os.path.join(pkg, "tasks")
    if os.path.isdir(inside):
        return inside
    return os.path.join(os.path.dirname(pkg), "tasks")


def _is_ours(path) -> bool:
    if path is None:
        return False
    try:
        ours = os.path.realpath(tasks_dir())
        return os.path.realpath(str(path)).startswith(ours + os.sep)
    except Exception:  # pragma: no cover - defensive
        return False


# ----------------------------------------------------------------------------- hooks
def _after_models(mod) -> None:
    """Runs right after ``lm_eval.models`` executed: lazily register ``parathinker``."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


class _DropOurOverrideWarnings:
    """logging filter: silence lm-eval's "Task 'aime24' from <ours> overrides existing task" warning."""

    def filter(self, record) -> bool:
        try:
            if "overrides existing task" in str(record.msg) and record.args and _is_ours(record.args[1]):
                return False
        except Exception:  # pragma: no cover - defensive
            pass
        return True


def _apply_repeats_override(cfg: dict) -> dict:
    """``--metadata '{"repeats": K}'`` (or ``"parathinker_repeats"``) sets repeats and take_first_k of our tasks."""
    meta = cfg.get("metadata") or {}
    k = meta.get("parathinker_repeats", meta.get("repeats"))
    if k is None or "task" not in cfg:
        return cfg
    k = int(k)
    if k < 1:
        raise ValueError(f"repeats must be >= 1, got {k}")
    cfg["repeats"] = k
    cfg["filter_list"] = [{"name": FILTER_NAME, "filter": [{"function": "take_first_k", "k": k}]}]
    return cfg


def _rewrite_our_configs(cfg: dict, yaml_path: str | None) -> dict:
    return _apply_repeats_override(cfg) if _is_ours(yaml_path) else cfg


def _after_manager(mod) -> None:
    """Runs right after ``lm_eval.tasks.manager`` executed: put our tasks on every TaskManager's path."""
    if hasattr(mod, "discover_plugin_task_paths"):  # future lm-eval with entry points: it finds us itself
        return
    if not lm_eval_tasks.scan_tasks_first(mod, tasks_dir()):
        return
    lm_eval_tasks.filter_index_warnings(_DropOurOverrideWarnings())
    lm_eval_tasks.rewrite_task_configs(_rewrite_our_configs)


_HOOKS = {"lm_eval.models": _after_models, "lm_eval.tasks.manager": _after_manager}


class _PostImport(importlib.abc.MetaPathFinder):
    """Meta-path finder that wraps the loader of the modules in ``_HOOKS`` to run a hook after them."""

    _busy: set = set()

    def find_spec(self, name, path, target=None):
        hook = _HOOKS.get(name)
        if hook is None or name in self._busy:
            return None
        self._busy.add(name)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._busy.discard(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        orig_exec = spec.loader.exec_module

        def exec_module(module):
            orig_exec(module)
            try:
                hook(module)
            except Exception as e:  # never break lm_eval because of us
                print(f"lm_eval_parathinker autoload: {e!r}", file=sys.stderr)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Install the post-import hook (idempotent); apply it at once to modules already imported."""
    if not any(type(f).__name__ == "_PostImport" and getattr(f, "_parathinker", False) for f in sys.meta_path):
        finder = _PostImport()
        finder._parathinker = True
        sys.meta_path.insert(0, finder)
    for name, hook in _HOOKS.items():
        mod = sys.modules.get(name)
        if mod is not None:
            try:
                hook(mod)
            except Exception as e:  # pragma: no cover - defensive
                print(f"lm_eval_parathinker autoload: {e!r}", file=sys.stderr)


if os.environ.get("LM_EVAL_PARATHINKER_NO_AUTOLOAD", "") not in ("1", "true", "True"):
    install()
