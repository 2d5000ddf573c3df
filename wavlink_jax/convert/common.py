"""Reading PyTorch checkpoints and writing them strictly into NNX modules (shared by every converter).

A converter describes its checkpoint as a mapping `{torch_name: (our_path, transform)}`. `assign_strict`
checks that every name the module needs is present, that no name of the converted part is left over (other
parts, e.g. Whisper's decoder or CLIP's vision tower, are filtered out by the converter first), and that
every shape fits; each failure is one error listing all offending keys. Nothing is skipped silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Transform = Callable[[np.ndarray], np.ndarray]
T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: the message names the file and the keys."""


def identity(x: np.ndarray) -> np.ndarray:
    return x


def transpose(x: np.ndarray) -> np.ndarray:
    """PyTorch Linear weight (out, in) → our kernel (in, out)."""
    return np.ascontiguousarray(x.T)


HUB_SAFETENSORS = ("model.safetensors", "model-*-of-*.safetensors")  # whisper-large-v3 also has model.fp32-*


def resolve_source(source: str | os.PathLike) -> Path:
    """A local file or directory as is; otherwise a Hugging Face hub id, downloaded when online: its configs,
    tokenizer files and safetensors weights (single or sharded; not the fp32 copies some repos add), or
    `pytorch_model*.bin` only when it has no safetensors (repos holding both would be fetched twice)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if text.count("/") > 1 or text.startswith((".", "/", "~")):
        raise CheckpointError(f"{text}: no such file or directory")
    try:
        from huggingface_hub import snapshot_download

        light = ["*.json", "*.txt", "*.model"]
        directory = Path(snapshot_download(text, allow_patterns=[*light, *HUB_SAFETENSORS]))
        if not any(directory.glob("*.safetensors")):
            directory = Path(snapshot_download(text, allow_patterns=[*light, "pytorch_model*.bin"]))
        return directory
    except Exception as err:  # offline, unknown id, gated repo: all end here with the reason
        reason = " ".join(str(err).split())  # huggingface_hub's words span lines: the error stays one line
        raise CheckpointError(
            f"{text!r} is neither a local path nor a reachable Hugging Face hub id "
            f"({type(err).__name__}: {reason}). Offline, download the checkpoint elsewhere and pass its directory."
        ) from err


def _to_numpy(tensor) -> np.ndarray:
    """torch tensor (any float dtype) → numpy, floating point upcast to float32."""
    import torch

    if tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
    return tensor.detach().cpu().numpy()


NameFilter = Callable[[str], bool]


def _read_safetensors(file: Path, skip: NameFilter | None) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return {key: _to_numpy(handle.get_tensor(key)) for key in handle.keys() if not (skip and skip(key))}


def read_torch_pickle(file: Path) -> object:
    """A PyTorch pickle (`.bin`/`.pt`), loaded safely (`weights_only`) on the CPU, memory-mapped: a tensor is read
    from disk when used, so the tensors a converter skips (Whisper's decoder, CLIP's vision tower) never are.
    A file from before PyTorch 1.6 (not a zip archive, which mapping needs) is read whole."""
    import torch

    try:
        return torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not mappable; any other problem shows again below
        pass
    try:
        return torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err


def tensors_to_numpy(obj: object, file: Path, skip: NameFilter | None = None) -> dict[str, np.ndarray]:
    """A state dict's tensors (names `skip` rejects left out before any upcast) → float32 numpy arrays."""
    import torch

    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{file}: expected a state dict (a mapping of names to tensors)")
    return {
        key: _to_numpy(value)
        for key, value in obj.items()
        if isinstance(value, torch.Tensor) and not (skip and skip(key))
    }


def read_weight_file(file: Path, skip: NameFilter | None = None) -> dict[str, np.ndarray]:
    """One `.safetensors` or PyTorch pickle (`.bin`/`.pt`/`.pth`) file → name → float32 numpy array.

    `skip(name)` → True leaves a tensor unread (e.g. Whisper's decoder), which saves memory on large models.
    """
    if file.suffix == ".safetensors":
        try:
            return _read_safetensors(file, skip)
        except Exception as err:
            raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err
    return tensors_to_numpy(read_torch_pickle(file), file, skip)


# In transformers' order of preference (`from_pretrained`): safetensors, whole then sharded, before any PyTorch
# pickle, whole then sharded. A directory saved into twice may hold both forms (`save_pretrained` leaves an old
# index): the file transformers loads is the one read. (A hub download of `*.safetensors` and `*.json` has the .bin
# index but not its shards.)
HF_WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)


def read_hf_directory(directory: Path, skip: NameFilter | None = None) -> dict[str, np.ndarray]:
    """A Hugging Face model directory: the first of `HF_WEIGHT_FILES` it has (an index: all of its shards)."""
    for name in HF_WEIGHT_FILES:
        file = directory / name
        if not file.exists():
            continue
        if not name.endswith(".index.json"):
            return read_weight_file(file, skip)
        weight_map = read_json(file).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{file}: no 'weight_map' (tensor name → shard file); replace the file")
        weights: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            weights.update(read_weight_file(directory / shard, skip))
        return weights
    raise CheckpointError(
        f"{directory}: no model.safetensors, pytorch_model.bin or sharded index found; "
        "expected a Hugging Face model directory"
    )


def write_safetensors(tensors: Mapping[str, np.ndarray], file: Path, metadata: Mapping[str, str] | None = None) -> None:
    """`safetensors.numpy.save_file`, leaving the file with the mode any other new file gets (0666 minus the
    umask, e.g. 0644). safetensors ≥ 0.8 writes through a private temporary file and so leaves 0600
    (huggingface/safetensors#782): an export that other users or a serving process cannot read."""
    from safetensors.numpy import save_file

    save_file(dict(tensors), str(file), metadata=dict(metadata) if metadata is not None else None)
    os.chmod(file, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask. Linux shows it in /proc; elsewhere os.umask is the only reader, and it has to set a
    value to read the old one (briefly process-wide, so only as the fallback)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def read_json(path: Path) -> Any:
    """A JSON file's contents; a file that is not valid JSON is a CheckpointError naming it."""
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); the file may be cut short: replace it") from err


def read_hf_config(directory: Path) -> dict:
    """`directory/config.json` of a Hugging Face model directory."""
    config_file = directory / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{directory}: no config.json; expected a Hugging Face model directory")
    config = read_json(config_file)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object of settings, got a {type(config).__name__}")
    return config


def config_from_file(file: Path, build: Callable[[], T], **overrides: Any) -> T:
    """`build()` (a tower config from the settings of `file` alone: a config.json, a tower.json, an OpenAI
    `.pt`'s dims), its refusal of a value (an unknown field or activation, a layer count of null) naming `file`;
    then the caller's `overrides` (`dataclasses.replace`), whose own mistakes are the caller's errors, not the
    file's."""
    try:
        config = build()
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{file}: {err}") from err
    return dataclasses.replace(config, **overrides) if overrides else config


# transformers' self-attention Linears (Whisper and CLIP name them alike) → our `EncoderBlock.attn` parts.
HF_SELF_ATTENTION_LINEARS: dict[str, tuple] = {
    "self_attn.q_proj": ("attn", "query"),
    "self_attn.k_proj": ("attn", "key"),
    "self_attn.v_proj": ("attn", "value"),
    "self_attn.out_proj": ("attn", "out"),
}


def block_name_map(
    torch_layer_prefix: str,
    num_layers: int,
    linears: Mapping[str, tuple],
    norms: Mapping[str, tuple],
    *,
    bias_free: Collection[str] = (),
) -> dict[str, tuple[tuple, Transform]]:
    """The per-layer entries of an `EncoderStack` (our `encoder/layers/i/...`) under PyTorch names.

    `{torch_layer_prefix}{i}.{part}.weight|bias` for each Linear part (weights transposed; parts in
    `bias_free` have no bias) and each LayerNorm part (`weight` → `scale`). Both towers' converters use it.
    """
    mapping: dict[str, tuple[tuple, Transform]] = {}
    for index in range(num_layers):
        torch_layer = f"{torch_layer_prefix}{index}."
        our_layer = ("encoder", "layers", index)
        for torch_part, our_part in linears.items():
            mapping[f"{torch_layer}{torch_part}.weight"] = ((*our_layer, *our_part, "kernel"), transpose)
            if torch_part not in bias_free:
                mapping[f"{torch_layer}{torch_part}.bias"] = ((*our_layer, *our_part, "bias"), identity)
        for torch_part, our_part in norms.items():
            mapping[f"{torch_layer}{torch_part}.weight"] = ((*our_layer, *our_part, "scale"), identity)
            mapping[f"{torch_layer}{torch_part}.bias"] = ((*our_layer, *our_part, "bias"), identity)
    return mapping


def check_filled(module: nnx.Module, name_map: str) -> None:
    """Every variable of a module built abstractly (`nnx.eval_shape`) was written from the checkpoint: one left
    unwritten is a bug in `name_map`, the table that should have covered it."""
    state = nnx.to_flat_state(nnx.state(module))
    unfilled = [path for path, variable in state if isinstance(variable.get_value(), jax.ShapeDtypeStruct)]
    if unfilled:
        raise KeyError(f"bug: {name_map} does not cover the variables {unfilled}")


def assign_strict(
    module: nnx.Module,
    weights: Mapping[str, np.ndarray],
    mapping: Mapping[str, tuple[tuple, Transform]],
    *,
    source: str,
    check_only: bool = False,
) -> None:
    """Write `weights[torch_name]` (transformed) into the module's variable at `our_path`, strictly; with
    `check_only`, only check that they would fit (names and shapes: an abstract module will do).

    Targets are usually `nnx.Param`s; fixed tables a checkpoint carries (e.g. Whisper's sinusoid position
    table, a non-trainable variable) are written the same way.

    `mapping` must cover exactly the module's parameters that come from the checkpoint; `weights` must hold
    exactly the keys of `mapping`. Raises one CheckpointError listing every missing, unexpected and mis-shaped
    key (the module is then partly written: discard it).
    """
    params = dict(nnx.to_flat_state(nnx.state(module)))
    mismatched = []
    for torch_name, (path, transform) in mapping.items():
        if path not in params:
            raise KeyError(f"converter bug: {path} is not a variable of {type(module).__name__}")
        if torch_name not in weights:
            continue
        raw, target = weights[torch_name], params[path]
        current = target.get_value()
        try:
            value = transform(raw)
        except ValueError:  # e.g. a transpose of an array of another rank
            value = None
        if value is None or value.shape != current.shape:
            ours = "" if value is None or value.shape == raw.shape else f" (in our layout {value.shape})"
            mismatched.append(f"{torch_name}: checkpoint {raw.shape}{ours} vs model {current.shape}")
            continue
        if not check_only:
            target.set_value(jnp.asarray(value, dtype=current.dtype))
    missing = sorted(set(mapping) - set(weights))
    unexpected = sorted(set(weights) - set(mapping))
    problems = [
        f"{kind} ({len(keys)}): {keys}"
        for kind, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not match the model; " + "; ".join(problems))
