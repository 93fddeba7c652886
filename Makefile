# Every target creates .venv on first use and installs the package with its dev extras, so a
# fresh machine with only Python 3.10+ and make needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where `make demo` listens: make demo PORT=8001 (HOST=0.0.0.0 to be reached from outside).
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install demo test lint typecheck pytest bench format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/asgi-resilience demo --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check asgi_resilience tests benchmarks
	$(BIN)/ruff format --check asgi_resilience tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy --strict

pytest: $(STAMP)
	$(BIN)/pytest --cov --cov-report=term

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.report
	$(BIN)/python -m benchmarks.ratelimit

format: $(STAMP)
	$(BIN)/ruff format asgi_resilience tests benchmarks
	$(BIN)/ruff check --fix asgi_resilience tests benchmarks

clean:
	rm -rf $(VENV) .coverage .mypy_cache .ruff_cache .pytest_cache
