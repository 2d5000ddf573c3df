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
# Two workers: 854 tests took 10.2 min of pytest on this repository's 2-core machine (2026-11-29, a fresh clone's
# `.ci/run`: 15.4 min in all, ~5 of them installing the venv); 836 took 10.1 min (12.0 in all), after the costliest
# launches moved to `slow` (CI had taken 1303 s for 837 tests; on a slow host they took 17.7 min of pytest).
# Earlier: 837 took 12.0 min (14.4 in all), 812 took 9.2 min (11.2
# in all), 814 took 9.9, and 12.1 (14.1 in all) and 14.7 on a slower host, where the quickstart's training took
# 7.0 min instead of 3.4-4.4; 10.7 min for 811, 9.4 min for 801, 736 took 10.4, 715 took 11.0, and 12.9 min of
# pytest before training processes stopped importing torch through tensorboardX, one-process checkpoints stopped
# slicing replicas and the tests cached every compiled program; 643 had taken 18.8 before the tests cached their
# programs and compiled them without LLVM's optimisations (tests/conftest.py, tests/xla_flags.py). The README's
# ~15 min budget includes the install (~2 min): new tests should be paid for (`--durations`).
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
