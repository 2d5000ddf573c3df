"""The Whisper audio encoder in Flax NNX, with WavLink's appended global token: WavLink's audio tower.

log-mel `(B, n_mels, frames)` → conv(k3, p1) + GELU → conv(k3, s2, p1) + GELU → + sinusoidal positions
→ [append the global token] → pre-LN transformer blocks (`layers.EncoderStack`, exact-erf GELU, `k_proj`
without bias) → final LayerNorm. Without the token this is PyTorch Whisper's encoder; with it, the last
position's output is `global_state`, the vector WavLink projects to its audio embedding.

Two parameters behave differently from the rest, and the trainer must know:

* `position_embedding` is Whisper's fixed sinusoid table `(max_positions, width)`. Checkpoints carry it and
  PyTorch never trains it (`requires_grad=False`), so it is a `PositionTable` variable, **not** an
  `nnx.Param`: optimizers built over `nnx.Param` leave it alone, while `nnx.state(model)` still saves it.
  It starts as OpenAI's `sinusoids(max_positions, width)` and is overwritten by `load_whisper`.
* `global_token` `(width,)` is new (no checkpoint has it) and trained from scratch. Its initialisation rule:
  normal with standard deviation 0.02 (Whisper's `init_std`, also our dense-kernel init; `init_global_token`),
  drawn from the `params` stream of the constructor's `rngs` (`load_whisper`: from `jax.random.key(seed)`).
  It is appended *after* the position add and gets no position of its own; every frame attends to it and it
  to every frame.

Windows shorter than 30 s use the first rows of the position table (Whisper's 3000 frames → 1500
positions); `frames` is expected to be even (odd counts give `(frames + 1) // 2` outputs, like PyTorch).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wavlink_jax import audio
from wavlink_jax.models import layers
from wavlink_jax.models.hf_fields import RUN_SETTINGS_NOT_IN_HF, HFField, HFFields


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
    """Sizes and options of the audio tower.

    `dtype` is the compute dtype (parameters stay fp32); `remat` is "none" or a `layers.REMAT_POLICIES`
    name; `attention_implementation` is None (jax picks), "xla", "cudnn" or "cudnn_unpadded"; `global_token=False`
    gives plain Whisper (`global_state` is then None).
    """

    n_mels: int
    width: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    max_positions: int = 1500
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5
    global_token: bool = True
    dtype: str = "float32"
    attention_implementation: str | None = None
    remat: str = "none"

    def __post_init__(self):
        layers.check_tower_config(self, ("n_mels", "width", "num_layers", "num_heads", "mlp_dim", "max_positions"))
        if self.width % 2:
            raise ValueError(f"WhisperConfig: width {self.width} must be even (sinusoidal positions)")

    @property
    def max_window_seconds(self) -> float:
        """The longest input the position table covers (2 mel frames per position: Whisper's 1500 = 30 s)."""
        return 2 * self.max_positions * audio.HOP_LENGTH / audio.SAMPLE_RATE

    def check_window(self, seconds: float, setting: str) -> None:
        """Refuse a window (`setting` names where it was set) too short for the log-mel's STFT or that the
        position table does not cover, before anything is decoded or compiled for it."""
        shortest = audio.N_FFT // 2 / audio.SAMPLE_RATE  # the log-mel's reflect padding needs more samples
        if not (seconds <= self.max_window_seconds and round(seconds * audio.SAMPLE_RATE) > audio.N_FFT // 2):
            raise ValueError(
                f"{setting} = {seconds:g} s: the audio tower takes windows of more than {shortest:g} s (half the "
                f"STFT's frame) and at most {self.max_window_seconds:g} s ({self.max_positions} positions)"
            )

    @classmethod
    def preset(cls, name: str, **overrides) -> WhisperConfig:
        """The encoder of an official Whisper checkpoint (`tiny`, `base.en`, `large-v3`, ...), with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown Whisper preset {name!r}; expected one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_hf(cls, config: dict, **overrides) -> WhisperConfig:
        """From a Hugging Face `WhisperConfig` dict (`config.json`); missing fields take its defaults.

        `overrides` set any field, including those `HF_FIELDS.not_in_hf` lists (e.g. `dtype`, `remat`).
        """
        return cls(**{**HF_FIELDS.read(config), **overrides})

    def to_hf(self, **extra) -> dict:
        """The Hugging Face `WhisperConfig` keys that describe this encoder (`HF_FIELDS`), plus `extra` settings.

        The decoder's keys are left to `transformers`' defaults. Raises ValueError when `layer_norm_eps` is not
        1e-5, the value `transformers`' Whisper encoder is fixed at (no Whisper config describes such an encoder).
        """
        if self.layer_norm_eps != HF_LAYER_NORM_EPS:
            raise ValueError(
                f"WhisperConfig.layer_norm_eps is {self.layer_norm_eps}, but transformers' Whisper encoder fixes "
                f"it at {HF_LAYER_NORM_EPS}: no transformers WhisperConfig describes this audio tower, so it cannot "
                "be exported as a Whisper encoder"
            )
        return HF_FIELDS.write(self, extra)


HF_LAYER_NORM_EPS = 1e-5  # transformers' WhisperEncoder builds its LayerNorms with PyTorch's default eps
HF_FIELDS = HFFields(
    fields=(
        HFField("n_mels", "num_mel_bins", 80),
        HFField("width", "d_model", 384),
        HFField("num_layers", "encoder_layers", 4),
        HFField("num_heads", "encoder_attention_heads", 6),
        HFField("mlp_dim", "encoder_ffn_dim", 1536),
        HFField("max_positions", "max_source_positions", 1500),
        HFField("activation", "activation_function", "gelu"),
    ),
    not_in_hf={
        "layer_norm_eps": f"transformers' Whisper encoder fixes it at {HF_LAYER_NORM_EPS} (to_hf refuses others)",
        "global_token": "WavLink's addition to Whisper; an export stores the token as its own tensor",
        **RUN_SETTINGS_NOT_IN_HF,
    },
)


def _official(width: int, num_layers: int, num_heads: int, n_mels: int = 80) -> WhisperConfig:
    return WhisperConfig(n_mels=n_mels, width=width, num_layers=num_layers, num_heads=num_heads, mlp_dim=4 * width)


_SIZES = {
    "tiny": _official(384, 4, 6),
    "base": _official(512, 6, 8),
    "small": _official(768, 12, 12),
    "medium": _official(1024, 24, 16),
}
PRESETS: dict[str, WhisperConfig] = {
    **_SIZES,
    **{f"{name}.en": config for name, config in _SIZES.items()},  # English-only models: same encoders
    "large-v1": _official(1280, 32, 20),
    "large-v2": _official(1280, 32, 20),
    "large-v3": _official(1280, 32, 20, n_mels=128),
    "large-v3-turbo": _official(1280, 32, 20, n_mels=128),  # turbo prunes the decoder only
}


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """OpenAI Whisper's position table `(length, channels)`: [sin | cos] at geometric timescales.

    Computed in float64 and rounded to float32 (PyTorch computes it in float32: tables differ by ~1e-4).
    """
    inv_timescales = np.exp(-np.log(max_timescale) / (channels // 2 - 1) * np.arange(channels // 2))
    scaled_time = np.arange(length)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled_time), np.cos(scaled_time)], axis=1).astype(np.float32)


def init_global_token(key: jax.Array, width: int) -> nnx.Param:
    """The global token's documented initialisation: normal(0, 0.02), fp32, logical axes ('embed',)."""
    return nnx.Param(nnx.initializers.normal(0.02)(key, (width,), jnp.float32), out_sharding=("embed",))


class PositionTable(nnx.Variable):
    """A fixed (non-trainable) table loaded from the checkpoint: not an `nnx.Param`, so optimizers skip it."""


class WhisperOutput(NamedTuple):
    hidden_states: jax.Array  # (B, (frames + 1) // 2, width): final-LayerNorm output at the audio frames
    global_state: jax.Array | None  # (B, width): final-LayerNorm output at the global token; None without it


class WhisperEncoder(nnx.Module):
    """Whisper's audio encoder, optionally with WavLink's appended global token."""

    def __init__(self, config: WhisperConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = layers.resolve_dtype(config.dtype)
        width = config.width

        def conv(in_features: int, stride: int) -> nnx.Conv:
            return nnx.Conv(
                in_features,
                width,
                kernel_size=(3,),
                strides=(stride,),
                padding=((1, 1),),
                dtype=dtype,
                param_dtype=jnp.float32,
                kernel_init=nnx.with_partitioning(layers.DEFAULT_KERNEL_INIT, (None, None, "embed")),
                bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
                rngs=rngs,
            )

        self.conv1 = conv(config.n_mels, 1)
        self.conv2 = conv(width, 2)
        self.position_embedding = PositionTable(
            jnp.asarray(sinusoids(config.max_positions, width)), out_sharding=(None, "embed")
        )
        self.global_token = init_global_token(rngs.params(), width) if config.global_token else None
        self.encoder = layers.EncoderStack.for_tower(config, key_bias=False, rngs=rngs)
        self.final_norm = layers.layer_norm(width, epsilon=config.layer_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, mel: jax.Array, *, global_only: bool = False) -> WhisperOutput:
        """`mel` `(B, n_mels, frames)` (see `wavlink_jax.audio.log_mel_spectrogram`) → `WhisperOutput`.

        `global_only=True` (needs the global token) returns only `global_state` (`hidden_states` is None):
        the last block then computes just the token's row, which is all WavLink's embedding reads.
        """
        config = self.config
        if mel.ndim != 3 or mel.shape[1] != config.n_mels or mel.shape[2] < 1:
            raise ValueError(
                f"Whisper encoder expects log-mel of shape (batch, n_mels={config.n_mels}, frames), got "
                f"{tuple(mel.shape)}; compute it with wavlink_jax.audio.log_mel_spectrogram(waveform, "
                f"n_mels={config.n_mels}) (large-v3 uses 128 mel bins, the other Whisper models 80)"
            )
        frames = mel.shape[2]
        positions = (frames + 1) // 2
        if positions > config.max_positions:
            raise ValueError(
                f"{frames} mel frames need {positions} positions but the encoder's table holds "
                f"{config.max_positions} (at most {2 * config.max_positions} frames = "
                f"{2 * config.max_positions / 100:g} s); cut the waveform with wavlink_jax.audio.pad_or_trim"
            )
        dtype = layers.resolve_dtype(config.dtype)
        gelu = layers.activation_fn("gelu")  # the stem is always exact GELU
        x = jnp.swapaxes(mel, 1, 2).astype(dtype)  # (B, frames, n_mels): channels last for nnx.Conv
        x = gelu(self.conv2(gelu(self.conv1(x))))
        x = x + self.position_embedding.get_value()[:positions].astype(x.dtype)
        if self.global_token is not None:
            token = jnp.broadcast_to(self.global_token.get_value().astype(x.dtype), (x.shape[0], 1, x.shape[2]))
            x = jnp.concatenate([x, token], axis=1)
        if global_only:
            if self.global_token is None:
                raise ValueError("global_only=True needs an encoder built with global_token=True")
            token_out = self.final_norm(self.encoder(x, last_query_start=-1))
            return WhisperOutput(hidden_states=None, global_state=token_out[:, 0])
        x = self.final_norm(self.encoder(x))
        if self.global_token is None:
            return WhisperOutput(hidden_states=x, global_state=None)
        return WhisperOutput(hidden_states=x[:, :-1], global_state=x[:, -1])
