# Two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
CONSTRAINTS := constraints.txt

.PHONY: demo test test-slow bench quickstart lint install install-dev lock clean mutate

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/toymesa demo

# --dist loadscope: each test module runs on one worker, so its module-scoped fixtures (trained
# runs) are built once, not once per worker.
test: install-dev
	$(BIN)/python -m pytest -q -m "not slow" -n 2 --dist loadscope

test-slow: install-dev
	$(BIN)/python -m pytest -q -m slow

# Mutation check: curated one-line bugs (tests/mutate/mutants.toml), each run against the tests
# meant to catch it, 2 at a time; fails below a 90% kill rate. Report: tests/mutate/report.md.
# Options: make mutate MUTATE_ARGS="--only ID" (or --file PATH, --min 0.8).
mutate: install-dev
	$(BIN)/python tests/mutate/run.py $(MUTATE_ARGS)

# Throughput benchmark; installs the optional PyTorch baseline (CPU wheel) first.
bench: install
	$(PIP) install --quiet -c $(CONSTRAINTS) -e '.[torch]'
	$(BIN)/toymesa bench

# The example sweep (under a minute on 2 cores).
quickstart: install
	$(BIN)/toymesa run quickstart

lint: install-dev
	$(BIN)/ruff check toymesa tests experiments theory
	$(BIN)/ruff format --check toymesa tests experiments theory

# Re-pin the constraints file from the current environment (after a tested upgrade).
lock: install-dev
	{ head -2 $(CONSTRAINTS); $(PIP) freeze --exclude-editable | grep -vi "^toymesa"; } > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
