# Run `make` or `make help` for the list of targets.
.DEFAULT_GOAL := help
PYTHON ?= python3
BIN := .venv/bin
STAMP := .venv/.installed

.PHONY: help venv test lint typecheck check stress bench sample

help: ## Show this help
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{ printf "  %-10s %s\n", $$1, $$2 }'

venv: $(STAMP) ## Create .venv and install the project with its test extras

# Reinstalls only when pyproject.toml changes, so `make test` is fast once installed.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv .venv
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

# Test workers: one per core, at most four. Each starts its own broker and PostgreSQL; a
# module's tests stay on one worker (its module fixtures are built once).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ "$$n" -gt 4 ] && n=4; echo $$n)

test: venv ## Run the test suite (starts its own Kafka broker and PostgreSQL per worker)
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: venv ## ruff check, ruff format --check, and the import layers (lint-imports)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: venv ## mypy --strict (packages listed in pyproject.toml)
	$(BIN)/mypy

check: lint typecheck test ## What CI runs: lint, typecheck, test

stress: venv ## Stress tests (pytest -m stress); set STRESS_SEEDS to vary them
	$(BIN)/pytest -q tests -m stress

bench: venv ## Throughput benchmark
	$(BIN)/python -m bench

sample: venv ## Import the sample chat export with the CLI
	$(BIN)/khala-stream import-chat
