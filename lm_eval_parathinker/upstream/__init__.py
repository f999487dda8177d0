"""Every private name of an upstream library the package touches, one module per upstream.

torch (:mod:`.torch`), transformers (:mod:`.transformers`), lm-eval (:mod:`.lm_eval` for the model
side, :mod:`.lm_eval_tasks` for the start-up hook's task loading) and kernels (:mod:`.kernels`):
each name sits behind a small named function, context manager or shim class whose docstring says
why the package needs it. ``tests/test_upstream.py`` fails, naming the name, when an upstream
release drops one or changes its signature, and when one appears anywhere else in the package.

The modules import their library with absolute imports (``import torch`` is torch itself); import
them as ``from lm_eval_parathinker.upstream import torch as upstream_torch``. This package imports
nothing of lm_eval_parathinker, and this file nothing at all (the start-up hook imports
:mod:`.lm_eval_tasks`).
"""
