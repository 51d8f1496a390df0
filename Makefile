# medtl: the two set-up commands are `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medtl-installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medtl demo --output demo_output

# One test worker per core (pytest-xdist), each taking whole test files (loadfile: a module's
# fixtures are built once; files with slow tests are queued first, see tests/conftest.py).
# Measured on 2 cores: 10.7 min, against 11.5 (load), 12.3 (worksteal) and 14.8 in one process.
# TEST_WORKERS=0 runs the tests in this one process.
TEST_WORKERS ?= auto

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check medtl tests workflows benchmarks

clean:
	rm -rf demo_output mlruns mlflow.db .pytest_cache
