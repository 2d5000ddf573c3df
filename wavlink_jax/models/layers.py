"""Transformer building blocks shared by the Whisper audio tower and the CLIP text tower.

Both towers are pre-LayerNorm encoders with the same block (self-attention with q/k/v/out projections,
a two-layer MLP); they differ only in the activation, whether `k_proj` has a bias, the LayerNorm epsilon and
causality. One implementation serves both; each converter maps its PyTorch names onto these.

Every parameter carries logical axis names (`embed`, `heads`, `mlp`, `vocab`, ...) that
`wavlink_jax.sharding` maps to mesh axes. Parameters are kept in `param_dtype` (fp32); matmuls run in the
compute `dtype` (e.g. bf16); LayerNorm statistics are always reduced in fp32.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wavlink_jax import sharding

# Parameters are created unsharded with their logical names as metadata; the trainer turns the names into
# shardings and creates the parameters already sharded (jit with out_shardings).
nnx.use_eager_sharding(False)

Dtype = jnp.dtype | type

_SQRT_HALF = np.float32(np.sqrt(0.5))
_INV_SQRT_2PI = np.float32(1 / np.sqrt(2 * np.pi))


def _wide(x: jax.Array) -> jax.Array:
    """`x` in at least float32: the GELU's and LayerNorm's arithmetic runs in fp32 for bf16/fp16 inputs, as
    PyTorch's opmath does."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def gelu_exact(x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """Exact GELU, 0.5·x·(1 + erf(x/√2)) (PyTorch's formula, whose weights we port), computed in fp32 and
    returned in `x`'s dtype (integers and Python numbers become float32, as with `jax.nn.gelu`).

    `bias` (a vector over x's last axis): GELU(x + bias), the sum (rounded to x's dtype, as a Linear's output
    is) formed inside the forward and the backward and never stored. Why: the backward needs the GELU's input,
    and a Linear's biased output is one more [batch, frames, mlp] tensor to write. On an H200 (GPU run 3, whose
    compiler put no bias into the fc1 GEMM) base's GELU forward wrote x + b beside GELU(x + b), 0.79 of its 2.36
    GB per layer; given the GEMM's unbiased output and the bias, it reads one and writes one.

    Why erf and not `jax.nn.gelu(x, approximate=False)`'s 0.5·x·erfc(-x/√2): XLA lowers erf to one HLO op with
    a short rational approximation, but expands erfc into both of its branches (a polynomial, an exp and two
    more polynomials, then a select). On an H200 (GPU run 3) the erfc kernels were bound by that arithmetic, not
    by memory: base's GELU forward moved its 2.4 GB per layer at ~2 TB/s, half the card's bandwidth (on a CPU,
    erf's forward costs ~40% of erfc's beyond a copy). The two forms differ only far in the negative tail,
    where 1 + erf cancels to 0 below x ≈ -5.5 as PyTorch's does (|GELU| < 1e-7 there).

    Why a custom VJP: autodiff of the formula saves its intermediates for the backward (0.5·x, erfc(-x/√2),
    exp(-x²/2) in the jaxpr; on an H200 the fused forward wrote erfc(-x/√2) and -x/√2 besides the output),
    each a bf16 [batch, frames, mlp] tensor per layer (787 MB for base at batch 128 on 30 s audio). Here the
    only residuals are `x` and the bias, and the backward recomputes gelu'(x) = Φ(x) + x·φ(x) in fp32:
    elementwise work in the kernel that reads `x` anyway. Computing in fp32 also matches PyTorch's GELU on bf16
    inputs.
    The backward reads `x` through an optimization barrier: without it XLA's common-subexpression elimination
    sees the backward's erf(x/√2) equal the forward's, computes it once in the forward and keeps it, an fp32
    [batch, frames, mlp] tensor (1.57 GB per layer for base at batch 128; seen in the H200-targeted compile
    of `hlo_audit.py --target h200`), which undoes the point of the custom VJP.
    The price: reverse mode only. `jax.grad`/`vjp` (also grad of grad) work; forward mode (`jax.jvp`,
    `jacfwd`, `hessian`) raises jax's "can't apply forward-mode autodiff (jvp) to a custom_vjp function".
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return _gelu_exact(x, bias)


def _biased(x: jax.Array, bias: jax.Array | None) -> jax.Array:
    """x + bias, rounded to x's dtype as a Linear's biased output is, then in at least fp32."""
    return _wide(x if bias is None else x + bias)


@jax.custom_vjp
def _gelu_exact(x: jax.Array, bias: jax.Array | None) -> jax.Array:
    wide = _biased(x, bias)
    return (0.5 * wide * (1 + jax.lax.erf(wide * _SQRT_HALF))).astype(x.dtype)


def _gelu_forward(x: jax.Array, bias: jax.Array | None) -> tuple[jax.Array, tuple]:
    return _gelu_exact(x, bias), (x, bias)


def _gelu_backward(residuals: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    x, bias = jax.lax.optimization_barrier(residuals)  # recompute, don't share the forward's erf (docstring)
    shape = x.shape
    if bias is not None:  # a [rows, mlp] view, as for `_layer_norm_backward`'s reductions
        x, g = x.reshape(-1, shape[-1]), g.reshape(-1, shape[-1])
    wide = _biased(x, bias)
    derivative = 0.5 * (1 + jax.lax.erf(wide * _SQRT_HALF)) + wide * jnp.exp(-0.5 * wide * wide) * _INV_SQRT_2PI
    grad = (_wide(g) * derivative).astype(g.dtype)
    if bias is None:
        return grad, None
    # The bias's gradient sums the rounded cotangent in its dtype, as autodiff of x + b does. Summed in fp32
    # or over [batch, frames, mlp], XLA (compiled for an H200) wrote the fp32 product out for a second kernel.
    return grad.reshape(shape), grad.sum(0).astype(bias.dtype)


_gelu_exact.defvjp(_gelu_forward, _gelu_backward)

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_exact,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}

# "cudnn_unpadded": cuDNN, with an odd length passed as it is where jax trains it so (see `cudnn_trains_unpadded`).
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "cudnn_unpadded", None)
CUDNN_IMPLEMENTATIONS = ("cudnn", "cudnn_unpadded")  # those that call cuDNN


def resolve_attention_implementation(implementation: str | None, dtype: Dtype) -> str:
    """`None` = the fastest that applies: cuDNN flash attention on GPU for bf16/fp16, XLA otherwise.

    (jax's own `None` means XLA, which ran at 62 vs 357 TFLOP/s for cuDNN on an H200.)
    """
    if implementation is not None:
        return implementation
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if half and jax.default_backend() == "gpu" else "xla"


@functools.cache
def cudnn_trains_unpadded(
    length: int, num_heads: int, head_dim: int, dtype: Dtype, causal: bool, lengths: bool
) -> bool:
    """Whether this jax trains cuDNN attention over `length` positions as they are (with `kv_lengths` when
    `lengths`), asked by tracing one call's gradient: jax refuses a shape it does not support while tracing
    (NotImplementedError). jax 0.10.2 refuses every odd length for training; GPU run 1's jax 0.11.2 trained
    Whisper's 1501 positions. Unpadded, cuDNN leaves its padding mode, which zeroes the output and gradient
    buffers before each call (BENCHMARKS.md, "cuDNN's padding mode zeroes its buffers")."""
    q = jax.ShapeDtypeStruct((1, length, num_heads, head_dim), dtype)
    kv_lengths = jax.ShapeDtypeStruct((1,), jnp.int32) if lengths else None

    def total(q: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array | None) -> jax.Array:
        out = jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, key_value_seq_lengths=kv_lengths, implementation="cudnn"
        )
        return out.astype(jnp.float32).sum()

    try:
        jax.eval_shape(jax.grad(total, argnums=(0, 1, 2)), q, q, q, kv_lengths)
    except NotImplementedError:
        return False
    return True


# Rematerialisation policies a config may name. "none" keeps every activation; "full" recomputes the block.
REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}

DEFAULT_KERNEL_INIT = nnx.initializers.normal(0.02)


def resolve_dtype(name: str | Dtype) -> jnp.dtype:
    """`"bfloat16"` / `"float32"` / a dtype → a jnp dtype (configs store dtypes as strings)."""
    return jnp.dtype(name)


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation a config names (`ACTIVATIONS`: Hugging Face's `hidden_act` names); unknown names raise."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def activate(name: str, x: jax.Array, bias: jax.Array | None) -> jax.Array:
    """The activation `name` of x + bias: the exact GELU takes the bias into its custom VJP (`gelu_exact`)."""
    function = activation_fn(name)
    if function is gelu_exact:
        return gelu_exact(x, bias)
    return function(x if bias is None else x + bias)


def check_tower_config(config: Any, sizes: Sequence[str]) -> None:
    """The checks both tower configs (`WhisperConfig`, `CLIPTextConfig`) run in `__post_init__`, so that a bad
    value fails where the config is made (a config file, `from_hf`, a checkpoint's saved config), naming the
    field, instead of deep inside model construction or tracing.

    The `sizes` fields must be positive integers; `width` divisible by `num_heads`; `activation` one of
    `ACTIVATIONS`; `layer_norm_eps` positive; `dtype` a floating dtype; `remat` "none" or one of
    `REMAT_POLICIES`; `attention_implementation` one of `ATTENTION_IMPLEMENTATIONS`.
    """
    name = type(config).__name__

    def refuse(field: str, requirement: str) -> None:
        raise ValueError(f"{name}.{field} is {getattr(config, field)!r}; {requirement}")

    for field in sizes:
        try:
            positive = operator.index(getattr(config, field)) >= 1
        except TypeError:
            positive = False
        if not positive:
            refuse(field, "it must be a positive integer")
    if config.width % config.num_heads:
        refuse("width", f"it must be divisible by num_heads ({config.num_heads})")
    if config.activation not in ACTIVATIONS:
        refuse("activation", f"expected one of {sorted(ACTIVATIONS)}")
    if not config.layer_norm_eps > 0:
        refuse("layer_norm_eps", "it must be positive")
    try:
        floating = jnp.issubdtype(resolve_dtype(config.dtype), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        refuse("dtype", 'expected a floating dtype name such as "float32" or "bfloat16"')
    if config.remat != "none" and config.remat not in REMAT_POLICIES:
        refuse("remat", f"expected 'none' or one of {sorted(REMAT_POLICIES)}")
    if config.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
        refuse("attention_implementation", f"expected one of {ATTENTION_IMPLEMENTATIONS}")


def dense(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    *,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init: Callable = DEFAULT_KERNEL_INIT,
    precision: jax.lax.Precision | None = None,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """A Linear whose kernel is named `axes` (in, out) and whose bias is named by the output axis.

    `precision` is the matmul's (None: the platform's default, e.g. TF32 for float32 on GPU)."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
        kernel_init=nnx.with_partitioning(kernel_init, axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )


class LayerNorm(nnx.LayerNorm):
    """`nnx.LayerNorm` over the last axis (statistics in fp32, output in the compute dtype) whose backward keeps
    only the input and recomputes each row's mean and 1/σ in the kernel that computes dx.

    Why: under autodiff XLA kept only σ² and recomputed each row's mean wherever the backward needed it; on an
    H200 (GPU run 2, base at batch 128) that row reduction kept the scale gradient's product dy·x̂ out of the
    column-reduction kernel, so every LayerNorm's backward wrote it as an fp32 `[batch, frames, width]` tensor
    and read it back (0.79 GB per audio LayerNorm, ~8.7 GB per step), and the kernel computing dx ran at ~1.2
    TB/s. Here the backward is written out: dγ = Σ dy·x̂ and dβ = Σ dy are element-wise work inside column
    reductions, and dx is row reductions of x and dy, one Triton kernel in the H200 compile, which reads x
    anyway and so recomputes the statistics for free (saving them made the forward two kernels, below). The
    forward is `nnx.LayerNorm`'s own arithmetic, value for value. The price, as for `gelu_exact`: reverse mode
    only, and no `mask` argument.

    In a block, `normalise` and `project` replace the call: the scale and shift go into the Linear that reads
    the output, and the backward keeps only dx's row reductions, one kernel per LayerNorm on an H200.

    `use_fast_variance` is flax's: σ² as E[x²] − E[x]² (True) or from the centred values (False). Its default
    here is False, flax's is True. Why: compiled for an H200, the forward with the centred form and nothing but
    its output to write is one Triton kernel that holds each row on chip and reads x once; E[x²] − E[x]²'s
    two sibling reductions, or statistics saved for the backward, left XLA a statistics kernel and a normalising
    kernel, each reading x (base at batch 128: 1611 → 1543 launches, 66.5 → 64.2 GB of element-wise traffic a
    step). The centred form is also the more accurate one, and PyTorch's.
    """

    # `nnx.LayerNorm` options whose other values this implementation does not compute.
    FIXED_OPTIONS = {"reduction_axes": -1, "feature_axes": -1, "use_bias": True, "use_scale": True, "axis_name": None}

    def __init__(self, num_features: int, *, use_fast_variance: bool = False, **options: Any):
        """`nnx.LayerNorm`'s arguments; those in `FIXED_OPTIONS` may only take the value given there."""
        refused = {
            name: options[name] for name, value in self.FIXED_OPTIONS.items() if options.get(name, value) != value
        }
        if refused:
            raise ValueError(f"layers.LayerNorm computes only {self.FIXED_OPTIONS}; got {refused}")
        super().__init__(num_features, **options)
        self.use_fast_variance = use_fast_variance

    def __call__(self, x: jax.Array) -> jax.Array:
        x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
        return _layer_norm(x, scale, bias, self.epsilon, self.use_fast_variance)

    def normalise(self, x: jax.Array) -> jax.Array:
        """(x − mean) / σ per row, in the compute dtype: this LayerNorm without its scale and shift, which
        `project` folds into the Linear that reads it."""
        (x,) = self.promote_dtype((x,), dtype=self.dtype)
        return _layer_norm(x, None, None, self.epsilon, self.use_fast_variance)

    def project(
        self, linear: nnx.Linear, normalised: jax.Array, *, shift: bool = True, activation: str | None = None
    ) -> jax.Array:
        """`linear(self(x))` from `normalised = self.normalise(x)`, with this LayerNorm's scale γ and shift β
        folded into `linear`'s kernel W and bias b: x̂·(γ ⊙ W) + (β·W + b), the same function.

        Why: the backward then has no [batch, frames, width] column reductions for dγ and dβ, a second read of
        x and dy per LayerNorm. dγ and dβ come from the folded kernel's and bias's gradients, [width, out]
        arrays the backward computes anyway, and dx from the row reductions alone (base at batch 128 compiled
        for an H200: element-wise traffic 75.2 → 66.4 GB a step, launches 1713 → 1611; BENCHMARKS.md).
        `shift=False` leaves out β·W: right for attention keys only, where a bias common to every key adds the
        same number to each query's logits, which softmax cancels.

        `activation` (an `ACTIVATIONS` name): that activation of the projection, given the bias apart
        (`activate`). `linear` is a `dense` (no `preferred_element_type`); β·W is computed in the parameters'
        dtype."""
        kernel = linear.kernel[...]
        bias = linear.bias[...] if linear.bias is not None else None
        if shift:
            shifted = (self.bias[...][:, None] * kernel).sum(0)  # in fp32 (a dot would be TF32 on a GPU)
            bias = shifted if bias is None else bias + shifted
        folded = self.scale[...][:, None] * kernel
        normalised, folded, bias = linear.promote_dtype((normalised, folded, bias), dtype=linear.dtype)
        dimensions = (((normalised.ndim - 1,), (0,)), ((), ()))
        projected = linear.dot_general(normalised, folded, dimensions, precision=linear.precision)
        if activation is not None:
            return activate(activation, projected, bias)
        return projected if bias is None else projected + bias


def _row_statistics(x: jax.Array, epsilon: float, one_pass: bool) -> tuple[jax.Array, jax.Array]:
    """Each row's mean and 1/√(σ² + ε) over the last axis, in fp32, σ² as flax computes it: E[x²] − E[x]² (not
    below 0) for `one_pass` (flax's `use_fast_variance=True`), else from the centred values."""
    wide = _wide(x)
    mean = wide.mean(-1, keepdims=True)
    if one_pass:
        variance = jnp.maximum(0.0, jnp.square(wide).mean(-1, keepdims=True) - jnp.square(mean))
    else:
        variance = jnp.square(wide - mean).mean(-1, keepdims=True)
    return mean, jax.lax.rsqrt(variance + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(
    x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, epsilon: float, one_pass: bool
) -> jax.Array:
    """LayerNorm over the last axis; `scale` and `bias` None (together): the normalised x alone."""
    return _layer_norm_forward(x, scale, bias, epsilon, one_pass)[0]


def _layer_norm_forward(
    x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, epsilon: float, one_pass: bool
) -> tuple[jax.Array, tuple]:
    mean, inverse_std = _row_statistics(x, epsilon, one_pass)
    if scale is None:
        normalised = (x - mean) * inverse_std
    else:
        normalised = (x - mean) * (inverse_std * scale) + bias  # flax's `_normalize`, op for op
    return normalised.astype(x.dtype), (x, scale)


def _layer_norm_backward(
    epsilon: float, one_pass: bool, residuals: tuple, grad: jax.Array
) -> tuple[jax.Array, ...]:
    """Cotangents of x, scale and bias (bias has scale's dtype: `LayerNorm` promotes them together; None for
    None)."""
    x, scale = residuals
    # The barrier keeps XLA from merging the statistics and x - mean below with the forward's (common
    # subexpressions, as for the GELU's erf, see `gelu_exact`): merged, the H200-targeted compile wrote dy·x̂
    # as an fp32 [batch, frames, width] tensor, autodiff's pattern (the class docstring).
    x = jax.lax.optimization_barrier(x)
    # All on a [rows, width] view: XLA sees dy as the GEMM's [rows, width] output, and with the reductions on
    # that view and the rest on [batch, frames, width] it split the row reductions from dx into a second pass
    # (compiled for an H200) instead of one Triton kernel doing both.
    shape = x.shape
    x, grad = x.reshape(-1, shape[-1]), grad.reshape(-1, shape[-1])
    mean, inverse_std = _row_statistics(x, epsilon, one_pass)
    normalised = (_wide(x) - mean) * inverse_std
    grad = _wide(grad)
    scaled = grad if scale is None else grad * _wide(scale)
    grad_x = inverse_std * (
        scaled - scaled.mean(-1, keepdims=True) - normalised * (scaled * normalised).mean(-1, keepdims=True)
    )
    grad_x = grad_x.astype(x.dtype).reshape(shape)
    if scale is None:
        return grad_x, None, None
    return grad_x, (grad * normalised).sum(0).astype(scale.dtype), grad.sum(0).astype(scale.dtype)


_layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


def layer_norm(
    features: int, *, epsilon: float, dtype: Dtype, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs
) -> LayerNorm:
    """LayerNorm over `embed` (statistics in fp32, output in the compute dtype)."""
    return LayerNorm(
        features,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
        rngs=rngs,
    )


def _pad_for_cudnn(kv_lengths: jax.Array | None, *sequences: jax.Array) -> tuple[jax.Array, ...]:
    """cuDNN flash attention needs even sequence lengths (Whisper's 1500 frames + the global token = 1501,
    CLIP's 77): zero-pad axis 1 of each `(B, T, ...)` array up to a multiple of 16, and return the `kv_lengths`
    that mask the padded keys out (`T` for every row when None) followed by the padded arrays."""
    batch, length = sequences[0].shape[:2]
    if kv_lengths is None:
        kv_lengths = jnp.full((batch,), length, jnp.int32)
    padded = [jnp.pad(x, [(0, 0), (0, -length % 16)] + [(0, 0)] * (x.ndim - 2)) for x in sequences]
    return kv_lengths, *padded


class Attention(nnx.Module):
    """Multi-head self-attention through `jax.nn.dot_product_attention` (XLA or cuDNN flash attention)."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        *,
        key_bias: bool,
        dtype: Dtype,
        param_dtype: Dtype,
        implementation: str | None,
        rngs: nnx.Rngs,
    ):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"unknown attention implementation {implementation!r}; expected one of {ATTENTION_IMPLEMENTATIONS}"
            )
        self.num_heads = num_heads
        self.implementation = implementation
        proj = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = dense(width, width, ("embed", "heads"), **proj)
        self.key = dense(width, width, ("embed", "heads"), use_bias=key_bias, **proj)
        self.value = dense(width, width, ("embed", "heads"), **proj)
        self.out = dense(width, width, ("heads", "embed"), **proj)

    def uses_cudnn(self) -> bool:
        """Whether attention over the whole sequence runs on cuDNN (q is in the projections' compute dtype)."""
        return resolve_attention_implementation(self.implementation, self.query.dtype) in CUDNN_IMPLEMENTATIONS

    def pads(self, length: int, *, causal: bool, lengths: bool) -> bool:
        """Whether attention over the whole of a `length`-long sequence pads it for cuDNN (`_pad_for_cudnn`):
        an odd length does, unless the implementation is "cudnn_unpadded" and jax trains it as it is."""
        implementation = resolve_attention_implementation(self.implementation, self.query.dtype)
        if length % 2 == 0 or implementation not in CUDNN_IMPLEMENTATIONS:
            return False
        if implementation == "cudnn":
            return True
        head_dim = self.query.out_features // self.num_heads
        return not cudnn_trains_unpadded(length, self.num_heads, head_dim, self.query.dtype, causal, lengths)

    def __call__(
        self,
        x: jax.Array,
        *,
        norm: LayerNorm | None = None,
        kv_lengths: jax.Array | None = None,
        causal: bool = False,
        query_start: int | None = None,
    ) -> jax.Array:
        """x `(B, T, width)`; `kv_lengths` `(B,)` int32 = number of valid (leading) positions per row.

        `norm`: attend over `norm(x)`, its scale and shift folded into the projections (`LayerNorm.project`).
        `query_start`: outputs only for rows `x[:, query_start:]` (keys and values still span every row), e.g.
        the last block when only the appended global token's output is needed.
        """
        if query_start is not None and causal:
            raise ValueError("query_start with a causal mask is not supported")
        batch, length, width = x.shape
        head_dim = width // self.num_heads
        if norm is not None:
            x = norm.normalise(x)

        def project(linear: nnx.Linear, inputs: jax.Array, shift: bool = True) -> jax.Array:
            projected = linear(inputs) if norm is None else norm.project(linear, inputs, shift=shift)
            heads = (None, "heads", None)  # rows over the batch axes, heads as their parameters (a step's tracing)
            return sharding.split_batch(projected.reshape(batch, inputs.shape[1], self.num_heads, head_dim), heads)

        q = project(self.query, x if query_start is None else x[:, query_start:])
        k = project(self.key, x, shift=False)  # a shift common to every key changes no attention weight
        v = project(self.value, x)
        # A few query rows against all keys is tiny work, which XLA handles for any shape.
        implementation = "xla" if query_start is not None or not self.uses_cudnn() else "cudnn"
        query_length = q.shape[1]
        # (`EncoderStack` pads once, so its blocks never do)
        padded = query_start is None and self.pads(length, causal=causal, lengths=kv_lengths is not None)
        if padded:
            kv_lengths, q, k, v = _pad_for_cudnn(kv_lengths, q, k, v)
        attended = jax.nn.dot_product_attention(
            q,
            k,
            v,
            is_causal=causal,
            key_value_seq_lengths=kv_lengths,
            implementation=implementation,
        )
        if padded:
            attended = attended[:, :query_length]
        return self.out(attended.reshape(batch, query_length, width))


class EncoderBlock(nnx.Module):
    """Pre-LN transformer block: x + attn(ln(x)); x + fc2(act(fc1(ln(x)))), each LayerNorm's scale and shift
    folded into the Linears that read it (`LayerNorm.project`)."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_dim: int,
        *,
        activation: str,
        key_bias: bool,
        layer_norm_eps: float,
        dtype: Dtype,
        param_dtype: Dtype,
        attention_implementation: str | None,
        rngs: nnx.Rngs,
    ):
        self.activation = activation
        activation_fn(activation)  # validate early
        norm = dict(epsilon=layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = layer_norm(width, **norm)
        self.attn = Attention(
            width,
            num_heads,
            key_bias=key_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            implementation=attention_implementation,
            rngs=rngs,
        )
        self.mlp_norm = layer_norm(width, **norm)
        self.fc1 = dense(width, mlp_dim, ("embed", "mlp"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = dense(mlp_dim, width, ("mlp", "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        *,
        kv_lengths: jax.Array | None = None,
        causal: bool = False,
        query_start: int | None = None,
    ) -> jax.Array:
        """`query_start`: compute (and return) only rows `query_start:` — see `Attention`."""
        x = sharding.split_batch(x)  # rows over the batch axes while a train step is traced (see there)
        rows = x if query_start is None else x[:, query_start:]
        attended = self.attn(x, norm=self.attn_norm, kv_lengths=kv_lengths, causal=causal, query_start=query_start)
        x = sharding.split_batch(rows + attended)
        hidden = self.mlp_norm.project(self.fc1, self.mlp_norm.normalise(x), activation=self.activation)
        return x + self.fc2(sharding.split_batch(hidden, (None, "mlp")))


def _create_blocks(num_layers: int, key: jax.Array, block_kwargs: dict) -> list[EncoderBlock]:
    """`num_layers` EncoderBlocks, each initialised from its own split of `key`, created in one `jax.lax.map`.

    Why one batched construction: under `jit` (the trainer creates its parameters there) a Python loop of blocks
    traces ~6 random draws per layer, each its own threefry kernel, and tracing and compiling those dominated
    start-up (state init took 45 s for base and 128 s for large on an H200 host, GPU run 1).

    Why `lax.map` and not `jax.vmap` (which replaced that loop first): on GPU jax lowers threefry fully unrolled
    (~20 rounds inline), and XLA fused each whole vmapped draw into every per-layer slice taken below, one
    threefry kernel per layer and parameter (base's init held 108 of them, large's 264): GPU run 2's init took
    89 s for small. In the loop's body each draw is compiled once, whatever the depth, and the slices of its
    stacked output are plain copies. Each layer's values depend on its key only, as before.
    """

    def create(layer_key: jax.Array) -> EncoderBlock:
        return EncoderBlock(rngs=nnx.Rngs(params=layer_key), **block_kwargs)

    keys = jax.random.split(key, num_layers)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: create(keys[0])))
    stacked = jax.lax.map(lambda layer_key: nnx.state(create(layer_key)), keys)
    return [nnx.merge(graphdef, jax.tree.map(lambda x: x[i], stacked)) for i in range(num_layers)]


class EncoderStack(nnx.Module):
    """`num_layers` EncoderBlocks applied in order, each optionally rematerialised in the backward pass."""

    def __init__(self, num_layers: int, *, remat: str = "none", rngs: nnx.Rngs, **block_kwargs):
        if remat != "none" and remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; expected 'none' or one of {sorted(REMAT_POLICIES)}")
        if num_layers < 1:
            raise ValueError(f"an encoder needs at least one layer, got num_layers={num_layers}")
        self.remat = remat
        self.layers = nnx.List(_create_blocks(num_layers, rngs.params(), block_kwargs))

    @classmethod
    def for_tower(cls, config: Any, *, key_bias: bool, rngs: nnx.Rngs) -> EncoderStack:
        """The blocks of a tower from its config (`WhisperConfig` and `CLIPTextConfig` share these field names):
        fp32 parameters, compute in `config.dtype`."""
        return cls(
            config.num_layers,
            remat=config.remat,
            width=config.width,
            num_heads=config.num_heads,
            mlp_dim=config.mlp_dim,
            activation=config.activation,
            key_bias=key_bias,
            layer_norm_eps=config.layer_norm_eps,
            dtype=resolve_dtype(config.dtype),
            param_dtype=jnp.float32,
            attention_implementation=config.attention_implementation,
            rngs=rngs,
        )

    def __call__(
        self,
        x: jax.Array,
        *,
        kv_lengths: jax.Array | None = None,
        causal: bool = False,
        last_query_start: int | None = None,
    ) -> jax.Array:
        """`last_query_start`: the last block computes only rows `last_query_start:` (the returned rows); a
        negative value counts from the end, as in a slice, and it must lie inside the sequence.

        An odd length with cuDNN attention is zero-padded once here (see `_pad_for_cudnn`; `Attention.pads` says
        when) instead of q, k and v in every layer (on an H200 that per-layer padding cost ~4 of base's 106 ms
        step). Real rows never see the padded ones: `kv_lengths` masks them as keys, and LayerNorm and the MLP
        work row by row. The padded rows are sliced off the result, so they also get no gradient.
        """
        length = x.shape[1]
        padded = self.layers[0].attn.pads(length, causal=causal, lengths=kv_lengths is not None)
        if padded:
            kv_lengths, x = _pad_for_cudnn(kv_lengths, x)
        if last_query_start is not None:
            if not -length <= last_query_start < length:
                raise ValueError(f"last_query_start {last_query_start} is outside the sequence of {length} rows")
            last_query_start %= length  # counted from the true end, not the padded one

        def block_fn(query_start: int | None) -> Callable[[EncoderBlock, jax.Array], jax.Array]:
            def apply(block: EncoderBlock, h: jax.Array) -> jax.Array:
                return block(h, kv_lengths=kv_lengths, causal=causal, query_start=query_start)

            if self.remat != "none":
                return nnx.remat(apply, policy=REMAT_POLICIES[self.remat])
            return apply

        apply_full = block_fn(None)
        for block in self.layers[:-1]:
            x = apply_full(block, x)
        last = apply_full if last_query_start is None else block_fn(last_query_start)
        x = last(self.layers[-1], x)
        return x[:, : length - (last_query_start or 0)] if padded else x


def logical_axes(module: nnx.Module) -> dict[tuple[str, ...], Sequence[str | None]]:
    """Flat map from each parameter's path to its logical axis names (for tests and sharding checks)."""
    specs = nnx.get_partition_spec(nnx.state(module, nnx.Param))
    return {path: tuple(leaf.get_value()) for path, leaf in nnx.to_flat_state(specs)}
