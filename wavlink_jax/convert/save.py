"""Converted towers on disk: `tower.json` (what it is) + an orbax checkpoint of its weights (`params/`).

    OUT/tower.json   {"kind": "whisper" | "clip_text", "config": {...the tower's config dataclass...}}
    OUT/params/      orbax StandardCheckpointer: every variable of the module (parameters and fixed tables
                     such as Whisper's position table), as the nested dict `nnx.State.to_pure_dict()` gives

`python -m wavlink_jax.convert` writes these; `load_tower` reads them back as host arrays, and the towers'
loaders (`load_whisper`, ...) accept such a directory like any other checkpoint, so `init_from` can point at
it. A converted directory needs neither `transformers` nor `torch` to load.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from wavlink_jax.convert.common import CheckpointError, assign_strict, config_from_file, identity
from wavlink_jax.files import replace_text

TOWER_FILE = "tower.json"
PARAMS_DIR = "params"
TOWER_KINDS = ("whisper", "clip_text")


def is_tower_dir(path: Path) -> bool:
    return (path / TOWER_FILE).is_file()


def save_tower(out_dir: str | os.PathLike, kind: str, config: Any, module: nnx.Module) -> Path:
    """Write `module` (of tower `kind`, built from the dataclass `config`) to `out_dir`; returns the path.

    Refuses to overwrite an existing conversion (remove it first): a half-replaced directory would mix towers.
    """
    if kind not in TOWER_KINDS:
        raise ValueError(f"unknown tower kind {kind!r}; expected one of {TOWER_KINDS}")
    out = check_tower_out(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = nnx.state(module, nnx.Not(nnx.RngState)).to_pure_dict()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out / PARAMS_DIR, state)
    # Written last: a directory without tower.json is an interrupted conversion, never mistaken for a tower.
    replace_text(out / TOWER_FILE, json.dumps({"kind": kind, "config": dataclasses.asdict(config)}, indent=2) + "\n")
    return out


def check_tower_out(out_dir: str | os.PathLike) -> Path:
    """The absolute output directory of a conversion, refused if it cannot take one: a file, a converted tower
    (a half-replaced directory would mix towers), or what an interrupted conversion left (`params/` without
    tower.json). `python -m wavlink_jax.convert` checks it before reading the source (seconds to minutes, GBs)."""
    if not str(out_dir).strip():  # an empty $OUT: the current directory would take the tower
        raise ValueError("--out is empty; give the directory the converted tower goes to")
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: a file, not a directory")
    if (out / TOWER_FILE).exists():
        raise FileExistsError(f"{out} already holds a converted tower; remove it or choose another output directory")
    if (out / PARAMS_DIR).exists():
        raise FileExistsError(
            f"{out} holds an interrupted conversion ({PARAMS_DIR}/ without {TOWER_FILE}); remove it and convert again"
        )
    return out


def _plain(tree: Any) -> Any:
    """Orbax metadata trees as nested dicts with string keys (list indices become "0", "1", ...)."""
    if isinstance(tree, Mapping):
        return {str(key): _plain(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return {str(index): _plain(value) for index, value in enumerate(tree)}
    return tree


def load_tower(out_dir: str | os.PathLike, kind: str | None = None) -> tuple[str, dict, dict]:
    """`(kind, config_dict, state)` of a `save_tower` directory; `state` is a nested dict of numpy arrays
    (string keys, layer indices as "0", "1", ...; `nnx.replace_by_pure_dict` accepts it). With `kind` given,
    a tower of another kind is an error."""
    directory = Path(out_dir).expanduser()
    if not is_tower_dir(directory):
        interrupted = (directory / PARAMS_DIR).exists()
        why = f" ({PARAMS_DIR}/ without it: an interrupted conversion; convert again)" if interrupted else ""
        raise CheckpointError(
            f"{directory}: no {TOWER_FILE}{why}; not a tower written by `python -m wavlink_jax.convert`"
        )
    try:
        description = json.loads((directory / TOWER_FILE).read_text())
        saved_kind, config = description["kind"], description["config"]
    except (ValueError, KeyError, TypeError) as err:  # TypeError: JSON that is not an object
        raise CheckpointError(f"{directory / TOWER_FILE}: expected JSON with 'kind' and 'config' ({err})") from err
    if kind is not None and saved_kind != kind:
        raise CheckpointError(f"{directory}: holds a {saved_kind!r} tower, not {kind!r}")
    params = (directory / PARAMS_DIR).absolute()
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        metadata = _plain(checkpointer.metadata(params).item_metadata.tree)
    except Exception as err:
        raise CheckpointError(f"{params}: not a readable orbax checkpoint ({type(err).__name__}: {err})") from err
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    try:
        state = checkpointer.restore(params, args=ocp.args.PyTreeRestore(item=metadata, restore_args=restore_args))
    except (OSError, ValueError) as err:  # a data file cut short or gone: tensorstore's words name no remedy
        raise CheckpointError(
            f"{params}: an array could not be read ({type(err).__name__}: {str(err)[:300]}); the conversion is "
            "damaged: convert again"
        ) from err
    return saved_kind, config, _plain(state)


def read_tower_module(
    directory: Path,
    kind: str,
    config_type: Callable[..., Any],
    build: Callable[[Any], nnx.Module],
    *,
    overrides: Mapping[str, Any],
    skip: tuple[tuple, ...] = (),
) -> tuple[nnx.Module, dict]:
    """The towers' loaders on a `save_tower` directory: the saved config (`config_type(**saved)`, its refusal
    naming tower.json) with the caller's `overrides` applied after (their mistakes are the caller's), then
    `build(config)` called abstractly (no random init of weights that are overwritten anyway), and every
    variable except the paths in `skip` filled strictly from the saved state. Returns the module and the state
    (for the caller's use of `skip` entries)."""
    _, saved, state = load_tower(directory, kind=kind)
    config = config_from_file(directory / TOWER_FILE, lambda: config_type(**saved), **overrides)
    module = nnx.eval_shape(lambda: build(config))
    assign_tower_state(module, state, source=str(directory), skip=skip)
    return module, state


def assign_tower_state(module: nnx.Module, state: Mapping, *, source: str, skip: tuple[tuple, ...] = ()) -> None:
    """Write a `load_tower` state into `module`, strictly: every variable of the module except the paths in
    `skip` must be in `state`, nothing else may be (entries at `skip` paths are ignored), shapes must match."""
    skipped = {"/".join(map(str, path)) for path in skip}
    mapping = {
        "/".join(map(str, path)): (path, identity)
        for path, _ in nnx.to_flat_state(nnx.state(module, nnx.Not(nnx.RngState)))
        if "/".join(map(str, path)) not in skipped
    }
    flat = {name: value for name, value in _flatten(state).items() if name not in skipped}
    assign_strict(module, flat, mapping, source=source)


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = np.asarray(value)
    return flat
