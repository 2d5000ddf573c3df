"""CLIP's text transformer in Flax NNX: WavLink's text tower.

token + learned position embeddings → pre-LN causal transformer blocks (`layers.EncoderStack`) → final
LayerNorm → the hidden state at the end-of-text token (`pooled`) → bias-free `text_projection` (`embedding`).
It computes what Hugging Face's `CLIPTextModelWithProjection` computes, including its two rules for finding
the end-of-text token (see `CLIPTextEncoder.__call__`).

Padding must be on the right (what the tokenizer produces): `attention_mask.sum(-1)` is each row's number
of valid tokens, the attention's key/value lengths. Valid positions never see padded ones, so a caption's
outputs do not depend on how long its batch is padded.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from wavlink_jax import sharding
from wavlink_jax.models import layers
from wavlink_jax.models.hf_fields import RUN_SETTINGS_NOT_IN_HF, HFField, HFFields


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Sizes and options of the text tower.

    `eos_token_id == 2` selects Hugging Face's legacy pooling (position of the largest token id, which is
    end-of-text in OpenAI's vocabulary); any other value pools at the first position holding that id.
    `dtype` is the compute dtype (parameters stay fp32); `remat` is a `layers.REMAT_POLICIES` name or "none".
    """

    vocab_size: int
    width: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    max_positions: int = 77
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    eos_token_id: int = 2
    dtype: str = "float32"
    attention_implementation: str | None = None
    remat: str = "none"

    def __post_init__(self):
        layers.check_tower_config(
            self, ("vocab_size", "width", "num_layers", "num_heads", "mlp_dim", "max_positions", "projection_dim")
        )
        eos = self.eos_token_id
        # Not an integer id (None, True, 5.0), or out of the vocabulary: no input id can equal it, so every caption
        # would be pooled at position 0 (None failed with "'<=' not supported").
        is_id = isinstance(eos, numbers.Integral) and not isinstance(eos, bool)
        if not is_id or (eos != 2 and not 0 <= eos < self.vocab_size):
            raise ValueError(
                f"CLIPTextConfig.eos_token_id is {eos!r}; it must be an integer token id below vocab_size "
                f"({self.vocab_size}), or 2 for the legacy pooling at the largest id"
            )

    @classmethod
    def preset(cls, name: str, **overrides) -> CLIPTextConfig:
        """The text tower of OpenAI CLIP `vit-b-32` (Base, Small) or `vit-l-14` (Large), with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown CLIP text preset {name!r}; expected one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_hf(cls, text_config: dict, projection_dim: int | None = None, **overrides) -> CLIPTextConfig:
        """From a Hugging Face `CLIPTextConfig` dict (`text_config` of a `CLIPModel`, or a text model's config).

        `projection_dim` defaults to the dict's own (present in `CLIPTextModelWithProjection` configs);
        missing fields take Hugging Face's defaults, as `transformers` would. `overrides` set any field,
        including those `HF_FIELDS.not_in_hf` lists (e.g. `dtype`, `remat`).
        """
        fields = HF_FIELDS.read(text_config)
        if projection_dim is not None:
            fields["projection_dim"] = projection_dim
        return cls(**{**fields, **overrides})

    def to_hf(self, **extra) -> dict:
        """The Hugging Face `CLIPTextConfig` keys that describe this tower (`HF_FIELDS`), plus `extra` settings
        (e.g. `bos_token_id`, `pad_token_id`, which the tokenizer decides, not the model)."""
        return HF_FIELDS.write(self, extra)


HF_FIELDS = HFFields(
    fields=(
        HFField("vocab_size", "vocab_size", 49408),
        HFField("width", "hidden_size", 512),
        HFField("num_layers", "num_hidden_layers", 12),
        HFField("num_heads", "num_attention_heads", 8),
        HFField("mlp_dim", "intermediate_size", 2048),
        HFField("max_positions", "max_position_embeddings", 77),
        HFField("activation", "hidden_act", "quick_gelu"),
        HFField("layer_norm_eps", "layer_norm_eps", 1e-5),
        HFField("projection_dim", "projection_dim", 512),
        HFField("eos_token_id", "eos_token_id", 49407),
    ),
    not_in_hf={
        **RUN_SETTINGS_NOT_IN_HF,
    },
)


PRESETS = {
    # OpenAI's checkpoints on the hub still carry the legacy eos_token_id 2 (pool at the largest id).
    "vit-b-32": CLIPTextConfig(
        vocab_size=49408, width=512, num_layers=12, num_heads=8, mlp_dim=2048, projection_dim=512
    ),
    "vit-l-14": CLIPTextConfig(
        vocab_size=49408, width=768, num_layers=12, num_heads=12, mlp_dim=3072, projection_dim=768
    ),
}


class CLIPTextOutput(NamedTuple):
    hidden_states: jax.Array  # (B, L, width): final-LayerNorm output at every position
    pooled: jax.Array  # (B, width): hidden state at the end-of-text token
    embedding: jax.Array  # (B, projection_dim): pooled @ text_projection (not normalised)


class CLIPTextEncoder(nnx.Module):
    """The CLIP text transformer with its text projection."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = layers.resolve_dtype(config.dtype)
        # CLIP's own initialisation (token 0.02, position 0.01, projection width^-0.5): used when trained
        # from scratch, e.g. with the quickstart's small tokenizer.
        self.token_embedding = nnx.Embed(
            config.vocab_size,
            config.width,
            dtype=dtype,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")),
            rngs=rngs,
        )
        self.position_embedding = nnx.Param(
            nnx.initializers.normal(0.01)(rngs.params(), (config.max_positions, config.width), jnp.float32),
            out_sharding=(None, "embed"),
        )
        self.encoder = layers.EncoderStack.for_tower(config, key_bias=True, rngs=rngs)
        self.final_norm = layers.layer_norm(config.width, epsilon=config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.text_projection = layers.dense(
            config.width,
            config.projection_dim,
            ("embed", None),
            use_bias=False,
            dtype=dtype,
            kernel_init=nnx.initializers.normal(config.width**-0.5),
            rngs=rngs,
        )

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        """`input_ids` `(B, L)` int, `attention_mask` `(B, L)` 1 = token, 0 = right padding (None: all valid).

        Pooling follows Hugging Face: with `eos_token_id == 2` the position of the largest id in the row,
        otherwise the first position equal to `eos_token_id` (so a pad token equal to end-of-text is fine).
        """
        length = input_ids.shape[-1]
        if length > self.config.max_positions:
            raise ValueError(f"sequence length {length} exceeds the model's max_positions {self.config.max_positions}")
        dtype = layers.resolve_dtype(self.config.dtype)
        table = self.token_embedding.embedding[...].astype(dtype)  # nnx.Embed's lookup, placed for the mesh
        x = sharding.look_up(table, input_ids, ("vocab", "embed")) + self.position_embedding[:length].astype(dtype)
        kv_lengths = None if attention_mask is None else jnp.sum(attention_mask, axis=-1, dtype=jnp.int32)
        x = self.final_norm(self.encoder(x, kv_lengths=kv_lengths, causal=True))

        if self.config.eos_token_id == 2:
            eos_index = jnp.argmax(input_ids, axis=-1)
        else:
            eos_index = jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(x, eos_index[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(hidden_states=x, pooled=pooled, embedding=self.text_projection(pooled))
