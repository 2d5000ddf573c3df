"""Device mesh, logical-axis rules and multi-host start-up for training.

The towers name every parameter axis logically (`embed`, `heads`, `mlp`, `vocab`, ...; see
`wavlink_jax.models.layers`). A config maps those names to mesh axes (`sharding_rules`), so the same model
runs data-parallel, FSDP or tensor-parallel by editing two config entries:

    config.mesh = {"data": -1, "fsdp": 1, "tensor": 1}     # -1: whatever devices are left
    config.sharding_rules = [("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor")]

The batch is split over the batch axes (`data` and `fsdp`); parameters are split by their rules.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import logging
import math
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple, NoReturn, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
# Its client's key-value store; no public API has it (orbax uses it too).
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils
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

# A launch by hand or by a script (no cluster manager): jax reads the coordinator's address itself; the number of
# processes and this process's index come from the two variables after it (jax.distributed has none for them).
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    if name not in environ:
        return None
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={environ[name]!r} is not an integer") from None


def is_multiprocess_launch(environ: Mapping[str, str]) -> bool:
    """Whether the environment describes a job of several processes: a coordinator address (set by hand or by
    a multi-slice TPU job), several SLURM tasks, several Open MPI ranks, or several TPU worker host names."""
    if any(environ.get(name) for name in (COORDINATOR_ENV, "MEGASCALE_COORDINATOR_ADDRESS")):
        return True
    counts = (_env_int(environ, name) for name in (NUM_PROCESSES_ENV, "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
    return any(count is not None and count > 1 for count in counts) or "," in environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(mode: str | bool, environ: Mapping[str, str] | None = None) -> None:
    """Join the multi-host job before any other jax call.

    `mode`: True = always call `jax.distributed.initialize` (TPU pods, SLURM, Open MPI: jax finds its peers
    from the environment); False = single process; "auto" = only when `is_multiprocess_launch` (the strings
    "true" / "false" of a `--config.distributed=...` override count as the booleans). Without a
    cluster manager, set `JAX_COORDINATOR_ADDRESS=host:port` (process 0's host, a free port),
    `JAX_NUM_PROCESSES=N` and `JAX_PROCESS_ID=i` (0 … N-1) on every process. Nothing happens when this process
    has already joined (a launcher script called `jax.distributed.initialize` itself). Cross-process
    collectives on CPU use gloo (jax's default, `jax_cpu_collectives_implementation`).
    """
    environ = os.environ if environ is None else environ
    if isinstance(mode, str):  # the command line can only set this string-valued key to strings
        mode = {"true": True, "false": False}.get(mode.lower(), mode)
    if mode == "auto":
        mode = is_multiprocess_launch(environ)
    elif not isinstance(mode, bool):
        raise ValueError(f"config.distributed must be true, false or 'auto', got {mode!r}")
    if not mode or jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(
            num_processes=_env_int(environ, NUM_PROCESSES_ENV), process_id=_env_int(environ, PROCESS_ID_ENV)
        )
    except ValueError as err:  # jax names the missing piece but not how to provide it
        raise ValueError(
            f"jax.distributed.initialize: {err} Without a cluster manager (SLURM, Open MPI, Cloud TPU) set "
            f"{COORDINATOR_ENV}=host:port, {NUM_PROCESSES_ENV}=N and {PROCESS_ID_ENV}=i (0 … N-1) on every process."
        ) from err
    # Connect the processes' collectives now, while every process stands here: gloo (CPU) gives a peer only 30 s
    # to reach a collective, and start-up work of different lengths (data, compilation) can exceed that.
    multihost_utils.sync_global_devices("wavlink_jax: joined")
    _watch_peers()
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


# A process that fails on its own (its share of the data, its disk, its mount) would leave the others waiting in a
# collective for the runtime's heartbeat timeout (100 s, then an abort with a core dump, and no word of why), and
# itself in jax's shutdown barrier (300 s). Instead it posts its error under STOP_KEY in the job's key-value store,
# where every other process's watcher thread reads it at once, prints it and ends that process too.
STOP_KEY = "wavlink_jax/stop"
_POLL_MS = 1000  # how long one read of STOP_KEY waits; a watcher ends at most this long after `close`
_READ_WAIT_MS = 10_000  # how long a stopping process waits for the others to read the error before it exits
_LEAVE_GRACE_S = 0.5  # how long process 0 outlives the last process that said it is leaving
_watcher: "_PeerWatcher | None" = None


def _wait_for(client: Any, keys: Sequence[str], deadline: float) -> None:
    """Block until every key of the job's key-value store is set, or until `deadline` (time.monotonic)."""
    for key in keys:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        if remaining_ms <= 0:
            return
        try:
            client.blocking_key_value_get(key, remaining_ms)
        except jax.errors.JaxRuntimeError:
            return  # that process is gone or stuck: the runtime's heartbeat timeout ends it


def _exit_after_the_others_read(client: Any, index: int, origin: int) -> NoReturn:
    """Exit (status 1) once every other process has read the error that process `origin` posted, or after
    `_READ_WAIT_MS`; waiting costs the others nothing (each reads the error within `_POLL_MS`). Process 0 serves
    the key-value store and leaves last: a process whose store vanishes while it waits aborts (SIGABRT and a core
    dump instead of exit status 1), so the others say they are leaving and process 0 exits after them. Not
    sys.exit: jax's shutdown barrier at exit would wait for the processes that are stopping."""
    deadline = time.monotonic() + _READ_WAIT_MS / 1000
    others = [other for other in range(jax.process_count()) if other != index]
    _wait_for(client, [f"{STOP_KEY}/read/{other}" for other in others if other != origin], deadline)
    if index == 0:
        _wait_for(client, [f"{STOP_KEY}/left/{other}" for other in others], deadline)
        time.sleep(_LEAVE_GRACE_S)
    else:
        try:
            client.key_value_set(f"{STOP_KEY}/left/{index}", "")
        except jax.errors.JaxRuntimeError:
            pass  # the store is gone: process 0 has left already
    os._exit(1)


class _PeerWatcher:
    """A daemon thread that ends this process (status 1) when another process of the job posts its error."""

    def __init__(self, client: Any, process_index: int):
        self._client, self._index = client, process_index
        self.stopping = False  # set by `stop_job`: this process ends itself
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="wavlink_jax peer watcher", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._closed.is_set():
            try:
                posted = self._client.blocking_key_value_get(STOP_KEY, _POLL_MS)
            except jax.errors.JaxRuntimeError as err:
                if "DEADLINE_EXCEEDED" in str(err):
                    continue  # nothing posted yet
                return  # the client is shutting down
            origin, message = posted.split("\n", 1)
            if int(origin) == self._index:
                return  # this process posted it (`stop_job`)
            sys.stderr.write(
                f"error: process {origin} of the job failed, so process {self._index} stops too. "
                f"Its error:\n{message}\n"
            )
            sys.stderr.flush()
            self._client.key_value_set(f"{STOP_KEY}/read/{self._index}", "")
            if self.stopping:
                return  # failing itself at the same time: `stop_job` exits
            _exit_after_the_others_read(self._client, self._index, int(origin))

    def close(self) -> None:
        self._closed.set()
        self._thread.join()


def _watch_peers() -> None:
    global _watcher
    if _watcher is None and jax.process_count() > 1:
        _watcher = _PeerWatcher(jax_distributed.global_state.client, jax.process_index())
        atexit.register(_watcher.close)  # before jax's own exit handler (registered earlier) shuts the client down


def has_peers() -> bool:
    """Whether this process runs in a job of several processes (joined by `initialize_distributed`)."""
    return _watcher is not None


def stop_job(message: str) -> NoReturn:
    """End this process with `message` on stderr and exit status 1; in a job of several processes, end all of
    them: the others print this process's `message` and exit at once instead of waiting in a collective."""
    if _watcher is None:
        sys.exit(message)
    _watcher.stopping = True
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()
    client, index = jax_distributed.global_state.client, jax.process_index()
    try:
        client.key_value_set(STOP_KEY, f"{index}\n{message[-8000:]}")
        origin = index
    except jax.errors.JaxRuntimeError:  # another process failed too and posted first: its error is spread
        try:
            origin = int(client.blocking_key_value_get(STOP_KEY, _POLL_MS).split("\n", 1)[0])
        except jax.errors.JaxRuntimeError:
            os._exit(1)  # the store is gone: process 0 has left already
    _exit_after_the_others_read(client, index, origin)


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


def axes_not_auto(mesh: Mesh, names: Sequence[str]) -> dict[str, str]:
    """{axis: its type's name} for the axes among `names` that `mesh` has and that are not AxisType.Auto (what the
    trainer and the loss's shard_map rely on; `jax.make_mesh` defaults to Explicit)."""
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    return {name: types[name].name for name in names if name in types and types[name] != jax.sharding.AxisType.Auto}


def check_mesh(mesh: Mesh) -> None:
    """Refuse a mesh the trainer cannot use, naming what it lacks: the batch shardings, the ring loss and the
    sharding rules name all of `MESH_AXES` (size 1 for one that is not used), and the step relies on the
    compiler propagating shardings (`AxisType.Auto`; `jax.make_mesh` defaults to Explicit). `create_mesh` builds
    such a mesh from the sizes alone."""
    shape = dict(mesh.shape)
    missing = [name for name in MESH_AXES if name not in shape]
    not_auto = axes_not_auto(mesh, MESH_AXES)
    if not missing and not not_auto:
        return
    problems = [f"lacks the axes {missing}"] if missing else []
    if not_auto:
        problems.append(f"has axes {list(not_auto)} of type {sorted(set(not_auto.values()))}, not Auto")
    sizes = shape if set(shape) <= set(MESH_AXES) else {name: "..." for name in MESH_AXES}
    raise ValueError(
        f"mesh {shape} {' and '.join(problems)}: the trainer needs the axes {list(MESH_AXES)} (size 1 for an unused "
        f"one), all of type AxisType.Auto; build it with wavlink_jax.sharding.create_mesh({sizes}) (missing axes get "
        "size 1)"
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the batch axes; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


# The mesh and logical-axis rules the towers' activations follow while a train step is traced (see
# `batch_split_activations`); None elsewhere (inference, tests of the modules), where nothing is constrained.
# The rules gain `_ROWS` → the batch axes, the logical name of an activation's first dimension.
_ROWS = "(activation rows)"
_ACTIVATIONS: contextvars.ContextVar[tuple[Mesh, dict[str, Any]] | None] = contextvars.ContextVar(
    "activations", default=None
)


@contextlib.contextmanager
def batch_split_activations(mesh: Mesh, rules: Mapping[str, Any]) -> Iterator[None]:
    """While tracing under this context, `split_batch` pins activations to rows over `mesh`'s batch axes and
    their named dimensions to the mesh axes `rules` (`rules_dict`) give those names.

    Why: XLA's partitioner otherwise follows the parameters' shardings into the activations. Under FSDP the text
    tower's token embedding is split along `embed` over `fsdp`, and the embedded tokens came out split along
    `embed` too: the tower then ran on the whole global batch on every device, all-reducing every layer's
    activations (base with `fsdp = 8` at batch 256, compiled for 8 H100s: 119 all-reduces of up to `[256, 80,
    2048]`, 3 GB per step and device). With the rows pinned XLA gathers the parameters and reduce-scatters the
    gradients instead (0.3 GB), which is what FSDP means, and each device's memory fell from 8.5 to 5.1 GiB."""
    token = _ACTIVATIONS.set((mesh, {**rules, _ROWS: BATCH_AXES}))
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def split_batch(x: jax.Array, names: Sequence[str | None] = ()) -> jax.Array:
    """`x` with its rows split over the batch axes of the mesh set by `batch_split_activations`, the dimensions
    after the first named by `names` (logical names, as on parameters; None or left out: whole) split as the
    rules map them, by `logical_to_spec` as for parameters (a mesh axis the rows already use, or one that does
    not divide a dimension, leaves it whole). Unchanged outside that context."""
    context = _ACTIVATIONS.get()
    if context is None:
        return x
    mesh, rules = context
    logical = (_ROWS, *names) + (None,) * (x.ndim - 1 - len(names))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical, x.shape, rules, mesh)))


def look_up(table: jax.Array, ids: jax.Array, names: tuple[str | None, str | None]) -> jax.Array:
    """`table[ids]`: the rows of an embedding table (logical axes `names`, e.g. `("vocab", "embed")`) for a batch of
    ids, as `split_batch` splits activations (unchanged outside `batch_split_activations`).

    The rows are looked up where the table's columns are: each device takes its columns of the rows its group of
    the column axes needs (gathering those ids: a few KB), and one all-to-all in that group gives each device its
    own rows whole. Left to itself on a data × fsdp mesh, the partitioner all-gathered the looked-up
    `[batch, length, width]` rows of the whole global batch onto every device, forward and backward (on
    data = 1 it found this way itself)."""
    rows = jnp.take(table, ids, axis=0)
    context = _ACTIVATIONS.get()
    if context is None:
        return rows
    mesh, rules = context
    columns = logical_to_spec(names, table.shape, rules, mesh)[1]
    column_axes = set(columns if isinstance(columns, tuple) else (columns,))
    group_rows = tuple(axis for axis in BATCH_AXES if axis not in column_axes) or None
    spec = PartitionSpec(group_rows, *(None,) * (rows.ndim - 2), columns)
    return split_batch(jax.lax.with_sharding_constraint(rows, NamedSharding(mesh, spec)))


def per_device_rows(fn: Callable[[jax.Array], jax.Array], mesh: Mesh) -> Callable[[jax.Array], jax.Array]:
    """`fn`, whose rows are independent, run by each device on its own rows of a batch-sharded array.

    For ops that XLA's partitioner does not split along the batch: it replicates the operand of an FFT, so the
    log-mel of a sharded batch all-gathered the STFT frames of the whole global batch onto every device (30 MB
    a step for the quickstart's batch, over the network between hosts) and transformed all of them there.
    """
    rows = PartitionSpec(BATCH_AXES)
    return jax.shard_map(fn, mesh=mesh, in_specs=rows, out_specs=rows)


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of `mesh`: the step counter, the optimizer's scalars, the step's metrics,
    and the inference model's weights."""
    return NamedSharding(mesh, PartitionSpec())


SMALL_BLOCK = 1 << 16  # elements: `tree_norm` reduces bigger blocks to their row sums first


def tree_norm(shardings: Any, mesh: Mesh) -> Callable[[Any], jax.Array]:
    """The L2 norm of a tree of arrays laid out as `shardings` (one NamedSharding on `mesh` per leaf): each device
    sums the squares of its own blocks, each weighted by one over the number of devices holding a copy of it, and
    one all-reduce adds the devices' sums.

    Why: `optax.tree.norm` makes each leaf's sum of squares a reduction over the whole mesh; under FSDP XLA then
    all-reduces the leaves' partial sums in combined buffers and slices them apart again, one launch per leaf
    (base under `fsdp = 8` compiled for 8 H100s: 547 slice launches a step with optax's norm, 102 with this)."""
    specs = jax.tree.map(lambda s: s.spec, shardings)
    copies = jax.tree.map(
        lambda s: mesh.size // math.prod(mesh.shape[a] for entry in s.spec for a in mesh_axes(entry)), shardings
    )

    def device_sum(tree: Any) -> jax.Array:
        leaves = zip(jax.tree.leaves(tree), jax.tree.leaves(copies), strict=True)
        squares = [jnp.square(x.astype(jnp.float32)) / n for x, n in leaves]
        # One reduction per leaf would be two launches for a big one (XLA splits it: rows, then their sums) and
        # one for a small one, ~400 kernels for base that move almost no bytes: instead each big block is reduced
        # to its row sums, and the row sums and the small blocks are added up in one last reduction.
        # The barrier keeps XLA from splitting the sum of the concatenation back into one reduction per part
        # (base compiled for an H200: 2011 launches a step with one reduction per leaf, 1713 with this).
        parts = [block.sum(axis=-1) if block.ndim > 1 and block.size > SMALL_BLOCK else block for block in squares]
        total = jnp.float32(0)
        if parts:
            total = jnp.sum(jax.lax.optimization_barrier(jnp.concatenate([part.ravel() for part in parts])))
        return jax.lax.psum(total, mesh.axis_names)

    # check_vma=False: the sum adds blocks that vary over different axes (or none), and each is already weighted
    # by its copies, so the all-reduce must add every device's sum as it is.
    summed = jax.shard_map(device_sum, mesh=mesh, in_specs=(specs,), out_specs=PartitionSpec(), check_vma=False)
    return lambda tree: jnp.sqrt(summed(tree))


def mesh_axes(entry: str | Sequence[str] | None) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry or sharding rule target: None, one axis name, or several."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def batch_divisor(mesh: Mesh) -> int:
    """The global batch (and each accumulation micro-batch) must be a multiple of this."""
    return int(np.prod([mesh.shape[name] for name in BATCH_AXES]))


def process_batch_share(mesh: Mesh, batch_axes: str | Sequence[str] = BATCH_AXES) -> tuple[int, int]:
    """`(index, count)`: this process's devices hold rows `[index·B/count, (index+1)·B/count)` of every global
    batch of B rows split over `batch_axes`; each process reads just those rows.

    On the usual mesh the batch axes span the processes in order and the share is `(process_index,
    process_count)`; when they span fewer (e.g. `tensor` across hosts), processes with the same index need,
    and read, the same rows. A mesh that gives one process rows that are not one block is an error.
    """
    axes = mesh_axes(batch_axes)
    shards = int(np.prod([mesh.shape[name] for name in axes]))
    rows = NamedSharding(mesh, PartitionSpec(axes)).addressable_devices_indices_map((shards,))
    held = sorted({index[0].indices(shards)[0] for index in rows.values()})
    if held != list(range(held[0], held[0] + len(held))) or held[0] % len(held):
        raise ValueError(
            f"mesh {dict(mesh.shape)}: process {jax.process_index()} holds batch shards {held} of {shards}, not one "
            "aligned block; order the devices so that each process holds consecutive positions on the batch axes"
        )
    return held[0] // len(held), shards // len(held)


class Unsharded(NamedTuple):
    """An array dimension whose sharding rule names mesh axes (of size > 1) that do not divide its size: the array
    is kept whole along it, i.e. replicated over `mesh_axes`, on every device of those axes."""

    path: str
    shape: tuple[int, ...]
    dim: int
    logical: str
    mesh_axes: tuple[str, ...]


def logical_to_spec(
    logical: Sequence[str | None],
    shape: Sequence[int],
    rules: Mapping[str, Any],
    mesh: Mesh,
    *,
    name: str = "",
    unsharded: list[Unsharded] | None = None,
) -> PartitionSpec:
    """Logical axis names of one array → its PartitionSpec on `mesh`.

    A dimension is left replicated when its rule says None, when its mesh axes have size 1, when the mesh axis
    is already used by an earlier dimension, or when the dimension is not divisible by the mesh axes' size
    (e.g. a 51865-token vocabulary over 8 devices). The last case costs memory the config asked to save: it is
    appended to `unsharded` (when given) unless a later dimension takes those mesh axes.
    """
    if len(logical) != len(shape):
        raise ValueError(f"{name}: {len(logical)} logical axis names {tuple(logical)} for shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[Any] = []
    not_divided: list[tuple[int, str, tuple[str, ...]]] = []
    for dim, (axis_name, size) in enumerate(zip(logical, shape)):
        if axis_name is None:
            spec.append(None)
            continue
        if axis_name not in rules:
            raise ValueError(
                f"{name}: logical axis {axis_name!r} has no sharding rule; add "
                f"({axis_name!r}, <mesh axis or None>) to config.sharding_rules (known: {sorted(rules)})"
            )
        targets = tuple(a for a in mesh_axes(rules[axis_name]) if mesh.shape[a] > 1 and a not in used)
        ways = int(np.prod([mesh.shape[a] for a in targets]))
        if not targets or size % ways:
            if targets:
                not_divided.append((dim, axis_name, targets))
            spec.append(None)
            continue
        used.update(targets)
        spec.append(targets[0] if len(targets) == 1 else targets)
    if unsharded is not None:
        for dim, axis_name, targets in not_divided:
            lost = tuple(a for a in targets if a not in used)
            if lost:
                unsharded.append(Unsharded(name, tuple(shape), dim, axis_name, lost))
    return PartitionSpec(*spec)


def dividing_sizes(unsharded: Sequence[Unsharded], mesh: Mesh) -> dict[tuple[str, ...], list[int]]:
    """Per group of mesh axes in `unsharded`: the sizes (> 1, dividing the mesh's device count) of those axes'
    product that would divide every dimension of the group, smallest first (empty: none would)."""
    groups: dict[tuple[str, ...], int] = {}
    for entry in unsharded:
        groups[entry.mesh_axes] = math.gcd(groups.get(entry.mesh_axes, 0), entry.shape[entry.dim])
    return {
        axes: [size for size in range(2, mesh.size + 1) if common % size == 0 and mesh.size % size == 0]
        for axes, common in groups.items()
    }


def rules_dict(rules: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """config.sharding_rules (list of (logical, mesh axis | list of mesh axes | None)) → dict, validated."""
    result: dict[str, Any] = {}
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"config.sharding_rules: each rule is (logical_name, mesh_axes), got {rule!r}")
        logical, target = rule
        if str(logical) in result:  # the last rule won, silently (e.g. FSDP turned off by a second `embed` rule)
            raise ValueError(f"config.sharding_rules: {logical!r} has more than one rule; keep one")
        bad = [t for t in mesh_axes(target) if t not in MESH_AXES]
        if bad:
            raise ValueError(f"config.sharding_rules: {logical!r} → unknown mesh axes {bad}; use {list(MESH_AXES)}")
        result[str(logical)] = target if target is None or isinstance(target, str) else tuple(target)
    return result


def logical_axes_tree(state: nnx.State) -> dict:
    """Nested dict (string keys, as `wavlink_jax.train_step.to_tree`) of each parameter's logical names."""
    flat = {}
    for path, variable in nnx.to_flat_state(state):
        names = variable.get_metadata().get("out_sharding") or (None,) * len(variable.get_value().shape)
        flat[tuple(str(p) for p in path)] = tuple(names)
    return traverse_util.unflatten_dict(flat)


def tree_shardings(
    logical: Any, shapes: Any, rules: Mapping[str, Any], mesh: Mesh, unsharded: list[Unsharded] | None = None
) -> Any:
    """NamedShardings for a tree of arrays from a same-structured tree of logical-name tuples; the dimensions
    that their rules' mesh axes do not divide are appended to `unsharded` (see `logical_to_spec`), named by their
    path in the tree ("a/b/kernel")."""

    def one(path, names, shaped):
        key = "/".join(str(getattr(p, "key", p)) for p in path)
        return NamedSharding(mesh, logical_to_spec(names, shaped.shape, rules, mesh, name=key, unsharded=unsharded))

    def is_names(x: Any) -> bool:
        return isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)

    return jax.tree_util.tree_map_with_path(one, logical, shapes, is_leaf=is_names)
