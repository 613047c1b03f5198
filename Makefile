# The two commands of the README: `make demo` and `make test`.
# Each builds .venv (pinned stack, scripts/bootstrap.sh) on first use.
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data/synth

.PHONY: env demo test lint format clean

env:
	@scripts/bootstrap.sh

demo: env  # a fresh demo run each time (runs/demo is replaced)
	rm -rf runs/demo
	$(BIN)/tff-privseg train --config configs/default.toml --out runs/demo

test: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

format: env
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf runs data/synth .pytest_cache
