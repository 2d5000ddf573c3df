"""Test-wide set-up: 8 host CPU devices for the sharding tests (compiled quickly: xla_flags.py), fp32 matmuls
for parity tests, and one persistent compilation cache per test process.

XLA_FLAGS must be set before jax is first imported, so it lives here rather than in a test module.
"""
import os

import pytest
from xla_flags import host_devices

os.environ.setdefault("XLA_FLAGS", host_devices(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every program into the cache, not only those that took ≥ 1 s to compile: a trainer the tests start as a new
# process loads its ~80 small programs instead of compiling them (a tiny `train` from a warm cache: 9.9 s, not 12.0).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

from wavlink_jax import train  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """jax's persistent compilation cache in this test process's temporary folder (xdist gives each worker its
    own), for the process and the trainers it starts (JAX_COMPILATION_CACHE_DIR; `tiny_config` says "auto"). Many
    tests train the same tiny model: a repeated `train.train` took 20 s compiling its programs and 5.6 s loading
    them. A program is found by its HLO and compile options, so a cached one is the program a compile would give."""
    folder = train.use_compilation_cache(str(tmp_path_factory.getbasetemp() / "xla_cache"))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    yield folder
    train.use_compilation_cache("off")
