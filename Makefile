# The two commands of the README: `make run` and `make test`. Both create .venv when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config.yaml

.PHONY: run demo test lint typecheck unit bench check fmt clean lock

# Installs come from the lock files (requirements/, every package pinned with its hashes):
# requirements/app.txt for `make run`, requirements/dev.txt (the same pins plus the tools of
# the tests) for `make test`. `make lock` writes both again from pyproject.toml's ranges.
APP_STAMP := $(VENV)/.installed-app
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
UV_VERSION := 0.13.9

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(APP_STAMP): requirements/app.txt | $(BIN)/python
	$(PIP) --require-hashes -r requirements/app.txt
	$(PIP) --no-deps --no-build-isolation -e .
	touch $(APP_STAMP)

$(STAMP): requirements/dev.txt | $(BIN)/python
	$(PIP) --require-hashes -r requirements/dev.txt
	$(PIP) --no-deps --no-build-isolation -e .
	touch $(STAMP) $(APP_STAMP)

# Resolve pyproject.toml's ranges (and the build backend, requirements/build.in) for Python
# 3.11 on every platform, keeping each pin that still satisfies them; `make lock
# LOCK_FLAGS=--upgrade` takes the newest releases instead. Commit the two files it writes.
LOCK_FLAGS ?=
lock: | $(BIN)/python
	$(PIP) uv==$(UV_VERSION)
	$(BIN)/uv pip compile --quiet $(LOCK_FLAGS) pyproject.toml requirements/build.in --python-version 3.11 \
		--universal --generate-hashes --custom-compile-command "make lock" -o requirements/app.txt
	$(BIN)/uv pip compile --quiet $(LOCK_FLAGS) pyproject.toml requirements/build.in --extra dev \
		--constraint requirements/app.txt --python-version 3.11 --universal --generate-hashes \
		--custom-compile-command "make lock" -o requirements/dev.txt

# The main job: the webhook receiver, the planner and the delivery workers in one process.
run: $(APP_STAMP)
	$(BIN)/connector check --config $(CONFIG)
	$(BIN)/connector serve --config $(CONFIG)

# In a second shell while `make run` serves: post the bundled sample events and show what
# each destination received (starts its own server when none is running).
demo: $(APP_STAMP)
	$(BIN)/connector demo --config $(CONFIG)

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check connector tests bench
	$(BIN)/ruff format --check connector tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

# Run by hand; bench/ingest.py needs wrk (apt-get install wrk).
bench: $(STAMP)
	$(BIN)/python bench/mapping.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/pipeline.py

fmt: $(STAMP)
	$(BIN)/ruff format connector tests bench
	$(BIN)/ruff check --fix connector tests bench

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
