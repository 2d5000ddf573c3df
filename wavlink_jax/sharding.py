"""Device mesh, logical-axis rules and multi-host start-up for training.

The towers name every parameter axis logically (`embed`, `heads`, `mlp`, `vocab`, ...; see
`wavlink_jax.models.layers`). A config maps those names to mesh axes (`sharding_rules`), so the same model
runs data-parallel, FSDP or tensor-parallel by editing two config entries:

    config.mesh = {"data": -1, "fsdp": 1, "tensor": 1}     # -1: whatever devices are left
    config.sharding_rules = [("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor")]

The batch is split over the batch axes (`data` and `fsdp`); parameters are split by their rules.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# The configs' default rules. A logical axis name that appears in a parameter but in no rule is an error (a new
# name needs a conscious decision); a rule to None keeps that axis replicated.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)

# Environment variables that mark a multi-process launch jax.distributed.initialize can read.
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def initialize_distributed(mode: str | bool) -> None:
    """Join the multi-host job before any other jax call.

    `mode`: True = always call `jax.distributed.initialize()` (TPU pods, SLURM, Open MPI: it finds its peers
    from the environment); False = single process; "auto" = only when a coordinator address is set, the
    launch is a SLURM job with several tasks, or TPU worker host names list several hosts.
    """
    if mode == "auto":
        slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1"))
        tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
        mode = any(name in os.environ for name in _CLUSTER_ENV) or slurm_tasks > 1 or "," in tpu_hosts
    elif not isinstance(mode, bool):
        raise ValueError(f"config.distributed must be true, false or 'auto', got {mode!r}")
    if mode:
        jax.distributed.initialize()
        logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def create_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with axes in the order `data, fsdp, tensor`.

    `axes` maps each axis to its size; one size may be -1 (the remaining devices). Missing axes get size 1.
    Axes are `AxisType.Auto`: the compiler propagates shardings (jax.make_mesh defaults to Explicit).
    """
    unknown = sorted(set(axes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"config.mesh: unknown axes {unknown}; expected a subset of {list(MESH_AXES)}")
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(axes.get(name, 1)) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(axes)}")
    if any(size == 0 or size < -1 for size in sizes):
        raise ValueError(f"config.mesh: sizes must be positive or -1, got {dict(axes)}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"config.mesh {dict(axes)}: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"config.mesh {dict(axes)} needs {int(np.prod(sizes))} devices but {len(devices)} are available"
        )
    return jax.make_mesh(
        tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the batch axes; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_divisor(mesh: Mesh) -> int:
    """The global batch (and each accumulation micro-batch) must be a multiple of this."""
    return int(np.prod([mesh.shape[name] for name in BATCH_AXES]))


def logical_to_spec(
    logical: Sequence[str | None],
    shape: Sequence[int],
    rules: Mapping[str, Any],
    mesh: Mesh,
    *,
    name: str = "",
) -> PartitionSpec:
    """Logical axis names of one array → its PartitionSpec on `mesh`.

    A dimension is left replicated when its rule says None, when its mesh axes have size 1, when the mesh axis
    is already used by an earlier dimension, or when the dimension is not divisible by the mesh axes' size
    (e.g. a 51865-token vocabulary over 8 devices); the last case is logged once per array.
    """
    if len(logical) != len(shape):
        raise ValueError(f"{name}: {len(logical)} logical axis names {tuple(logical)} for shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[Any] = []
    for axis_name, size in zip(logical, shape):
        if axis_name is None:
            spec.append(None)
            continue
        if axis_name not in rules:
            raise ValueError(
                f"{name}: logical axis {axis_name!r} has no sharding rule; add "
                f"({axis_name!r}, <mesh axis or None>) to config.sharding_rules (known: {sorted(rules)})"
            )
        target = rules[axis_name]
        mesh_axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1 and a not in used)
        ways = int(np.prod([mesh.shape[a] for a in mesh_axes]))
        if not mesh_axes or size % ways:
            if mesh_axes:
                logging.info("%s: dimension %d (%s) not divisible by %s; replicated", name, size, axis_name, mesh_axes)
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def rules_dict(rules: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """config.sharding_rules (list of (logical, mesh axis | list of mesh axes | None)) → dict, validated."""
    result: dict[str, Any] = {}
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"config.sharding_rules: each rule is (logical_name, mesh_axes), got {rule!r}")
        logical, target = rule
        targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        bad = [t for t in targets if t not in MESH_AXES]
        if bad:
            raise ValueError(f"config.sharding_rules: {logical!r} → unknown mesh axes {bad}; use {list(MESH_AXES)}")
        result[str(logical)] = target if target is None or isinstance(target, str) else tuple(target)
    return result


def logical_axes_tree(state: nnx.State) -> dict:
    """Nested dict (string keys, as `wavlink_jax.train_step.params_tree`) of each parameter's logical names."""
    flat = {}
    for path, variable in nnx.to_flat_state(state):
        names = variable.get_metadata().get("out_sharding") or (None,) * len(variable.get_value().shape)
        flat[tuple(str(p) for p in path)] = tuple(names)
    return traverse_util.unflatten_dict(flat)


def tree_shardings(logical: Any, shapes: Any, rules: Mapping[str, Any], mesh: Mesh) -> Any:
    """NamedShardings for a tree of arrays from a same-structured tree of logical-name tuples."""

    def one(path, names, shaped):
        key = "/".join(str(getattr(p, "key", p)) for p in path)
        return NamedSharding(mesh, logical_to_spec(names, shaped.shape, rules, mesh, name=key))

    return jax.tree_util.tree_map_with_path(
        one, logical, shapes, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)
    )
