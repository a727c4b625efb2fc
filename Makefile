# The README's two commands: `make demo` and `make test`. Everything else supports them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The uv release PyAirbyte accepts, as in requirements.lock.
UV_VERSION := 0.8.24

.PHONY: venv demo test lint lint-sql hooks doctor lock deploy clean bench mutation stack-rebuild

# The lock holds the whole resolved set (prefect, PyAirbyte, dbt, adapters): installing it
# never backtracks. `make lock` re-resolves after a change to pyproject.toml.
$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	# Compiled at install: where PYTHONDONTWRITEBYTECODE is set (Docker images, CI) Python would
	# otherwise compile every module it imports, in every process, on every run.
	$(BIN)/uv pip sync --quiet --compile-bytecode --python $(BIN)/python requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	# The temporary Prefect server's database, migrated once here, not in a first `make demo`.
	$(BIN)/python -m elt.temporary_server
	touch $@

venv: $(VENV)/.installed

# fakesnow (Snowflake emulated on DuckDB, for the tests) needs duckdb 2, which PyAirbyte's pin
# excludes: it runs as a server from a virtualenv of its own.
FAKESNOW_VENV := .venv-fakesnow
$(FAKESNOW_VENV)/.installed: tests/fakesnow.lock $(VENV)/.installed
	$(BIN)/uv venv --quiet --python $(PYTHON) $(FAKESNOW_VENV)
	$(BIN)/uv pip sync --quiet --compile-bytecode --python $(FAKESNOW_VENV)/bin/python tests/fakesnow.lock
	touch $@

demo: venv
	$(BIN)/elt run

test: venv $(FAKESNOW_VENV)/.installed
	$(BIN)/pytest -n 2 --dist loadscope

# ruff (lint and format, configured in pyproject.toml), mypy on src/elt, sqlfluff on the dbt project.
lint: venv lint-sql
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The dbt templater compiles the project, which opens the DuckDB warehouse: a scratch one.
lint-sql: venv
	cd dbt && ELT_DUCKDB_PATH=$$(mktemp -d)/lint.duckdb ../$(BIN)/sqlfluff lint models tests macros

# Runs `make lint`'s tools before each commit (.pre-commit-config.yaml).
hooks: venv
	$(BIN)/pre-commit install

doctor: venv
	$(BIN)/elt doctor

# Creates the process work pool if missing and (re)deploys all-etl from prefect/prefect.yaml
# to the Prefect server in PREFECT_API_URL: one deployment per environments/<name>.env if any.
deploy: venv
	ELT_HOME=$(CURDIR) $(BIN)/elt deploy

# Benchmarks: each prints ratios measured side by side in one run; results land in bench/out/.
bench: venv
	$(BIN)/python bench/p1_transform_overhead.py
	$(BIN)/python bench/p2_extract_concurrency.py
	$(BIN)/python bench/pyairbyte_import.py
	$(BIN)/python bench/extract_throughput.py
	$(BIN)/python bench/p3_embedded_all_etl.py --repeat 3
	$(BIN)/python bench/p4_stack.py
	$(BIN)/python bench/p5_only_changed.py --repeat 3

# Mutation testing (mutmut, one worker, one module at a time) against the fast tests; prints the
# killed share per module (docs/testing.md). A benchmark, not a gate: it takes a while.
# MODULES=src/elt/run_lock.py runs one module; the table covers every module run so far.
mutation: venv $(FAKESNOW_VENV)/.installed
	$(BIN)/python tests/mutation.py $(MODULES)

lock:
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

clean:
	rm -rf data dbt/target dbt/logs .venv-connectors $(FAKESNOW_VENV) .mutation

# The appliance (docker/docker-compose.yml): rebuild the image after a change to
# requirements.lock or docker/, restart what changed, redeploy all-etl, update the
# automations. Same as rerunning setup.sh (idempotent); flags go in SETUP_FLAGS.
stack-rebuild:
	./setup.sh --no-airbyte --no-docker-install $(SETUP_FLAGS)
