"""The paper's experiments in one command: a grid of methods x paths x per-path budgets x engine
options x tasks, run through lm-eval's Python API with one model per checkpoint, then drawn.

    python -m lm_eval_parathinker.experiments CONFIG.yaml [--output-path DIR] [--dry-run]

Layers: :mod:`.config` (the YAML, checked and expanded into points), :mod:`.runner` (the points
through ``simple_evaluate`` on shared models, written by lm-eval's ``EvaluationTracker``),
:mod:`.figures` (CSV, PNG and markdown per sweep). Ready configs: ``experiments/*.yaml``.
"""
