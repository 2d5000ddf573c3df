"""cuDNN flash attention needs even sequence lengths: the encoder stack pads once per tower, not q/k/v per layer.

CPUs have no cuDNN, so `implementation="cudnn"` calls are routed through XLA (recording the query length each
call sees); the padded cuDNN path must then compute exactly what plain XLA attention computes on the true
length, values and gradients alike, and the differentiated program must hold a fixed number of pads however
many layers the stack has.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import subjaxprs

from wavlink_jax.models import layers
from wavlink_jax.models.clip_text import CLIPTextConfig, CLIPTextEncoder
from wavlink_jax.models.whisper import WhisperConfig, WhisperEncoder

from test_layers import tiny_stack

TOL = 1e-5


def _route_cudnn_through_xla(monkeypatch, refuse_odd: bool) -> list:
    """Route `implementation="cudnn"` through XLA; the list collects the query length of each cuDNN call.
    `refuse_odd`: an odd length raises NotImplementedError, as jax 0.10.2 refuses it while tracing a training
    step (`layers.cudnn_trains_unpadded` asks; the test gets a fresh memory of its answers)."""
    original = jax.nn.dot_product_attention
    lengths = []

    def fake(q, k, v, *, implementation=None, **kwargs):
        if implementation == "cudnn":
            if refuse_odd and q.shape[1] % 2:
                raise NotImplementedError(f"Unsupported sequence length Q {q.shape[1]}, KV {k.shape[1]}.")
            lengths.append(q.shape[1])
        return original(q, k, v, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    monkeypatch.setattr(layers, "cudnn_trains_unpadded", functools.cache(layers.cudnn_trains_unpadded.__wrapped__))
    return lengths


@pytest.fixture
def cudnn_lengths(monkeypatch) -> list:
    """cuDNN calls through XLA, any length accepted (`_route_cudnn_through_xla`)."""
    return _route_cudnn_through_xla(monkeypatch, refuse_odd=False)


@pytest.fixture(params=[False, True], ids=["jax-trains-odd", "jax-refuses-odd"])
def unpadded_lengths(request, monkeypatch) -> tuple[list, int | None]:
    """cuDNN calls through XLA, odd lengths refused or not; (the lengths, the padded length expected from an odd
    one: None where jax trains it as it is)."""
    return _route_cudnn_through_xla(monkeypatch, refuse_odd=request.param), 32 if request.param else None


def _value_and_grads(model: nnx.Module, loss, *inputs):
    """The loss and its gradients with respect to the model's parameters and, when it is float, the first input."""
    graphdef, params, others = nnx.split(model, nnx.Param, ...)

    def f(params, *inputs):
        return loss(nnx.merge(graphdef, params, others), *inputs)

    argnums = (0, 1) if jnp.issubdtype(inputs[0].dtype, jnp.floating) else 0
    return jax.jit(jax.value_and_grad(f, argnums=argnums))(params, *inputs)  # jitted: eager dispatch is slow


def _assert_close(cudnn, xla) -> None:
    """Every leaf agrees to `TOL` relative to its largest magnitude or 1, whichever is larger (fp32 rounding
    of sums the padding reorders; a padded row leaking into a real one would show as O(1)). The floor is
    for leaves that are zero up to rounding, such as the key bias's gradient (softmax ignores it)."""

    def relative(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1.0))

    diffs = jax.tree.map(relative, cudnn, xla)
    assert max(jax.tree.leaves(diffs)) < TOL, diffs


@pytest.mark.parametrize("global_only", [False, True])
def test_whisper_padded_cudnn_path_matches_xla(cudnn_lengths, global_only):
    """40 mel frames → 20 positions + the global token = 21 rows, padded once to 32 for every cuDNN block."""
    sizes = dict(n_mels=8, width=32, num_layers=3, num_heads=4, mlp_dim=64, max_positions=24, remat="dots_saveable")
    mel = jax.random.normal(jax.random.key(1), (2, 8, 40))
    weights = jax.random.normal(jax.random.key(2), (2, 21, 32))

    def loss(model, mel):
        out = model(mel, global_only=global_only)
        if global_only:
            return jnp.sum(out.global_state * weights[:, -1])
        return jnp.sum(out.hidden_states * weights[:, :-1]) + jnp.sum(out.global_state * weights[:, -1])

    results = {
        implementation: _value_and_grads(
            WhisperEncoder(WhisperConfig(**sizes, attention_implementation=implementation), rngs=nnx.Rngs(0)),
            loss,
            mel,
        )
        for implementation in ("xla", "cudnn")
    }
    assert set(cudnn_lengths) == {32}
    _assert_close(results["cudnn"], results["xla"])


def test_clip_text_padded_cudnn_path_matches_xla(cudnn_lengths):
    """77 causal tokens (captions of 77, 40 and 5 tokens) padded once to 80; pooled at each caption's EOS."""
    sizes = dict(vocab_size=99, width=32, num_layers=2, num_heads=4, mlp_dim=64, projection_dim=16)
    caption_lengths = np.array([77, 40, 5])
    positions = np.arange(77)
    ids = np.array(jax.random.randint(jax.random.key(3), (3, 77), 3, 98))
    ids[np.arange(3), caption_lengths - 1] = 98  # end-of-text: the largest id (eos_token_id == 2 pooling)
    mask = positions < caption_lengths[:, None]
    ids = jnp.asarray(np.where(mask, ids, 0))
    weights = jax.random.normal(jax.random.key(4), (3, 77, 32))

    def loss(model, ids, mask):
        out = model(ids, mask.astype(jnp.int32))
        valid = mask[..., None]
        return jnp.sum(jnp.where(valid, out.hidden_states, 0) * weights) + jnp.sum(out.pooled * weights[:, 0])

    results = {
        implementation: _value_and_grads(
            CLIPTextEncoder(CLIPTextConfig(**sizes, attention_implementation=implementation), rngs=nnx.Rngs(0)),
            loss,
            ids,
            jnp.asarray(mask),
        )
        for implementation in ("xla", "cudnn")
    }
    assert set(cudnn_lengths) == {80}
    _assert_close(results["cudnn"], results["xla"])


def _stack_value_and_grads(implementation: str, causal: bool):
    """A 2-layer stack over 21 rows with the caller's kv_lengths shorter than the sequence: the loss on its valid
    rows and the gradients of the parameters and the input."""
    x = jax.random.normal(jax.random.key(5), (3, 21, 32))
    kv_lengths = jnp.array([21, 9, 1], jnp.int32)
    weights = jax.random.normal(jax.random.key(6), (3, 21, 32))
    valid = (jnp.arange(21) < kv_lengths[:, None])[..., None]

    def loss(stack, x):
        return jnp.sum(jnp.where(valid, stack(x, kv_lengths=kv_lengths, causal=causal), 0) * weights)

    return _value_and_grads(tiny_stack(2, implementation=implementation), loss, x)


@pytest.mark.parametrize("causal", [False, True])
def test_stack_input_gradient_matches_xla(cudnn_lengths, causal):
    """The stack itself, caller's kv_lengths shorter than the sequence: outputs and input gradients agree."""
    cudnn, xla = (_stack_value_and_grads(impl, causal) for impl in ("cudnn", "xla"))
    assert set(cudnn_lengths) == {32}
    _assert_close(cudnn, xla)


def test_stack_returns_only_the_last_rows_it_was_asked_for(cudnn_lengths):
    """`last_query_start=-1` (the global token) at an odd length: the padded stack returns the true last row, that
    of plain XLA attention, and none of the padded rows after it."""
    x = jax.random.normal(jax.random.key(8), (2, 21, 32))
    outputs = {
        impl: jax.jit(lambda x, impl=impl: tiny_stack(2, implementation=impl)(x, last_query_start=-1))(x)
        for impl in ("xla", "cudnn")
    }
    assert outputs["cudnn"].shape == outputs["xla"].shape == (2, 1, 32)
    assert set(cudnn_lengths) == {32}
    _assert_close(outputs["cudnn"], outputs["xla"])


def _count_primitive(jaxpr, name: str) -> int:
    """Occurrences of primitive `name` in `jaxpr` and every jaxpr nested in it (remat, pjit, custom_vjp...)."""
    own = sum(eqn.primitive.name == name for eqn in jaxpr.eqns)
    return own + sum(_count_primitive(sub, name) for sub in subjaxprs(jaxpr))


def test_differentiated_stack_pads_once_whatever_its_depth(cudnn_lengths):
    """Forward + backward through 1 and 4 cuDNN layers at an odd length: 3 pads however deep the stack (the
    input's; in the backward, the final slice's transpose and the input pad's, a negative pad), where padding
    q, k and v in every layer gave 7 per layer (28 for 4 layers)."""
    x = jax.random.normal(jax.random.key(7), (2, 21, 32))

    def pads(num_layers: int) -> int:
        graphdef, params = nnx.split(tiny_stack(num_layers, implementation="cudnn"), nnx.Param)

        def loss(params, x):
            return jnp.sum(nnx.merge(graphdef, params)(x) ** 2)

        return _count_primitive(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x).jaxpr, "pad")

    assert pads(1) == pads(4) == 3
    assert set(cudnn_lengths) == {32}


def test_unpadded_stack_matches_xla(unpadded_lengths):
    """`cudnn_unpadded` on the text tower's case (causal, caller's kv_lengths, an odd length): cuDNN sees the 21
    rows as they are where jax trains them so, else the padded 32, and either way computes plain XLA attention's
    outputs and input gradients."""
    lengths, padded_length = unpadded_lengths
    unpadded, xla = (_stack_value_and_grads(impl, causal=True) for impl in ("cudnn_unpadded", "xla"))
    assert set(lengths) == {padded_length or 21}
    _assert_close(unpadded, xla)


def test_unpadded_stack_pads_only_where_jax_refuses(unpadded_lengths):
    """Whisper's case (no kv_lengths, not causal), differentiated: no pad at all where jax trains the odd length,
    else the 3 of the padded stack; an even length is never padded or probed."""
    lengths, padded_length = unpadded_lengths
    graphdef, params = nnx.split(tiny_stack(2, implementation="cudnn_unpadded"), nnx.Param)

    def pads(length: int) -> int:
        def loss(params, x):
            return jnp.sum(nnx.merge(graphdef, params)(x) ** 2)

        x = jnp.ones((2, length, 32))
        return _count_primitive(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x).jaxpr, "pad")

    assert pads(21) == (3 if padded_length else 0)
    assert set(lengths) == {padded_length or 21}
    assert layers.cudnn_trains_unpadded.cache_info().currsize == 1  # the odd length's question, once
    lengths.clear()
    assert pads(20) == 0 and set(lengths) == {20}
    assert layers.cudnn_trains_unpadded.cache_info().currsize == 1


@pytest.mark.parametrize("refused", ["causal", "lengths"])
def test_unpadded_stack_asks_jax_about_its_own_mask(monkeypatch, refused):
    """jax's answer depends on the call's mask as well as its length, so a stack asks about its own: with a jax that
    refuses an odd length only in a causal call (or only with kv_lengths), exactly the stacks called so pad."""
    original = jax.nn.dot_product_attention

    def fake(q, k, v, *, implementation=None, is_causal=False, key_value_seq_lengths=None, **kwargs):
        masked = is_causal if refused == "causal" else key_value_seq_lengths is not None
        if implementation == "cudnn" and masked and q.shape[1] % 2:
            raise NotImplementedError(f"Unsupported sequence length Q {q.shape[1]}, KV {k.shape[1]}.")
        return original(
            q, k, v, implementation="xla", is_causal=is_causal, key_value_seq_lengths=key_value_seq_lengths, **kwargs
        )

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    monkeypatch.setattr(layers, "cudnn_trains_unpadded", functools.cache(layers.cudnn_trains_unpadded.__wrapped__))
    graphdef, params = nnx.split(tiny_stack(2, implementation="cudnn_unpadded"), nnx.Param)
    kv_lengths = jnp.array([21, 9], jnp.int32)

    def pads(causal: bool, lengths: bool) -> int:
        def loss(params, x):
            stack = nnx.merge(graphdef, params)
            return jnp.sum(stack(x, kv_lengths=kv_lengths if lengths else None, causal=causal) ** 2)

        x = jnp.ones((2, 21, 32))
        return _count_primitive(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x).jaxpr, "pad")

    for causal in (False, True):
        for lengths in (False, True):
            masked = causal if refused == "causal" else lengths
            assert pads(causal, lengths) == (3 if masked else 0), (causal, lengths)
