#!/usr/bin/env bash
# Engine benchmarks on one GPU: Qwen2-1.5B shape (random weights), bfloat16 (PRESETS["gpu"] in
# benchmarks/engine.py): think latency vs P (width), one decode step at 4 slots x 8 paths against
# reading the weights and the KV in use once from HBM (decode_step, eager and compiled), and the
# evaluation workload through 4 slots, static vs continuous vs compiled (eval_workload). Writes
# results/bench_*_cuda.{csv,png} and prints the tables; sized for an estimated 8 minutes on
# an H100 (never timed: no session has had a GPU yet).
#
#   bash benchmarks/gpu.sh [--smoke] [extra args for python -m benchmarks.engine, e.g. --output DIR]
#
# --smoke runs the same benchmarks on the CPU with a tiny shape (what the tests run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ONLY=width,decode_step,eval_workload
if [ "${1:-}" = "--smoke" ]; then
  shift
  exec "$PY" -m benchmarks.engine --smoke --compile --only "$ONLY" "$@"
fi
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "benchmarks/gpu.sh: no CUDA device visible to torch")'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec "$PY" -m benchmarks.engine --device cuda --dtype bfloat16 --compile --only "$ONLY" "$@"
