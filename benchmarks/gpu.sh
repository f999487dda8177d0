#!/usr/bin/env bash
# Engine benchmarks on one GPU: Qwen2-1.5B shape (random weights), bfloat16, per-path budget
# 2048 (see PRESETS["gpu"] in benchmarks/engine.py). Runs width, vs_hf and summary (about
# 8 minutes on an H100-class card), writes results/bench_*_cuda.{csv,png} and prints the tables.
#
#   bash benchmarks/gpu.sh [extra args for python -m benchmarks.engine, e.g. --device cuda:1]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "benchmarks/gpu.sh: no CUDA device visible to torch")'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec "$PY" -m benchmarks.engine --device cuda --dtype bfloat16 --only width,vs_hf,summary "$@"
