"""``python -m lm_eval_parathinker.experiments CONFIG.yaml``: run an experiment, then draw it."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .config import ConfigError, load


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m lm_eval_parathinker.experiments",
        description="Run an experiment config's grid of lm_eval --model parathinker points (weights loaded once "
                    "per checkpoint), then write its pictures and tables.",
    )
    ap.add_argument("config", help="experiment config (YAML), e.g. experiments/demo.yaml")
    ap.add_argument("--output-path", default=None, help="where the points and pictures go (default: the config's "
                                                        "output_path)")
    ap.add_argument("--dry-run", action="store_true", help="check the config and print the grid, loading no weights")
    args = ap.parse_args(argv)

    from .. import _autoload

    _autoload.install()  # our tasks and --metadata repeats, also when the .pth hook is disabled
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # as lm_eval's CLI
    from lm_eval.utils import setup_logging

    from . import figures, runner

    setup_logging()
    start = time.perf_counter()
    try:
        experiment = load(args.config, args.output_path)
        if args.dry_run:
            runner.check(experiment, tokenizers=False)
            print(runner.describe(experiment))
            return 0
        counts = runner.run(experiment)
    except ConfigError as e:
        print(f"experiments: {e}", file=sys.stderr)
        return 2
    written = figures.write(experiment)
    print(f"\n{counts['ran']} point(s) run, {counts['done']} done before, {counts['loads']} model load(s), "
          f"{time.perf_counter() - start:.0f} s; wrote {', '.join(str(p) for p in written)}")
    for path in written:
        if path.suffix == ".md":
            print("\n" + path.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
