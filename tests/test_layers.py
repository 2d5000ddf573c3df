"""The shared transformer block: attention implementation choice and cuDNN's even-length padding."""

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
