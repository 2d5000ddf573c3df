"""Hugging Face CLIP text weights → `CLIPTextEncoder`, strictly.

Accepted: a `CLIPModel` directory (its `text_model.*` and `text_projection`; the vision tower,
`visual_projection` and `logit_scale` are ignored by design), a `CLIPTextModelWithProjection` directory, or a
`CLIPTextModel` directory (names with or without the `text_model.` prefix). Weights may be safetensors
(single or sharded) or `pytorch_model.bin`; a hub id is downloaded when online. A tower directory written by
`python -m wavlink_jax.convert clip_text` (`wavlink_jax.convert.save`) loads too. The non-learned
`position_ids` buffer that old checkpoints store is dropped. Anything else missing or left over is an error
listing the keys.

A `CLIPTextModel` has no `text_projection`, which WavLink reuses. Loading one is an error unless the caller
asks for `new_projection=True`: then `text_projection` starts from CLIP's random initialisation (seed 0,
`projection_dim` from the checkpoint's config unless overridden).
"""

from __future__ import annotations

import os
from pathlib import Path

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
    resolve_source,
    transpose,
)
from wavlink_jax.convert.save import is_tower_dir, read_tower_module
from wavlink_jax.models.clip_text import CLIPTextConfig, CLIPTextEncoder

TEXT_PREFIX = "text_model."
PROJECTION_KEY = "text_projection.weight"
# Parts of a CLIPModel checkpoint that are not the text tower.
IGNORED_CLIP_MODEL_PREFIXES = ("vision_model.", "visual_projection.", "logit_scale")
# Bare CLIPTextModel names (transformers >= 5 saves them without the text_model. prefix).
BARE_TEXT_PREFIXES = ("embeddings.", "encoder.", "final_layer_norm.")

_LAYER_PARTS = {**HF_SELF_ATTENTION_LINEARS, "mlp.fc1": ("fc1",), "mlp.fc2": ("fc2",)}
_LAYER_NORMS = {"layer_norm1": ("attn_norm",), "layer_norm2": ("mlp_norm",)}


def hf_text_name_map(config: CLIPTextConfig, *, projection: bool = True) -> dict[str, tuple[tuple, Transform]]:
    """`{hf_name: (our_parameter_path, transform)}` in `CLIPTextModelWithProjection` naming.

    `transform` turns the PyTorch tensor into our parameter (Linear weights are transposed; it is its own
    inverse, so the exporter applies the same transform the other way).
    """
    mapping: dict[str, tuple[tuple, Transform]] = {
        f"{TEXT_PREFIX}embeddings.token_embedding.weight": (("token_embedding", "embedding"), identity),
        f"{TEXT_PREFIX}embeddings.position_embedding.weight": (("position_embedding",), identity),
        f"{TEXT_PREFIX}final_layer_norm.weight": (("final_norm", "scale"), identity),
        f"{TEXT_PREFIX}final_layer_norm.bias": (("final_norm", "bias"), identity),
    }
    mapping.update(block_name_map(f"{TEXT_PREFIX}encoder.layers.", config.num_layers, _LAYER_PARTS, _LAYER_NORMS))
    if projection:
        mapping[PROJECTION_KEY] = (("text_projection", "kernel"), transpose)
    return mapping


def _text_config(hf_config: dict, source: str) -> tuple[dict, int | None]:
    """(text config dict, projection_dim) of a `CLIPModel` or CLIP text model config."""
    model_type = hf_config.get("model_type")
    if model_type == "clip":
        # transformers' CLIPConfig: a legacy `text_config_dict` (OpenAI's ViT-L/14 has both) is the whole text config,
        # its missing fields at their defaults, overriding `text_config` field by field.
        text_config = hf_config.get("text_config_dict")
        if text_config is None:
            text_config = hf_config.get("text_config") or {}
        return text_config, hf_config.get("projection_dim", 512)
    if model_type == "clip_text_model":
        return hf_config, None
    raise CheckpointError(
        f"{source}: model_type {model_type!r} is not a CLIP model; expected 'clip' (CLIPModel) or "
        "'clip_text_model' (CLIPTextModel / CLIPTextModelWithProjection)"
    )


def _text_weights(weights: dict) -> dict:
    """The text tower's tensors (a CLIPModel's vision tower already left out) in `CLIPTextModelWithProjection`
    naming."""
    text = {}
    for name, value in weights.items():
        if name.endswith("embeddings.position_ids"):  # a non-learned arange buffer in old checkpoints
            continue
        if name.startswith(BARE_TEXT_PREFIXES):
            name = TEXT_PREFIX + name
        text[name] = value
    return text


def _read_hf(directory: Path, new_projection: bool, overrides: dict) -> CLIPTextEncoder:
    """The text tower of a Hugging Face CLIP directory (see the module doc)."""
    source = str(directory)
    hf_config = read_hf_config(directory)
    text_config, projection_dim = _text_config(hf_config, f"{directory / 'config.json'}")
    config = config_from_file(
        directory / "config.json", lambda: CLIPTextConfig.from_hf(text_config, projection_dim), **overrides
    )
    model_type = hf_config["model_type"]
    # A CLIPModel's vision tower (most of ViT-L/14's weights) is never converted: not even read into memory.
    skip = (lambda name: name.startswith(IGNORED_CLIP_MODEL_PREFIXES)) if model_type == "clip" else None
    weights = _text_weights(read_hf_directory(directory, skip=skip))

    # A CLIPModel always has the projection: one without it is incomplete, and its missing keys are listed below.
    text_model = model_type != "clip" and any(name.startswith(TEXT_PREFIX) for name in weights)
    if not new_projection and PROJECTION_KEY not in weights and text_model:
        raise CheckpointError(
            f"{source}: no {PROJECTION_KEY} (a CLIPTextModel checkpoint). WavLink reuses CLIP's pretrained text "
            "projection: load the CLIPModel or CLIPTextModelWithProjection checkpoint of the same model, or pass "
            "new_projection=True (on the command line: --new-projection) to start the projection from random "
            "initialisation"
        )
    if new_projection and PROJECTION_KEY in weights:
        raise CheckpointError(
            f"{source}: holds CLIP's pretrained {PROJECTION_KEY}; new_projection=True (--new-projection) is for "
            "CLIPTextModel checkpoints, which have none: leave it out to use this one"
        )

    def build() -> CLIPTextEncoder:
        return CLIPTextEncoder(config, rngs=nnx.Rngs(0))

    # Only a new projection needs initial values; otherwise every parameter is overwritten, so the module is
    # built abstractly (no random init of ~100M parameters) and filled from the checkpoint.
    module = build() if new_projection else nnx.eval_shape(build)
    assign_strict(module, weights, hf_text_name_map(config, projection=not new_projection), source=source)
    return module


def load_clip_text(path: str | os.PathLike, *, new_projection: bool = False, **config_overrides) -> CLIPTextEncoder:
    """A `CLIPTextEncoder` holding the text tower of the CLIP checkpoint at `path`.

    `path`: a Hugging Face model directory, a hub id, or a tower converted by `python -m wavlink_jax.convert
    clip_text`. `config_overrides` replace `CLIPTextConfig` fields (e.g. `dtype="bfloat16"`, `remat="full"`,
    `attention_implementation="cudnn"`); shape fields must still match the checkpoint. `new_projection=True`
    is only for `CLIPTextModel` checkpoints (see the module doc; a converted tower has its projection).
    """
    directory = resolve_source(path)
    if is_tower_dir(directory):
        if new_projection:
            raise CheckpointError(
                f"{directory}: a converted tower keeps the projection it was converted with; new_projection=True "
                "applies to CLIPTextModel checkpoints without one (convert again with --new-projection instead)"
            )
        module, _ = read_tower_module(
            directory, "clip_text", CLIPTextConfig, lambda config: CLIPTextEncoder(config, rngs=nnx.Rngs(0)),
            overrides=config_overrides,
        )  # fmt: skip
    elif directory.is_dir():
        module = _read_hf(directory, new_projection, config_overrides)
    else:
        raise CheckpointError(
            f"{directory}: expected a Hugging Face CLIP model directory (config.json + weights) or a converted "
            "tower directory, not a file"
        )
    check_filled(module, "hf_text_name_map")
    return module
