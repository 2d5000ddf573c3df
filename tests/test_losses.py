"""CLIP / sigmoid losses: dense and ring forms vs a NumPy reference on 8 CPU devices; ring memory; Matryoshka."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import JaxprEqn, subjaxprs
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from wavlink_jax import losses

N, D = 32, 16
SCALES = {"clip": np.log(1 / 0.07), "sigmoid": np.log(10.0)}
NOISE = 1.5  # text = audio + noise: pairs match clearly but not perfectly (CLIP loss ≈ 1.2)
SIGMOID_BIAS = -3.0  # between the SigLIP init (-10) and 0, so positives and negatives both matter
MESHES = {
    "8": ((8,), ("data",)),
    "4x2": ((4, 2), ("data", "fsdp")),
    "2x2x2": ((2, 2, 2), ("data", "fsdp", "tensor")),  # batch over data×fsdp, replicated over tensor
}


def make_mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    z = rng.normal(size=(n, d))
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def embeddings(seed: int = 0, n: int = N, d: int = D) -> tuple[np.ndarray, np.ndarray]:
    """Correlated pairs (so the diagonal stands out, as in training), float32 values held in float64 so the
    reference sees exactly the inputs the JAX code sees."""
    rng = np.random.default_rng(seed)
    za = unit_rows(rng, n, d)
    zt = za + NOISE * unit_rows(rng, n, d)
    zt /= np.linalg.norm(zt, axis=1, keepdims=True)
    return za.astype(np.float32).astype(np.float64), zt.astype(np.float32).astype(np.float64)


def numpy_loss_and_grads(kind, za, zt, logit_scale, logit_bias=0.0):
    """The textbook form with explicit labels (float64): value, gradients wrt (za, zt, scale, bias), and the
    magnitude each is compared at (see `assert_loss_close`)."""
    n = za.shape[0]
    scale = np.exp(logit_scale)
    similarity = za @ zt.T
    x = scale * similarity + logit_bias
    eye = np.eye(n)
    if kind == "clip":
        log_row = x - np.logaddexp.reduce(x, axis=1, keepdims=True)
        log_column = x - np.logaddexp.reduce(x, axis=0, keepdims=True)
        value = -(np.trace(log_row) + np.trace(log_column)) / (2 * n)
        dx = (np.exp(log_row) - eye + np.exp(log_column) - eye) / (2 * n)
    else:
        labels = 2 * eye - 1
        value = np.logaddexp(0.0, -labels * x).sum() / n  # -log σ(label·x)
        dx = -labels / (1 + np.exp(labels * x)) / n
    grads = (scale * dx @ zt, scale * dx.T @ za, scale * np.sum(dx * similarity), dx.sum())
    # The two scalar gradients are sums of N² terms of both signs; near the optimal temperature the sum is
    # close to 0, and any float32 evaluation is only accurate relative to the sum of the terms' magnitudes.
    magnitudes = (
        abs(value),
        np.max(np.abs(grads[0])),
        np.max(np.abs(grads[1])),
        scale * np.sum(np.abs(dx * similarity)),
        np.sum(np.abs(dx)),
    )
    return value, grads, magnitudes


def jax_loss_and_grads(kind, za, zt, logit_scale, logit_bias=0.0, *, mesh=None, impl="dense"):
    def loss(a, t, s, b):
        if kind == "clip":
            return losses.clip_loss(a, t, s, mesh=mesh, impl=impl)
        return losses.sigmoid_loss(a, t, s, b, mesh=mesh, impl=impl)

    args = [jnp.asarray(za, jnp.float32), jnp.asarray(zt, jnp.float32), jnp.float32(logit_scale), jnp.float32(logit_bias)]
    if mesh is not None:
        rows = NamedSharding(mesh, P(losses.resolve_batch_axes(mesh), None))
        args[:2] = [jax.device_put(a, rows) for a in args[:2]]
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(*args)
    return float(value), [np.asarray(g, np.float64) for g in grads]


def assert_close(actual, expected, rtol=1e-5, what="", magnitude=None):
    """max |actual − expected| ≤ rtol · magnitude (default max |expected|: relative to the array's scale)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    magnitude = np.max(np.abs(expected)) if magnitude is None else magnitude
    err = np.max(np.abs(actual - expected))
    assert err <= rtol * magnitude, f"{what}: max abs diff {err:.3g} vs magnitude {magnitude:.3g}"


def assert_loss_close(actual, expected, magnitudes, rtol=1e-5):
    """Value and the four gradients of `actual` match `expected` within rtol of the reference magnitudes."""
    names = ("value", "d_za", "d_zt", "d_logit_scale", "d_logit_bias")
    for name, a, e, magnitude in zip(names, [actual[0], *actual[1]], [expected[0], *expected[1]], magnitudes):
        if name == "d_logit_bias" and magnitude == 0:  # CLIP has no bias: its gradient must be exactly 0
            assert a == 0.0
        else:
            assert_close(a, e, rtol, name, magnitude)


@pytest.mark.parametrize("kind", losses.LOSS_KINDS)
def test_unsharded_matches_numpy(kind):
    za, zt = embeddings()
    bias = SIGMOID_BIAS if kind == "sigmoid" else 0.0
    value, grads, magnitudes = numpy_loss_and_grads(kind, za, zt, SCALES[kind], bias)
    assert_loss_close(jax_loss_and_grads(kind, za, zt, SCALES[kind], bias), (value, grads), magnitudes)


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("kind", losses.LOSS_KINDS)
def test_dense_and_ring_match_numpy_and_each_other(kind, mesh_name):
    za, zt = embeddings(seed=1)
    bias = SIGMOID_BIAS if kind == "sigmoid" else 0.0
    mesh = make_mesh(*MESHES[mesh_name])
    dense = jax_loss_and_grads(kind, za, zt, SCALES[kind], bias, mesh=mesh, impl="dense")
    ring = jax_loss_and_grads(kind, za, zt, SCALES[kind], bias, mesh=mesh, impl="ring")
    value, grads, magnitudes = numpy_loss_and_grads(kind, za, zt, SCALES[kind], bias)
    assert_loss_close(ring, dense, magnitudes)
    assert_loss_close(dense, (value, grads), magnitudes)
    assert_loss_close(ring, (value, grads), magnitudes)


def test_explicit_batch_axes_and_single_device_fallback():
    za, zt = embeddings(seed=2)
    expected = numpy_loss_and_grads("clip", za, zt, SCALES["clip"])
    mesh = make_mesh((2, 4), ("data", "tensor"))
    for batch_axes in (("data",), ("tensor",)):  # rings of 2 and 4 devices, replicated over the other axis
        loss = lambda a, t: losses.clip_loss(a, t, SCALES["clip"], mesh=mesh, impl="ring", batch_axes=batch_axes)
        assert_close(jax.jit(loss)(za.astype(np.float32), zt.astype(np.float32)), expected[0], what="value")
    # One device on the batch axes → the dense form; no shard_map needed.
    single = make_mesh((1, 8), ("data", "tensor"))
    value = losses.clip_loss(za.astype(np.float32), zt.astype(np.float32), SCALES["clip"], mesh=single, impl="ring")
    assert_close(value, expected[0], what="value")


def test_bad_arguments_raise_clear_errors():
    za = jnp.zeros((12, 4))
    mesh = make_mesh((8,), ("data",))
    with pytest.raises(ValueError, match="divisible by the 8 devices"):
        losses.clip_loss(za, za, 0.0, mesh=mesh, impl="ring")
    with pytest.raises(ValueError, match="unknown loss impl"):
        losses.clip_loss(za, za, 0.0, impl="gather")
    with pytest.raises(ValueError, match="not axes of the mesh"):
        losses.sigmoid_loss(za, za, 0.0, 0.0, mesh=mesh, batch_axes=("fsdp",))
    with pytest.raises(ValueError, match="same shape"):
        losses.clip_loss(za, za[:, :2], 0.0)
    explicit = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))  # make_mesh's default
    for impl in losses.IMPLEMENTATIONS:  # shard_map's own error spoke of specs
        with pytest.raises(ValueError, match=r"batch axes \['data'\] are of type \['Explicit'\], not AxisType.Auto"):
            losses.clip_loss(jnp.zeros((8, 4)), jnp.zeros((8, 4)), 0.0, mesh=explicit, impl=impl)


@pytest.mark.parametrize("kind", losses.LOSS_KINDS)
def test_ring_compiled_memory_is_a_fraction_of_dense(kind):
    """N=8192, d=512 over 8 devices, loss + gradients, compiled only: the ring's temporaries stay ≤ ¼ of the
    dense form's, and the dense form never holds the full N×N logits on one device."""
    n, d = 8192, 512
    mesh = make_mesh((8,), ("data",))
    rows = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=NamedSharding(mesh, P("data", None)))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))

    def temp_bytes(impl):
        def loss(a, t, s, b):
            if kind == "clip":
                return losses.clip_loss(a, t, s, mesh=mesh, impl=impl)
            return losses.sigmoid_loss(a, t, s, b, mesh=mesh, impl=impl)

        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(rows, rows, scalar, scalar).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    dense, ring = temp_bytes("dense"), temp_bytes("ring")
    assert dense < n * n * 4, f"dense temp {dense} bytes ≥ one full N×N fp32 logits matrix"
    assert ring <= dense / 4, f"ring temp {ring} bytes > ¼ of dense {dense} bytes"


# ---------------------------------------------------------------------------------------------------------------
# Matryoshka


def prefix_sensitive_embeddings(seed: int = 3, n: int = 16, d: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Pairs that match in the first quarter of the features and not at all in the rest, which dominates the
    norm: the loss on the re-normalised d/4 prefix is far from the loss on the full embedding and from the loss
    on the prefix left un-normalised."""
    rng = np.random.default_rng(seed)
    za, zt = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    zt[:, : d // 4] = za[:, : d // 4] + 0.8 * rng.normal(size=(n, d // 4))
    za[:, d // 4 :] *= 3.0
    zt[:, d // 4 :] *= 3.0
    unit = [z / np.linalg.norm(z, axis=1, keepdims=True) for z in (za, zt)]
    return tuple(z.astype(np.float32).astype(np.float64) for z in unit)


def numpy_prefix(z, dim):
    return z[:, :dim] / np.linalg.norm(z[:, :dim], axis=1, keepdims=True)


def test_matryoshka_uses_renormalised_prefixes():
    za, zt = prefix_sensitive_embeddings()
    dims = (32, 16, 8)
    clip_weight, sigmoid_weight = 0.7, 1.3
    scales = dict(logit_scale_clip=SCALES["clip"], logit_scale_sigmoid=SCALES["sigmoid"], logit_bias=SIGMOID_BIAS)
    loss = jax.jit(
        lambda a, t: losses.matryoshka_loss(
            a, t, dims=dims, clip_weight=clip_weight, sigmoid_weight=sigmoid_weight, **scales
        )
    )
    total, aux = loss(jnp.asarray(za, jnp.float32), jnp.asarray(zt, jnp.float32))
    levels = []
    for dim in dims:
        a, t = numpy_prefix(za, dim), numpy_prefix(zt, dim)
        clip = numpy_loss_and_grads("clip", a, t, SCALES["clip"])[0]
        sigmoid = numpy_loss_and_grads("sigmoid", a, t, SCALES["sigmoid"], SIGMOID_BIAS)[0]
        assert_close(aux[f"clip/{dim}"], clip, what=f"clip/{dim}")
        assert_close(aux[f"sigmoid/{dim}"], sigmoid, what=f"sigmoid/{dim}")
        assert_close(aux[f"loss/{dim}"], clip_weight * clip + sigmoid_weight * sigmoid, what=f"loss/{dim}")
        levels.append(clip_weight * clip + sigmoid_weight * sigmoid)
    assert_close(total, np.mean(levels), what="total")
    # The data really discriminates: the full embedding, or an un-normalised prefix, gives another loss.
    full_clip = numpy_loss_and_grads("clip", za, zt, SCALES["clip"])[0]
    unnormalised_clip = numpy_loss_and_grads("clip", za[:, :8], zt[:, :8], SCALES["clip"])[0]
    assert abs(full_clip - aux["clip/8"]) > 0.5 and abs(unnormalised_clip - aux["clip/8"]) > 0.5


def test_matryoshka_zero_weight_skips_that_loss_and_ring_matches():
    za, zt = (jnp.asarray(z, jnp.float32) for z in prefix_sensitive_embeddings())
    kwargs = dict(dims=(32, 8), logit_scale_clip=2.0, logit_scale_sigmoid=1.0, logit_bias=-2.0, clip_weight=0.0)
    total, aux = losses.matryoshka_loss(za, zt, **kwargs)
    assert sorted(aux) == ["loss/32", "loss/8", "sigmoid/32", "sigmoid/8"]
    assert_close(total, (aux["sigmoid/32"] + aux["sigmoid/8"]) / 2, what="total")
    mesh = make_mesh((8,), ("data",))
    ring_total, _ = jax.jit(lambda a, t: losses.matryoshka_loss(a, t, mesh=mesh, impl="ring", **kwargs))(za, zt)
    assert_close(ring_total, total, what="ring total")
    with pytest.raises(ValueError, match="not both 0"):
        losses.matryoshka_loss(za, zt, **{**kwargs, "sigmoid_weight": 0.0})
    with pytest.raises(ValueError, match="must be in 1..32"):
        losses.matryoshka_loss(za, zt, **{**kwargs, "dims": (64,)})
    with pytest.raises(ValueError, match=r"dims \(32, 8, 32\) contain duplicates"):  # a level counted twice
        losses.matryoshka_loss(za, zt, **{**kwargs, "dims": (32, 8, 32)})


def test_zero_rows_and_zero_prefixes_normalise_to_zeros_not_nan():
    """A head output of zeros (or one whose Matryoshka prefix is all zeros) has no direction: it normalises to
    zeros, and the loss stays finite, instead of 0 · rsqrt(0) = NaN poisoning the whole batch."""
    z = jnp.asarray([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    # rtol only (atol 0): the zero rows must be exactly 0.
    np.testing.assert_allclose(losses.l2_normalize(z), [[0.6, 0.8, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]], rtol=1e-6)
    np.testing.assert_allclose(losses.matryoshka_prefix(z, 2), [[0.6, 0.8], [0, 0], [0, 0]], rtol=1e-6)
    total, _ = losses.matryoshka_loss(
        z, z[::-1], dims=(4, 2), logit_scale_clip=SCALES["clip"], logit_scale_sigmoid=SCALES["sigmoid"],
        logit_bias=SIGMOID_BIAS,
    )
    assert np.isfinite(total)


def test_small_rows_normalise_to_unit_length_and_the_loss_ignores_the_heads_scale():
    """Only rows of norm < sqrt(eps) = 1e-6 are left short of unit length: heads whose outputs (or Matryoshka
    prefixes) are small, as early in training, still give unit embeddings and the loss of the same directions."""
    z = jnp.asarray([[3e-5, 4e-5], [6e-3, 8e-3], [3e3, 4e3]])
    np.testing.assert_allclose(losses.l2_normalize(z), [[0.6, 0.8]] * 3, rtol=1e-6)
    za, zt = (jnp.asarray(z, jnp.float32) for z in prefix_sensitive_embeddings())
    kwargs = dict(dims=(32, 8), logit_scale_clip=SCALES["clip"], logit_scale_sigmoid=SCALES["sigmoid"],
                  logit_bias=SIGMOID_BIAS)
    loss = jax.jit(lambda a, t: losses.matryoshka_loss(a, t, **kwargs)[0])
    # The 8-dim prefixes of the scaled rows have norms from 1e-5 to 3e-5.
    assert_close(loss(1e-4 * za, 1e-4 * zt), loss(za, zt), what="total at 1e-4 × the scale")


def test_default_batch_axes_are_data_and_fsdp_of_the_mesh():
    """Without `batch_axes` the loss splits the batch over every one of data and fsdp the mesh has (as the
    trainer's batch is split): on data only, a 4 × 2 mesh would repeat each device's loss on both fsdp devices."""
    assert losses.resolve_batch_axes(make_mesh(*MESHES["4x2"])) == ("data", "fsdp")
    assert losses.resolve_batch_axes(make_mesh(*MESHES["2x2x2"])) == ("data", "fsdp")
    assert losses.resolve_batch_axes(make_mesh((2, 4), ("data", "tensor"))) == ("data",)
    assert losses.resolve_batch_axes(make_mesh((8,), ("fsdp",))) == ("fsdp",)


def dot_generals(fn, *args) -> list[JaxprEqn]:
    """Every dot_general in `fn(*args)`'s jaxpr (nested ones included: shard_map, loops, custom_vjp), traced
    under the platform's default matmul precision (not conftest's global `highest`), so that a matmul left
    at the default shows `Precision.DEFAULT`, as it would run (TF32 on GPU, bf16 passes on TPU)."""

    def walk(jaxpr):
        yield from (eqn for eqn in jaxpr.eqns if eqn.primitive.name == "dot_general")
        for sub in subjaxprs(jaxpr):
            yield from walk(sub)

    with jax.default_matmul_precision("default"):
        return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("impl", losses.IMPLEMENTATIONS)
@pytest.mark.parametrize("sharded", [False, True], ids=["one_device", "mesh8"])
def test_logit_matmuls_and_their_gradients_run_at_highest_precision(impl, sharded):
    """With CLIP's logit multiplier up to 100, TF32's ~1e-3 relative error on the cosines is ~0.1 on a logit."""
    za, zt = (jnp.asarray(z, jnp.float32) for z in embeddings())
    mesh = make_mesh((8,), ("data",)) if sharded else None
    assert {eqn.params["precision"] for eqn in dot_generals(lambda a, t: a @ t.T, za, zt)} == {
        (jax.lax.Precision.DEFAULT, jax.lax.Precision.DEFAULT)
    }  # the probe sees a matmul left at the default

    def loss(a, t, scales):
        return losses.matryoshka_loss(a, t, dims=(D, D // 2), mesh=mesh, impl=impl, **scales)[0]

    scales = dict(logit_scale_clip=SCALES["clip"], logit_scale_sigmoid=SCALES["sigmoid"], logit_bias=SIGMOID_BIAS)
    dots = dot_generals(jax.value_and_grad(loss, argnums=(0, 1, 2)), za, zt, scales)
    # Forward logits: 2 levels × 2 losses (× the ring's steps); the backward adds the gradients' matmuls.
    assert len(dots) >= 3 * 2 * 2
    assert {eqn.params["precision"] for eqn in dots} == {HIGHEST}
