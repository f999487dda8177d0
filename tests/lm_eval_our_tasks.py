"""``lm_eval``'s command line with our tasks only: most tests that run lm_eval in a subprocess use it, and
indexing lm-eval's thousands of built-in task files would cost each process a long start.

``accelerate launch tests/lm_eval_our_tasks.py --model parathinker ...`` runs as ``-m lm_eval`` does.
"""

import functools

from lm_eval.__main__ import cli_evaluate
from lm_eval.tasks import TaskManager

TaskManager.__init__ = functools.partialmethod(TaskManager.__init__, include_defaults=False)

if __name__ == "__main__":
    cli_evaluate()
