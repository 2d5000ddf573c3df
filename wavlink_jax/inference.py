"""Embeddings from a trained model: `load(path)` → `.embed_audio(waveforms_16k, dim=None)`, `.embed_text(texts, dim=None)`.

`path` is either a training workdir (`config.json` + `checkpoints/`; the latest checkpoint, or `step=`) or a
directory written by `python -m wavlink_jax.export`. Both give the same model: LoRA adapters are merged,
the tokenizer is the run's (a workdir's `config.data.tokenizer`, an export's own copy).

Audio: 16 kHz float waveforms, one 1-D array, a list of 1-D arrays of any lengths, or a `(B, samples)`
array. Each is brought to the model's window as evaluation does during training: cut to the head of the
window (`config.data.window_seconds`; an export's `window_seconds`; or `window_seconds=` up to the audio
tower's 30 s, e.g. to embed long clips whole) or zero-padded at the end. `embed_audio(..., long_clips="mean")`
covers a longer waveform with consecutive windows instead and averages their embeddings (`ClipWindows`,
`waveform_layout.window_plan`); every row of a `(B, samples)` array is then audio to its end, so clips of
different lengths go in a list, not zero-padded into one array. The log-mel spectrogram is computed inside the
jitted function. Decode files with `wavlink_jax.data.audio_io.load_audio`.

Text: captions are tokenized as in training (cut / padded to the training text length).

Both are embedded in fixed-size batches (`batch_size`, rounded up to a multiple of the device count and
split over all local devices; the last batch is padded and its padding dropped), so one compiled function
serves every call. Results are L2-normalised float32 numpy arrays; `dim` picks a Matryoshka size (the
prefix of the embedding, re-normalised). Computation is float32 (matmuls at full float32 precision, also on
GPUs and TPUs, whose default is lower) unless `dtype=` says otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from wavlink_jax import audio, checkpoint, export, sharding, train_step
from wavlink_jax.convert.common import (
    CheckpointError,
    assign_strict,
    check_filled,
    read_hf_directory,
    read_json,
    resolve_source,
)
from wavlink_jax.data import audio_io
from wavlink_jax.evaluate import ClipWindows, embed_in_batches, truncate_normalize
from wavlink_jax.models.wavlink import WavLink, WavLinkConfig
from wavlink_jax.tokenizer import load_tokenizer
from wavlink_jax.waveform_layout import (
    check_batch_size,
    check_finite_samples,
    check_float_samples,
    check_long_clips,
    check_not_channels_last,
    checked_texts,
)


@dataclasses.dataclass
class LoadedModel:
    """A concrete WavLink module with what inference needs beside its weights."""

    model: WavLink
    tokenizer_dir: Path
    window_seconds: float
    max_text_length: int
    path: Path  # the workdir or exported directory it was read from
    step: int | None  # the checkpoint step of a workdir; None for an exported directory

    @property
    def source(self) -> str:
        return str(self.path) if self.step is None else f"{self.path} (step {self.step})"


def _runtime_overrides(dtype: str) -> dict:
    """Tower runtime fields for inference: the compute dtype, no remat, jax's default attention."""
    return {"dtype": dtype, "remat": "none", "attention_implementation": None}


def read_workdir(workdir: str | os.PathLike, step: int | None = None, *, dtype: str = "float32") -> LoadedModel:
    """The model of a training workdir at `step` (default: the latest checkpoint), LoRA merged."""
    items, raw_config, step = checkpoint.read_workdir_state(workdir, step, items=("params", "buffers"))
    config = ml_collections.ConfigDict({**raw_config, **_runtime_overrides(dtype)})
    model_config = train_step.model_config(config)
    source, config_file = f"{workdir} (step {step})", checkpoint.step_config_file(workdir, step)
    params = checkpoint.merged_params(items["params"], raw_config, config_file=config_file)

    abstract = nnx.eval_shape(lambda: WavLink(model_config, rngs=nnx.Rngs(0)))
    graphdef, param_state, buffer_state = nnx.split(abstract, nnx.Param, ...)
    for kind, saved, template in (("params", params, param_state), ("buffers", items["buffers"], buffer_state)):
        checkpoint.check_compatible(saved, train_step.to_tree(template), source=f"{source} {kind}")
        nnx.replace_by_pure_dict(template, jax.tree.map(jnp.asarray, saved))
    model = nnx.merge(graphdef, param_state, buffer_state)

    try:
        tokenizer_dir = resolve_source(config.data.tokenizer)  # a directory, or a hub id as in training
    except CheckpointError as err:
        raise CheckpointError(
            f"{workdir}: the run's tokenizer {config.data.tokenizer!r} (config.data.tokenizer in {config_file}) "
            f"cannot be found from here ({err}); run from the directory the run was started in (an export made "
            "there, python -m wavlink_jax.export, holds a copy of the tokenizer and loads from anywhere)"
        ) from err
    return LoadedModel(
        model=model,
        tokenizer_dir=tokenizer_dir,
        window_seconds=float(config.data.window_seconds),
        max_text_length=int(config.data.max_text_length),
        path=Path(workdir),
        step=step,
    )


def read_exported(directory: str | os.PathLike, *, dtype: str = "float32") -> LoadedModel:
    """The model of a directory written by `wavlink_jax.export` (strict: every tensor used, none missing)."""
    directory = Path(directory)
    hf_config = export.read_export_config(directory)
    config = export.model_config(hf_config, **_runtime_overrides(dtype))
    model = nnx.eval_shape(lambda: WavLink(config, rngs=nnx.Rngs(0)))
    assign_strict(model, read_hf_directory(directory), export.name_map(config), source=str(directory))
    check_filled(model, "export.name_map")
    return LoadedModel(
        model=model,
        tokenizer_dir=directory,
        window_seconds=float(hf_config["window_seconds"]),
        max_text_length=int(hf_config["max_text_length"]),
        path=directory,
        step=None,
    )


def read_model(path: str | os.PathLike, step: int | None = None, *, dtype: str = "float32") -> LoadedModel:
    """A workdir (has `checkpoints/`) or an exported directory (config.json of model_type "wavlink")."""
    path = Path(path).expanduser()
    if (path / checkpoint.CHECKPOINT_SUBDIR).is_dir():
        return read_workdir(path, step, dtype=dtype)
    if step is not None:
        raise ValueError(
            f"{path}: a step (--step {step}) applies to training workdirs only; this is not one (no checkpoints/)"
        )
    config_file = path / "config.json"
    if config_file.exists() and read_json(config_file).get("model_type") == export.MODEL_TYPE:
        return read_exported(path, dtype=dtype)
    raise CheckpointError(
        f"{path}: neither a training workdir (config.json + checkpoints/) nor an exported WavLink directory "
        "(config.json with model_type 'wavlink')"
    )


class Embedder:
    """Jitted, batched embedding of waveforms and texts with one loaded model (see the module docstring)."""

    def __init__(
        self, loaded: LoadedModel, *, batch_size: int = 32, progress: bool = False, window_seconds: float | None = None
    ):
        check_batch_size(batch_size)
        self.loaded = loaded
        self.config: WavLinkConfig = loaded.model.config
        self.window_seconds = loaded.window_seconds if window_seconds is None else float(window_seconds)
        self.config.audio.check_window(self.window_seconds, "window_seconds")
        self.tokenizer = load_tokenizer(loaded.tokenizer_dir, max_length=loaded.max_text_length)
        self.mesh = sharding.create_mesh({"data": -1}, devices=jax.local_devices())
        divisor = sharding.batch_divisor(self.mesh)
        self.batch_size = -(-batch_size // divisor) * divisor
        self.progress = progress
        graphdef, state = nnx.split(loaded.model)
        self._state = jax.device_put(state, sharding.replicated(self.mesh))
        n_mels = self.config.audio.n_mels
        precision = train_step.embedding_matmul_precision(self.config.audio.dtype)

        def audio_fn(state, waveform, dim):
            with jax.default_matmul_precision(precision):
                return nnx.merge(graphdef, state).embed_audio(audio.log_mel_spectrogram(waveform, n_mels), dim)

        def text_fn(state, tokens, dim):
            with jax.default_matmul_precision(precision):
                return nnx.merge(graphdef, state).embed_text(tokens["input_ids"], tokens["attention_mask"], dim)

        self._audio_fn = jax.jit(audio_fn, static_argnames="dim")
        self._text_fn = jax.jit(text_fn, static_argnames="dim")

    @property
    def window_samples(self) -> int:
        """The length every waveform is cut or zero-padded to (`window_seconds` at 16 kHz)."""
        return audio_io.samples(self.window_seconds)

    def _checked_clips(self, waveforms: np.ndarray | Sequence[np.ndarray]) -> np.ndarray | list[np.ndarray]:
        """The waveforms (numpy, jax or torch arrays) as float32 mono clips: a 2-D float32 array as it is (its rows
        are the clips), anything else as a list of 1-D arrays. Refuses `(samples, channels)` arrays, integer PCM
        and clips that are not 1-D or hold NaN or infinite samples, with the exported PyTorch model's rules and
        words."""
        if not isinstance(waveforms, (list, tuple)):  # one array of any kind (numpy, jax, torch): a clip or a batch
            waveforms = np.asarray(waveforms)
            check_not_channels_last(waveforms.shape)
            if waveforms.ndim == 2 and waveforms.size and waveforms.dtype == np.float32:
                # Not copied (an evaluation set's windows can take tens of GB); a NaN or an infinity shows in the
                # rows' largest or smallest sample, which needs no temporary array.
                finite = np.isfinite(waveforms.max(axis=1)) & np.isfinite(waveforms.min(axis=1))
                if not finite.all():
                    check_finite_samples(int(np.argmin(finite)), False)
                return waveforms
            if waveforms.ndim <= 1:
                waveforms = [waveforms]
        clips = []
        for index, waveform in enumerate(waveforms):
            waveform = np.asarray(waveform)
            check_float_samples(index, waveform.dtype, np.issubdtype(waveform.dtype, np.floating))
            if waveform.ndim != 1:
                raise ValueError(f"waveform {index} has shape {waveform.shape}; expected 1-D mono 16 kHz samples")
            with np.errstate(over="ignore"):  # refused below, not warned about
                clip = waveform.astype(np.float32, copy=False)
            check_finite_samples(index, bool(np.isfinite(clip).all()))  # in float32: 1e39 in float64 is infinite
            clips.append(clip)
        if not clips:
            raise ValueError("embed_audio got no waveforms")
        return clips

    def prepare_waveforms(self, waveforms: np.ndarray | Sequence[np.ndarray]) -> np.ndarray | ClipWindows:
        """`(B, window_samples)` float32: each waveform cut to the head of the window or zero-padded (a float32
        batch of windows, or `ClipWindows` of this window, is returned as it is)."""
        if isinstance(waveforms, ClipWindows):
            self._check_clip_windows(waveforms)
            return waveforms  # cut a batch at a time by `embed_in_batches`
        clips = self._checked_clips(waveforms)
        if isinstance(clips, np.ndarray) and clips.shape[1] == self.window_samples:
            return clips
        return np.stack([audio.pad_or_trim(clip, self.window_samples) for clip in clips])

    def _check_clip_windows(self, windows: ClipWindows) -> None:
        """`ClipWindows` are embedded as they are, so their windows must be this embedder's."""
        if windows.window_samples != self.window_samples:
            raise ValueError(
                f"windows of {windows.window_samples} samples given to an embedder whose window is "
                f"{self.window_samples} samples ({self.window_seconds} s): cut the clips with this window, or load "
                "the model with window_seconds to match"
            )

    def _embed_windows(self, windows: np.ndarray | ClipWindows, dim: int | None) -> np.ndarray:
        fn = functools.partial(self._audio_fn, self._state, dim=dim)
        return embed_in_batches(fn, windows, self.batch_size, self.mesh, desc="audio", progress=self.progress)

    def embed_audio(
        self, waveforms: np.ndarray | Sequence[np.ndarray], dim: int | None = None, *, long_clips: str = "head"
    ) -> np.ndarray:
        """16 kHz waveforms → L2-normalised float32 `(B, dim or embed_dim)`. A waveform longer than the window is
        cut to its head (`long_clips="head"`), or embedded window by window and the windows' embeddings averaged,
        weighted by the audio each holds, and re-normalised (`"mean"`: a `(B, samples)` array's rows count to
        their end, zeros too; `dim` then takes the prefix of that mean, re-normalised, as from an index of
        full-size embeddings)."""
        check_long_clips(long_clips)
        dim = self.config.served_dim(dim)
        if long_clips == "head":
            return self._embed_windows(self.prepare_waveforms(waveforms), dim)
        if isinstance(waveforms, ClipWindows):
            raise ValueError("ClipWindows are windows already: embed them with long_clips='head' and average them "
                             "with their .mean")
        windows = ClipWindows(self._checked_clips(waveforms), self.window_samples)
        pooled = windows.mean(self._embed_windows(windows, None))
        return pooled if dim is None else truncate_normalize(pooled, dim)

    def embed_text(self, texts: Sequence[str], dim: int | None = None) -> np.ndarray:
        """Texts → L2-normalised float32 `(len(texts), dim or embed_dim)`."""
        texts = checked_texts(texts)
        fn = functools.partial(self._text_fn, self._state, dim=self.config.served_dim(dim))
        input_ids, attention_mask = self.tokenizer(texts)
        tokens = {"input_ids": input_ids, "attention_mask": attention_mask}
        return embed_in_batches(fn, tokens, self.batch_size, self.mesh, desc="text", progress=self.progress)


def load(
    path: str | os.PathLike,
    step: int | None = None,
    *,
    batch_size: int = 32,
    dtype: str = "float32",
    progress: bool = False,
    window_seconds: float | None = None,
) -> Embedder:
    """An `Embedder` for a training workdir (latest checkpoint, or `step`) or an exported directory;
    `window_seconds` overrides the model's training window (see the module docstring)."""
    return Embedder(
        read_model(path, step, dtype=dtype), batch_size=batch_size, progress=progress, window_seconds=window_seconds
    )
