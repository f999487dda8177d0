"""Collect lm-eval results JSON files into a CSV leaderboard (plus a terminal table and a PNG), or
compare its runs pairwise on their shared problems.

    python -m lm_eval_parathinker.leaderboard RESULTS_DIR [-o results/leaderboard.csv] [--plot results/leaderboard.png]
    python -m lm_eval_parathinker.leaderboard RESULTS_DIR --compare [--halfwidth 0.02]

Every ``**/results_*.json`` under RESULTS_DIR (as written by ``lm_eval --output_path``) becomes one
CSV row per run x task x metric, with its Markdown table beside it (``.md``). Partial or corrupt files
are skipped with a warning. Outputs are written atomically. Where the run logged its samples
(``--log_samples``), each row has a 95% interval over problems (``stats.METHOD``) beside lm-eval's
stderr. The picture puts each run's accuracy beside its cost (generated tokens and seconds per
problem), so runs compare even when every one of them scores 0.

``--compare`` writes RESULTS_DIR/comparisons.csv (and .md) and comparisons.png: for every pair of
runs of a task with the same problems (read from their samples files), the mean per-problem
difference of pass@1, its paired bootstrap interval, a sign-flip p-value, and the estimated repeats
per problem for an interval of +/- ``--halfwidth``. Pairs whose problems differ are refused, naming
the difference.

Modules: :mod:`.rows` (results files into rows; the CSV, its Markdown table and the terminal table),
:mod:`.pictures` (the PNGs), :mod:`.compare` (paired comparisons), ``__main__`` (the command line).
"""

from __future__ import annotations

from .compare import (COMPARED_METRIC, COMPARISON_COLUMNS, COMPARISON_READER_COLUMNS, DEFAULT_HALFWIDTH, Refused,
                      RunScores, compare_pair, compare_runs, format_comparisons, problem_set_difference, run_scores,
                      write_comparison_rows, write_comparisons)
from .pictures import COST_PANELS, plot, plot_comparisons
from .rows import (COLUMNS, MAIN_METRIC, READER_COLUMNS, ProblemKey, as_number, collect, find_result_files, format_table,
                   parse_model_args, pivot, read_samples, rows_from_file, rows_from_results, run_label, samples_path,
                   task_sort, write_csv)

__all__ = ["COLUMNS", "COMPARED_METRIC", "COMPARISON_COLUMNS", "COMPARISON_READER_COLUMNS", "COST_PANELS",
           "DEFAULT_HALFWIDTH", "MAIN_METRIC", "READER_COLUMNS", "ProblemKey", "Refused", "RunScores", "as_number",
           "collect", "compare_pair", "compare_runs", "find_result_files", "format_comparisons", "format_table",
           "parse_model_args", "pivot", "plot", "plot_comparisons", "problem_set_difference", "read_samples",
           "rows_from_file", "rows_from_results", "run_label", "run_scores", "samples_path", "task_sort",
           "write_comparison_rows", "write_comparisons", "write_csv"]
