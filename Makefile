# Two commands matter: `make demo` (a local federated training run on the embedded AWS)
# and `make test`. Both create .venv and install what they need on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION ?= 20

.PHONY: demo test check lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/fedstream local --mode sync --aggregator fedavg --clients 3 --rounds 3 --dataset mnist-5k --out runs/demo

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The edit-test loop: lint, the plugins and the pure unit tests (no AWS, no TensorFlow), seconds.
check: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests/plugins tests/unit/test_weights.py tests/unit/test_aggregation_helpers.py \
		tests/unit/test_attack.py tests/unit/test_import_contract.py

lint: $(VENV)/.installed
	$(BIN)/ruff check .

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/aggregation_memory.py
	$(BIN)/python benchmarks/aggregation_engine.py --quick
	$(BIN)/python benchmarks/round_overhead.py --rounds 5 --updates 20

clean:
	rm -rf $(VENV) runs .pytest_cache
