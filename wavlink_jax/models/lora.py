"""LoRA adapters for the towers' Linear projections, kept apart from the base weights.

An adapted kernel W (in, out) gets two small matrices A (in, r) and B (r, out); the model runs with
W + (alpha / r) · A @ B. The adapters live in their own parameter tree next to the model's (same paths, one
level up from `kernel`), so the base weights stay exactly as loaded and any checkpoint of the plain model
still loads; `merge` folds the adapters into the kernels (used in every forward pass and at export).
B starts at zero, so an adapted model starts as the base model.

The trees are nested dicts with string keys, as `wavlink_jax.train_step` keeps parameters.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from wavlink_jax.optim import flatten, matching, unflatten

Tree = dict


def targets(params: Tree, patterns: Sequence[str]) -> list[str]:
    """Paths of the 2-D kernels matched by `patterns` (e.g. `training_mode(...).lora`); sorted."""
    flat = flatten(params)
    hits = matching(list(flat), patterns, "LoRA target patterns")
    not_kernels = sorted(path for path in hits if not path.endswith("/kernel") or jnp.ndim(flat[path]) != 2)
    if not_kernels:
        raise ValueError(f"LoRA adapts 2-D Linear kernels only; these matches are not: {not_kernels}")
    return sorted(hits)


def init(key: jax.Array, params: Tree, target_paths: Sequence[str], rank: int) -> Tree:
    """Adapters for each target kernel: A ~ N(0, 1/in) (fan-in scaled), B = 0; fp32 like the parameters."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    flat = flatten(params)
    adapters = {}
    for index, path in enumerate(target_paths):
        fan_in, fan_out = flat[path].shape
        module = path.removesuffix("/kernel")
        a_key = jax.random.fold_in(key, index)
        adapters[f"{module}/lora_a"] = jax.random.normal(a_key, (fan_in, rank), jnp.float32) / jnp.sqrt(fan_in)
        adapters[f"{module}/lora_b"] = jnp.zeros((rank, fan_out), jnp.float32)
    return unflatten(adapters)


def logical_axes(kernel_axes: Tree, adapters: Tree) -> Tree:
    """Logical axis names for the adapters: A = (kernel's input axis, None), B = (None, kernel's output axis)."""
    axes = flatten(kernel_axes)
    names = {}
    for path in flatten(adapters):
        module, which = path.rsplit("/", 1)
        kernel_in, kernel_out = axes[f"{module}/kernel"]
        names[path] = (kernel_in, None) if which == "lora_a" else (None, kernel_out)
    return unflatten(names)


def merge(params: Tree, adapters: Tree, scale: float) -> Tree:
    """Parameters with every adapted kernel replaced by W + scale · A @ B (A @ B in fp32)."""
    if not adapters:
        return params
    flat = flatten(params)
    pairs: dict[str, dict[str, Any]] = {}
    for path, value in flatten(adapters).items():
        module, which = path.rsplit("/", 1)
        pairs.setdefault(module, {})[which] = value
    for module, pair in pairs.items():
        kernel = flat[f"{module}/kernel"]
        delta = jnp.matmul(pair["lora_a"], pair["lora_b"], precision=jax.lax.Precision.HIGHEST)
        flat[f"{module}/kernel"] = (kernel + scale * delta).astype(kernel.dtype)
    return unflatten(flat)


def scale(rank: int, alpha: float) -> float:
    """The usual LoRA scaling alpha / r."""
    return float(alpha) / float(rank)
