# The project's verbs. Each one sets up .venv itself on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: 2.13.0 is the CPU wheel available here; anything looser pulls CUDA.
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
PYTEST := $(BIN)/pytest

.PHONY: setup demo test test-slow lint crds chart bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[runtime,dev]'
	@rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedkube validate crds/samples/*.yaml

test: $(STAMP)
	$(PYTEST) -m "not slow"

test-slow: $(STAMP)
	$(PYTEST) -m slow

lint: $(STAMP)
	$(BIN)/ruff check operator tests hack
	$(BIN)/mypy

crds: $(STAMP)
	$(BIN)/fedkube crd -o crds/fedkube.io_federatedjobs.yaml

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
