"""Dense vs ring contrastive loss: time and compiled memory of loss + gradients for a range of batch sizes.

    python scripts/benchmark_loss.py                      # CPU: 8 host devices, N = 1024 … 8192, d = 512
    python scripts/benchmark_loss.py --sizes 16384 65536   # on a multi-GPU / TPU host: all its devices

Both forms run in one process on the same mesh (all devices on a `data` axis, embeddings row-sharded), so the
ratio columns compare like with like. Memory is XLA's compiled temporary-buffer size per device
(`memory_analysis().temp_size_in_bytes`); time is the median wall time of a jitted loss + gradient call
(wrt both embeddings, log-scale and bias). Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="global batch sizes N")
    parser.add_argument("--dim", type=int, default=512, help="embedding size d")
    parser.add_argument("--kinds", nargs="+", default=["clip", "sigmoid"], choices=["clip", "sigmoid"])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per configuration (median reported)")
    parser.add_argument(
        "--host-devices", type=int, default=8, help="on CPU: number of host devices to simulate (XLA_FLAGS)"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # Must happen before jax is imported; ignored on GPU/TPU backends.
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.host_devices}")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from wavlink_jax import losses

    devices = jax.devices()
    if len(devices) < 2:
        raise SystemExit(f"the ring form needs at least 2 devices on the batch axis; found {len(devices)}")
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P("data", None))
    replicated = NamedSharding(mesh, P())
    print(
        f"# {devices[0].platform} × {len(devices)} ({devices[0].device_kind}), host {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, jax {jax.__version__}, d={args.dim}, median of {args.repeats}"
    )

    def measure(kind: str, impl: str, za, zt, scale, bias) -> tuple[float, int]:
        def loss(a, t, s, b):
            if kind == "clip":
                return losses.clip_loss(a, t, s, mesh=mesh, impl=impl)
            return losses.sigmoid_loss(a, t, s, b, mesh=mesh, impl=impl)

        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(za, zt, scale, bias).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        jax.block_until_ready(compiled(za, zt, scale, bias))  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(za, zt, scale, bias))
            times.append(time.perf_counter() - start)
        return statistics.median(times), temp

    print()
    print("| loss | N | dense ms | ring ms | ring/dense time | dense temp MiB | ring temp MiB | ring/dense memory |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for n in args.sizes:
        if n % len(devices):
            raise SystemExit(f"N={n} is not divisible by the {len(devices)} devices")
        za, zt = (
            jax.device_put(losses.l2_normalize(jnp.asarray(rng.normal(size=(n, args.dim)), jnp.float32)), rows)
            for _ in range(2)
        )
        scale = jax.device_put(jnp.float32(np.log(10.0)), replicated)
        bias = jax.device_put(jnp.float32(-10.0), replicated)
        for kind in args.kinds:
            (dense_s, dense_b), (ring_s, ring_b) = (measure(kind, impl, za, zt, scale, bias) for impl in ("dense", "ring"))
            print(
                f"| {kind} | {n} | {dense_s * 1e3:.1f} | {ring_s * 1e3:.1f} | {ring_s / dense_s:.2f} | "
                f"{dense_b / 2**20:.1f} | {ring_b / 2**20:.1f} | {ring_b / dense_b:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
