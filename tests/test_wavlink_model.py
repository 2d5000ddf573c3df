"""WavLink model: embedding shapes and normalisation, Matryoshka truncation, presets' sizes, config round
trip, gradients reaching the global token and the loss scalars."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_losses import HIGHEST, dot_generals

from wavlink_jax import losses
from wavlink_jax.models import layers
from wavlink_jax.models.clip_text import CLIPTextConfig
from wavlink_jax.models.wavlink import WavLink, WavLinkConfig
from wavlink_jax.models.whisper import WhisperConfig

BATCH, FRAMES, TEXT_LENGTH = 4, 16, 8


def tiny_config(**overrides) -> WavLinkConfig:
    audio = WhisperConfig(n_mels=8, width=16, num_layers=2, num_heads=2, mlp_dim=32, max_positions=FRAMES // 2)
    text = CLIPTextConfig(
        vocab_size=50, width=16, num_layers=2, num_heads=2, mlp_dim=32, max_positions=TEXT_LENGTH, projection_dim=12
    )
    return WavLinkConfig(**{"audio": audio, "text": text, "embed_dim": 24, **overrides})


def inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    mel = jnp.asarray(rng.normal(size=(BATCH, 8, FRAMES)), jnp.float32)
    lengths = np.array([TEXT_LENGTH, 5, 3, 6])
    ids = rng.integers(3, 40, size=(BATCH, TEXT_LENGTH))
    ids[np.arange(BATCH), lengths - 1] = 49  # end-of-text: the largest id (legacy CLIP pooling)
    mask = (np.arange(TEXT_LENGTH)[None] < lengths[:, None]).astype(np.int32)
    return mel, jnp.asarray(ids * mask, jnp.int32), jnp.asarray(mask)


@pytest.fixture(scope="module")
def model() -> WavLink:
    return WavLink(tiny_config(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def embeddings(model) -> dict:
    """One jitted call: the full embeddings from `__call__` and from `embed_*` at every size ("full": dim=None)."""

    @nnx.jit
    def embed_all(m: WavLink, mel, ids, mask):
        sizes = {"full": None, **{str(dim): dim for dim in m.config.matryoshka_dims}}
        return {
            "call": m(mel, ids, mask),
            "audio": {key: m.embed_audio(mel, dim) for key, dim in sizes.items()},
            "text": {key: m.embed_text(ids, mask, dim) for key, dim in sizes.items()},
        }

    return jax.tree.map(np.asarray, embed_all(model, *inputs()))


def test_embeddings_are_the_normalised_head_outputs_with_the_right_shapes(embeddings):
    heads = embeddings["call"]  # the heads' outputs, before normalisation (what the loss receives)
    for head, embedded in zip(heads, (embeddings["audio"]["full"], embeddings["text"]["full"])):
        assert head.shape == embedded.shape == (BATCH, 24) and head.dtype == embedded.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-6)
        np.testing.assert_allclose(embedded, head / np.linalg.norm(head, axis=1, keepdims=True), atol=1e-6)
    assert np.ptp(embeddings["audio"]["full"], axis=0).max() > 1e-3  # distinct inputs → distinct embeddings


def test_truncated_embeddings_are_renormalised_prefixes(model, embeddings):
    assert model.config.matryoshka_dims == (24, 12, 6, 3)
    for full, truncated in zip(embeddings["call"], (embeddings["audio"], embeddings["text"])):
        full = full.astype(np.float64)
        for dim in model.config.matryoshka_dims:
            expected = full[:, :dim] / np.linalg.norm(full[:, :dim], axis=1, keepdims=True)
            assert truncated[str(dim)].shape == (BATCH, dim)
            np.testing.assert_allclose(truncated[str(dim)], expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"dim 10 is not a trained size .*\(24, 12, 6, 3\)"):
        model.embed_audio(inputs()[0], 10)


def test_gradient_reaches_global_token_heads_and_loss_scalars(model):
    mel, ids, mask = inputs(seed=1)

    def loss_fn(m: WavLink) -> jax.Array:
        za, zt = m(mel, ids, mask)
        total, _ = losses.matryoshka_loss(
            za,
            zt,
            dims=m.config.matryoshka_dims,
            logit_scale_clip=m.clip_logit_scale[...],
            logit_scale_sigmoid=m.sigmoid_logit_scale[...],
            logit_bias=m.sigmoid_logit_bias[...],
        )
        return total

    grads = nnx.jit(nnx.grad(loss_fn))(model)
    for name, grad in (
        ("global_token", grads.audio.global_token),
        ("audio_projection", grads.audio_projection.kernel),
        ("text_projection", grads.text_projection.kernel),
        ("clip_logit_scale", grads.clip_logit_scale),
        ("sigmoid_logit_scale", grads.sigmoid_logit_scale),
        ("sigmoid_logit_bias", grads.sigmoid_logit_bias),
    ):
        assert np.all(np.isfinite(grad[...])) and np.abs(grad[...]).max() > 1e-8, f"no gradient reaches {name}"


def test_heads_run_at_highest_precision(model):
    """The heads are float32 whatever the platform: their matmul (the only one producing `(B, E)`) is at
    HIGHEST even where the default is TF32 / bf16 passes; the towers' matmuls keep the default (compute dtype)."""
    mel, ids, mask = inputs()
    for head in (lambda: model.project_audio(mel), lambda: model.project_text(ids, mask)):
        dots = dot_generals(head)
        heads = [eqn for eqn in dots if eqn.outvars[0].aval.shape == (BATCH, 24)]
        towers = [eqn for eqn in dots if eqn.outvars[0].aval.shape != (BATCH, 24)]
        assert len(heads) == 1 and heads[0].params["precision"] == HIGHEST
        assert towers and all(eqn.params["precision"] != HIGHEST for eqn in towers)


def test_every_parameter_has_logical_axes(model):
    axes = layers.logical_axes(model)
    assert axes[("clip_logit_scale",)] == axes[("sigmoid_logit_scale",)] == axes[("sigmoid_logit_bias",)] == ()
    assert axes[("audio_projection", "kernel")] == ("embed", None)
    assert len(axes) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert float(model.clip_logit_scale[...]) == pytest.approx(math.log(1 / 0.07))
    assert float(model.sigmoid_logit_scale[...]) == pytest.approx(math.log(10))
    assert float(model.sigmoid_logit_bias[...]) == -10.0


# The paper's Table: parameters of the audio and text towers (millions).
PAPER_SIZES = {"base": (20, 63, 84, 512), "small": (88, 63, 152, 512), "large": (637, 123, 761, 768)}


@pytest.mark.parametrize("name", PAPER_SIZES)
def test_presets_match_the_paper_sizes(name):
    config = WavLinkConfig.preset(name)
    abstract = nnx.eval_shape(lambda: WavLink(config, rngs=nnx.Rngs(0)))  # nothing allocated

    def millions(module) -> float:  # every variable, the fixed Whisper position table included (as in the paper)
        return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(module, nnx.Variable))) / 1e6

    audio, text, total, embed_dim = PAPER_SIZES[name]
    assert millions(abstract.audio) == pytest.approx(audio, rel=0.03)
    assert millions(abstract.text) == pytest.approx(text, rel=0.03)
    assert millions(abstract.audio) + millions(abstract.text) == pytest.approx(total, rel=0.01)
    assert config.embed_dim == embed_dim
    assert config.matryoshka_dims == tuple(embed_dim // k for k in (1, 2, 4, 8))


def test_config_round_trips_through_json_and_rejects_bad_input():
    config = WavLinkConfig.preset("large", audio={"dtype": "bfloat16", "remat": "full"}, matryoshka_dims=(96, 768))
    assert config.audio.dtype == "bfloat16" and config.audio.n_mels == 128 and config.text.width == 768
    assert config.matryoshka_dims == (768, 96)
    assert WavLinkConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config

    data = config.to_dict()
    with pytest.raises(ValueError, match=r"'audio' does not match WhisperConfig: unknown fields \['n_mel'\]"):
        WavLinkConfig.from_dict({**data, "audio": {**data["audio"], "n_mel": 80}})
    with pytest.raises(ValueError, match=r"missing fields \['embed_dim'\]"):
        WavLinkConfig.from_dict({k: v for k, v in data.items() if k != "embed_dim"})
    with pytest.raises(ValueError, match="global_token=True"):
        tiny_config(audio=WhisperConfig(n_mels=8, width=16, num_layers=1, num_heads=2, mlp_dim=32, global_token=False))
    with pytest.raises(ValueError, match="not divisible by 8"):
        tiny_config(embed_dim=20)
    with pytest.raises(ValueError, match="distinct whole sizes"):
        tiny_config(matryoshka_dims=(24, 48))
    with pytest.raises(ValueError, match="distinct whole sizes"):
        tiny_config(matryoshka_dims=(24, 12, 12))
    with pytest.raises(ValueError, match="distinct whole sizes"):
        tiny_config(matryoshka_dims=(24, 0))
    with pytest.raises(ValueError, match="distinct whole sizes"):  # was cut to (24, 12) silently
        tiny_config(matryoshka_dims=(24, 12.7))
    with pytest.raises(ValueError, match="unknown WavLink preset"):
        WavLinkConfig.preset("huge")
    for name in ("clip_logit_scale_init", "sigmoid_logit_bias_init"):  # trained a step, then stopped on NaN
        with pytest.raises(ValueError, match=rf"config\.model\.{name} in a training config\) must be a finite"):
            tiny_config(**{name: float("nan")})


def test_matryoshka_dims_must_include_the_full_size():
    """The loss trains exactly `matryoshka_dims`, while `dim=None`, export and the evaluation's top line serve
    `embed_dim`: a config whose levels leave out the full size would serve an untrained embedding."""
    with pytest.raises(ValueError, match=r"must include embed_dim \(24\) .* set matryoshka_dims=\(24, 12, 6\)"):
        tiny_config(matryoshka_dims=(12, 6))
    assert tiny_config(matryoshka_dims=(6, 24)).matryoshka_dims == (24, 6)  # any order, stored largest first
    assert tiny_config(matryoshka_dims=(24,)).matryoshka_dims == (24,)
