# torchrelay: `make demo` and `make test` are all a new user needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
BROKER ?=

.PHONY: setup demo test lint bench clean

# A virtual environment with torchrelay installed in editable mode. torch is pinned
# first: on these machines 2.13.0 is a local CPU build, an unpinned torch would pull
# a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# The seed walkthrough, then federated learning on the digits (its plot written to
# federated-digits.png); in-process workers, or `make demo BROKER=amqp://...` for
# RabbitMQ with worker daemons the demos start and stop themselves.
demo: setup
	$(BIN)/torchrelay demo $(if $(BROKER),--broker $(BROKER))
	$(BIN)/torchrelay demo federated --plot federated-digits.png $(if $(BROKER),--broker $(BROKER))

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

# Everything CI runs: RabbitMQ started if needed, lint, types, the whole suite.
test: setup
	./scripts/ensure-rabbitmq.sh
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

bench: setup
	./scripts/ensure-rabbitmq.sh
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
