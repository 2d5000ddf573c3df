# The two commands of the README. Each creates .venv if missing and installs requirements.txt first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

.PHONY: quickstart test test-all gpu-compile-env clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

quickstart: $(STAMP)
	$(PY) scripts/quickstart.py

# Test files run in parallel worker processes, one file per worker at a time (module fixtures are built once).
# Two workers: ~10–12.6 min of pytest for `make test` on the 2-core development machine (618 tests, 10.7 min of pytest and 12.2 min from a fresh clone of 74191cd, idle; 2618892 took 12.6 and 14.2: the ~15 min budget is near, new tests should be paid for); `make test TEST_WORKERS=0` runs one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PYTEST) -m "not slow" tests

test-all: $(STAMP)
	$(PYTEST) tests

# For `scripts/hlo_audit.py --target h100|h200` (compile the step for a GPU on a machine without one): a venv
# that sees .venv's packages (a .pth file) and adds jax's CUDA plugin with its CUDA libraries (~4 GB).
GPU_COMPILE_VENV := .venv-gpu-compile
JAX_VERSION = $(shell sed -n 's/^jax==//p' requirements.txt)

gpu-compile-env: $(STAMP)
	$(PYTHON) -m venv $(GPU_COMPILE_VENV)
	$(PY) -c "import site; print(site.getsitepackages()[0])" > \
		"$$($(GPU_COMPILE_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/wavlink-venv.pth"
	$(GPU_COMPILE_VENV)/bin/python -m pip install --quiet "jax-cuda13-plugin[with-cuda]==$(JAX_VERSION)"

clean:
	rm -rf $(VENV) $(GPU_COMPILE_VENV) .pytest_cache
