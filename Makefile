# ddpm-pipeline: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; set TORCH_SPEC (e.g. "torch==2.13.0 --index-url ...") for a CUDA machine.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning makes small ops ~100x slower.
export OMP_WAIT_POLICY ?= PASSIVE

.DEFAULT_GOAL := help
.PHONY: help install test lint clean

help: ## show this list of targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed ## create .venv and install the package with its dev tools

test: install ## run the test suite
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install ## check the code with ruff
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests

clean: ## remove caches and build leftovers (keeps .venv)
	rm -rf .pytest_cache .ruff_cache build src/*.egg-info
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +
