# One virtual environment per checkout; reinstalled when pyproject.toml changes.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: help install test test-slow lint typecheck check run bench supabase-check clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || \
	  { echo "CPA Scheduler needs Python 3.11 or newer; run: make PY=python3.11 ..."; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.stamp-*; touch $@

install: $(STAMP) ## create .venv and install the project with its dev tools

test: $(STAMP) ## run the default test suite (unit, integration, functions)
	$(BIN)/pytest

test-slow: $(STAMP) ## run the slow suites (crash safety, large concurrency)
	$(BIN)/pytest -m slow

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP) ## mypy --strict on shared/ and functions/
	$(BIN)/mypy

check: lint typecheck test ## everything CI runs

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

supabase-check: $(STAMP) ## db push + security advisors with the real Supabase CLI (needs npx)
	$(BIN)/python scripts/supabase_check.py

bench: $(STAMP) ## benchmarks against PgQueuer and Procrastinate, observability overhead (tests/bench/RESULTS.md)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python -m tests.bench.bench_dispatch
	$(BIN)/python -m tests.bench.bench_observability

run: $(STAMP) ## install, then serve the API and dispatcher on the embedded PostgreSQL
	$(BIN)/cpa-scheduler serve
