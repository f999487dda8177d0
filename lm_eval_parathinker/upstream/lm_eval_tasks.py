"""lm-eval internals of task loading, for the start-up hook (:mod:`lm_eval_parathinker._autoload`).

lm-eval 0.4.13 has no plugin discovery for tasks: the hook patches its task manager and task
factory once ``lm_eval.tasks.manager`` has been imported. This module imports only the standard
library (the hook runs at every Python start-up); each function takes the lm-eval module it
patches, or imports it once lm-eval is loaded. Guarded by tests/test_upstream.py.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

#: the logger of lm-eval's task index, which warns when a task path overrides another's task
INDEX_LOGGER = "lm_eval.tasks._index"
#: the module of lm-eval's task factory (imported by ``lm_eval.tasks.manager``)
FACTORY_MODULE = "lm_eval.tasks._factory"


def scan_tasks_first(manager_module, folder: str) -> bool:
    """Every ``TaskManager`` scans ``folder`` right after lm-eval's built-in tasks and before any
    user ``include_path`` (a later path overrides an earlier one): wraps ``TaskManager.__init__``
    once. Returns False when it was wrapped already."""
    from pathlib import Path

    TaskManager = manager_module.TaskManager
    if getattr(TaskManager.__init__, "_parathinker", False):
        return False
    orig_init = TaskManager.__init__

    @functools.wraps(orig_init)
    def __init__(self, *args, include_path=None, **kwargs):
        if include_path is None:
            extra = []
        elif isinstance(include_path, (list, tuple)):
            extra = list(include_path)
        else:
            extra = [include_path]
        real = os.path.realpath(folder)
        extra = [p for p in extra if os.path.realpath(str(p)) != real]
        # defaults (scanned first by TaskManager) < ours < the user's include paths
        orig_init(self, *args, include_path=[Path(folder)] + extra, **kwargs)

    __init__._parathinker = True  # type: ignore[attr-defined]
    TaskManager.__init__ = __init__
    return True


def filter_index_warnings(log_filter) -> None:
    """Add ``log_filter`` to the logger of lm-eval's task index (its "Task '%s' from %s overrides
    existing task from %s" warnings, the new task's YAML path as the second argument)."""
    import logging

    logging.getLogger(INDEX_LOGGER).addFilter(log_filter)


def rewrite_task_configs(rewrite: Callable[[dict, str | None], dict]) -> None:
    """Pass every task config lm-eval's task factory loads (``TaskFactory._load_full_config``, its
    ``metadata`` merged in) through ``rewrite(config, yaml_path)``: the only point where a task's
    YAML and the run's ``--metadata`` meet. Wraps the method once; nothing when the factory's
    module is not loaded."""
    factory_mod = sys.modules.get(FACTORY_MODULE)
    if factory_mod is None or getattr(factory_mod.TaskFactory._load_full_config, "_parathinker", False):
        return
    orig_load = factory_mod.TaskFactory._load_full_config

    @functools.wraps(orig_load)
    def _load_full_config(self, entry, overrides=None):
        cfg = orig_load(self, entry, overrides)
        return rewrite(cfg, getattr(entry, "yaml_path", None)) if isinstance(cfg, dict) else cfg

    _load_full_config._parathinker = True  # type: ignore[attr-defined]
    factory_mod.TaskFactory._load_full_config = _load_full_config
