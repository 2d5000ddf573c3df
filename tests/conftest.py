"""Test-wide set-up: 8 host CPU devices for the sharding tests, fp32 matmuls for parity tests.

XLA_FLAGS must be set before jax is first imported, so it lives here rather than in a test module.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
