#!/usr/bin/env bash
# Engine benchmarks on one GPU: Qwen2-1.5B shape (random weights), bfloat16 (PRESETS["gpu"] in
# benchmarks/engine.py), in one short run:
#   decode_step  8 slots x P = 8, paths filled to 4K and 16K tokens, eager and compiled (CUDA graphs),
#                against reading the weights and the KV pages held once from HBM;
#   path_length  think stage at 4K tokens per path, P = 8 vs P = 1 (the paper: +7.1% latency);
#   vs_hf        P = 8 at 4K tokens per path against model.generate(num_return_sequences=8).
# Writes results/bench_*_cuda.{csv,png} and prints the tables; sized for under 5 minutes on an
# H100/H200 (an estimate: never timed, no session has had a GPU yet).
#
#   bash benchmarks/gpu.sh [--smoke] [extra args for python -m benchmarks.engine, e.g. --output DIR]
#
# --smoke runs the same benchmarks on the CPU with a tiny shape (what the tests run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ONLY=decode_step,path_length,vs_hf
if [ "${1:-}" = "--smoke" ]; then
  shift
  exec "$PY" -m benchmarks.engine --smoke --compile --only "$ONLY" "$@"
fi
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "benchmarks/gpu.sh: no CUDA device visible to torch")'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec "$PY" -m benchmarks.engine --device cuda --dtype bfloat16 --compile --only "$ONLY" "$@"
