"""``python -m lm_eval_parathinker.leaderboard``: the command line of the package (see its docstring)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __doc__ as DOC
from .compare import DEFAULT_HALFWIDTH, format_comparisons, write_comparisons
from .pictures import plot
from .rows import MAIN_METRIC, collect, format_table, write_csv


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lm_eval_parathinker.leaderboard", description=DOC.split("\n")[0])
    ap.add_argument("results_dir", help="folder searched recursively for lm-eval results_*.json files")
    ap.add_argument("-o", "--output", default="results/leaderboard.csv", help="CSV path (default: %(default)s)")
    ap.add_argument("--plot", default=None, help="also draw a PNG here")
    ap.add_argument("--metric", default=MAIN_METRIC, help="metric of the terminal table and plot (default: %(default)s)")
    ap.add_argument("--compare", action="store_true", help="instead: compare every pair of runs of a task on their "
                    "shared problems (needs --log_samples runs); writes RESULTS_DIR/comparisons.csv and .png")
    ap.add_argument("--halfwidth", type=float, default=DEFAULT_HALFWIDTH,
                    help="with --compare: the interval half-width the repeats estimate aims at (default: %(default)s)")
    args = ap.parse_args(argv)
    if not 0 < args.halfwidth < 1:
        ap.error(f"--halfwidth {args.halfwidth}: must be between 0 and 1 (a difference in accuracy)")
    if not Path(args.results_dir).exists():
        print(f"leaderboard: {args.results_dir} does not exist", file=sys.stderr)
        return 2
    if args.compare:
        return compare_main(Path(args.results_dir), args.halfwidth)
    rows = collect(args.results_dir)
    write_csv(rows, args.output)
    print(format_table(rows, args.metric))
    print(f"wrote {len(rows)} rows to {args.output}")
    if args.plot:
        plot(rows, args.plot, args.metric)
        print(f"wrote {args.plot}")
    return 0


def compare_main(root: Path, halfwidth: float) -> int:
    """``--compare``: exit 0 when every pair compared, 1 when a pair was refused (the others are written)."""
    folder = root if root.is_dir() else root.parent
    csv_path, png_path = folder / "comparisons.csv", folder / "comparisons.png"
    rows, refusals = write_comparisons(root, csv_path, png_path, halfwidth)
    for refusal in refusals:
        print(f"leaderboard: {refusal}", file=sys.stderr)
    if not rows:
        print(f"leaderboard: no pair of runs to compare under {root}; nothing written", file=sys.stderr)
        return 1
    print(format_comparisons(rows))
    print(f"wrote {len(rows)} comparison(s) to {csv_path} and {png_path}"
          + (f"; {len(refusals)} pair(s) not compared (see above)" if refusals else ""))
    return 1 if refusals else 0


if __name__ == "__main__":
    sys.exit(main())
