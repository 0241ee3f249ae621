# fedctl developer entry points. `make demo` and `make test` work on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
PIP     := $(BIN)/python -m pip
# Tests that start servers or Ray must keep all traffic on loopback; CI wraps `make test` itself.
PYTEST  := $(BIN)/python -m pytest

.PHONY: install demo test test-slow test-all fuzz lint bench bench-quick clean

install: $(STAMP)

# torch is installed first and pinned by constraints.txt so pip never pulls a CUDA build.
# Every optional extra is installed, so that the tests (and CI) cover the sinks, Lightning and PNGs.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev,dp,tensorboard,mlflow,lightning,report]'
	touch $(STAMP)

# The report is of the newest run in fedctl-runs: the one just made.
demo: $(STAMP)
	$(BIN)/fedctl simulate recipes/hello_pt --clients 8 --workspace fedctl-runs
	$(BIN)/fedctl report fedctl-runs

test: $(STAMP)
	$(PYTEST) -q -m "not slow"

test-slow: $(STAMP)
	$(PYTEST) -q -m slow

test-all: $(STAMP)
	$(PYTEST) -q

# tests/test_fuzz.py with a much larger budget (thousands of examples a target, the failures
# Hypothesis finds kept in .hypothesis/ and replayed first next time); `make test` runs it small.
fuzz: $(STAMP)
	FEDCTL_FUZZ=long $(PYTEST) -q tests/test_fuzz.py --timeout=3600

lint: $(STAMP)
	$(BIN)/ruff check fedctl tests bench recipes
	$(BIN)/ruff format --check fedctl tests bench recipes
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/bench_sim.py

bench-quick: $(STAMP)
	$(BIN)/python bench/bench_sim.py --quick

clean:
	rm -rf $(VENV) fedctl-runs .pytest_cache .ruff_cache *.egg-info

.PHONY: bench-algorithms bench-aggregators

# Non-IID comparison of FedAvg, FedProx, SCAFFOLD, FedNova, FedAdam (docs/algorithms.md).
bench-algorithms: $(STAMP)
	$(BIN)/python bench/bench_algorithms.py

# Memory and time of the weighted mean and the robust aggregators.
bench-aggregators: $(STAMP)
	$(BIN)/python bench/bench_aggregators.py
