"""PyTorch Whisper weights → `WhisperEncoder`, strictly.

Accepted sources:
* a Hugging Face Whisper directory (`config.json` with `model_type: whisper` + `model.safetensors`, sharded
  safetensors with an index, or `pytorch_model.bin`), saved from `WhisperModel` (`encoder.*`),
  `WhisperForConditionalGeneration` (`model.encoder.*`) or a bare `WhisperEncoder` (no prefix);
* an OpenAI checkpoint file (`.pt`: a dict with `dims` and `model_state_dict`, names like
  `encoder.blocks.N.attn.query.weight`; the encoder's `positional_embedding` buffer is part of it);
* a hub id such as `openai/whisper-base.en` (downloaded when online; offline a clear error);
* a tower directory written by `python -m wavlink_jax.convert whisper` (`wavlink_jax.convert.save`).

Only the encoder is read: decoder (and classifier) weights are ignored by design. Within the encoder,
every missing, unexpected or mis-shaped key is an error listing the keys. fp16/bf16 weights are upcast to
fp32. The global token is in no PyTorch checkpoint: it gets its documented initialisation
(`wavlink_jax.models.whisper.init_global_token`: normal(0.02) from `jax.random.key(seed)`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wavlink_jax.convert.common import (
    HF_SELF_ATTENTION_LINEARS,
    CheckpointError,
    Transform,
    assign_strict,
    check_filled,
    block_name_map,
    config_from_file,
    identity,
    read_hf_config,
    read_hf_directory,
    read_torch_pickle,
    resolve_source,
    tensors_to_numpy,
)
from wavlink_jax.convert.save import is_tower_dir, read_tower_module
from wavlink_jax.models.whisper import WhisperConfig, WhisperEncoder, init_global_token

# Encoder prefixes, most specific first: WhisperForConditionalGeneration, WhisperModel, bare WhisperEncoder.
HF_ENCODER_PREFIXES = ("model.encoder.", "encoder.", "")

_LAYER_LINEARS = {**HF_SELF_ATTENTION_LINEARS, "fc1": ("fc1",), "fc2": ("fc2",)}
_LAYER_NORMS = {"self_attn_layer_norm": ("attn_norm",), "final_layer_norm": ("mlp_norm",)}

# Hugging Face name fragment → OpenAI name fragment (the renames of transformers' convert_openai_to_hf.py).
_HF_TO_OPENAI = (
    ("encoder.layers.", "encoder.blocks."),
    (".self_attn_layer_norm.", ".attn_ln."),
    (".self_attn.q_proj.", ".attn.query."),
    (".self_attn.k_proj.", ".attn.key."),
    (".self_attn.v_proj.", ".attn.value."),
    (".self_attn.out_proj.", ".attn.out."),
    (".final_layer_norm.", ".mlp_ln."),
    (".fc1.", ".mlp.0."),
    (".fc2.", ".mlp.2."),
    ("encoder.layer_norm.", "encoder.ln_post."),
    ("encoder.embed_positions.weight", "encoder.positional_embedding"),
)


def conv_kernel(x: np.ndarray) -> np.ndarray:
    """PyTorch Conv1d weight (out, in, k) ↔ our nnx.Conv kernel (k, in, out); its own inverse."""
    return np.ascontiguousarray(x.transpose(2, 1, 0))


def hf_encoder_name_map(config: WhisperConfig, prefix: str = "encoder.") -> dict[str, tuple[tuple, Transform]]:
    """`{hf_name: (our_variable_path, transform)}` for every checkpoint tensor of the encoder.

    `prefix` is the encoder's prefix (`encoder.` in `WhisperModel`, `model.encoder.` in
    `WhisperForConditionalGeneration`). Every transform is its own inverse (Linear weights are transposed,
    conv kernels axis-reversed), so the exporter applies the same transform to go back. The global token is
    not in the map: Whisper has no such tensor.
    """
    mapping: dict[str, tuple[tuple, Transform]] = {
        f"{prefix}embed_positions.weight": (("position_embedding",), identity),
        f"{prefix}layer_norm.weight": (("final_norm", "scale"), identity),
        f"{prefix}layer_norm.bias": (("final_norm", "bias"), identity),
    }
    for conv in ("conv1", "conv2"):
        mapping[f"{prefix}{conv}.weight"] = ((conv, "kernel"), conv_kernel)
        mapping[f"{prefix}{conv}.bias"] = ((conv, "bias"), identity)
    mapping.update(
        block_name_map(
            f"{prefix}layers.", config.num_layers, _LAYER_LINEARS, _LAYER_NORMS, bias_free={"self_attn.k_proj"}
        )  # Whisper's key projection has no bias
    )
    return mapping


def hf_to_openai_name(name: str) -> str:
    """A `WhisperModel` encoder name (`encoder.layers.0.self_attn.q_proj.weight`) → OpenAI's."""
    for hf_part, openai_part in _HF_TO_OPENAI:
        name = name.replace(hf_part, openai_part)
    return name


def openai_encoder_name_map(config: WhisperConfig) -> dict[str, tuple[tuple, Transform]]:
    """`{openai_name: (our_variable_path, transform)}`: `hf_encoder_name_map` under OpenAI's names."""
    return {hf_to_openai_name(name): target for name, target in hf_encoder_name_map(config).items()}


def config_from_openai_dims(dims: Mapping) -> WhisperConfig:
    """OpenAI `ModelDimensions` (`n_mels`, `n_audio_ctx`, `n_audio_state`, ...) → WhisperConfig."""
    try:
        width = int(dims["n_audio_state"])
        return WhisperConfig(
            n_mels=int(dims["n_mels"]),
            width=width,
            num_layers=int(dims["n_audio_layer"]),
            num_heads=int(dims["n_audio_head"]),
            mlp_dim=4 * width,
            max_positions=int(dims["n_audio_ctx"]),
        )
    except KeyError as err:
        raise ValueError(f"OpenAI Whisper 'dims' lacks {err.args[0]!r}: got {dict(dims)}") from err


def _is_decoder(name: str) -> bool:
    """Decoder-side tensors (HF `decoder.*`/`proj_out.*`, OpenAI `decoder.*`): never read, never upcast."""
    return name.startswith(("decoder.", "model.decoder.", "proj_out."))


# Names only an encoder has: the stem, the position table, the blocks (one missing tensor among them is a missing
# key, listed by `assign_strict`; it said "no Whisper encoder weights" when it was conv1's).
_ENCODER_PARTS = ("conv1.", "conv2.", "embed_positions.", "layers.", "layer_norm.")


def _encoder_weights(weights: dict[str, np.ndarray], source: Path) -> tuple[dict[str, np.ndarray], str]:
    """Keep only the encoder's tensors (decoder etc. ignored by design); returns them and their prefix."""
    for prefix in HF_ENCODER_PREFIXES:
        if any(name.startswith(tuple(prefix + part for part in _ENCODER_PARTS)) for name in weights):
            return {name: value for name, value in weights.items() if name.startswith(prefix)}, prefix
    sample = sorted(weights)[:8]
    raise CheckpointError(
        f"{source}: no Whisper encoder weights (expected 'encoder.conv1.weight', 'model.encoder.conv1.weight' "
        f"or 'conv1.weight'); first keys found: {sample}"
    )


def _read_hf(directory: Path, overrides: dict) -> tuple[WhisperConfig, dict, dict, str]:
    hf_config = read_hf_config(directory)
    if hf_config.get("model_type") != "whisper":
        raise CheckpointError(
            f"{directory}: config.json has model_type {hf_config.get('model_type')!r}, not 'whisper'; "
            "expected a Hugging Face Whisper checkpoint"
        )
    config = config_from_file(directory / "config.json", lambda: WhisperConfig.from_hf(hf_config), **overrides)
    weights, prefix = _encoder_weights(read_hf_directory(directory, skip=_is_decoder), directory)
    return config, weights, hf_encoder_name_map(config, prefix), str(directory)


def _read_openai(file: Path, overrides: dict) -> tuple[WhisperConfig, dict, dict, str]:
    checkpoint = read_torch_pickle(file)
    if not (isinstance(checkpoint, Mapping) and "dims" in checkpoint and "model_state_dict" in checkpoint):
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointError(
            f"{file}: not an OpenAI Whisper checkpoint (expected a dict with 'dims' and 'model_state_dict', "
            f"found {found}); for a Hugging Face checkpoint pass the directory holding config.json"
        )
    config = config_from_file(file, lambda: config_from_openai_dims(checkpoint["dims"]), **overrides)
    state = tensors_to_numpy(checkpoint["model_state_dict"], file, skip=_is_decoder)
    weights = {name: value for name, value in state.items() if name.startswith("encoder.")}
    if not weights:
        raise CheckpointError(f"{file}: 'model_state_dict' holds no 'encoder.*' tensors")
    return config, weights, openai_encoder_name_map(config), str(file)


def _read_source(source: Path, overrides: dict, seed: int) -> tuple[WhisperEncoder, np.ndarray | None]:
    """The encoder with every checkpoint variable filled (built abstract: nothing is randomly initialised
    only to be overwritten), and the global token the source holds (only a converted tower holds one)."""
    if is_tower_dir(source):
        model, state = read_tower_module(
            source, "whisper", WhisperConfig, lambda config: WhisperEncoder(config, rngs=nnx.Rngs(seed)),
            overrides=overrides, skip=(("global_token",),),
        )  # fmt: skip
        return model, state.get("global_token")
    if source.is_dir():
        config, weights, mapping, name = _read_hf(source, overrides)
    elif source.suffix in (".safetensors", ".json"):
        raise CheckpointError(
            f"{source}: a Hugging Face weight or config file alone is not enough; pass the directory holding "
            "config.json and the weights"
        )
    else:
        config, weights, mapping, name = _read_openai(source, overrides)
    model = nnx.eval_shape(lambda: WhisperEncoder(config, rngs=nnx.Rngs(seed)))
    assign_strict(model, weights, mapping, source=name)
    return model, None


def load_whisper(
    path: str | os.PathLike, *, global_token: bool = True, seed: int = 0, **config_overrides
) -> WhisperEncoder:
    """A `WhisperEncoder` with the pretrained encoder weights of `path`: a Hugging Face directory, an OpenAI
    `.pt`, a hub id, or a tower converted by `python -m wavlink_jax.convert whisper` (its global token, if it
    has one, is kept when `global_token=True`).

    `global_token=False` gives plain Whisper. `seed` initialises a new global token. `config_overrides` set
    non-shape options of `WhisperConfig` (e.g. `dtype="bfloat16"`, `remat="full"`,
    `attention_implementation="cudnn"`); shape overrides that disagree with the checkpoint are an error.
    """
    overrides = dict(config_overrides, global_token=global_token)
    model, saved_token = _read_source(resolve_source(path), overrides, seed)
    if model.config.global_token:
        model.global_token = init_global_token(jax.random.key(seed), model.config.width)
        if saved_token is not None:
            model.global_token.set_value(jnp.asarray(saved_token, jnp.float32))
    check_filled(model, "hf_encoder_name_map")
    return model
