"""LoRA adapters for the towers' Linear projections, kept apart from the base weights.

An adapted kernel W (in, out) at `.../attn/query/kernel` gets two extra parameters beside it,
`.../attn/query/lora_a` (in, r) and `.../attn/query/lora_b` (r, out); the model runs with
W + (alpha / r) · A @ B. The NNX modules are not changed: the adapters live only in the trainer's parameter
tree, the base weights stay exactly as loaded (a converted tower or a stage-1 checkpoint loads as is), and
`merge` folds the adapters into the kernels (in every forward pass, and at export, which therefore sees a
plain model). B starts at zero, so an adapted model starts as the base model.

The trees are nested dicts with string keys, as `wavlink_jax.train_step` keeps parameters.
"""

from __future__ import annotations

from typing import Sequence

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


ADAPTER_NAMES = ("lora_a", "lora_b")


def is_adapter(path: str) -> bool:
    """Whether a flat parameter path (`.../attn/query/lora_a`) names a LoRA adapter rather than a model weight."""
    return path.rsplit("/", 1)[-1] in ADAPTER_NAMES


def merge(params: Tree, scale: float) -> Tree:
    """The plain model parameters: adapters removed, each adapted kernel replaced by W + scale · A @ B.

    `params` holds the model's parameters with adapters beside their kernels (as the train state keeps
    them); without adapters it is returned unchanged. A @ B is computed in fp32.
    """
    flat = flatten(params)
    adapters = {path: flat.pop(path) for path in [p for p in flat if is_adapter(p)]}
    if not adapters:
        return params
    for path in adapters:
        module, which = path.rsplit("/", 1)
        if which != "lora_a":
            continue
        kernel = flat[f"{module}/kernel"]
        delta = jnp.matmul(adapters[path], adapters[f"{module}/lora_b"], precision=jax.lax.Precision.HIGHEST)
        flat[f"{module}/kernel"] = (kernel + scale * delta).astype(kernel.dtype)
    return unflatten(flat)


def scale(rank: int, alpha: float) -> float:
    """The usual LoRA scaling alpha / r."""
    return float(alpha) / float(rank)
