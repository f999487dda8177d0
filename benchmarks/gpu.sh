#!/usr/bin/env bash
# Engine benchmarks on one GPU: Qwen2-1.5B shape (random weights), bfloat16 (PRESETS["gpu"] in
# benchmarks/harness.py), in one short run:
#   eval_workload  16 prompts, P = 8, 512 tokens per path, 8 slots: the original engine (ca50159, from a
#                git worktree under .bench/, made with git; where the copy has no git history, bring that
#                folder along) against today's, eager and compiled, a process each; writes the CUDA
#                row of the compile verdicts (lm_eval_parathinker/engine/compile_verdicts.csv);
#   decode_step  8 slots x P = 8, paths filled to 4K and 16K tokens, eager and compiled (CUDA graphs),
#                against reading the weights and the KV pages held once from HBM;
#   path_length  think stage at 4K tokens per path, P = 8 vs P = 1 (the paper: +7.1% latency);
#   vs_hf        P = 8 at 4K tokens per path against model.generate(num_return_sequences=8).
# Writes results/bench_*_cuda.{csv,png} and prints the tables; sized for under 8 minutes on an
# H100/H200 (an estimate: never timed, no session has had a GPU yet; eval_workload about 3 of them,
# mostly its processes' start and the compiled step's compilation).
#
#   bash benchmarks/gpu.sh [--smoke] [extra args for python -m benchmarks.engine, e.g. --output DIR]
#
# Python: $PYTHON, else the project's .venv where there is one, else python3 (a GPU image's, which
# holds its torch). Where the package is not installed, it is installed first, offline, from
# wheelhouse/ (`make wheelhouse`: what the image lacks), with the image's torch held as it is;
# then the imports are checked, so a missing package fails here, in the first seconds.
# --smoke runs the same benchmarks on the CPU with a tiny shape (what the tests run), but for
# eval_workload (its processes and compilations cost minutes; the benchmarks' own smoke run covers it).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
say() { echo "benchmarks/gpu.sh: $*" >&2; }

if ! "$PY" -c 'import importlib.metadata as m; m.version("lm-eval-parathinker")' 2>/dev/null; then
  [ -d wheelhouse ] || { say "lm-eval-parathinker is not installed for $PY and there is no wheelhouse/ to install it from (make wheelhouse)"; exit 1; }
  say "installing lm-eval-parathinker from wheelhouse/ (offline)"
  "$PY" -m pip install -q --no-index --find-links wheelhouse --no-cache-dir \
      -c <("$PY" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))') lm-eval-parathinker \
    || { say "the offline install from wheelhouse/ failed (above): rebuild it for this image (make wheelhouse)"; exit 1; }
fi
"$PY" - <<'EOF' || exit 1
import importlib
import sys

missing = []
for name in ("torch", "transformers", "lm_eval", "lm_eval_parathinker.engine", "lm_eval_parathinker.harness.model",
             "benchmarks.engine"):
    try:
        importlib.import_module(name)
    except Exception as e:  # any import failure: name it and stop before measuring
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    sys.exit("benchmarks/gpu.sh: cannot import " + "; ".join(missing))
import torch, transformers

print(f"benchmarks/gpu.sh: python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}", file=sys.stderr)
EOF

ONLY=eval_workload,decode_step,path_length,vs_hf
if [ "${1:-}" = "--smoke" ]; then
  shift
  exec "$PY" -m benchmarks.engine --smoke --compile --only "${ONLY#eval_workload,}" "$@"
fi
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "benchmarks/gpu.sh: no CUDA device visible to torch")'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec "$PY" -m benchmarks.engine --device cuda --dtype bfloat16 --compile --only "$ONLY" "$@"
