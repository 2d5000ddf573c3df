"""Contrastive losses for WavLink: CLIP (InfoNCE) and sigmoid (SigLIP), dense and ring-sharded, Matryoshka.

Both losses act on `(N, d)` L2-normalised audio embeddings `za` and text embeddings `zt` whose row `i` is a
matching pair, with logits `x = exp(logit_scale) · za ztᵀ (+ logit_bias)`:

* CLIP:    mean over the two directions of the cross-entropy with the diagonal as target,
           `(Σ_r lse(x[r, :]) + Σ_c lse(x[:, c]) − 2 Σ_i x_ii) / 2N`.
* sigmoid: per row the sum over all columns of `−log σ(label · x)` (label +1 on the diagonal, −1 elsewhere),
           mean over rows, `(Σ_rc softplus(x_rc) − Σ_i x_ii) / N`.

Written this way both are an "all pairs" term that never looks at labels minus a diagonal term, and that is
how the sharded forms are built: the diagonal term is local to each device (row i of `za` and `zt` live on
the same device), only the all-pairs term needs the other devices' embeddings. Both terms are kept per row
(row i: its row lse, the lse of column i, x_ii) and subtracted before the sum over rows, so a small loss is
not lost to float32 cancellation between two large sums.

Implementations (`impl=`), over the mesh's batch axes (default: those of `("data", "fsdp")` in the mesh):

* `"dense"`: each device computes its own rows of the logits against the all-gathered text embeddings,
  `(N/P, N)` logits per device; the CLIP column log-sum-exp is combined across devices with a max and a
  reduce-scatter. Fast for moderate N; memory grows with N²/P.
* `"ring"`: no device ever holds more than an `(N/P, N/P)` block. The text shards travel around the ring
  of P devices with `lax.ppermute`; the CLIP row log-sum-exp is accumulated online (running max and sum)
  and the column statistics travel with their text shard. A `custom_vjp` recomputes every block in the
  backward pass (a second ring, in which the text gradients travel with their shard), so nothing of size
  N×N or N×d is saved and per-device memory does not grow with the device count. Each transfer is issued
  before the block's matmul so the two overlap. Value and gradients equal the dense form's up to float
  rounding.

Without a mesh, or with one device on the batch axes, both implementations compute the plain dense form.
Embeddings are cast to float32 before the logits, and every matmul of the logits and of their gradients runs
at `lax.Precision.HIGHEST` (`_matmul`): with a logit multiplier near 100, bf16 logits would be off by whole
units, and the accelerators' default fp32 matmul (TF32 on GPU, bf16 passes on TPU; ~1e-3 relative on the
cosines) by ~0.1. These matmuls are small (N×N×d per level), so full precision costs little.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from wavlink_jax import sharding

DEFAULT_BATCH_AXES = ("data", "fsdp")
IMPLEMENTATIONS = ("dense", "ring")
LOSS_KINDS = ("clip", "sigmoid")
# Each loss is Σ_i (all-pairs term_i − DIAGONAL_WEIGHT · x_ii) / (DIAGONAL_WEIGHT · N).
DIAGONAL_WEIGHT = {"clip": 2.0, "sigmoid": 1.0}
# The precision of the logits' matmuls and of their gradients (see the module docstring).
PRECISION = lax.Precision.HIGHEST


def l2_normalize(z: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows of `z` scaled to unit L2 norm (rows of norm < sqrt(eps) are scaled by 1/sqrt(eps), not NaN)."""
    z32 = z.astype(jnp.float32)
    return (z32 * lax.rsqrt(jnp.maximum(jnp.sum(z32 * z32, axis=-1, keepdims=True), eps))).astype(z.dtype)


def matryoshka_prefix(z: jax.Array, dim: int) -> jax.Array:
    """The first `dim` features of each row of `z`, re-normalised to unit length (one Matryoshka level)."""
    if not 0 < dim <= z.shape[-1]:
        raise ValueError(f"Matryoshka dim {dim} must be in 1..{z.shape[-1]} (the embedding size)")
    return l2_normalize(z[..., :dim])


def clip_loss(
    za: jax.Array,
    zt: jax.Array,
    logit_scale: jax.Array | float,
    *,
    mesh: Mesh | None = None,
    impl: str = "dense",
    batch_axes: Sequence[str] | None = None,
) -> jax.Array:
    """CLIP loss: mean of the audio→text and text→audio cross-entropies, logits `exp(logit_scale)·za·ztᵀ`."""
    return _contrastive_loss("clip", za, zt, logit_scale, 0.0, mesh=mesh, impl=impl, batch_axes=batch_axes)


def sigmoid_loss(
    za: jax.Array,
    zt: jax.Array,
    logit_scale: jax.Array | float,
    logit_bias: jax.Array | float,
    *,
    mesh: Mesh | None = None,
    impl: str = "dense",
    batch_axes: Sequence[str] | None = None,
) -> jax.Array:
    """Sigmoid (SigLIP) loss: per row Σ over all columns of −log σ(label·logit), mean over rows."""
    return _contrastive_loss(
        "sigmoid", za, zt, logit_scale, logit_bias, mesh=mesh, impl=impl, batch_axes=batch_axes
    )


def check_loss_weights(clip_weight: float, sigmoid_weight: float, where: str = "") -> None:
    """Both weights finite and ≥ 0, not both 0: a negative weight maximises its loss and a NaN one trains on a NaN
    loss. `where` prefixes the names in the error (e.g. "config.loss.")."""
    weights = (clip_weight, sigmoid_weight)
    if not all(math.isfinite(w) and w >= 0 for w in weights) or clip_weight == sigmoid_weight == 0:
        raise ValueError(
            f"loss weights must be finite, ≥ 0 and not both 0 (got {where}clip_weight={clip_weight}, "
            f"{where}sigmoid_weight={sigmoid_weight})"
        )


def matryoshka_loss(
    za: jax.Array,
    zt: jax.Array,
    *,
    dims: Sequence[int],
    logit_scale_clip: jax.Array | float,
    logit_scale_sigmoid: jax.Array | float,
    logit_bias: jax.Array | float,
    clip_weight: float = 1.0,
    sigmoid_weight: float = 1.0,
    mesh: Mesh | None = None,
    impl: str = "dense",
    batch_axes: Sequence[str] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over Matryoshka levels of `clip_weight·clip + sigmoid_weight·sigmoid` on re-normalised prefixes.

    Each level `d` in `dims` uses `za[:, :d]` and `zt[:, :d]` normalised (so `za`, `zt` may be the heads'
    outputs before normalisation, as in training). The CLIP and sigmoid losses have
    their own log-temperatures (`logit_scale_clip`, `logit_scale_sigmoid`; initialised differently, log 1/0.07
    vs log 10), shared by all levels. A loss whose weight is 0 is not computed. Returns the total and, for
    logging, `{"clip/<d>": ..., "sigmoid/<d>": ..., "loss/<d>": weighted level loss}`.
    """
    dims = tuple(int(d) for d in dims)
    if not dims:
        raise ValueError("matryoshka_loss needs at least one dim")
    if len(set(dims)) != len(dims):
        raise ValueError(f"Matryoshka dims {dims} contain duplicates")
    check_loss_weights(clip_weight, sigmoid_weight)
    sharding = dict(mesh=mesh, impl=impl, batch_axes=batch_axes)
    aux: dict[str, jax.Array] = {}
    level_losses = []
    for dim in dims:
        za_d, zt_d = matryoshka_prefix(za, dim), matryoshka_prefix(zt, dim)
        level = jnp.zeros((), jnp.float32)
        if clip_weight:
            aux[f"clip/{dim}"] = clip_loss(za_d, zt_d, logit_scale_clip, **sharding)
            level = level + clip_weight * aux[f"clip/{dim}"]
        if sigmoid_weight:
            aux[f"sigmoid/{dim}"] = sigmoid_loss(za_d, zt_d, logit_scale_sigmoid, logit_bias, **sharding)
            level = level + sigmoid_weight * aux[f"sigmoid/{dim}"]
        aux[f"loss/{dim}"] = level
        level_losses.append(level)
    return jnp.mean(jnp.stack(level_losses)), aux


# --------------------------------------------------------------------------------------------------------------
# Dispatch


def resolve_batch_axes(mesh: Mesh, batch_axes: Sequence[str] | None = None) -> tuple[str, ...]:
    """The mesh axes the batch is sharded over: `batch_axes` if given (validated), else those of
    `("data", "fsdp")` present in `mesh`."""
    if batch_axes is None:
        return tuple(name for name in DEFAULT_BATCH_AXES if name in mesh.axis_names)
    batch_axes = tuple(batch_axes)
    missing = [name for name in batch_axes if name not in mesh.axis_names]
    if missing:
        raise ValueError(f"batch_axes {missing} are not axes of the mesh {dict(mesh.shape)}")
    return batch_axes


def _contrastive_loss(
    kind: str,
    za: jax.Array,
    zt: jax.Array,
    logit_scale: jax.Array | float,
    logit_bias: jax.Array | float,
    *,
    mesh: Mesh | None,
    impl: str,
    batch_axes: Sequence[str] | None,
) -> jax.Array:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown loss impl {impl!r}; expected one of {IMPLEMENTATIONS}")
    if za.ndim != 2 or za.shape != zt.shape:
        raise ValueError(f"za and zt must both be (N, d) with the same shape; got {za.shape} and {zt.shape}")
    za, zt = za.astype(jnp.float32), zt.astype(jnp.float32)
    scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
    bias = jnp.asarray(logit_bias, jnp.float32)
    axes = resolve_batch_axes(mesh, batch_axes) if mesh is not None else ()
    not_auto = sorted(set(sharding.axes_not_auto(mesh, axes).values())) if mesh is not None else []
    if not_auto:  # jax.make_mesh's default is Explicit; shard_map would fail with an error about specs
        raise ValueError(
            f"the loss's batch axes {list(axes)} are of type {not_auto}, not AxisType.Auto: build the mesh with "
            "wavlink_jax.sharding.create_mesh, or pass axis_types=(jax.sharding.AxisType.Auto, ...) to jax.make_mesh"
        )
    size = 1
    for name in axes:
        size *= mesh.shape[name]
    if size == 1:
        return _single_device_loss(kind, za, zt, scale, bias)
    if za.shape[0] % size:
        raise ValueError(
            f"the batch size {za.shape[0]} must be divisible by the {size} devices of the batch axes {axes}"
        )
    if impl == "dense":
        body = partial(_dense_shard, kind=kind, axes=axes, num_rows=za.shape[0])
    else:
        body = partial(_ring_shard, kind=kind, axes=axes, size=size, num_rows=za.shape[0])
    rows = P(axes, None)
    return jax.shard_map(body, mesh=mesh, in_specs=(rows, rows, P(), P()), out_specs=P())(za, zt, scale, bias)


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a @ b` in full float32 (`PRECISION`), whatever the default matmul precision of the platform."""
    return jnp.matmul(a, b, precision=PRECISION)


def _single_device_loss(kind: str, za: jax.Array, zt: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    logits = scale * _matmul(za, zt.T) + bias
    if kind == "clip":
        pairs = jax.nn.logsumexp(logits, axis=1) + jax.nn.logsumexp(logits, axis=0)
    else:
        pairs = jax.nn.softplus(logits).sum(axis=1)
    return _local_sum(kind, pairs, za, zt, scale, bias) / (DIAGONAL_WEIGHT[kind] * za.shape[0])


def _local_sum(
    kind: str, pairs: jax.Array, za: jax.Array, zt: jax.Array, scale: jax.Array, bias: jax.Array
) -> jax.Array:
    """Σ over this device's rows i of (all-pairs term_i − DIAGONAL_WEIGHT · x_ii); row i of za and zt (and so
    x_ii) live on the same device."""
    diagonal = scale * jnp.sum(za * zt, axis=-1) + bias
    return jnp.sum(pairs - DIAGONAL_WEIGHT[kind] * diagonal)


# --------------------------------------------------------------------------------------------------------------
# Dense sharded form: own rows against the gathered text embeddings.


def _dense_shard(za, zt, scale, bias, *, kind: str, axes: tuple[str, ...], num_rows: int) -> jax.Array:
    logits = scale * _matmul(za, lax.all_gather(zt, axes, tiled=True).T) + bias  # (N/P, N)
    if kind == "clip":
        local = za.shape[0]
        column_max = lax.pmax(lax.stop_gradient(logits.max(axis=0)), axes)  # (N,), the same on every device
        own_columns = lax.axis_index(axes) * local
        column_sum = lax.psum_scatter(
            jnp.exp(logits - column_max).sum(axis=0), axes, scatter_dimension=0, tiled=True
        )  # (N/P,) own text columns, summed over all devices' rows
        column_lse = lax.dynamic_slice_in_dim(column_max, own_columns, local) + jnp.log(column_sum)
        pairs = jax.nn.logsumexp(logits, axis=1) + column_lse
    else:
        pairs = jax.nn.softplus(logits).sum(axis=1)
    return lax.psum(_local_sum(kind, pairs, za, zt, scale, bias), axes) / (DIAGONAL_WEIGHT[kind] * num_rows)


# --------------------------------------------------------------------------------------------------------------
# Ring form.


def _ring(
    block: Callable,
    combine: Callable,
    payload,
    local,
    *,
    axes: tuple[str, ...],
    size: int,
):
    """Visit every text shard once, in `size` steps around the ring of devices on `axes`.

    At step k this device holds the payload of text shard (me − k) mod size and calls
    `block(payload, local) -> (local, contribution)`: `local` accumulates on this device, `contribution` is
    this device's share of an accumulator that belongs to the text shard. The shard's accumulator travels
    one hop behind it and is merged with `combine`; at the end each shard's accumulator is delivered to the
    device that owns the shard. Both transfers of a step are issued before its block so they overlap with it.
    Returns `(local, accumulator of this device's own text shard)`.
    """
    send = partial(lax.ppermute, axis_name=axes, perm=[(j, (j + 1) % size) for j in range(size)])

    def step(current, carried, local, *, last: bool):
        upcoming = None if last else send(current)  # the next step's shard, in flight during this block
        incoming = send(carried)  # the accumulator of `current`, from the device that held it last step
        local, contribution = block(current, local)
        return upcoming, combine(incoming, contribution), local

    upcoming = send(payload)
    local, carried = block(payload, local)
    upcoming, carried, local = lax.fori_loop(
        1, size - 1, lambda _, carry: step(*carry, last=False), (upcoming, carried, local)
    )
    _, carried, local = step(upcoming, carried, local, last=True)
    return local, send(carried)


def _merge_lse(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Merge two partial log-sum-exps, each held as (running max, sum of exp(x − max))."""
    (max_a, sum_a), (max_b, sum_b) = a, b
    new_max = jnp.maximum(max_a, max_b)
    return new_max, sum_a * jnp.exp(max_a - new_max) + sum_b * jnp.exp(max_b - new_max)


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _ring_pairs(kind: str, axes: tuple[str, ...], size: int) -> Callable:
    """This device's part of the all-pairs term, `(za, zt, scale, bias) -> (N/P,)`, with a ring backward.

    For local row i, CLIP: lse of row i + lse of column i (the own text shard's columns); sigmoid: Σ over all
    columns of softplus(x_ic).
    """
    ring = partial(_ring, axes=axes, size=size)

    def logits(za, zt_block, scale, bias):
        return scale * _matmul(za, zt_block.T) + bias

    def forward(za, zt, scale, bias):
        if kind == "clip":

            def block(zt_block, row_stats):
                x = logits(za, zt_block, scale, bias)
                row_max, column_max = x.max(axis=1), x.max(axis=0)
                rows = (row_max, jnp.exp(x - row_max[:, None]).sum(axis=1))
                columns = (column_max, jnp.exp(x - column_max).sum(axis=0))
                return _merge_lse(row_stats, rows), columns

            empty = (jnp.full(za.shape[0], -jnp.inf), jnp.zeros(za.shape[0]))
            (row_max, row_sum), (column_max, column_sum) = ring(block, _merge_lse, zt, empty)
            row_lse, column_lse = row_max + jnp.log(row_sum), column_max + jnp.log(column_sum)
            pairs = row_lse + column_lse
        else:

            def block(zt_block, row_sums):
                return row_sums + jax.nn.softplus(logits(za, zt_block, scale, bias)).sum(axis=1), ()

            pairs, _ = ring(block, _add, zt, jnp.zeros(za.shape[0]))
            row_lse = column_lse = None
        return pairs, (za, zt, scale, bias, row_lse, column_lse)

    def backward(residuals, cotangent):
        za, zt, scale, bias, row_lse, column_lse = residuals

        def block(payload, grads):
            zt_block, column_lse_block, cotangent_block = payload
            similarity = _matmul(za, zt_block.T)
            x = scale * similarity + bias
            if kind == "clip":
                # d(row lse)/dx is the row softmax (cotangent of this device); d(column lse)/dx the column
                # softmax, whose cotangent is that of the device owning the text shard.
                dx = cotangent[:, None] * jnp.exp(x - row_lse[:, None]) + cotangent_block * jnp.exp(
                    x - column_lse_block
                )
            else:
                dx = cotangent[:, None] * jax.nn.sigmoid(x)
            d_za, d_scale, d_bias = grads
            grads = (d_za + scale * _matmul(dx, zt_block), d_scale + jnp.sum(dx * similarity), d_bias + dx.sum())
            return grads, scale * _matmul(dx.T, za)

        # Only CLIP's column term needs the text shard owner's statistics and cotangent.
        payload = (zt, column_lse, cotangent) if kind == "clip" else (zt, None, None)
        zero = jnp.zeros((), za.dtype)
        (d_za, d_scale, d_bias), d_zt = ring(block, _add, payload, (jnp.zeros_like(za), zero, zero))
        return d_za, d_zt, d_scale, d_bias

    @jax.custom_vjp
    def pairs(za, zt, scale, bias):
        return forward(za, zt, scale, bias)[0]

    pairs.defvjp(forward, backward)
    return pairs


def _ring_shard(za, zt, scale, bias, *, kind: str, axes: tuple[str, ...], size: int, num_rows: int) -> jax.Array:
    # The ring's custom_vjp returns per-device gradients for scale and bias; making them device-varying here
    # lets shard_map's transpose sum those gradients over the devices.
    varying = partial(lax.pcast, axis_name=axes, to="varying")
    pairs = _ring_pairs(kind, axes, size)(za, zt, varying(scale), varying(bias))
    return lax.psum(_local_sum(kind, pairs, za, zt, scale, bias), axes) / (DIAGONAL_WEIGHT[kind] * num_rows)
