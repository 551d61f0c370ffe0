# The two commands of the README: `make run` and `make test`. Both create .venv when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config.yaml

.PHONY: run demo test lint typecheck unit bench check fmt clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The main job: the webhook receiver, the planner and the delivery workers in one process.
run: $(STAMP)
	$(BIN)/connector check --config $(CONFIG)
	$(BIN)/connector serve --config $(CONFIG)

# In a second shell while `make run` serves: post the bundled sample events and show what
# each destination received (starts its own server when none is running).
demo: $(STAMP)
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
