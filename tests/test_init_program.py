"""The compiled parameter-initialisation program: its random-number kernels must not grow with depth.

GPU run 2 spent 15 s (base) to 89 s (small) compiling the trainer's init program: jax lowers threefry for GPU
fully unrolled, and XLA fused each layer-stacked (vmapped) draw into every per-layer slice of it, one unrolled
threefry kernel per layer and parameter. The CPU normally gets a rolled threefry loop, which hides this, so
these tests give the CPU the GPU's lowering and count the compiled computations that contain threefry's xor.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wavlink_jax.models import layers

BLOCK = dict(
    width=32, num_heads=2, mlp_dim=64, activation="gelu", key_bias=False, layer_norm_eps=1e-5,
    dtype=jnp.float32, param_dtype=jnp.float32, attention_implementation=None,
)


@contextlib.contextmanager
def gpu_threefry_lowering_on_cpu() -> Iterator[None]:
    """Lower threefry on the CPU as jax does for GPU (unrolled, no loop) while inside the block."""
    from jax._src.interpreters import mlir
    from jax._src.random.threefry2x32 import threefry2x32_p

    cpu_rules = mlir._platform_specific_lowerings["cpu"]
    saved = cpu_rules[threefry2x32_p]
    cpu_rules[threefry2x32_p] = mlir._lowerings[threefry2x32_p]  # the rule cuda falls back to
    try:
        yield
    finally:
        cpu_rules[threefry2x32_p] = saved


def threefry_kernels(num_layers: int) -> int:
    """Computations holding threefry's xor in the compiled init of a `num_layers` EncoderStack (GPU lowering)."""

    def init(key: jax.Array) -> nnx.State:
        return nnx.state(layers.EncoderStack(num_layers, rngs=nnx.Rngs(params=key), **BLOCK))

    with gpu_threefry_lowering_on_cpu():
        compiled = jax.jit(init).lower(jax.random.key(0)).compile()
    return sum(" xor(" in computation for computation in compiled.as_text().split("\n\n"))


def test_random_kernels_of_init_do_not_grow_with_depth():
    shallow, deep = threefry_kernels(2), threefry_kernels(6)
    assert shallow > 0, "no threefry in the compiled program: the test no longer sees the draws"
    # With vmapped draws sliced per layer (before commit "init: draw encoder blocks in a loop"): 20 at depth 2
    # and 44 at depth 6, the six kernel draws of a block fused into each layer's slices; in a loop: 7 and 7.
    assert deep == shallow, f"threefry kernels grow with depth: {shallow} at 2 layers, {deep} at 6"


def test_each_block_draws_from_its_own_key():
    """Block i's parameters are exactly a block created on its own from the i-th split of the stack's key: the
    values (and so seeded runs and checkpoint compatibility) do not depend on how the stack batches the draws."""
    key = jax.random.key(3)
    stack = jax.jit(lambda k: nnx.state(layers.EncoderStack(3, rngs=nnx.Rngs(params=k), **BLOCK)))(key)
    keys = jax.random.split(jax.random.fold_in(key, 0), 3)  # what nnx.Rngs(params=key).params() yields first
    for i, layer_key in enumerate(keys):
        alone = jax.jit(lambda k: nnx.state(layers.EncoderBlock(rngs=nnx.Rngs(params=k), **BLOCK)))(layer_key)
        expected, got = nnx.to_flat_state(alone), dict(nnx.to_flat_state(stack["layers"][i]))
        assert [path for path, _ in expected] == sorted(got), f"layer {i}: parameter paths differ"
        for path, variable in expected:
            np.testing.assert_array_equal(got[path].get_value(), variable.get_value(), err_msg=f"layer {i} {path}")
