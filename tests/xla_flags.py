"""XLA_FLAGS of the test processes and the trainers they start (no jax import: conftest reads it before jax).

The tests' programs are compiled without LLVM's optimisations (`--xla_backend_optimization_level=0`): a tiny
model's train step is compiled and run in ~60% of the time (measured on the 2-core development machine, busy with
other jobs: a `train.train` of tests/train_fixtures.py took 38 s instead of 67), and the suite's time is mostly
compiling. Only the CPU code
generation changes, not the HLO passes (fusion, sharding) the tests read, and results agree within rounding,
which is all the parity tests' tolerances allow for anyway. Benchmarks and user runs keep the default.
"""


def host_devices(count: int) -> str:
    """XLA_FLAGS for a process with `count` CPU devices."""
    return f"--xla_force_host_platform_device_count={count} --xla_backend_optimization_level=0"
