# `make demo`, `make test` and `make test-fast` set themselves up on a fresh machine: venv,
# requirements, assets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# One pytest worker per core (pytest-xdist); PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= auto

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=15 $(PYTEST_ARGS) tests

# Everything but the tests marked slow (whole training runs, subprocesses, long compilations).
# --dist loadfile: each file's module fixtures (models, compiled programs) are built once.
test-fast: setup
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=15 -m "not slow" \
	  $(PYTEST_ARGS) tests

demo: setup
	$(PY) -m experiments.demo

bench: setup
	$(PY) -m experiments.bench_wkv

clean:
	rm -rf $(VENV) build *.egg-info
