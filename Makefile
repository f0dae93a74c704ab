# Every target creates .venv on first use, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONFIG ?= config/broker.toml

.PHONY: run test lint bench soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/credbroker run -c $(CONFIG)

lint: $(STAMP)
	$(BIN)/ruff check broker tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q -n 4

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	$(BIN)/python -m benchmarks --json-out benchmarks/last-run.json

soak: $(STAMP)
	$(BIN)/python -m pytest -q -m soak --run-soak

clean:
	rm -rf $(VENV) build *.egg-info
