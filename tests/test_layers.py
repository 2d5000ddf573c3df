"""The shared transformer pieces: attention implementation choice and cuDNN's even-length padding, block
creation, and the custom-VJP GELU and LayerNorm (values, gradients, residuals, remat)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.activations import ACT2FN

from wavlink_jax.models import layers


def test_none_resolves_to_xla_on_cpu_and_named_implementations_stay():
    assert layers.resolve_attention_implementation(None, jnp.bfloat16) == "xla"  # the tests run on CPU
    assert layers.resolve_attention_implementation("cudnn", jnp.float32) == "cudnn"


def test_none_resolves_to_cudnn_on_gpu_for_half_precision_only(monkeypatch):
    """On a GPU, None means cuDNN for bf16/fp16 compute only (jax's cuDNN flash attention takes half precision)."""
    monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
    assert layers.resolve_attention_implementation(None, jnp.float32) == "xla"
    assert layers.resolve_attention_implementation(None, jnp.bfloat16) == "cudnn"
    assert layers.resolve_attention_implementation(None, jnp.float16) == "cudnn"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [31, 32])
def test_cudnn_path_pads_odd_lengths_and_masks_the_padding(monkeypatch, length, causal):
    """cuDNN flash attention refuses odd lengths (Whisper's 1500 frames + token = 1501): the padded call, run
    here through XLA, must give the unpadded result — padded keys masked out, padded query rows dropped, a
    causal mask kept (a block called on its own pads here; `EncoderStack` pads before its blocks)."""
    attention = layers.Attention(
        64, 4, key_bias=False, dtype=jnp.float32, param_dtype=jnp.float32, implementation="xla", rngs=nnx.Rngs(0)
    )
    x = jax.random.normal(jax.random.key(1), (2, length, 64))
    reference = attention(x, causal=causal)
    original = jax.nn.dot_product_attention
    shapes = []

    def as_if_cudnn(q, k, v, *, implementation, **kwargs):
        assert implementation == "cudnn"
        shapes.append(q.shape[1])
        return original(q, k, v, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", as_if_cudnn)
    attention.implementation = "cudnn"
    out = attention(x, causal=causal)
    assert shapes == [32]
    assert float(jnp.abs(out - reference).max()) < 1e-6


def tiny_stack(num_layers: int, seed: int = 0, remat: str = "none", implementation: str = "xla") -> layers.EncoderStack:
    """An fp32 stack of width 32 (4 heads, MLP 64): shared with test_cudnn_padding."""
    return layers.EncoderStack(
        num_layers, remat=remat, width=32, num_heads=4, mlp_dim=64, activation="gelu", key_bias=True,
        layer_norm_eps=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, attention_implementation=implementation,
        rngs=nnx.Rngs(seed),
    )


def layer_norm_epsilons(module: nnx.Module) -> list[float]:
    """The epsilon of every `layers.LayerNorm` in `module` (shared with test_whisper and test_clip_text)."""
    return [norm.epsilon for _, norm in nnx.iter_modules(module) if isinstance(norm, layers.LayerNorm)]


@pytest.mark.parametrize("remat", ["none", *sorted(layers.REMAT_POLICIES)])
def test_stack_rematerialises_each_block_with_the_named_policy(remat):
    """Each block of the traced stack is one jax.checkpoint equation (`remat2` in the jaxpr) carrying the policy
    of jax's that the config names ("full": None, save nothing), and "none" has no such equation. The expected
    policy is looked up in `jax.checkpoint_policies` by name, so a mix-up in REMAT_POLICIES shows too."""
    graphdef, state = nnx.split(tiny_stack(2, remat=remat))
    jaxpr = jax.make_jaxpr(lambda state, x: nnx.merge(graphdef, state)(x))(state, jnp.zeros((1, 4, 32))).jaxpr
    policies = [eqn.params["policy"] for eqn in jaxpr.eqns if eqn.primitive.name == "remat2"]
    if remat == "none":
        assert policies == []
    else:
        expected = None if remat == "full" else getattr(jax.checkpoint_policies, remat)
        assert policies == [expected, expected], policies


def test_stack_blocks_are_initialised_independently_with_their_axes():
    """The vmapped creation gives every block its own draws (normal 0.02 kernels, zero biases, unit LayerNorm
    scales), keeps each parameter's logical axes, and is reproducible from the seed."""
    stack = tiny_stack(4)
    kernels = np.stack([np.asarray(block.fc1.kernel[...]) for block in stack.layers])
    assert kernels.shape == (4, 32, 64)
    assert all(not np.allclose(kernels[i], kernels[j]) for i in range(4) for j in range(i))
    assert abs(kernels.std() - 0.02) < 0.002 and abs(kernels.mean()) < 0.002
    assert all(float(jnp.abs(block.fc1.bias[...]).max()) == 0 for block in stack.layers)
    assert all(float(jnp.abs(block.attn_norm.scale[...] - 1).max()) == 0 for block in stack.layers)
    axes = layers.logical_axes(stack)
    assert axes[("layers", 3, "fc1", "kernel")] == ("embed", "mlp")
    assert axes[("layers", 0, "attn", "out", "kernel")] == ("heads", "embed")
    assert np.array_equal(kernels[2], np.asarray(tiny_stack(4).layers[2].fc1.kernel[...]))


def test_stack_init_program_does_not_grow_random_draws_with_depth():
    """Under jit (how the trainer creates parameters) the number of random-number programs is that of one
    block, whatever the depth: a loop of blocks made init compile time grow with the layer count."""

    def draws(num_layers: int) -> int:  # call sites of jax.random.normal in the lowered init program
        init = jax.jit(lambda key: nnx.state(tiny_stack(num_layers, seed=key)))
        return len(re.findall(r"call @_normal", init.lower(jax.random.key(0)).as_text()))

    assert draws(2) == draws(8) > 0


# Exact GELU (`layers.gelu_exact`, the "gelu" activation): values, gradient, residuals, remat.
EXTREMES = [-30.0, -10.0, -5.6, -1e-6, -1e-30, 0.0, 1e-30, 1e-6, 10.0, 30.0]


def _gelu_inputs(dtype=jnp.float32) -> jax.Array:
    return jnp.asarray(np.concatenate([np.linspace(-12, 12, 4001), EXTREMES]), dtype=dtype)


def _reference_gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def test_gelu_float32_matches_pytorch_and_jax():
    """fp32: PyTorch's GELU (the weights' home; the same 1 + erf(x/√2) form) and jax's erfc form, each within
    1e-6 (absolute, and relative above 1e-6: the two erf forms differ by about one ulp of erf where 1 + erf
    cancels, x < -5, as the erfc form differs from PyTorch's). Not bit for bit: XLA's erf is its own
    approximation, and fused under jit (the training step) it may round erf's last bit otherwise than op by
    op. A GELU off by a sign, a factor or an x·φ term is off by far more."""
    import torch

    x = _gelu_inputs()
    torch_values = torch.nn.functional.gelu(torch.from_numpy(np.array(x))).numpy()
    for gelu in (layers.gelu_exact, jax.jit(layers.gelu_exact)):
        ours = np.asarray(gelu(x))
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, torch_values, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ours, np.asarray(_reference_gelu(x)), rtol=1e-6, atol=1e-6)
        assert np.all(ours[np.asarray(x) < -5.6] == 0)  # where PyTorch's is 0 too
    assert layers.activation_fn("gelu") is layers.gelu_exact


def test_gelu_uses_erf_not_erfc():
    """XLA expands erfc into both of its branches, which made the GELU kernels compute-bound on an H200; erf is
    one HLO op. The forward and the backward of the lowered step hold erf, no erfc."""
    x = jnp.linspace(-3, 3, 64, dtype=jnp.bfloat16)
    step = jax.value_and_grad(lambda v: layers.gelu_exact(v).astype(jnp.float32).sum())
    text = jax.jit(step).lower(x).as_text()
    assert text.count("chlo.erf ") == 2 and "erfc" not in text


def test_gelu_bfloat16_is_the_float32_value_rounded():
    """bf16 inputs are computed in fp32 and rounded once: within one bf16 ulp of the fp32 reference (in fact
    equal to it rounded; the old bf16 arithmetic differed from it on ~20% of these inputs)."""
    x = _gelu_inputs(jnp.bfloat16)
    ours = layers.gelu_exact(x)
    assert ours.dtype == jnp.bfloat16
    reference = layers.gelu_exact(x.astype(jnp.float32))
    ulp = 2.0**-7 * 2.0 ** jnp.floor(jnp.log2(jnp.maximum(jnp.abs(reference), 1e-30)))
    assert bool(jnp.all(jnp.abs(ours.astype(jnp.float32) - reference) <= ulp))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_gradient_matches_autodiff_of_the_float32_formula(dtype):
    """The hand-written derivative Φ(x) + x·φ(x) against jax.grad of jax's formula in fp32, at the same
    points. bf16: within 1% + 1e-3 (a dropped x·φ(x) term is off by up to 0.4, a dropped Φ(x) by up to 1)."""
    x = _gelu_inputs(dtype)
    grad = jax.vmap(jax.grad(layers.gelu_exact))(x)
    assert grad.dtype == dtype
    reference = jax.vmap(jax.grad(_reference_gelu))(x.astype(jnp.float32))
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-3)
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(reference), **tolerance)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_of_a_biased_input_is_the_gelu_of_the_sum_with_its_gradients(dtype):
    """`gelu_exact(x, bias)` is `gelu_exact(x + bias)`, value for value (in bf16 too: the sum is rounded as a
    Linear's output is), and its gradients are the sum's: dx = d(x + b) bit for bit, and db = Σ over the rows
    of dx, within 1e-6 of Σ|dx| in fp32 and 2⁻⁵ in bf16 (a bf16 sum of 500 rows, as autodiff's)."""
    x = _gelu_inputs(jnp.float32)[:4000].reshape(-1, 8).astype(dtype)
    bias = jnp.linspace(-2, 2, 8).astype(dtype)
    weights = jax.random.normal(jax.random.key(3), x.shape)
    np.testing.assert_array_equal(layers.gelu_exact(x, bias), layers.gelu_exact(x + bias))

    def gradients(gelu):
        return jax.grad(lambda x, b: (gelu(x, b).astype(jnp.float32) * weights).sum(), argnums=(0, 1))(x, bias)

    (grad_x, grad_bias), summed = gradients(layers.gelu_exact), gradients(lambda x, b: layers.gelu_exact(x + b))
    np.testing.assert_array_equal(grad_x, summed[0])
    wide = np.asarray(grad_x, np.float64)
    bound = (1e-6 if dtype == jnp.float32 else 2**-5) * np.abs(wide).sum(0)
    assert np.all(np.abs(np.asarray(grad_bias, np.float64) - wide.sum(0)) <= bound)


@pytest.mark.parametrize("name", sorted(layers.ACTIVATIONS))
def test_activate_is_the_activation_of_the_biased_input(name):
    """`activate(name, x, b)` is `ACTIVATIONS[name](x + b)` for every activation; the GELU's goes through its
    custom VJP with the bias apart (one custom call, x and b its operands)."""
    x, bias = _gelu_inputs(jnp.float32)[:4000].reshape(-1, 8), jnp.linspace(-2, 2, 8)
    np.testing.assert_array_equal(layers.activate(name, x, bias), layers.ACTIVATIONS[name](x + bias))
    equations = jax.make_jaxpr(lambda x, b: layers.activate(name, x, b))(x, bias).eqns
    calls = [equation for equation in equations if "custom_vjp" in str(equation.primitive)]
    assert len(calls) == (name == "gelu") and all(len(call.invars) == 2 for call in calls)


def test_gelu_saves_only_its_input_for_the_backward():
    """dense → gelu → dense in bf16: the [batch, mlp] residuals are the gelu input and its output (which the
    second dense's weight gradient needs) — nothing of GELU's internals (autodiff of the formula saved 0.5·x,
    erfc and exp besides the output: four such tensors)."""
    hidden, mlp = 8, 16

    def mlp_loss(x, w1, w2):
        return (layers.gelu_exact(x @ w1) @ w2).sum()

    args = [jnp.ones(shape, jnp.bfloat16) for shape in [(4, hidden), (hidden, mlp), (mlp, hidden)]]
    _, backward = jax.vjp(mlp_loss, *args)
    residuals = [leaf for leaf in jax.tree.leaves(backward) if leaf.shape == (4, mlp)]
    assert len(residuals) == 2 and all(r.dtype == jnp.bfloat16 for r in residuals)


def test_compiled_gelu_gradient_keeps_no_more_than_an_identitys_plus_its_input_and_output():
    """What XLA actually keeps between forward and backward (the compiled program's temporary memory), not
    jax's residuals: dense → activation → dense in bf16, against the identity activation. GELU may add its
    saved input and its output, two bf16 [rows, mlp] tensors (the bound leaves half a tensor of slack; autodiff
    of `jax.nn.gelu` keeps 3). Without the backward's optimization barrier XLA shared the forward's erfc with the
    backward and kept it in fp32: 8 tensors' worth here on a CPU, an fp32 [batch, frames, mlp] per layer in the
    H200-targeted compile."""
    rows, hidden, mlp = 4096, 256, 1024

    def temporary_bytes(activation) -> int:
        def loss(x, w1, w2):
            return jnp.sum((activation(x @ w1) @ w2).astype(jnp.float32) ** 2)

        shapes = [jax.ShapeDtypeStruct(shape, jnp.bfloat16) for shape in [(rows, hidden), (hidden, mlp), (mlp, hidden)]]
        compiled = jax.jit(jax.grad(loss, argnums=(1, 2))).lower(*shapes).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    one_tensor = rows * mlp * 2
    assert temporary_bytes(layers.gelu_exact) <= temporary_bytes(lambda h: h) + 2.5 * one_tensor


@pytest.mark.parametrize("function", ["gelu", "layer_norm"])
def test_custom_backwards_read_their_input_through_an_optimization_barrier(function):
    """The barrier that keeps XLA from sharing the forward's fp32 intermediates with the backward (see
    `gelu_exact` and `_layer_norm_backward`) is in the backward's program: removing it fails here."""
    x = jnp.ones((4, 8), jnp.bfloat16)
    if function == "gelu":
        _, backward = jax.vjp(layers.gelu_exact, x)
    else:
        _, backward = jax.vjp(lambda x: layers._layer_norm(x, jnp.ones(8), jnp.zeros(8), 1e-5, False), x)
    assert "optimization_barrier" in str(jax.make_jaxpr(backward)(x))


@pytest.mark.parametrize(
    "remat",
    [  # the other two policies are the same mechanism with another saved set: `make test-all` runs them
        pytest.param(name, marks=[pytest.mark.slow] if name not in ("full", "dots_saveable") else [])
        for name in sorted(layers.REMAT_POLICIES)
    ],
)
def test_block_gradients_are_the_same_under_remat(remat):
    """A rematerialised gelu block (the GELU's and LayerNorm's custom VJPs inside jax.checkpoint) gives the
    gradients of the plain one."""
    def grads(policy: str) -> list:
        stack = tiny_stack(1, remat=policy)
        x = jax.random.normal(jax.random.key(1), (2, 8, 32))
        return jax.tree.leaves(nnx.grad(lambda model: (model(x) ** 2).sum())(stack))

    for ours, plain in zip(grads(remat), grads("none"), strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(plain), rtol=1e-5, atol=1e-6)


def test_activations_match_transformers():
    """Every activation a config may name is Hugging Face's of that name (`ACT2FN`) in fp32, within fp32 rounding:
    e.g. "gelu_new" is the tanh approximation, 4.7e-4 from the exact GELU."""
    x = np.linspace(-10, 10, 4001, dtype=np.float32)
    for name, function in layers.ACTIVATIONS.items():
        reference = ACT2FN[name](torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(np.asarray(function(jnp.asarray(x))), reference, rtol=1e-6, atol=2e-6, err_msg=name)


def test_gelu_takes_integers_and_python_numbers_as_jax_does_and_refuses_forward_mode_clearly():
    """Integers and Python numbers become float32 (as in `jax.nn.gelu`), not truncated or an AttributeError;
    forward-mode autodiff, which a custom VJP cannot give, fails with jax's own message (documented)."""
    np.testing.assert_array_equal(layers.gelu_exact(jnp.arange(3)), jax.nn.gelu(jnp.arange(3.0), approximate=False))
    assert float(layers.gelu_exact(0.3)) == float(jax.nn.gelu(jnp.float32(0.3), approximate=False))
    with pytest.raises(TypeError, match="forward-mode autodiff"):
        jax.jvp(layers.gelu_exact, (jnp.ones(3),), (jnp.ones(3),))


# LayerNorm with a custom VJP (`layers.LayerNorm`): flax's values, autodiff's gradients, fewer residuals.


def _layer_norms(dtype, width: int = 64, fast: bool = False) -> tuple[layers.LayerNorm, nnx.LayerNorm]:
    """Ours and flax's LayerNorm with the same (perturbed) scale and bias, compute dtype `dtype`, both with
    `use_fast_variance=fast`."""
    norms = []
    for cls in (layers.LayerNorm, nnx.LayerNorm):
        norm = cls(width, epsilon=1e-5, dtype=dtype, use_fast_variance=fast, rngs=nnx.Rngs(0))
        norm.scale.set_value(1 + 0.5 * jax.random.normal(jax.random.key(3), (width,)))
        norm.bias.set_value(0.1 * jax.random.normal(jax.random.key(4), (width,)))
        norms.append(norm)
    return norms[0], norms[1]


def _layer_norm_inputs(dtype) -> jax.Array:
    """Rows with an offset and a spread, so that centring and scaling both matter."""
    return (3 * jax.random.normal(jax.random.key(1), (4, 33, 64)) + 1).astype(dtype)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("input_dtype, dtype", [("float32", "float32"), ("bfloat16", "bfloat16"), ("float32", "bfloat16")])
def test_layer_norm_forward_is_flax_value_for_value(input_dtype, dtype, fast):
    """The custom VJP changes only the backward: the forward is `nnx.LayerNorm`'s arithmetic, bit for bit, with
    either variance."""
    ours, flax_norm = _layer_norms(jnp.dtype(dtype), fast=fast)
    x = _layer_norm_inputs(jnp.dtype(input_dtype))
    apply = jax.jit(lambda norm, x: norm(x))
    got, expected = apply(ours, x), apply(flax_norm, x)
    assert got.dtype == expected.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_layer_norm_variance_by_default_is_from_the_centred_values(dtype):
    """Left unset, `use_fast_variance` is False (flax's default is True): σ² from the centred values in every
    dtype, equal to flax with that setting and not to flax with the other."""
    ours = layers.LayerNorm(64, epsilon=1e-5, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))
    x = (_layer_norm_inputs(jnp.float32) * 0.1 + 20).astype(dtype)  # rows whose mean is ~70 σ: the variances differ
    apply = jax.jit(lambda norm, x: norm(x).astype(jnp.float32))
    same, other = (
        nnx.LayerNorm(64, epsilon=1e-5, dtype=jnp.dtype(dtype), use_fast_variance=fast, rngs=nnx.Rngs(0))
        for fast in (False, True)
    )
    np.testing.assert_array_equal(apply(ours, x), apply(same, x))
    assert not np.array_equal(apply(ours, x), apply(other, x))


def test_layer_norm_one_pass_variance_is_as_accurate_as_two_pass_in_bfloat16():
    """bf16 rows whose mean is 30 σ (a residual stream with an offset): the one-pass statistics' output is as
    close to a float64 LayerNorm of the same bf16 values as the two-pass one's, i.e. within bf16's rounding."""
    x = (30 + jax.random.normal(jax.random.key(5), (8, 33, 512))).astype(jnp.bfloat16)
    wide = np.asarray(x, np.float64)
    exact = (wide - wide.mean(-1, keepdims=True)) / np.sqrt(wide.var(-1, keepdims=True) + 1e-5)
    errors = []
    for fast in (True, False):
        norm = layers.LayerNorm(512, epsilon=1e-5, dtype=jnp.bfloat16, use_fast_variance=fast, rngs=nnx.Rngs(0))
        errors.append(float(np.abs(np.asarray(jax.jit(lambda n, x: n(x))(norm, x), np.float64) - exact).max()))
    one_pass, two_pass = errors
    assert one_pass <= 1.05 * two_pass and two_pass < 2 ** -6  # at most half a bf16 step (2^-5) at |x̂| < 4
    # Measured: σ² within 6.5e-5 (one pass) and 1.8e-7 (two) of float64's, for bf16's 4e-3 rounding; both outputs
    # are at most 0.0143 off.


def _layer_norm_gradients(norm: nnx.Module, x: jax.Array) -> list:
    """d/d(x, scale, bias) of a weighted sum of the output (weights fixed), in fp32."""
    weights = jax.random.normal(jax.random.key(2), x.shape)

    def loss(norm, x):
        return (norm(x).astype(jnp.float32) * weights).sum()

    grad_norm, grad_x = jax.jit(nnx.grad(loss, argnums=(0, 1)))(norm, x)
    return [grad_x.astype(jnp.float32), grad_norm["scale"].get_value(), grad_norm["bias"].get_value()]


@pytest.mark.parametrize(
    "fast, spread, offset", [(False, 1, 0), (False, 1e-3, 0), (True, 1, 300)], ids=["rows", "quiet", "offset_one_pass"]
)
def test_layer_norm_gradients_match_autodiff_in_float32(fast, spread, offset):
    """The hand-written backward against flax's autodiff with the same variance. "quiet": rows with σ² ≈ ε
    (σ = 3e-3, ε = 1e-5: near-silence), where a backward whose statistics leave ε out is ~50% off. "offset": rows
    whose mean is ~100 σ with the one-pass variance, whose rounding the backward must share with the forward
    (its statistics taken from the centred values instead, dx is ~1e-3 off)."""
    ours, flax_norm = _layer_norms(jnp.float32, fast=fast)
    x = _layer_norm_inputs(jnp.float32) * spread + offset
    for got, expected in zip(_layer_norm_gradients(ours, x), _layer_norm_gradients(flax_norm, x), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5 * float(jnp.abs(expected).max()))


def test_layer_norm_bfloat16_gradients_are_as_close_to_float32_as_autodiffs():
    """In bf16 (the training setting) each gradient is within bf16 rounding of the fp32 gradient of the same
    inputs, and no further from it than flax's autodiff: a wrong term (e.g. a dropped mean) would be O(1) off."""
    x = _layer_norm_inputs(jnp.bfloat16)
    exact = _layer_norm_gradients(_layer_norms(jnp.float32)[1], x.astype(jnp.float32))
    ours, flax_norm = (_layer_norm_gradients(norm, x) for norm in _layer_norms(jnp.bfloat16))
    for name, got, autodiff, reference in zip(["x", "scale", "bias"], ours, flax_norm, exact, strict=True):
        scale = float(jnp.abs(reference).max())
        error, autodiff_error = (float(jnp.abs(g - reference).max()) / scale for g in (got, autodiff))
        assert error < 1e-2, (name, error)
        assert error <= 1.5 * autodiff_error + 1e-3, (name, error, autodiff_error)


def test_layer_norm_one_pass_variance_is_clamped_at_zero():
    """With `use_fast_variance=True`, E[x²] − E[x]² of a constant row rounds below zero in fp32 (−0.012 for rows
    of 123.456, beyond −ε): clamped at 0 as flax does, the output is flax's and it and the gradients are finite,
    not NaN."""
    ours, flax_norm = _layer_norms(jnp.float32, fast=True)
    x = jnp.full((2, 3, 64), 123.456, jnp.float32)
    apply = jax.jit(lambda norm, x: norm(x))
    got = apply(ours, x)
    assert bool(jnp.all(jnp.isfinite(got)))
    np.testing.assert_array_equal(got, apply(flax_norm, x))
    for gradient in _layer_norm_gradients(ours, x):
        assert bool(jnp.all(jnp.isfinite(gradient)))


def test_layer_norm_saves_only_its_input_for_the_backward():
    """bf16 in and out: the one residual is the bf16 input (the backward recomputes the row statistics); flax's
    autodiff saves three fp32 `[..., width]` tensors (x − mean and two products)."""
    ours, flax_norm = _layer_norms(jnp.bfloat16)
    x = _layer_norm_inputs(jnp.bfloat16)

    def residuals(norm: nnx.Module) -> list[tuple]:
        graphdef, state = nnx.split(norm)
        _, backward = jax.vjp(lambda x, state: nnx.merge(graphdef, state)(x), x, state)
        return sorted((leaf.shape, str(leaf.dtype)) for leaf in jax.tree.leaves(backward) if leaf.size >= 4 * 33)

    assert residuals(ours) == [(x.shape, "bfloat16")]
    assert residuals(flax_norm).count((x.shape, "float32")) == 3  # what the custom VJP avoids


@pytest.mark.parametrize("option", [{"reduction_axes": 0}, {"use_scale": False}, {"use_bias": False}])
def test_layer_norm_refuses_options_it_does_not_compute(option):
    """flax's options that the custom VJP does not implement are refused by name, not silently ignored."""
    with pytest.raises(ValueError, match=f"got {re.escape(repr(option))}"):
        layers.LayerNorm(8, rngs=nnx.Rngs(0), **option)


# A LayerNorm folded into the Linears that read it (`LayerNorm.project`): the same function, fewer reductions.


def _folded_loss(norm: layers.LayerNorm, linear: nnx.Linear, x: jax.Array, folded: bool) -> tuple[jax.Array, jax.Array]:
    """A weighted sum of `linear(norm(x))`, computed folded or as written, and the projection itself."""
    projected = norm.project(linear, norm.normalise(x)) if folded else linear(norm(x))
    weights = jax.random.normal(jax.random.key(6), projected.shape)
    return (projected * weights).sum(), projected


@pytest.mark.parametrize("use_bias", [True, False])
def test_folded_projection_is_the_linear_of_the_layer_norm_with_the_same_gradients(use_bias):
    """x̂·(γ ⊙ W) + (β·W + b) is `linear(norm(x))` in fp32: the values and the gradients of x, γ, β, W and b
    (b absent for a key projection), within fp32 rounding."""
    norm, _ = _layer_norms(jnp.float32)
    linear = layers.dense(
        64, 48, ("embed", "mlp"), use_bias=use_bias, dtype=jnp.float32, param_dtype=jnp.float32,
        precision=jax.lax.Precision.HIGHEST, rngs=nnx.Rngs(5),
    )
    if use_bias:
        linear.bias.set_value(0.3 * jax.random.normal(jax.random.key(7), (48,)))
    x = _layer_norm_inputs(jnp.float32)
    gradient = jax.jit(nnx.grad(_folded_loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    (folded_grads, folded), (plain_grads, plain) = (gradient(norm, linear, x, folded) for folded in (True, False))
    np.testing.assert_allclose(np.asarray(folded), np.asarray(plain), rtol=1e-5, atol=1e-5)
    got, expected = jax.tree.leaves(folded_grads), jax.tree.leaves(plain_grads)
    assert len(got) == len(expected) == 4 + use_bias  # γ, β, W, (b), x
    for ours, reference in zip(got, expected, strict=True):
        np.testing.assert_allclose(
            np.asarray(ours), np.asarray(reference), rtol=1e-5, atol=1e-5 * float(jnp.abs(reference).max())
        )


@pytest.mark.parametrize("masking", ["lengths", "causal"])
def test_attention_over_a_folded_norm_is_attention_over_the_norm(masking):
    """`Attention(x, norm=norm)` (β·W left out of the keys: softmax cancels a shift common to every key) gives
    `Attention(norm(x))` and the same gradients for every parameter, β included, in fp32."""
    norm, _ = _layer_norms(jnp.float32, width=32)
    attention = layers.Attention(
        32, 4, key_bias=True, dtype=jnp.float32, param_dtype=jnp.float32, implementation="xla", rngs=nnx.Rngs(2)
    )
    x = _layer_norm_inputs(jnp.float32)[..., :32]
    options = {"kv_lengths": jnp.array([33, 20, 7, 33])} if masking == "lengths" else {"causal": True}
    weights = jax.random.normal(jax.random.key(8), x.shape)

    def loss(norm, attention, folded):
        attended = attention(x, norm=norm, **options) if folded else attention(norm(x), **options)
        return (attended * weights).sum(), attended

    gradient = jax.jit(nnx.grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (folded_grads, folded), (plain_grads, plain) = (gradient(norm, attention, folded) for folded in (True, False))
    np.testing.assert_allclose(np.asarray(folded), np.asarray(plain), rtol=1e-5, atol=1e-5)
    got, expected = jax.tree.leaves(folded_grads), jax.tree.leaves(plain_grads)
    scale = max(float(jnp.abs(reference).max()) for reference in expected)  # the key bias's gradient is 0 (±1e-9)
    for ours, reference in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-5, atol=1e-6 * scale)


def _row_reductions(jaxpr: jax.extend.core.Jaxpr, rows: int, width: int) -> int:
    """How many `reduce_sum`s over every axis but the last take a `(..., width)` operand of `rows` rows (as
    `[batch, frames, width]` or `[rows, width]`), sub-jaxprs included."""
    count = 0
    for equation in jaxpr.eqns:
        if equation.primitive.name == "reduce_sum":
            shape = equation.invars[0].aval.shape
            count += (
                shape[-1:] == (width,) and math.prod(shape[:-1]) == rows
                and tuple(equation.params["axes"]) == tuple(range(len(shape) - 1))
            )
        for value in equation.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(inner, jax.extend.core.ClosedJaxpr):
                    count += _row_reductions(inner.jaxpr, rows, width)
                elif isinstance(inner, jax.extend.core.Jaxpr):
                    count += _row_reductions(inner, rows, width)
    return count


def test_block_backward_reduces_activations_over_rows_only_for_the_linears_biases():
    """A block's backward sums a [batch, frames, width] gradient over its rows once per width-sized bias (query,
    key, value, attention output, fc2): the LayerNorms' dγ and dβ are no longer four more such sums."""
    block = tiny_stack(1).layers[0]
    x = jnp.zeros((2, 8, 32))
    jaxpr = jax.make_jaxpr(nnx.grad(lambda block: block(x).sum()))(block)
    assert _row_reductions(jaxpr.jaxpr, rows=16, width=32) == 5


def test_layer_norm_refuses_forward_mode_clearly():
    ours, _ = _layer_norms(jnp.float32)
    x = _layer_norm_inputs(jnp.float32)
    with pytest.raises(TypeError, match="forward-mode autodiff"):
        jax.jvp(lambda x: ours(x), (x,), (x,))


def test_stack_refuses_last_query_start_with_a_causal_mask():
    """Query rows cut from the end under a causal mask would see the wrong keys: refused, not computed."""
    with pytest.raises(ValueError, match="query_start with a causal mask is not supported"):
        tiny_stack(1)(jnp.zeros((1, 6, 32)), causal=True, last_query_start=-1)


@pytest.mark.parametrize("last_query_start", [21, -22, 30])
def test_stack_refuses_a_last_query_start_outside_the_sequence(last_query_start):
    """Out of range it used to be clamped by a slice (rows 0: for -30 of 21) and would now count from a padded
    end: refused instead, naming the value and the length."""
    with pytest.raises(ValueError, match=f"last_query_start {last_query_start} is outside the sequence of 21 rows"):
        tiny_stack(1)(jnp.zeros((1, 21, 32)), last_query_start=last_query_start)
