"""The shared transformer block: attention implementation choice and cuDNN's even-length padding."""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from wavlink_jax.models import layers


def test_none_resolves_to_xla_on_cpu_and_named_implementations_stay():
    assert layers.resolve_attention_implementation(None, jnp.bfloat16) == "xla"  # the tests run on CPU
    assert layers.resolve_attention_implementation("cudnn", jnp.float32) == "cudnn"


@pytest.mark.parametrize("length", [31, 32])
def test_cudnn_path_pads_odd_lengths_and_masks_the_padding(monkeypatch, length):
    """cuDNN flash attention refuses odd lengths (Whisper's 1500 frames + token = 1501): the padded call, run
    here through XLA, must give the unpadded result — padded keys masked out, padded query rows dropped."""
    attention = layers.Attention(
        64, 4, key_bias=False, dtype=jnp.float32, param_dtype=jnp.float32, implementation="xla", rngs=nnx.Rngs(0)
    )
    x = jax.random.normal(jax.random.key(1), (2, length, 64))
    reference = attention(x)
    original = jax.nn.dot_product_attention
    shapes = []

    def as_if_cudnn(q, k, v, *, implementation, **kwargs):
        assert implementation == "cudnn"
        shapes.append(q.shape[1])
        return original(q, k, v, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", as_if_cudnn)
    attention.implementation = "cudnn"
    out = attention(x)
    assert shapes == [32]
    assert float(jnp.abs(out - reference).max()) < 1e-6


def _stack(num_layers: int, seed: int = 0) -> layers.EncoderStack:
    return layers.EncoderStack(
        num_layers, width=32, num_heads=4, mlp_dim=64, activation="gelu", key_bias=True, layer_norm_eps=1e-5,
        dtype=jnp.float32, param_dtype=jnp.float32, attention_implementation="xla", rngs=nnx.Rngs(seed),
    )


def test_stack_blocks_are_initialised_independently_with_their_axes():
    """The vmapped creation gives every block its own draws (normal 0.02 kernels, zero biases, unit LayerNorm
    scales), keeps each parameter's logical axes, and is reproducible from the seed."""
    import numpy as np

    stack = _stack(4)
    kernels = np.stack([np.asarray(block.fc1.kernel[...]) for block in stack.layers])
    assert kernels.shape == (4, 32, 64)
    assert all(not np.allclose(kernels[i], kernels[j]) for i in range(4) for j in range(i))
    assert abs(kernels.std() - 0.02) < 0.002 and abs(kernels.mean()) < 0.002
    assert all(float(jnp.abs(block.fc1.bias[...]).max()) == 0 for block in stack.layers)
    assert all(float(jnp.abs(block.attn_norm.scale[...] - 1).max()) == 0 for block in stack.layers)
    axes = layers.logical_axes(stack)
    assert axes[("layers", 3, "fc1", "kernel")] == ("embed", "mlp")
    assert axes[("layers", 0, "attn", "out", "kernel")] == ("heads", "embed")
    assert np.array_equal(kernels[2], np.asarray(_stack(4).layers[2].fc1.kernel[...]))


def test_stack_init_program_does_not_grow_random_draws_with_depth():
    """Under jit (how the trainer creates parameters) the number of random-number programs is that of one
    block, whatever the depth: a loop of blocks made init compile time grow with the layer count."""

    def draws(num_layers: int) -> int:  # call sites of jax.random.normal in the lowered init program
        init = jax.jit(lambda key: nnx.state(_stack(num_layers, seed=key)))
        return len(re.findall(r"call @_normal", init.lower(jax.random.key(0)).as_text()))

    assert draws(2) == draws(8) > 0
