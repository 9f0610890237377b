# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
export GX_ANALYTICS_ENABLED := false
export DAGSTER_HOME ?= $(CURDIR)/.oppsync/dagster
# Some machines (ours among them) set PYTHONDONTWRITEBYTECODE: every run then compiles the package again and pytest
# rewrites every test module again (collecting the unit layer took 13 s instead of 5.5 s). Byte code goes to
# __pycache__/ directories, which git ignores.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install lint run test test-fast dev sandbox bench reliability check-defs docs clean workers

# uv (pinned in constraints.txt, installed by the venv's own pip) installs the pinned set in 10-30 s where pip took
# 75-95 s, a sixth of a clean-clone CI run. Byte code is compiled on first import (see above), not at install.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q -c constraints.txt uv
	$(BIN)/uv pip install -q --python $(BIN)/python -c constraints.txt -e '.[dev]'
	@rm -f $(VENV)/.installed-*; touch $(STAMP)

install: $(STAMP)
	@mkdir -p $(DAGSTER_HOME) && test -f $(DAGSTER_HOME)/dagster.yaml || cp dagster.yaml $(DAGSTER_HOME)/dagster.yaml

## ruff (lint + format check) over the Python, sqlfluff over the dbt project; seconds. To fix what is fixable:
## .venv/bin/ruff check --fix . && .venv/bin/ruff format . && .venv/bin/sqlfluff fix dbt
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/sqlfluff lint dbt

## the main job on the embedded default: sandbox CRMs -> DuckDB -> outcomes mart
run: install
	$(BIN)/oppsync run

## the whole suite (Postgres tests run when 127.0.0.1:5432 answers; in CI they must). Whole files per worker, in
## collection order: the longest first (tests/conftest.py LONGEST_FILES), so the run ends on short files
test: install browser
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=40

.PHONY: test-unit snapshot browser dashboard

## the fast loop: the unit layer (markers assigned in tests/conftest.py), under a minute
test-unit: install
	$(BIN)/python -m pytest -q -n 2 -m "unit and not slow and not postgres" --durations=5

test-fast: test-unit

## rewrite the Dagster definitions snapshot after an intended change (review and commit the diff)
snapshot: install
	$(BIN)/python -m pytest -q -n 0 tests/dagster/test_definitions_snapshot.py --snapshot-update

## the Dagster UI on the embedded default, with the sandbox serving in the background
## the Dagster UI with the sandbox serving and the webhook receiver listening (changes reach the mart in seconds)
dev: install
	$(BIN)/oppsync sandbox serve & $(BIN)/oppsync webhooks serve & trap 'kill $$(jobs -p)' EXIT; \
	$(BIN)/dagster dev -w workspace.yaml

## the outcomes dashboard (a web page over the marts, read-only) on http://127.0.0.1:8501; `make run` fills them
dashboard: install
	$(BIN)/oppsync dashboard

## Debian's chromium for the dashboard's browser test (Playwright drives /usr/bin/chromium; never
## `playwright install`, which downloads a browser build of its own). Quiet and idempotent: apt-get runs only
## when it is missing; as root (CI) or with password-less sudo, else the browser test skips outside CI.
browser:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	  else echo "browser: /usr/bin/chromium missing and no root: apt-get install chromium (the browser test skips)"; exit 0; fi; \
	  echo "browser: installing Debian's chromium for the dashboard's browser test"; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

sandbox: install
	$(BIN)/oppsync sandbox serve

## N Celery workers (default 2) for the celery_executor on the broker in deploy/celery/worker.yaml (README "Scaling out")
WORKERS ?= 2
workers: install
	$(BIN)/oppsync workers --count $(WORKERS)

check-defs: install
	$(BIN)/dg check defs

bench: install
	$(BIN)/python -m benchmarks

## faults x CRMs, crash kills on both warehouses, hostile answers, secrets, lease races: ends with one table
reliability: install
	OPPSYNC_RELIABILITY=full $(BIN)/python -m pytest -q -n 2 --dist load tests/reliability tests/reconcile/test_lease_race.py

docs: install
	cd dbt && OPPSYNC_DUCKDB_PATH=$(CURDIR)/.oppsync/warehouse.duckdb ../$(BIN)/dbt docs generate --profiles-dir . --target duckdb

clean:
	rm -rf .oppsync dbt/target dbt/logs .pytest_cache
