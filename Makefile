# `make repro`: set up .venv and rebuild the pipeline; `make test`: the whole test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: repro test lint bench clean

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

test: $(VENV)/.dev
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

lint: $(VENV)/.dev
	$(BIN)/ruff check src stages tests benchmarks

bench: $(VENV)/.dev
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
