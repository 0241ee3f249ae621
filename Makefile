# fedctl developer entry points. `make demo` and `make test` work on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
PIP     := $(BIN)/python -m pip
# Tests that start servers or Ray must keep all traffic on loopback; CI wraps `make test` itself.
# make install installs every extra (he, dp, tensorboard, ...): a missing one fails the tests
# that need it instead of skipping them (FEDCTL_REQUIRE_HE: tests/test_he.py).
PYTEST  := FEDCTL_REQUIRE_HE=1 $(BIN)/python -m pytest

.PHONY: install install-flower demo test test-slow test-docs test-all test-flower fuzz lint bench bench-quick clean

install: $(STAMP)

PLUGIN  := recipes/fedclip-plugin

# torch is installed first and pinned by constraints.txt so pip never pulls a CUDA build.
# The example plugin (docs/plugins.md) is installed too: tests/test_plugins.py runs it in the
# simulator and on a POC. Every optional extra is installed, so that the tests (and CI) cover
# them: DP, the sinks, Lightning, PNG reports.
$(STAMP): pyproject.toml constraints.txt $(PLUGIN)/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev,dp,he,tensorboard,mlflow,lightning,report]'
	$(PIP) install -q -c constraints.txt -e $(PLUGIN)
	touch $(STAMP)

# The report is of the newest run in fedctl-runs: the one just made.
demo: $(STAMP)
	$(BIN)/fedctl simulate recipes/hello_pt --clients 8 --workspace fedctl-runs
	$(BIN)/fedctl report fedctl-runs

test: $(STAMP)
	$(PYTEST) -q -m "not slow"

test-slow: $(STAMP)
	$(PYTEST) -q -m slow

# Every command block of README.md and docs/ runs (tests/test_docs.py; 3 to 5 minutes). CI runs
# it like `make test`, inside the loopback-only namespace.
test-docs: $(STAMP)
	$(PYTEST) -q -m slow tests/test_docs.py

test-all: $(STAMP)
	$(PYTEST) -q

# Flower apps through fedctl (tests_flower/, docs/flower.md) in their own virtual environment:
# flwr[simulation] brings its own pins (protobuf, ray, typer), which must not move the core's.
FVENV   := .venv-flower
FSTAMP  := $(FVENV)/.installed-stamp

$(FSTAMP): pyproject.toml constraints.txt
	test -x $(FVENV)/bin/python || $(PY) -m venv $(FVENV)
	$(FVENV)/bin/python -m pip install -q torch==2.13.0
	$(FVENV)/bin/python -m pip install -q -c constraints.txt -e '.[dev,flower]'
	touch $(FSTAMP)

install-flower: $(FSTAMP)

test-flower: $(FSTAMP)
	$(FVENV)/bin/python -m pytest -q tests_flower -p no:cacheprovider

# tests/test_fuzz.py with a much larger budget (thousands of examples a target, the failures
# Hypothesis finds kept in .hypothesis/ and replayed first next time); `make test` runs it small.
fuzz: $(STAMP)
	FEDCTL_FUZZ=long $(PYTEST) -q tests/test_fuzz.py --timeout=3600

lint: $(STAMP)
	$(BIN)/ruff check fedctl tests tests_flower bench recipes
	$(BIN)/ruff format --check fedctl tests tests_flower bench recipes
	$(BIN)/mypy

# (c)'s time ratio is the median of three alternating reference/fedctl pairs (one pair moves by
# ±10% with this machine's speed), timed unwatched; its peaks come from a fourth pair whose
# memory is sampled (about 10 minutes in all on 2 cores)
bench: $(STAMP)
	$(BIN)/python bench/bench_sim.py --repeat 3

bench-quick: $(STAMP)
	$(BIN)/python bench/bench_sim.py --quick

clean:
	rm -rf $(VENV) $(FVENV) fedctl-runs .pytest_cache .ruff_cache *.egg-info

.PHONY: bench-algorithms bench-aggregators bench-privacy bench-he bench-compression bench-scale bench-async bench-swarm soak

# Non-IID comparison of FedAvg, FedProx, SCAFFOLD, FedNova, FedAdam (docs/algorithms.md).
bench-algorithms: $(STAMP)
	$(BIN)/python bench/bench_algorithms.py

# Accuracy against epsilon: no DP, central DP and DP-SGD on a non-IID task (docs/privacy.md).
bench-privacy: $(STAMP)
	$(BIN)/python bench/bench_privacy.py

# Memory and time of the weighted mean and the robust aggregators.
bench-aggregators: $(STAMP)
	$(BIN)/python bench/bench_aggregators.py

# Per-round cost of homomorphic encryption against plain FedAvg, 1M and 10M parameters with
# 10 and 100 sites (a few minutes; docs/he.md). `python bench/bench_he.py --quick` for a glance.
bench-he: $(STAMP)
	$(BIN)/python bench/bench_he.py

# Bytes on the wire, time per round and accuracy of each compression setting (docs/compression.md).
bench-compression: $(STAMP)
	$(BIN)/python bench/bench_compression.py

# 10,000 virtual sites beside 1,000, 100 sampled per round: peak memory and round time ratios
# (three alternating pairs, medians reported: about 4 minutes; docs/simulation.md).
bench-scale: $(STAMP)
	$(BIN)/python bench/bench_scale.py --repeat 3

# Simulated time to 75% accuracy of FedAvg, FedBuff and FedAsync with a tenfold spread of site
# speeds (about 15 seconds; docs/algorithms.md).
bench-async: $(STAMP)
	$(BIN)/python bench/bench_async.py

# Swarm learning's relay cost on a local POC against server aggregation (about a minute).
bench-swarm: $(STAMP)
	$(BIN)/python bench/bench_swarm.py

# Long jobs must not grow: 1,000 rounds in simulation and 300 on a POC, RSS, files and threads
# of every long-lived process with their slope (about 10 minutes; not in CI).
soak: $(STAMP)
	$(BIN)/python bench/soak.py
