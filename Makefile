# The two commands of the README. Each creates .venv if missing and installs requirements.txt first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

.PHONY: quickstart test test-all clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

quickstart: $(STAMP)
	$(PY) scripts/quickstart.py

# Test files run in parallel worker processes, one file per worker at a time (module fixtures are built once).
# Two workers: ~10.3–11.2 min of pytest for `make test` on the 2-core development machine (553 tests, 11.8–12.7 min from a fresh clone); `make test TEST_WORKERS=0` runs one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PYTEST) -m "not slow" tests

test-all: $(STAMP)
	$(PYTEST) tests

clean:
	rm -rf $(VENV) .pytest_cache
