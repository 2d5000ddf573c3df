"""WavLink: the Whisper audio tower (global token) and the CLIP text tower, projected to one embedding space.

audio: log-mel → `WhisperEncoder` (appended global token) → `global_state` `(B, D)` → `audio_projection`
(D → E) → L2 normalise. text: token ids → `CLIPTextEncoder` → `embedding` (pooled end-of-text state after
CLIP's pretrained `text_projection`) → `text_projection` (→ E) → L2 normalise.

The model also owns the losses' learnable scalars, one log-temperature per loss and the sigmoid bias:
`clip_logit_scale` (init log 1/0.07, CLIP's), `sigmoid_logit_scale` (init log 10) and `sigmoid_logit_bias`
(init −10, SigLIP's). The two losses have separate temperatures because their usual inits differ by 10× and
their optima need not coincide; all Matryoshka levels share them. The losses themselves live in
`wavlink_jax.losses`.

Matryoshka: the first `d` features of an embedding, re-normalised, are the embedding at size `d`, for each
`d` in `config.matryoshka_dims` (default E, E/2, E/4, E/8).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from wavlink_jax.losses import l2_normalize, matryoshka_prefix
from wavlink_jax.models import layers
from wavlink_jax.models.clip_text import CLIPTextConfig, CLIPTextEncoder
from wavlink_jax.models.whisper import WhisperConfig, WhisperEncoder

# The paper's three sizes: (Whisper preset, CLIP text preset, embedding size E).
PRESETS: dict[str, tuple[str, str, int]] = {
    "base": ("base.en", "vit-b-32", 512),
    "small": ("small.en", "vit-b-32", 512),
    "large": ("large-v3", "vit-l-14", 768),
}


@dataclasses.dataclass(frozen=True)
class WavLinkConfig:
    """The two towers' configs, the embedding size E, the Matryoshka sizes and the loss scalars' inits.

    `matryoshka_dims=None` means (E, E/2, E/4, E/8) (E must then be divisible by 8); given dims must be
    distinct sizes in 1..E whose largest is E (the loss trains exactly these sizes, and the full size is the
    one served by default), and are stored largest first. Logit scales are logs of the logit multiplier
    (CLIP: log 1/0.07; sigmoid: log 10).
    """

    audio: WhisperConfig
    text: CLIPTextConfig
    embed_dim: int
    matryoshka_dims: tuple[int, ...] | None = None
    clip_logit_scale_init: float = math.log(1 / 0.07)
    sigmoid_logit_scale_init: float = math.log(10.0)
    sigmoid_logit_bias_init: float = -10.0

    def __post_init__(self):
        if not self.audio.global_token:
            raise ValueError("WavLinkConfig.audio must have global_token=True: the audio embedding is the global token")
        if int(self.embed_dim) < 1:
            raise ValueError(f"WavLinkConfig.embed_dim must be positive, got {self.embed_dim}")
        for name in ("clip_logit_scale_init", "sigmoid_logit_scale_init", "sigmoid_logit_bias_init"):
            if not math.isfinite(getattr(self, name)):  # trained a step, then stopped on a NaN loss
                raise ValueError(
                    f"WavLinkConfig.{name} (config.model.{name} in a training config) must be a finite number, "
                    f"got {getattr(self, name)}"
                )
        if self.matryoshka_dims is None:
            if self.embed_dim % 8:
                raise ValueError(
                    f"embed_dim {self.embed_dim} is not divisible by 8, so the default Matryoshka dims "
                    "(E, E/2, E/4, E/8) do not exist; set matryoshka_dims explicitly"
                )
            dims = tuple(self.embed_dim // factor for factor in (1, 2, 4, 8))
        else:
            whole = all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in self.matryoshka_dims)
            dims = tuple(int(d) for d in self.matryoshka_dims) if whole else ()  # 256.7 is refused, not cut to 256
            if not dims or len(set(dims)) != len(dims) or not all(0 < d <= self.embed_dim for d in dims):
                halves = tuple(self.embed_dim // f for f in (1, 2, 4, 8) if self.embed_dim % f == 0)
                raise ValueError(
                    f"WavLinkConfig.matryoshka_dims {self.matryoshka_dims} must be distinct whole sizes in "
                    f"1..embed_dim ({self.embed_dim}); a config's matryoshka_dims do not follow a changed "
                    f"embed_dim: set them too, e.g. --config.model.matryoshka_dims='{halves}'"
                )
            if max(dims) != self.embed_dim:
                # The loss trains only these sizes, while embed_*(dim=None), export and the evaluation's
                # top-line metrics serve the full size: it must be one of them.
                raise ValueError(
                    f"WavLinkConfig.matryoshka_dims {self.matryoshka_dims} must include embed_dim "
                    f"({self.embed_dim}) as the largest size, or the full-size embedding is never trained; set "
                    f"matryoshka_dims={tuple(sorted({self.embed_dim, *dims}, reverse=True))} or a smaller embed_dim"
                )
        object.__setattr__(self, "matryoshka_dims", tuple(sorted(dims, reverse=True)))

    def served_dim(self, dim: int | None) -> int | None:
        """A requested embedding size → None for the full size E (None or E), else `dim` if it is a trained
        Matryoshka size; another prefix would work mechanically, but nothing trained it: refused."""
        if dim is None or dim == self.embed_dim:
            return None
        if dim not in self.matryoshka_dims:
            raise ValueError(
                f"embedding dim {dim} is not a trained size of this model; choose one of "
                f"{self.matryoshka_dims} (config.matryoshka_dims) or None for the full {self.embed_dim}"
            )
        return dim

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> WavLinkConfig:
        """The paper's `base`, `small` or `large` model, with field overrides.

        `audio=` / `text=` may be a full tower config or a dict of overrides for the preset's tower, e.g.
        `WavLinkConfig.preset("base", audio={"dtype": "bfloat16", "remat": "full"})`.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown WavLink preset {name!r}; expected one of {sorted(PRESETS)}")
        audio_preset, text_preset, embed_dim = PRESETS[name]
        audio, text = overrides.pop("audio", {}), overrides.pop("text", {})
        if isinstance(audio, dict):
            audio = WhisperConfig.preset(audio_preset, **audio)
        if isinstance(text, dict):
            text = CLIPTextConfig.preset(text_preset, **text)
        return cls(**{"audio": audio, "text": text, "embed_dim": embed_dim, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (for a workdir's config.json); `from_dict` inverts it."""
        return {**dataclasses.asdict(self), "matryoshka_dims": list(self.matryoshka_dims)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WavLinkConfig:
        """Inverse of `to_dict`; unknown or missing fields raise an error naming them."""
        fields = dict(data)
        fields["audio"] = _dataclass_from_dict(WhisperConfig, fields.get("audio"), "audio")
        fields["text"] = _dataclass_from_dict(CLIPTextConfig, fields.get("text"), "text")
        if fields.get("matryoshka_dims") is not None:
            fields["matryoshka_dims"] = tuple(fields["matryoshka_dims"])
        return _dataclass_from_dict(cls, fields, "model")


def _dataclass_from_dict(cls: type, data: Any, where: str):
    if not isinstance(data, dict):
        raise ValueError(f"model config: {where!r} must be a dict of {cls.__name__} fields, got {type(data).__name__}")
    names = {field.name for field in dataclasses.fields(cls)}
    required = {
        field.name
        for field in dataclasses.fields(cls)
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    }
    unknown, missing = sorted(set(data) - names), sorted(required - set(data))
    if unknown or missing:
        raise ValueError(
            f"model config {where!r} does not match {cls.__name__}: unknown fields {unknown}, missing fields {missing}"
        )
    return cls(**data)


class WavLink(nnx.Module):
    """Audio and text towers with their projection heads and the losses' learnable scalars."""

    def __init__(self, config: WavLinkConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.audio = WhisperEncoder(config.audio, rngs=rngs)
        self.text = CLIPTextEncoder(config.text, rngs=rngs)
        # The heads are small: they compute in full float32 whatever the towers' dtype and the platform's
        # default matmul precision (TF32 on GPU, bf16 passes on TPU), as the loss's logits do.
        head = dict(precision=jax.lax.Precision.HIGHEST, rngs=rngs)
        self.audio_projection = layers.dense(config.audio.width, config.embed_dim, ("embed", None), **head)
        self.text_projection = layers.dense(config.text.projection_dim, config.embed_dim, (None, None), **head)

        def scalar(value: float) -> nnx.Param:
            return nnx.Param(jnp.asarray(value, jnp.float32), out_sharding=())

        self.clip_logit_scale = scalar(config.clip_logit_scale_init)
        self.sigmoid_logit_scale = scalar(config.sigmoid_logit_scale_init)
        self.sigmoid_logit_bias = scalar(config.sigmoid_logit_bias_init)

    def project_audio(self, mel: jax.Array) -> jax.Array:
        """log-mel `(B, n_mels, frames)` → float32 `(B, E)` audio head outputs, before normalisation."""
        global_state = self.audio(mel, global_only=True).global_state.astype(jnp.float32)
        return self.audio_projection(global_state)

    def project_text(self, input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
        """Token ids `(B, L)` and mask (1 = token, right padding) → float32 `(B, E)` text head outputs, before
        normalisation."""
        return self.text_projection(self.text(input_ids, attention_mask).embedding.astype(jnp.float32))

    def embed_audio(self, mel: jax.Array, dim: int | None = None) -> jax.Array:
        """log-mel `(B, n_mels, frames)` → L2-normalised float32 `(B, dim or E)` audio embeddings."""
        return self._finish(self.project_audio(mel), self.config.served_dim(dim))

    def embed_text(self, input_ids: jax.Array, attention_mask: jax.Array | None, dim: int | None = None) -> jax.Array:
        """Token ids `(B, L)` and mask (1 = token, right padding) → L2-normalised float32 `(B, dim or E)`."""
        return self._finish(self.project_text(input_ids, attention_mask), self.config.served_dim(dim))

    def __call__(
        self, mel: jax.Array, input_ids: jax.Array, attention_mask: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """The heads' `(audio, text)` outputs, `(B, E)` each, before normalisation: the loss normalises each
        Matryoshka prefix itself (`wavlink_jax.losses.matryoshka_loss`), and training logs their norms."""
        return self.project_audio(mel), self.project_text(input_ids, attention_mask)

    def _finish(self, projected: jax.Array, dim: int | None) -> jax.Array:
        if dim is None:
            return l2_normalize(projected)
        return matryoshka_prefix(projected, dim)
