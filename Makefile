# `make repro`: set up .venv and rebuild the pipeline; `make test`: the whole test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: repro test lint bench bench-serve sweep experiments clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# Reinstalled whenever pyproject.toml changes.
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@ $(VENV)/.runtime

# Stage commands call `python`: the venv's must come first on PATH.
repro: $(VENV)/.runtime
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# Each of N parallel workers' share of the cores: oversubscribed, trainings on a CPU run
# ~10x slower. $(call cores_each,N)
cores_each = $(shell echo $$(( $$(nproc) / $(1) > 0 ? $$(nproc) / $(1) : 1 )))

# Two workers, each taking a whole test module at a time (module fixtures such as the
# pipeline's `dvc repro` are built once), longest modules first (tests/conftest.py),
# each with its share of the cores, as in `make sweep` (oversubscribed, 2 cores ran the
# suite in 10.5 min instead of 8.9, an earlier and smaller suite; serially it took ~19.5;
# docs/testing.md has the current times).
TEST_JOBS ?= 2
TEST_THREADS ?= $(call cores_each,$(TEST_JOBS))
test: $(VENV)/.dev
	PATH="$(CURDIR)/$(BIN):$$PATH" OMP_NUM_THREADS=$(TEST_THREADS) \
		$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadscope --no-loadscope-reorder

# ruff, and the hosted CI workflow against GitHub's schema for workflows.
lint: $(VENV)/.dev
	$(BIN)/ruff check src stages tests benchmarks
	$(BIN)/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/ci.yml

bench: $(VENV)/.dev
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/train_speed.py

# The model served by `mlflow models serve` under 1, 4 and 16 concurrent clients.
bench-serve: $(VENV)/.dev
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/serve_load.py

# What is queued, run by N workers, each with its share of the cores; waits for the
# queue to empty. $(call run_queue,JOBS,THREADS)
define run_queue
	PATH="$(CURDIR)/$(BIN):$$PATH" OMP_NUM_THREADS=$(2) $(BIN)/dvc queue start -j $(1)
	while PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc queue status | grep -qE 'Queued|Running'; \
		do sleep 10; done
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc queue status
endef

# A grid of queued experiments, then a report in metrics/sweep/.
SWEEP_RANKS ?= 1,2,4,8,16
SWEEP_SEEDS ?= 123,7
SWEEP_INIT ?= reference
SWEEP_JOBS ?= 2
SWEEP_THREADS ?= $(call cores_each,$(SWEEP_JOBS))
sweep: $(VENV)/.runtime
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc exp run --queue \
		-S 'lora.rank=$(SWEEP_RANKS)' -S 'train.seed=$(SWEEP_SEEDS)' -S 'lora.init=$(SWEEP_INIT)'
	$(call run_queue,$(SWEEP_JOBS),$(SWEEP_THREADS))
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/spamlora sweep-report

# The book's chapter 6 experiments as named DVC experiments, then
# metrics/experiments/table.md beside its figures (docs/experiments.md). ROWS="1 2 8":
# those rows (default: all 12; `spamlora experiments list` says what each downloads);
# EXTRA="-S train.epochs=1": a param for every row, replacing the book's.
ROWS ?=
EXTRA ?=
EXPERIMENTS_JOBS ?= 2
EXPERIMENTS_THREADS ?= $(call cores_each,$(EXPERIMENTS_JOBS))
experiments: $(VENV)/.runtime
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/spamlora experiments queue $(ROWS) $(EXTRA)
	$(call run_queue,$(EXPERIMENTS_JOBS),$(EXPERIMENTS_THREADS))
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/spamlora experiments report

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
