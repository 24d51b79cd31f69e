# Two commands matter: `make demo` (a local federated training run on the embedded AWS)
# and `make test`. Both create .venv and install what they need on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION ?= 20

.PHONY: demo test check lint bench clean

# `make demo` installs what a local run needs (.[local]: TensorFlow, moto, rich, matplotlib);
# `make test` adds the development tools on top (.[dev]: CDK, cfn-lint, pytest, ruff).
# setuptools' notice about editable installs (a folder named like the package) is not for users.
PIP := PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install --quiet

$(VENV)/.local: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(PIP) -e '.[local]'
	touch $@

$(VENV)/.installed: $(VENV)/.local
	$(PIP) -e '.[dev]'
	touch $@

demo: $(VENV)/.local
	$(BIN)/fedstream local --mode sync --aggregator fedavg --clients 3 --rounds 3 --dataset mnist-5k

# Test processes (pytest-xdist); work stealing evens out the long end-to-end runs.
WORKERS ?= 2
PYTEST_PARALLEL := -n $(WORKERS) --dist worksteal

# Everything but the 200-client load tests (pytest -m load).
test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL)

# The edit-test loop: lint, the unit, plugin and protocol tests (the server logic on the in-memory
# store); no end-to-end runs, no CDK.
check: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) tests/unit tests/plugins tests/protocol

lint: $(VENV)/.installed
	$(BIN)/ruff check .

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/aggregation_memory.py
	$(BIN)/python benchmarks/aggregation_engine.py --quick
	$(BIN)/python benchmarks/round_overhead.py --rounds 5 --updates 20

clean:
	rm -rf $(VENV) runs .pytest_cache
