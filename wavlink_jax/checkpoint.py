"""Training checkpoints (orbax): asynchronous saves, keep-last-K, exact resume, re-sharding, `init_from`.

`WORKDIR/checkpoints/<step>/` holds three items:
* `state`: the train state pytree (`step`, `params`, `opt_state`, `rng`), each array written by its own
  shards (no gather to one host), and restored onto whatever mesh the restoring run builds;
* `data`: the data iterator's position (grain's checkpoint handler; one file per process), so a resumed
  run sees exactly the batches the uninterrupted run would have seen;
* `config`: the config of the run that saved it (`config/config.json`, as WORKDIR/config.json), which the
  readers of a step (inference, export, evaluate, `init_from.workdir`) take: a run resumed with other settings
  (e.g. `lora.alpha`, the window, the tokenizer) rewrites WORKDIR/config.json, and the steps saved before it
  must still be read with their own.

Kill-safety comes from orbax's atomic commit: a step is written into a temporary directory and renamed to
`<step>` only once every item is complete, so a run killed at any moment (also in the middle of a save)
leaves either a finished checkpoint or a temporary directory that the next run deletes and ignores.

Every restore first compares the checkpoint's tree with the one the config builds and refuses a mismatch with
the full list of missing, unexpected and mis-shaped keys (`CheckpointError`), instead of orbax's first error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
# For `register_array_handler` (orbax exports neither): the array metadata store its default handler keeps, and
# the registry's `add`, which can skip the warning `register_type_handler` logs on replacing a handler.
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.serialization.type_handler_registry import GLOBAL_TYPE_HANDLER_REGISTRY

from wavlink_jax import train_step
from wavlink_jax.convert.common import CheckpointError, read_json
from wavlink_jax.data.pipeline import PositionUnreadable, WorkersMismatch
from wavlink_jax.models import lora
from wavlink_jax.optim import flatten, unflatten

CHECKPOINT_SUBDIR = "checkpoints"
STATE_ITEMS = ("step", "params", "buffers", "opt_state", "rng")  # the train state's items (see train_step)
CONFIG_ITEM, CONFIG_FILE = "config", "config.json"  # a step's config: checkpoints/<step>/config/config.json
GLOBAL_TOKEN = "audio/global_token"  # WavLink's new parameter: no pretrained checkpoint has it
# How tensorstore's errors (ValueErrors) start when a checkpoint's file is missing, cut short or garbled.
TENSORSTORE_READ_FAILURES = ("NOT_FOUND:", "OUT_OF_RANGE:", "DATA_LOSS:", "FAILED_PRECONDITION:")


def workdir_path(workdir: str | os.PathLike) -> str:
    """`workdir` as an absolute path (orbax refuses relative ones; `~` expanded, which the shell does not do in
    `--workdir=~/run`). A file is refused, and so are URLs (gs://…): config.json, metrics.jsonl and TensorBoard
    go through plain file I/O, which would write them to a local `gs:/…` folder."""
    workdir = os.fspath(workdir)
    if "://" in workdir:
        raise ValueError(
            f"workdir {workdir!r}: URLs are not supported; mount the bucket (e.g. with gcsfuse) and give the mounted "
            "path (on a multi-host run, one every host sees)"
        )
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"workdir {path} is a file; a workdir is a directory (new, or a run's)")
    return path


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    """`WORKDIR/checkpoints`, absolute."""
    return os.path.join(workdir_path(workdir), CHECKPOINT_SUBDIR)


def register_array_handler() -> None:
    """Make orbax save jax.Arrays without replica-parallel slicing when the job is one process (with several,
    orbax's default stands).

    Replica-parallel saving splits every array held by several replicas among them, each slicing its part on the
    device, so that several hosts write in parallel. In one process every replica is on the same host: it buys
    nothing and costs a slicing program per part (compiled at the first save) and a dispatch per slice. The tiny
    test model on 8 CPU devices: the first save's blocking part took 5.6 s with it and 0.15 s without, later ones
    1.1-1.6 s and 0.4-0.9 s (2-core CPU, 2026-11-28; BENCHMARKS.md, "Starting and checkpointing a run"). Orbax
    turns it off for GPUs itself, but only where JAX_PLATFORMS names them. The handler is otherwise orbax's
    default (array metadata kept; the files a step holds are the same), and goes into orbax's global registry,
    where orbax takes such options: every later orbax save of a jax.Array in this process uses it."""
    handler = ocp.type_handlers.ArrayHandler(
        use_replica_parallel=None if jax.process_count() > 1 else False,  # None: orbax's choice
        array_metadata_store=array_metadata_store.Store(),
    )
    GLOBAL_TYPE_HANDLER_REGISTRY.add(jax.Array, handler, override=True, ignore_warnings=True)


class Checkpoints:
    """The checkpoints of one workdir. `save` is asynchronous: the call returns once the arrays are copied off
    the devices, the write continues in the background; `wait` blocks until it is committed."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        keep: int,
        every: int,
        config: Mapping[str, Any] | None = None,
        async_save: bool = True,
    ):
        """`config` (the run's resolved config as JSON data) is saved with every step (the trainer's; tools
        that only read or write a state leave it out)."""
        if keep < 1 or every < 1:
            raise ValueError(f"keep_checkpoints ({keep}) and checkpoint_every_steps ({every}) must be ≥ 1")
        self.directory = checkpoint_dir(workdir)
        self.every = every
        self.config = config
        register_array_handler()  # here: the process count is known once jax.distributed is initialised
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data", CONFIG_ITEM),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                CONFIG_ITEM: ocp.JsonCheckpointHandler(filename=CONFIG_FILE),
            },
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                cleanup_tmp_directories=True,  # leftovers of a save that was killed
                enable_async_checkpointing=async_save,
                create=False,  # the first save makes it: a run refused at start-up leaves no empty checkpoints/
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, *, force: bool = False) -> bool:
        """Save if `step` is a multiple of `every` (or `force`); returns whether a save started.

        (The interval is decided here, not by orbax, whose first save of a process happens at any step.)
        """
        if step % self.every and not force:
            return False
        items = {"state": ocp.args.StandardSave(state), "data": grain.checkpoint.CheckpointSave(data_iterator)}
        if self.config is not None:
            items[CONFIG_ITEM] = ocp.args.JsonSave(self.config)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, abstract_state: Any, data_iterator: Any, step: int | None = None) -> Any:
        """The state of `step` (default: the latest), placed as `abstract_state`'s shardings say; the data
        iterator is moved to the saved position in place. A step that cannot be read (a file missing, cut short
        or garbled) is a CheckpointError naming it and the step to resume from once it is deleted; a data position
        saved with another `data.num_workers` (`pipeline.WorkersMismatch`) one naming the count to resume with."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        where = os.path.join(self.directory, str(step))
        steps = self.manager.all_steps()
        check_step(Path(where), ("state", "data"), steps, resuming=True)
        with damage_named(where, steps, resuming=True, any_of=METADATA_READ_FAILURES):
            saved = self.manager.item_metadata(step)["state"]
        check_compatible(saved.tree, abstract_state, source=where, workdir=os.path.dirname(self.directory))
        check_data_processes(os.path.join(where, "data"))
        count = jax.process_count()  # every process looks at all positions (a shared workdir)
        gone = [f"data/{name}" for name in (data_position_name(i, count) for i in range(count))
                if not os.path.exists(os.path.join(where, "data", name))]  # fmt: skip
        if gone:  # grain said "File ... does not exist." alone
            raise damaged_step_error(where, f"{', '.join(gone)} (a data position) is gone", steps, resuming=True)
        try:
            with damage_named(where, steps, resuming=True):
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=grain.checkpoint.CheckpointRestore(data_iterator),
                    ),
                )
        except WorkersMismatch as err:
            raise CheckpointError(
                f"{where}: the data position of step {step} was saved with num_workers={err.saved} (this run has "
                f"{err.current}); resume with --config.data.num_workers={err.saved}, or start a new workdir with "
                f"--config.init_from.workdir={os.path.dirname(self.directory)} to change it (parameters only; "
                "optimizer and step start afresh)"
            ) from err
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """Path → shape of every array leaf (orbax stores an empty optimizer state as None: skipped)."""
    return {path: tuple(leaf.shape) for path, leaf in flatten(_as_dict(tree)).items() if leaf is not None}


def _as_dict(tree: Any) -> Any:
    """Orbax metadata trees and train states as nested plain dicts keyed as orbax keys them (NamedTuples,
    e.g. optax states, by field name; lists and tuples by index)."""
    if hasattr(tree, "_asdict"):
        return _as_dict(tree._asdict())
    if isinstance(tree, Mapping):
        return {str(key): _as_dict(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return {str(index): _as_dict(value) for index, value in enumerate(tree)}
    return tree


def tree_mismatches(saved: Any, expected: Any) -> list[str]:
    """How a checkpoint's tree differs from `expected`: missing keys, unexpected keys, shape mismatches (one
    entry per kind, listing every key; empty when they fit)."""
    saved_shapes, expected_shapes = _shapes(saved), _shapes(expected)
    missing = sorted(set(expected_shapes) - set(saved_shapes))
    unexpected = sorted(set(saved_shapes) - set(expected_shapes))
    mismatched = sorted(
        f"{key}: checkpoint {saved_shapes[key]} vs model {expected_shapes[key]}"
        for key in set(saved_shapes) & set(expected_shapes)
        if saved_shapes[key] != expected_shapes[key]
    )
    return [
        f"{name} ({len(keys)}): {keys}"
        for name, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        if keys
    ]


def _without_optimizer(state: Any) -> dict:
    """The state without its optimizer state and without LoRA adapters: what is left when only what trains
    (optim.mode, optim.freeze, optim.towers) changed, a change of mode to or from "lora" included."""
    flat = flatten({key: value for key, value in _as_dict(state).items() if key != "opt_state"})
    return unflatten({path: value for path, value in flat.items() if not lora.is_adapter(path)})


def _chain_length(state: Any) -> int | None:
    """How many entries the optimizer's chain state has (None: no `opt_state`). Orbax refuses a restore into a
    chain of another length, and an entry without arrays (optax's EmptyState) is no leaf `tree_mismatches` sees."""
    chain = _as_dict(state).get("opt_state")
    return len(chain) if isinstance(chain, dict) else None


def check_compatible(saved: Any, expected: Any, *, source: str, workdir: str | None = None) -> None:
    """Refuse a checkpoint whose tree differs from `expected`: one error listing every differing key. Resuming
    (`workdir` given) where only the optimizer state differs, the error says so and gives the ways out."""
    problems = tree_mismatches(saved, expected)
    if (saved_chain := _chain_length(saved)) != (expected_chain := _chain_length(expected)):
        problems.append(  # orbax's words: "tree structures do not match ... pass `partial_restore=True`"
            f"opt_state has {saved_chain} entries in the checkpoint, {expected_chain} in this optimizer (e.g. one "
            "written before 2026-11-29 with optim.lr_rules holds a fifth, empty one)"
        )
    if not problems:
        return
    if workdir is not None and not tree_mismatches(_without_optimizer(saved), _without_optimizer(expected)):
        what = (
            "the model fits, its optimizer state does not: what trains or how changed (optim.mode, optim.freeze, "
            "optim.towers, the optimizer's chain). Resume with the settings it was saved with, or start a new "
            f"workdir with --config.init_from.workdir={workdir} (parameters only; optimizer and step start afresh)"
        )
    else:
        what = "the checkpoint does not fit the model of this config"
    raise CheckpointError(f"{source}: {what}; " + "; ".join(problems))


def data_position_name(process: int | str, count: int | str) -> str:
    """grain's file name for one process's data position in a step's `data/` (`"*"`s make its glob pattern)."""
    return f"process_{process}-of-{count}.json"


def check_data_processes(data_dir: str) -> None:
    """Refuse a data-iterator position saved by another number of processes (grain keeps one file per
    process, `data_position_name`): each host's position is in its own share of the data."""
    count = jax.process_count()
    files = Path(data_dir).glob(data_position_name("*", "*"))
    saved = sorted({int(path.stem.rsplit("-of-", 1)[1]) for path in files})
    if saved and count not in saved:
        raise CheckpointError(
            f"{data_dir}: the data iterator's position was saved by {saved[0]} processes, this run has {count}; "
            f"resume with {saved[0]} processes (the model state itself restores onto any mesh), or start a new "
            "workdir with config.init_from.workdir pointing at this one (parameters only; optimizer and step "
            "start afresh)"
        )


def check_step(step_dir: Path, items: tuple[str, ...], steps: list[int], *, resuming: bool) -> None:
    """Refuse (`damaged_step_error`) a `step_dir` that visibly is not a complete checkpoint of `items`: an empty
    directory, a missing item, a `state/_METADATA` that is not JSON (cut short). Orbax's own errors for these
    name neither the step nor what to do."""
    if not any(step_dir.iterdir()):
        problem = "the directory is empty"
    elif missing := [f"{item}/" for item in items if not (step_dir / item).is_dir()]:
        problem = f"it has no {' and no '.join(missing)}"
    else:
        try:
            json.loads((step_dir / "state" / "_METADATA").read_text())
            return
        except (OSError, ValueError) as err:
            problem = f"state/_METADATA cannot be read ({type(err).__name__}: {err})"
    raise damaged_step_error(step_dir, problem, steps, resuming=resuming)


def read_failure(err: BaseException) -> str | None:
    """What in `err`'s chain says a checkpoint file could not be read (None: nothing does): a tensorstore
    ValueError starting with one of `TENSORSTORE_READ_FAILURES` (a file missing, cut short or garbled; orbax wraps
    it in its own `Exception`), a `json.JSONDecodeError` (e.g. the data iterator's position cut short), or a data
    position of another layout (`PositionUnreadable`). Follows the chain Python's traceback shows (`__cause__`,
    else `__context__`). Any other error, e.g. a restore template that does not fit, is not damage."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (json.JSONDecodeError, PositionUnreadable)):
            return f"{type(err).__name__}: {err}"
        if isinstance(err, ValueError) and str(err).startswith(TENSORSTORE_READ_FAILURES):
            return str(err)
        err = err.__cause__ if err.__cause__ is not None else (None if err.__suppress_context__ else err.__context__)
    return None


# What orbax raises when a step's metadata cannot be read: every such error is damage (nothing else is checked yet).
METADATA_READ_FAILURES = (KeyError, ValueError, OSError)


@contextlib.contextmanager
def damage_named(
    step_dir: str | os.PathLike, steps: list[int], *, resuming: bool, any_of: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """Raise an error of the block that is one of `any_of`, or that `read_failure` finds to be a damaged file, as
    `damaged_step_error`'s error (naming the step and the way out) instead of orbax's traceback; any other error
    as it is."""
    try:
        yield
    except Exception as err:
        failure = str(err) if isinstance(err, any_of) else read_failure(err)
        if failure is None:
            raise
        raise damaged_step_error(step_dir, f"orbax cannot read it ({failure})", steps, resuming=resuming) from err


def damaged_step_error(
    step_dir: str | os.PathLike, problem: str, steps: list[int], *, resuming: bool
) -> CheckpointError:
    """The error for a step directory that cannot be read: what is wrong, the other steps, the way out (nothing
    falls back to another step by itself). The trainer (`resuming`) always takes the latest step, so a damaged
    one has to go; readers (inference, export, evaluate) can be given another step."""
    step = int(Path(step_dir).name)
    others = [other for other in steps if other != step]
    if not others:
        way_out = "no other checkpoint is in this workdir" + (": delete it to start the run afresh" if resuming else "")
    elif resuming:
        way_out = f"other steps: {others}; delete {step_dir} to resume from step {others[-1]}"
    else:
        way_out = (
            f"other steps: {others}; read one of them (e.g. step={others[-1]}, or --step {others[-1]} on the "
            f"command line), or delete {step_dir}"
        )
    return CheckpointError(f"{step_dir}: checkpoint step {step} is damaged: {problem}; {way_out}")


def check_not_exported(workdir: Path, config: Any) -> None:
    """Refuse an exported model directory (`config`: its config.json) given where a training workdir is meant:
    to read a checkpoint from, or to train into (which would overwrite the export's config.json)."""
    from wavlink_jax.export import MODEL_TYPE as EXPORTED_MODEL_TYPE

    if isinstance(config, dict) and config.get("model_type") == EXPORTED_MODEL_TYPE:
        raise CheckpointError(
            f"{workdir}: an exported model directory (written by `python -m wavlink_jax.export`), not a training "
            "workdir. It needs no export: transformers loads it (AutoModel.from_pretrained(..., "
            "trust_remote_code=True)), and wavlink_jax.inference.load, evaluate and embed read it as it is. To "
            "export again, or to start training from it, give the training workdir it was exported from; to train, "
            "give a new workdir"
        )


def step_config_file(workdir: str | os.PathLike, step: int) -> Path:
    """The config a step is read with: its own (`checkpoints/<step>/config/config.json`), or WORKDIR/config.json
    for a step saved before steps kept theirs (no `config/` folder)."""
    folder = Path(checkpoint_dir(workdir)) / str(step) / CONFIG_ITEM
    return folder / CONFIG_FILE if folder.is_dir() else Path(workdir_path(workdir)) / "config.json"


def read_workdir_state(
    workdir: str | os.PathLike, step: int | None = None, items: tuple[str, ...] = ("params", "buffers")
) -> tuple[dict, dict, int]:
    """`items` of a workdir's checkpoint at `step` (default: the latest) as host numpy arrays, the config it was
    saved with (WORKDIR/config.json for a step saved before steps kept theirs), and the step read.

    `items` are names of the train state, `STATE_ITEMS`: "step" and "rng" (arrays), "params" and "buffers"
    (nested dicts, as `train_step` keeps them), "opt_state" (as orbax stores optax's chain state: a list with one
    entry per transformation, a dict of its state's fields, e.g. "count", "mu", "nu", or None for a stateless
    one); another name is a ValueError. An item the state does not hold (e.g. `buffers` of a model without any)
    comes back `{}`.

    For the exporter, `wavlink_jax.inference` and `init_from.workdir`, which need the parameters and fixed tables
    without a mesh, and for inspecting a run (its step, optimizer moments).
    """
    unknown = [name for name in items if name not in STATE_ITEMS]
    if unknown:
        raise ValueError(f"read_workdir_state: items {unknown} are not in a train state; it holds {list(STATE_ITEMS)}")
    workdir = Path(workdir_path(workdir))
    config_file = workdir / "config.json"
    if not workdir.is_dir():
        raise CheckpointError(f"{workdir}: no such directory; expected a training workdir")
    if not config_file.exists():
        raise CheckpointError(f"{workdir}: no config.json; expected a training workdir")
    config = read_json(config_file)
    check_not_exported(workdir, config)
    directory = checkpoint_dir(workdir)
    steps = sorted(int(p.name) for p in Path(directory).glob("*") if p.name.isdigit() and p.is_dir())
    if not steps:
        raise CheckpointError(f"{directory}: no finished checkpoint in this workdir")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"{directory}: no finished checkpoint of step {step}; steps available: {steps}")
    step_dir = Path(directory) / str(step)
    check_step(step_dir, ("state",), steps, resuming=False)
    step_config = step_config_file(workdir, step)
    if step_config != config_file:
        if not step_config.exists():  # never read with W/config.json instead: that may be a later run's
            raise damaged_step_error(step_dir, f"{CONFIG_ITEM}/{CONFIG_FILE} is gone", steps, resuming=False)
        try:
            config = read_json(step_config)
        except CheckpointError as err:
            raise damaged_step_error(step_dir, str(err), steps, resuming=False) from err
    # The step directory, read with the item layout `Checkpoints` writes: orbax keeps the step's metadata
    # (_CHECKPOINT_METADATA) there, so reading `state/` alone made orbax warn that it does not exist (and an item
    # without its handler, that it cannot be restored).
    checkpointer = ocp.Checkpointer(
        ocp.CompositeCheckpointHandler(
            state=ocp.PyTreeCheckpointHandler(),
            data=grain.checkpoint.CheckpointHandler(),
            **{CONFIG_ITEM: ocp.JsonCheckpointHandler(filename=CONFIG_FILE)},
        )
    )
    with damage_named(step_dir, steps, resuming=False, any_of=METADATA_READ_FAILURES):
        saved = checkpointer.metadata(step_dir).item_metadata.get("state")
    # The tree as orbax stored it (optax's chain state is a list there; `_as_dict` would key it by index, which
    # orbax refuses to restore into).
    metadata = saved.tree if saved is not None else {}
    if "params" not in metadata:
        raise CheckpointError(f"{step_dir / 'state'}: not a train state (no 'params')")
    item = {name: metadata[name] for name in items if metadata.get(name)}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    with damage_named(step_dir, steps, resuming=False):
        restored = checkpointer.restore(
            step_dir,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
            ),
        )["state"]
    logging.info("read %s of step %d from %s", "/".join(items), step, step_dir / "state")
    return {name: restored.get(name, {}) for name in items}, config, step


def merged_params(params: dict, config: Mapping[str, Any], *, config_file: Path) -> dict:
    """A checkpoint's parameters with its LoRA adapters merged at the scale of `config` (the one it was saved
    with, read from `config_file`); without adapters, `params` as they are. Adapters whose config gives no
    `lora.rank`/`lora.alpha` are refused: a guessed scale would be another model."""
    if not any(lora.is_adapter(path) for path in flatten(params)):
        return params
    try:
        scale = lora.scale(config["lora"]["rank"], config["lora"]["alpha"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{config_file}: the checkpoint holds LoRA adapters but this config has no lora.rank and lora.alpha "
            f"({type(err).__name__}: {err}); add the run's settings (\"lora\": {{\"rank\": R, \"alpha\": A}})"
        ) from err
    return lora.merge(params, scale)


def _place(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array → a global array in `sharding` (every process holds the same full array)."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _subtree(
    state: dict, kind: str, prefix: str, loaded: dict, keep: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(the entries of `state[kind]` under `prefix` ("" = all) that `loaded` replaces, `loaded` under the same
    flat paths). Not replaced: LoRA adapters and the paths in `keep`, which keep their fresh values."""
    target = {
        path: value
        for path, value in flatten(state[kind]).items()
        if path.startswith(prefix) and not lora.is_adapter(path) and path not in keep
    }
    incoming = {prefix + path: np.asarray(value) for path, value in flatten(loaded).items()}
    return target, incoming


def _replace_subtree(state: dict, kind: str, prefix: str, loaded: dict, shardings: dict, keep: tuple[str, ...]) -> None:
    """Overwrite the entries `_subtree` selects with `loaded` (whose tree `tree_mismatches` found to fit)."""
    target, incoming = _subtree(state, kind, prefix, loaded, keep)
    flat_state, flat_shardings = flatten(state[kind]), flatten(shardings[kind])
    for path, value in incoming.items():
        flat_state[path] = _place(value.astype(target[path].dtype), flat_shardings[path])
    state[kind] = unflatten(flat_state)


def tower_config_mismatch(loaded: Any, expected: Any, *, tower: str, ignore: tuple[str, ...] = ()) -> str | None:
    """How a pretrained tower's model settings differ from the run's `config.model.<tower>` (None: they agree).

    The tree check sees only names and shapes: a checkpoint with another activation, LayerNorm epsilon or
    end-of-text id would load and then run as the config says, i.e. as another model. Compared: every field of
    the tower's config dataclass (`loaded`: what the loader read from the checkpoint; `expected`: the run's)
    except the run settings `train_step.TOWER_RUNTIME_FIELDS` (how to compute, not what) and `ignore`.
    """
    skipped = set(train_step.TOWER_RUNTIME_FIELDS) | set(ignore)
    differing = {
        field.name: (getattr(loaded, field.name), getattr(expected, field.name))
        for field in dataclasses.fields(expected)
        if field.name not in skipped and getattr(loaded, field.name) != getattr(expected, field.name)
    }
    if not differing:
        return None
    listed = "; ".join(f"{name}: checkpoint {ours!r} vs config {theirs!r}" for name, (ours, theirs) in differing.items())
    overrides = " ".join(f"--config.model.{tower}.{name}={ours}" for name, (ours, _) in differing.items())
    return (
        f"the checkpoint's {tower} tower is not the model config.model.{tower} describes ({listed}); set the config "
        f"to the checkpoint's values ({overrides}) or start from a checkpoint that fits the config"
    )


def apply_init_from(state: dict, setup: Any) -> dict:
    """Start from pretrained weights as `config.init_from` says (only for a fresh run, never on resume).

    * `workdir`: a previous training run (stage 1 → stage 2): all model parameters and buffers of its latest
      checkpoint (its LoRA adapters merged into the kernels first). Optimizer state and step start fresh.
    * `audio`: a Whisper checkpoint (Hugging Face directory, OpenAI `.pt`, hub id or converted tower) for the
      audio tower; the global token keeps its fresh initialisation (no checkpoint has it).
    * `text`: a Hugging Face CLIP checkpoint or converted tower for the text tower (with CLIP's pretrained text
      projection).
    Every tree must fit the config's model exactly, and a tower's settings (activation, LayerNorm epsilon,
    end-of-text id, ...) must equal the config's. Everything is checked before anything is replaced: all
    mismatches of all sources (settings, parameter and buffer trees) are listed in one CheckpointError.
    """
    init = setup.config.init_from
    if init.workdir and (init.audio or init.text):
        raise ValueError("config.init_from: set either workdir, or audio/text, not both")
    # (source, [(tower settings loaded, expected, tower, ignore)], [(kind, prefix, tree, keep)])
    sources: list[tuple[str, list[tuple], list[tuple]]] = []
    if init.workdir:
        items, source_config, step = read_workdir_state(init.workdir, items=("params", "buffers"))
        params = merged_params(items["params"], source_config, config_file=step_config_file(init.workdir, step))
        stage1 = train_step.model_config(ml_collections.ConfigDict(source_config))
        sources.append((
            f"init_from.workdir={init.workdir}",
            [(getattr(stage1, tower), getattr(setup.model_config, tower), tower, ()) for tower in ("audio", "text")],
            # Fixed tables too: stage 1's Whisper position table came from the pretrained checkpoint (PyTorch's
            # float32 sinusoid, ~1e-4 from the one a fresh model computes).
            [("params", "", params, ()), ("buffers", "", items["buffers"], ())],
        ))
    if init.audio:
        from wavlink_jax.convert import load_whisper

        # global_token: read without it; the run's token keeps its fresh init.
        tower = load_whisper(init.audio, global_token=False)
        params, buffers = (train_step.to_tree(nnx.state(tower, kind)) for kind in (nnx.Param, nnx.Not(nnx.Param)))
        sources.append((
            f"init_from.audio={init.audio}",
            [(tower.config, setup.model_config.audio, "audio", ("global_token",))],
            [("params", "audio/", params, (GLOBAL_TOKEN,)), ("buffers", "audio/", buffers, ())],
        ))
    if init.text:
        from wavlink_jax.convert import load_clip_text

        tower = load_clip_text(init.text)
        sources.append((
            f"init_from.text={init.text}",
            [(tower.config, setup.model_config.text, "text", ())],
            [("params", "text/", train_step.to_tree(nnx.state(tower, nnx.Param)), ())],
        ))

    problems = []
    for where, settings, subtrees in sources:
        for loaded, expected, tower, ignore in settings:
            mismatch = tower_config_mismatch(loaded, expected, tower=tower, ignore=ignore)
            if mismatch:
                problems.append(f"{where}: {mismatch}")
        for kind, prefix, tree, keep in subtrees:
            target, incoming = _subtree(state, kind, prefix, tree, keep)
            mismatches = tree_mismatches(unflatten(incoming), unflatten(target))
            if mismatches:
                problems.append(f"{where}: its {kind} do not fit the model of this config; " + "; ".join(mismatches))
    if problems:
        raise CheckpointError("config.init_from does not fit this run's model:\n- " + "\n- ".join(problems))

    state = dict(state)
    for _, _, subtrees in sources:
        for kind, prefix, tree, keep in subtrees:
            _replace_subtree(state, kind, prefix, tree, setup.shardings, keep)
    return state
