"""``python -m lm_eval_parathinker ...`` / ``parathinker-eval ...``: lm-eval's CLI with our model and tasks.

The explicit route (plain ``lm_eval`` works too, through the start-up hook of ``_autoload``): it
registers ``--model parathinker``, puts our task directory on the include path and runs
``lm_eval``'s own command line with the same arguments. Also works as
``accelerate launch -m lm_eval_parathinker ...``.
"""

from __future__ import annotations

import sys

_SUBCOMMANDS = ("run", "ls", "validate")


def lm_eval_argv(argv: list[str], tasks_dir: str) -> list[str]:
    """``argv`` as lm-eval's CLI expects it: ``run`` implied, our tasks on the include path."""
    argv = list(argv)
    if argv and argv[0] not in (*_SUBCOMMANDS, "-h", "--help"):
        argv = ["run", *argv]
    if argv and argv[0] in _SUBCOMMANDS and "--include_path" not in argv:
        argv += ["--include_path", tasks_dir]  # the CLI takes one directory
    return argv


def main(argv: list[str] | None = None) -> None:
    from lm_eval_parathinker import _autoload

    _autoload.install()  # also when the .pth hook is disabled: task override and --metadata repeats
    from lm_eval.__main__ import cli_evaluate

    import lm_eval_parathinker.harness.model  # noqa: F401  (runs @register_model("parathinker"))

    args = sys.argv[1:] if argv is None else argv
    sys.argv = [sys.argv[0], *lm_eval_argv(args, _autoload.tasks_dir())]
    cli_evaluate()


if __name__ == "__main__":
    main()
