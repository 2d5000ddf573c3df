"""JAX → PyTorch export: `python -m wavlink_jax.export --workdir W [--step S] --out DIR`.

DIR becomes a Hugging Face model directory that `transformers` loads with the remote-code mechanism:

    config.json            model_type "wavlink", auto_map → modeling_wavlink; `audio_config` (a Whisper config),
                           `text_config` (a CLIP text config), embed_dim, matryoshka_dims, window_seconds,
                           max_text_length
    model.safetensors      fp32 weights: `audio.*` under transformers' exact `WhisperEncoder` names,
                           `text.*` under exact `CLIPTextModelWithProjection` names, `audio_global_token`,
                           `audio_projection.*`, `text_projection.*` (the heads), and the losses' scalars
                           `clip_logit_scale`, `sigmoid_logit_scale`, `sigmoid_logit_bias`
    modeling_wavlink.py    a copy of `wavlink_jax/torch_model.py` (torch + transformers only)
    waveform_layout.py     a copy of `wavlink_jax/waveform_layout.py`, which modeling_wavlink.py imports
    tokenizer files        the run's tokenizer (tokenizer.json / vocab.json + merges.txt, tokenizer_config.json
                           with model_max_length = the training text length)

LoRA adapters are merged into their kernels first, so the export is a plain model. The name map
(`name_map`) reuses the tower converters' maps (`convert.whisper.hf_encoder_name_map`,
`convert.clip_text.hf_text_name_map`), whose transforms are their own inverses: the same table imports
(`wavlink_jax.inference` reads exported directories back into JAX) and exports. `export_tower` writes one
tower alone as a plain `transformers` checkpoint (a Whisper encoder that `load_whisper` and
`WhisperEncoder.from_pretrained` read; a `CLIPTextModelWithProjection`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
from flax import nnx

from wavlink_jax import cli
from wavlink_jax.convert.clip_text import hf_text_name_map
from wavlink_jax.convert.common import (
    CheckpointError,
    Transform,
    assign_strict,
    identity,
    read_hf_config,
    read_hf_directory,
    transpose,
    write_safetensors,
)
from wavlink_jax.convert.whisper import hf_encoder_name_map
from wavlink_jax.models.clip_text import CLIPTextConfig
from wavlink_jax.models.wavlink import WavLink, WavLinkConfig
from wavlink_jax.models.whisper import WhisperConfig

WEIGHTS_FILE = "model.safetensors"
MODELING_FILE = "modeling_wavlink.py"
MODEL_TYPE = "wavlink"
# The config.json keys JAX inference reads back (besides model_type); torch_model.WavLinkConfig writes them all.
CONFIG_KEYS = ("audio_config", "text_config", "embed_dim", "matryoshka_dims", "window_seconds", "max_text_length")
AUTO_MAP = {"AutoConfig": "modeling_wavlink.WavLinkConfig", "AutoModel": "modeling_wavlink.WavLinkModel"}
TOWER_PREFIXES = {"audio": "audio.", "text": "text."}
TOWER_MODEL_TYPES = ("whisper", "clip_text_model")  # the model_type of export_tower's config.json
# In the metadata of every export's model.safetensors: what tells an earlier export, which --overwrite may replace,
# from a transformers checkpoint of the same model_type (someone's fine-tuned Whisper), which it may not.
WRITTEN_BY_KEY, WRITTEN_BY = "written_by", "wavlink_jax.export"
WEIGHTS_METADATA = {"format": "pt", WRITTEN_BY_KEY: WRITTEN_BY}
GLOBAL_TOKEN = "audio_global_token"
SCALARS = ("clip_logit_scale", "sigmoid_logit_scale", "sigmoid_logit_bias")
HEADS = ("audio_projection", "text_projection")
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)

logger = logging.getLogger(__name__)


def name_map(config: WavLinkConfig) -> dict[str, tuple[tuple, Transform]]:
    """`{exported_name: (WavLink variable path, transform)}` for every tensor of an exported directory.

    Each transform is its own inverse: applied to our variable it gives the PyTorch tensor, and back.
    """
    mapping: dict[str, tuple[tuple, Transform]] = {}
    for name, (path, transform) in hf_encoder_name_map(config.audio, prefix="").items():
        mapping[TOWER_PREFIXES["audio"] + name] = (("audio", *path), transform)
    mapping[GLOBAL_TOKEN] = (("audio", "global_token"), identity)
    for name, (path, transform) in hf_text_name_map(config.text, projection=True).items():
        mapping[TOWER_PREFIXES["text"] + name] = (("text", *path), transform)
    for head in HEADS:
        mapping[f"{head}.weight"] = ((head, "kernel"), transpose)
        mapping[f"{head}.bias"] = ((head, "bias"), identity)
    for scalar in SCALARS:
        mapping[scalar] = ((scalar,), identity)
    return mapping


def export_weights(model: WavLink) -> dict[str, np.ndarray]:
    """The model's variables as fp32 numpy tensors under the exported names (every variable, or an error)."""
    variables = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}
    mapping = name_map(model.config)
    uncovered = sorted(set(variables) - {path for path, _ in mapping.values()})
    if uncovered:
        raise KeyError(f"exporter bug: the name map does not cover the model variables {uncovered}")
    return {
        # np.array, not np.ascontiguousarray: that turns the 0-d scalars into shape (1,).
        name: np.array(transform(np.asarray(variables[path], dtype=np.float32)), order="C")
        for name, (path, transform) in mapping.items()
    }


def hf_tower_configs(config: WavLinkConfig, *, bos_token_id: int, pad_token_id: int) -> tuple[dict, dict]:
    """(`WhisperConfig`, `CLIPTextConfig`) dicts of `transformers` describing the two towers.

    The towers' own fields come from their `to_hf` (one correspondence table per tower); this adds what only
    the export decides: no dropout (an inference model) and the tokenizer's special token ids. Raises
    ValueError for an audio tower `transformers`' Whisper encoder cannot express (`WhisperConfig.to_hf`).
    """
    from transformers import CLIPTextConfig as HFCLIPTextConfig
    from transformers import WhisperConfig as HFWhisperConfig

    whisper = HFWhisperConfig(
        **config.audio.to_hf(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0)
    )
    clip_text = HFCLIPTextConfig(
        **config.text.to_hf(bos_token_id=bos_token_id, pad_token_id=pad_token_id, attention_dropout=0.0)
    )
    return whisper.to_dict(), clip_text.to_dict()


def _write_tokenizer(tokenizer_dir: Path, out: Path, max_text_length: int) -> None:
    """Copy the tokenizer files; `tokenizer_config.json` gets the training text length and the special tokens
    `load_tokenizer` falls back to where the files, read with transformers' precedence (`read_settings`), name
    none."""
    from wavlink_jax.tokenizer import BOS_TOKEN, CONFIG_FILE, EOS_TOKEN, read_settings

    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copyfile(tokenizer_dir / name, out / name)
    config_file = out / CONFIG_FILE
    settings = json.loads(config_file.read_text()) if config_file.exists() else {"tokenizer_class": "CLIPTokenizer"}
    named = read_settings(out)
    eos = named.get("eos_token") or EOS_TOKEN
    for role, token in (("bos_token", BOS_TOKEN), ("eos_token", eos), ("pad_token", eos)):
        if not named.get(role):
            settings[role] = token
    settings["model_max_length"] = max_text_length
    config_file.write_text(json.dumps(settings, indent=2) + "\n")


STAGING_PREFIX = ".export-partial-"  # the directory inside `out` an export is written into (a killed export leaves it)


def _entries(out: Path) -> list[Path]:
    """What `out` holds, less the staging directories of earlier exports that were killed."""
    return [path for path in out.iterdir() if not path.name.startswith(STAGING_PREFIX)]


def check_output(out: Path, *, overwrite: bool, model_types: Collection[str]) -> None:
    """Refuse an `out` that an export may not take: a file, a path under a file, a link to nothing, or a non-empty
    directory unless `overwrite` and it is a previous export (config.json of one of `model_types`); `overwrite`
    never deletes other files. (Checked before the checkpoint is read: those failed after it, as errno's words.)"""
    if not out.exists():
        if out.is_symlink():
            raise FileExistsError(f"{out} is a link to {os.readlink(out)}, which does not exist; choose a new "
                                  "directory, or create the one it links to")
        above = next(parent for parent in out.parents if parent.exists())
        if not above.is_dir():
            raise NotADirectoryError(f"{out}: {above} is a file, not a directory; choose another output directory")
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose a new directory")
    if not _entries(out):
        return
    if not overwrite:
        raise FileExistsError(
            f"{out} exists and is not empty; choose a new directory or pass --overwrite (overwrite=True)"
        )
    try:
        model_type = json.loads((out / "config.json").read_text()).get("model_type")
        with safetensors.safe_open(out / WEIGHTS_FILE, "np") as weights:
            written_by = (weights.metadata() or {}).get(WRITTEN_BY_KEY)
    except (OSError, ValueError, AttributeError, safetensors.SafetensorError):
        model_type = written_by = None
    if model_type not in model_types or written_by != WRITTEN_BY:
        raise FileExistsError(
            f"{out} is not a previous export (config.json of model_type {' or '.join(map(repr, model_types))} and "
            f"{WEIGHTS_FILE} written by {WRITTEN_BY}) and is not empty; --overwrite replaces an export's directory "
            "only, never other files: choose a new directory, or empty this one yourself"
        )


@contextlib.contextmanager
def _staged_output(out: Path, *, overwrite: bool, model_types: Collection[str]) -> Iterator[Path]:
    """A fresh directory inside `out` (created if new) to write an export into. When the block completes, what
    `out` held (nothing, or a previous export that `check_output` verified, checked again now) is deleted and
    the written entries move up into `out`, so `out` holds exactly them; a failed block leaves `out` as it was (a
    new `out` is removed again). `out` itself is never renamed or replaced: it keeps its mode, group and
    ownership, and may be a mount point, the current directory or a directory in a parent the user cannot
    write. A killed export leaves a `.export-partial-*` directory inside `out`, which the next export ignores and
    deletes."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}"
    staging.mkdir()  # the mode every new directory gets (tempfile.mkdtemp's would be 0700)
    moved = False
    try:
        yield staging
        check_output(out, overwrite=overwrite, model_types=model_types)  # nothing else was written there since
        for path in out.iterdir():
            if path == staging:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        for path in staging.iterdir():
            path.rename(out / path.name)
        moved = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not moved:
            with contextlib.suppress(OSError):
                out.rmdir()  # only while empty: never what someone else wrote there meanwhile


def export_model(
    model: WavLink, out: str | os.PathLike, *, tokenizer_dir: str | os.PathLike, window_seconds: float,
    max_text_length: int, overwrite: bool = False,
) -> Path:
    """Write `model` (a plain WavLink, LoRA merged) as a `transformers` remote-code directory at `out`.

    `out` must be new or empty; with `overwrite`, a previous export there is replaced as a whole (no file of it
    is left beside the new one). The files are written into a directory inside `out` and moved up at the end.
    """
    from wavlink_jax import torch_model, waveform_layout
    from wavlink_jax.tokenizer import load_tokenizer

    out, tokenizer_dir = Path(out).expanduser(), Path(tokenizer_dir)
    # Everything that can refuse the export runs before anything is written.
    check_output(out, overwrite=overwrite, model_types=(MODEL_TYPE,))
    tokenizer = load_tokenizer(tokenizer_dir, max_length=max_text_length)  # refuses an unusable directory
    audio_config, text_config = hf_tower_configs(
        model.config, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    config = torch_model.WavLinkConfig(
        audio_config=audio_config,
        text_config=text_config,
        embed_dim=model.config.embed_dim,
        matryoshka_dims=list(model.config.matryoshka_dims),
        window_seconds=float(window_seconds),
        max_text_length=int(max_text_length),
        architectures=["WavLinkModel"],
        dtype="float32",
    ).to_dict()
    config["auto_map"] = AUTO_MAP
    weights = export_weights(model)
    with _staged_output(out, overwrite=overwrite, model_types=(MODEL_TYPE,)) as staging:
        _write_tokenizer(tokenizer_dir, staging, max_text_length)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_safetensors(weights, staging / WEIGHTS_FILE, metadata=WEIGHTS_METADATA)
        shutil.copyfile(torch_model.__file__, staging / MODELING_FILE)
        shutil.copyfile(waveform_layout.__file__, staging / Path(waveform_layout.__file__).name)
    return out


def export(workdir: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None,
           overwrite: bool = False) -> Path:
    """Export a training workdir's checkpoint (`step`, default the latest) to `out`; returns `out` (`~` expanded)."""
    from wavlink_jax import inference

    out = Path(out).expanduser()
    check_output(out, overwrite=overwrite, model_types=(MODEL_TYPE,))  # before the (slow) read
    loaded = inference.read_workdir(workdir, step)
    export_model(
        loaded.model,
        out,
        tokenizer_dir=loaded.tokenizer_dir,
        window_seconds=loaded.window_seconds,
        max_text_length=loaded.max_text_length,
        overwrite=overwrite,
    )
    logger.info("exported %s (step %s) to %s", workdir, loaded.step, out)
    return out


def read_export_config(directory: Path) -> dict:
    """config.json of a directory written by `export_model`; anything else (a training workdir, another model)
    is a CheckpointError saying what it is and what to give."""
    config = read_hf_config(directory)
    if config.get("model_type") != MODEL_TYPE:
        workdir = (directory / "checkpoints").is_dir()
        what = "a training workdir: export it first (python -m wavlink_jax.export)" if workdir else (
            f"config.json has model_type {config.get('model_type')!r}, not {MODEL_TYPE!r}"
        )
        raise CheckpointError(f"{directory}: {what}; expected a directory written by python -m wavlink_jax.export")
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise CheckpointError(
            f"{directory / 'config.json'} lacks {missing}, which every export writes; export the training workdir "
            "again (python -m wavlink_jax.export --workdir W --out DIR)"
        )
    return config


def model_config(hf_config: dict, **tower_overrides: Any) -> WavLinkConfig:
    """The `WavLinkConfig` an exported config.json describes (its keys checked by `read_export_config`);
    `tower_overrides` set fields of both towers that are not in it (e.g. `dtype`, `remat`)."""
    return WavLinkConfig(
        audio=WhisperConfig.from_hf(hf_config["audio_config"], **tower_overrides),
        text=CLIPTextConfig.from_hf(hf_config["text_config"], **tower_overrides),
        embed_dim=int(hf_config["embed_dim"]),
        matryoshka_dims=tuple(hf_config["matryoshka_dims"]),
    )


def export_tower(
    export_dir: str | os.PathLike, tower: str, out: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """One tower of an exported directory as a plain `transformers` checkpoint in `out`.

    `audio`: a bare Whisper encoder (config.json of model_type "whisper", `conv1.weight`, `layers.N...`) that
    `wavlink_jax.convert.load_whisper` and `transformers`' `WhisperEncoder.from_pretrained` load (the global
    token is not part of Whisper; it stays in the WavLink directory). `text`: a `CLIPTextModelWithProjection`.
    `out` must be new or empty, as for `export_model`; `overwrite` replaces a previous tower export there.
    """
    if tower not in TOWER_PREFIXES:
        raise ValueError(f"tower must be one of {sorted(TOWER_PREFIXES)}, got {tower!r}")
    export_dir, out = Path(export_dir).expanduser(), Path(out).expanduser()
    check_output(out, overwrite=overwrite, model_types=TOWER_MODEL_TYPES)
    config = read_export_config(export_dir)
    prefix = TOWER_PREFIXES[tower]
    weights = read_hf_directory(export_dir)
    # Read as strictly as JAX inference reads the directory: a tensor missing, unexpected or of another shape is
    # refused with the list (copied as it was, transformers would have filled a missing one with random values).
    wavlink_config = model_config(config)
    model = nnx.eval_shape(lambda: WavLink(wavlink_config, rngs=nnx.Rngs(0)))
    assign_strict(model, weights, name_map(wavlink_config), source=str(export_dir), check_only=True)
    tower_weights = {name[len(prefix):]: value for name, value in weights.items() if name.startswith(prefix)}
    tower_config = dict(config[f"{tower}_config"])
    tower_config["architectures"] = ["WhisperEncoder" if tower == "audio" else "CLIPTextModelWithProjection"]
    with _staged_output(out, overwrite=overwrite, model_types=TOWER_MODEL_TYPES) as staging:
        (staging / "config.json").write_text(json.dumps(tower_config, indent=2, sort_keys=True) + "\n")
        write_safetensors(tower_weights, staging / WEIGHTS_FILE, metadata=WEIGHTS_METADATA)
        if tower == "text":
            for name in TOKENIZER_FILES:
                if (export_dir / name).exists():
                    shutil.copyfile(export_dir / name, staging / name)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m wavlink_jax.export",
        description="Export a training workdir to a Hugging Face directory that transformers.AutoModel "
        "loads with trust_remote_code=True.",
    )
    parser.add_argument(
        "--workdir", required=True, type=os.path.expanduser, help="training run directory (config.json, checkpoints/)"
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", required=True, type=os.path.expanduser, help="output directory")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace a previous export in --out as a whole (a directory that is not an export is never deleted)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with cli.user_errors():
        out = export(args.workdir, args.out, step=args.step, overwrite=args.overwrite)
    print(f"exported to {out}")


if __name__ == "__main__":
    main()
