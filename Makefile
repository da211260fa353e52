# Set-up and everyday commands. `make run` and `make test` work on a fresh machine with Python 3.11.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test demo lint bench setup clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the pair these machines carry locally; the ranges in pyproject admit it.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

# The service on embedded defaults: SQLite + files under ./data, jobs in-process. http://127.0.0.1:8000
run: setup
	$(BIN)/scan-service

# The whole test suite against the local PostgreSQL, Redis, a real Celery worker and Chromium.
test: setup
	scripts/services.sh
	scripts/browser.sh
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The engine alone on a generated sample of shapes: results in ./demo-results.
demo: setup
	$(BIN)/python -m scan_engine.sample_data demo-images
	$(BIN)/scan-cluster demo-images --clusters 4 --preset tiny --labels-from-folders --out demo-results

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy app worker

bench: setup
	$(BIN)/scan-bench --data ../shared/datasets/cifar10_test.npz --preset cpu --budget-s 1800

clean:
	rm -rf $(VENV) data demo-images demo-results test-output
