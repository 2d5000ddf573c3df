"""CLIP text tower: parity with transformers' CLIPTextModelWithProjection through saved checkpoints.

Reference models have random weights (every parameter perturbed, so LayerNorm scales/biases are not the
trivial 1/0 and a swapped name would show). Hidden states are compared at every position, padded ones
included: in both implementations a padded query attends causally to the valid keys only, so they agree
there too.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file
from test_layers import layer_norm_epsilons

from wavlink_jax.convert.clip_text import load_clip_text
from wavlink_jax.convert.common import CheckpointError
from wavlink_jax.models.clip_text import CLIPTextConfig, CLIPTextEncoder

TOL = 1e-4
SMALL = dict(vocab_size=99, width=64, num_layers=2, num_heads=4, mlp_dim=128, max_positions=16, projection_dim=48)


def _hf_config(config: CLIPTextConfig, eos_token_id: int) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.width,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.mlp_dim,
        max_position_embeddings=config.max_positions,
        projection_dim=config.projection_dim,
        hidden_act=config.activation,
        eos_token_id=eos_token_id,
        bos_token_id=0,
        pad_token_id=0,
    )


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def _reference(config: CLIPTextConfig, eos_token_id: int, seed: int = 0) -> transformers.CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    model = transformers.CLIPTextModelWithProjection(_hf_config(config, eos_token_id))
    return _randomise(model, seed + 1)


def _save(model: torch.nn.Module, directory, weights_format: str) -> None:
    """`safetensors` (save_pretrained), `sharded` (several safetensors + index) or `bin` (an old-style
    pytorch_model.bin that also holds the position_ids buffer, as pre-2023 checkpoints do)."""
    if weights_format == "bin":
        model.config.save_pretrained(directory)
        state = dict(model.state_dict())
        prefix = "text_model." if "text_model.embeddings.token_embedding.weight" in state else ""
        positions = state[f"{prefix}embeddings.position_embedding.weight"].shape[0]
        state[f"{prefix}embeddings.position_ids"] = torch.arange(positions)[None]
        torch.save(state, directory / "pytorch_model.bin")
    else:
        model.save_pretrained(directory, max_shard_size="1MB" if weights_format == "sharded" else "50GB")


def _batch(lengths, seq_len, *, bos, eos, pad, vocab_size, seed=0):
    """Right-padded rows [bos, words..., eos, pad...]; words avoid the special ids."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), seq_len), pad, np.int32)
    mask = np.zeros((len(lengths), seq_len), np.int32)
    special = {bos, eos, pad}
    words = np.array([t for t in range(vocab_size) if t not in special])
    for row, length in enumerate(lengths):
        ids[row, :length] = [bos, *rng.choice(words, length - 2), eos]
        mask[row, :length] = 1
    return ids, mask


def _torch_outputs(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    return out.last_hidden_state.numpy(), out.text_embeds.numpy()


@nnx.jit
def _jit_apply(module, ids, mask):
    return module(ids, mask)


def _apply(module, ids, mask):
    """One compiled forward per shape and config (cheaper on CPU than op-by-op eager execution)."""
    return _jit_apply(module, jnp.asarray(ids), jnp.asarray(mask))


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


# Conventions: legacy (config eos_token_id == 2: pool at the largest id; end-of-text is the largest id) and
# current (pool at the first eos_token_id; here end-of-text is id 1, not the largest, so argmax would miss it).
CONVENTIONS = {"legacy": dict(config_eos=2, bos=97, eos=98), "current": dict(config_eos=1, bos=0, eos=1)}


@pytest.mark.parametrize("weights_format", ["safetensors", "bin"])
@pytest.mark.parametrize("pad_with", ["eos", "zero"])
@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_parity_small(tmp_path, convention, pad_with, weights_format):
    spec = CONVENTIONS[convention]
    config = CLIPTextConfig(**SMALL, eos_token_id=spec["config_eos"])
    reference = _reference(config, spec["config_eos"])
    _save(reference, tmp_path, weights_format)
    module = load_clip_text(tmp_path)
    assert module.config == config

    pad = spec["eos"] if pad_with == "eos" else 0
    ids, mask = _batch([16, 3, 9, 2], 16, bos=spec["bos"], eos=spec["eos"], pad=pad, vocab_size=99)
    hidden_ref, embeds_ref = _torch_outputs(reference, ids, mask)
    out = _apply(module, ids, mask)
    assert _max_diff(out.hidden_states, hidden_ref) <= TOL
    assert _max_diff(out.embedding, embeds_ref) <= TOL
    eos_positions = mask.sum(-1) - 1
    np.testing.assert_allclose(out.pooled, np.asarray(out.hidden_states)[np.arange(4), eos_positions], atol=0)


@pytest.mark.parametrize("preset", ["vit-b-32", "vit-l-14"])
def test_parity_preset_widths(tmp_path, preset):
    # The preset's width/heads/MLP/projection with 2 layers and a small vocabulary (the 49408-row table
    # would only slow the test down); sharded safetensors.
    config = CLIPTextConfig.preset(preset, num_layers=2, vocab_size=500)
    reference = _reference(config, eos_token_id=2, seed=3)
    _save(reference, tmp_path, "sharded")
    assert (tmp_path / "model.safetensors.index.json").exists()
    module = load_clip_text(tmp_path)
    assert module.config == config

    ids, mask = _batch([77, 5, 30], 77, bos=498, eos=499, pad=499, vocab_size=500)
    hidden_ref, embeds_ref = _torch_outputs(reference, ids, mask)
    out = _apply(module, ids, mask)
    assert _max_diff(out.hidden_states, hidden_ref) <= TOL
    assert _max_diff(out.embedding, embeds_ref) <= TOL


@pytest.fixture(scope="module")
def small_module():
    return CLIPTextEncoder(CLIPTextConfig(**SMALL, eos_token_id=1), rngs=nnx.Rngs(0))


def test_fresh_encoder_takes_clips_initialisation(small_module):
    """Trained from scratch (the quickstart's small tokenizer) the tower starts as CLIP does: token embeddings
    N(0, 0.02), positions N(0, 0.01), the text projection N(0, width^-0.5); each std within 15% (1000+ draws)."""
    for name, variable, std in [
        ("token", small_module.token_embedding.embedding, 0.02),
        ("position", small_module.position_embedding, 0.01),
        ("projection", small_module.text_projection.kernel, SMALL["width"] ** -0.5),
    ]:
        values = np.asarray(variable[...])
        assert abs(values.std() / std - 1) < 0.15 and abs(values.mean()) < 0.2 * std, (name, values.std(), std)


def test_results_do_not_depend_on_batch_padding(small_module):
    lengths = [5, 2, 9]
    short_ids, short_mask = _batch(lengths, 9, bos=0, eos=1, pad=1, vocab_size=99, seed=7)
    long_ids, long_mask = _batch(lengths, 16, bos=0, eos=1, pad=1, vocab_size=99, seed=7)
    np.testing.assert_array_equal(short_ids, long_ids[:, :9])
    short = _apply(small_module, short_ids, short_mask)
    long = _apply(small_module, long_ids, long_mask)
    alone = _apply(small_module, long_ids[:1, :5], long_mask[:1, :5])
    assert _max_diff(short.embedding, long.embedding) <= 1e-5
    assert _max_diff(short.pooled, long.pooled) <= 1e-5
    for row, length in enumerate(lengths):
        assert _max_diff(short.hidden_states[row, :length], long.hidden_states[row, :length]) <= 1e-5
    assert _max_diff(alone.embedding[0], long.embedding[0]) <= 1e-5


def test_remat_and_bf16_keep_the_function():
    ids, mask = map(jnp.asarray, _batch([7, 3], 10, bos=0, eos=1, pad=1, vocab_size=99, seed=2))

    def build(**options):
        config = CLIPTextConfig(**{**SMALL, "num_layers": 1}, eos_token_id=1, **options)
        return CLIPTextEncoder(config, rngs=nnx.Rngs(0))

    def value_and_grads(module):
        return nnx.jit(nnx.value_and_grad(lambda m: jnp.sum(m(ids, mask).embedding ** 2)))(module)

    value, grads = value_and_grads(build())
    remat_value, remat_grads = value_and_grads(build(remat="full"))
    assert abs(float(value - remat_value)) <= 1e-5 * abs(float(value))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, remat_grads)
    fp32, bf16 = _apply(build(), ids, mask), _apply(build(dtype="bfloat16"), ids, mask)
    assert bf16.embedding.dtype == jnp.bfloat16
    assert _max_diff(bf16.embedding, fp32.embedding) <= 0.05 * float(jnp.max(jnp.abs(fp32.embedding)))


def _tiny_clip_model(text: CLIPTextConfig) -> transformers.CLIPModel:
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=16
    )
    config = transformers.CLIPConfig(
        text_config=_hf_config(text, text.eos_token_id).to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=text.projection_dim,
    )
    torch.manual_seed(5)
    return _randomise(transformers.CLIPModel(config), 6)


def test_clip_model_directory_ignores_vision_tower(tmp_path):
    text = CLIPTextConfig(**{**SMALL, "projection_dim": 40}, eos_token_id=2)
    reference = _tiny_clip_model(text)
    _save(reference, tmp_path, "bin")
    module = load_clip_text(tmp_path)
    assert module.config == text  # projection_dim comes from the CLIPModel's top-level config
    ids, mask = _batch([6, 16], 16, bos=97, eos=98, pad=0, vocab_size=99)
    with torch.no_grad():
        features = reference.get_text_features(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)
        ).pooler_output  # transformers 5: the projected text features
    assert _max_diff(_apply(module, ids, mask).embedding, features.numpy()) <= TOL


def test_a_legacy_text_config_dict_overrides_text_config_as_in_transformers(tmp_path):
    """OpenAI's ViT-L/14 config.json holds both `text_config` and a legacy `text_config_dict`; transformers builds
    the text tower from `text_config_dict` (its missing fields at their defaults). Ours read `text_config`: here,
    where the two disagree on the activation and the LayerNorm epsilon, that was another function."""
    text = CLIPTextConfig(**{**SMALL, "projection_dim": 40}, eos_token_id=2)
    _save(_tiny_clip_model(text), tmp_path, "safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    shape_fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings", "eos_token_id")
    legacy = {key: config["text_config"][key] for key in shape_fields}
    config["text_config_dict"] = {**legacy, "hidden_act": "gelu", "layer_norm_eps": 0.1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    reference = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    assert (reference.config.text_config.hidden_act, reference.config.text_config.layer_norm_eps) == ("gelu", 0.1)
    module = load_clip_text(tmp_path)
    assert module.config == dataclasses.replace(text, activation="gelu", layer_norm_eps=0.1)
    ids, mask = _batch([6, 16], 16, bos=97, eos=98, pad=0, vocab_size=99)
    with torch.no_grad():
        features = reference.get_text_features(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)
        ).pooler_output
    assert _max_diff(_apply(module, ids, mask).embedding, features.numpy()) <= TOL


def test_clip_text_model_needs_an_explicit_new_projection(tmp_path):
    config = CLIPTextConfig(**SMALL, eos_token_id=1)
    torch.manual_seed(0)
    reference = _randomise(transformers.CLIPTextModel(_hf_config(config, 1)), 1)
    _save(reference, tmp_path, "safetensors")
    with pytest.raises(CheckpointError, match="no text_projection.weight .*new_projection=True"):
        load_clip_text(tmp_path)
    module = load_clip_text(tmp_path, new_projection=True)
    ids, mask = _batch([4, 11], 12, bos=0, eos=1, pad=1, vocab_size=99)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    out = _apply(module, ids, mask)
    assert _max_diff(out.hidden_states, expected.last_hidden_state.numpy()) <= TOL
    assert _max_diff(out.pooled, expected.pooler_output.numpy()) <= TOL
    assert out.embedding.shape == (2, SMALL["projection_dim"])
    with_projection = _reference(config, 1)
    _save(with_projection, tmp_path / "projected", "safetensors")
    refused = r"pretrained text_projection.weight; new_projection=True \(--new-projection\) is for"
    with pytest.raises(CheckpointError, match=refused):
        load_clip_text(tmp_path / "projected", new_projection=True)


def test_a_clip_model_without_its_projection_lists_the_missing_key(tmp_path):
    """Every CLIPModel has a text projection: one without it is incomplete, and its missing key is listed. It
    was called a CLIPTextModel checkpoint, with the advice to start a random projection (--new-projection)."""
    from safetensors.torch import load_file

    _save(_tiny_clip_model(CLIPTextConfig(**SMALL, eos_token_id=2)), tmp_path, "safetensors")
    weights = load_file(tmp_path / "model.safetensors")
    del weights["text_projection.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): \['text_projection.weight'\]"):
        load_clip_text(tmp_path)


def test_bad_checkpoints_name_the_problem(tmp_path):
    config = CLIPTextConfig(**SMALL)
    reference = _reference(config, eos_token_id=2)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}

    missing = tmp_path / "missing"
    reference.config.save_pretrained(missing)
    dropped = "text_model.encoder.layers.1.mlp.fc2.bias"
    save_file({k: v for k, v in state.items() if k != dropped}, missing / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): \['text_model.encoder.layers.1.mlp.fc2.bias'\]"):
        load_clip_text(missing)

    extra = tmp_path / "extra"
    reference.config.save_pretrained(extra)
    save_file({**state, "text_model.encoder.layers.2.mlp.fc2.bias": torch.zeros(64)}, extra / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): \['text_model.encoder.layers.2.mlp.fc2.bias'\]"):
        load_clip_text(extra)

    valid = tmp_path / "valid"
    _save(reference, valid, "safetensors")
    with pytest.raises(CheckpointError, match=r"position_embedding.weight: checkpoint \(16, 64\) vs model \(8, 64\)"):
        load_clip_text(valid, max_positions=8)

    whisper = tmp_path / "whisper"
    whisper.mkdir()
    (whisper / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    with pytest.raises(CheckpointError, match="model_type 'whisper' is not a CLIP model"):
        load_clip_text(whisper)
    with pytest.raises(CheckpointError, match="not a file"):
        load_clip_text(missing / "model.safetensors")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    reference.config.save_pretrained(garbage)
    (garbage / "model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_clip_text(garbage)


def test_config_presets_defaults_and_length_check():
    large = CLIPTextConfig.preset("vit-l-14", dtype="bfloat16")
    sizes = (large.width, large.num_heads, large.num_layers, large.mlp_dim, large.projection_dim)
    assert sizes == (768, 12, 12, 3072, 768)
    assert large.vocab_size == 49408 and large.max_positions == 77 and large.dtype == "bfloat16"
    with pytest.raises(ValueError, match="unknown CLIP text preset 'vit-h-14'"):
        CLIPTextConfig.preset("vit-h-14")
    module = CLIPTextEncoder(CLIPTextConfig(**SMALL), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="sequence length 17 exceeds the model's max_positions 16"):
        module(jnp.zeros((1, 17), jnp.int32), jnp.ones((1, 17), jnp.int32))


def test_every_layer_norm_takes_the_configured_epsilon():
    """The blocks' and the final LayerNorm's epsilon is `layer_norm_eps` (a non-default value here)."""
    config = CLIPTextConfig(**SMALL, layer_norm_eps=1e-3)
    model = nnx.eval_shape(lambda: CLIPTextEncoder(config, rngs=nnx.Rngs(0)))
    assert layer_norm_epsilons(model) == [1e-3] * (2 * config.num_layers + 1)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("width", 63, r"CLIPTextConfig.width is 63; it must be divisible by num_heads \(4\)"),
        ("vocab_size", 0, r"CLIPTextConfig.vocab_size is 0; it must be a positive integer"),
        ("projection_dim", 2.5, r"CLIPTextConfig.projection_dim is 2.5; it must be a positive integer"),
        ("activation", "gelu_fast", r"CLIPTextConfig.activation is 'gelu_fast'; expected one of \["),
        ("layer_norm_eps", 0.0, r"CLIPTextConfig.layer_norm_eps is 0.0; it must be positive"),
        ("dtype", "bfloat", r"CLIPTextConfig.dtype is 'bfloat'; expected a floating dtype"),
        ("dtype", "int32", r"CLIPTextConfig.dtype is 'int32'; expected a floating dtype"),
        ("remat", "dots", r"CLIPTextConfig.remat is 'dots'; expected 'none' or one of \["),
        ("attention_implementation", "flash", r"CLIPTextConfig.attention_implementation is 'flash'; expected one of"),
        ("eos_token_id", 49407, r"CLIPTextConfig.eos_token_id is 49407; it must be an integer token id below "
                                r"vocab_size \(99\), or 2 for the legacy pooling"),
        ("eos_token_id", 99, r"CLIPTextConfig.eos_token_id is 99; it must be an integer token id below vocab_size"),
        ("eos_token_id", -1, r"CLIPTextConfig.eos_token_id is -1; it must be an integer token id below vocab_size"),
        # None failed with TypeError "'<=' not supported"; True and 5.0 were accepted
        ("eos_token_id", None, r"CLIPTextConfig.eos_token_id is None; it must be an integer token id below vocab"),
        ("eos_token_id", True, r"CLIPTextConfig.eos_token_id is True; it must be an integer token id below vocab"),
        ("eos_token_id", 5.0, r"CLIPTextConfig.eos_token_id is 5.0; it must be an integer token id below vocab"),
    ],
)
def test_config_refuses_bad_values_naming_the_field(field, value, message):
    """Checked where the config is made (shared with WhisperConfig: `layers.check_tower_config`), not when the
    module is built or traced."""
    with pytest.raises(ValueError, match=message):
        CLIPTextConfig(**{**SMALL, field: value})
    CLIPTextConfig(**SMALL, activation="gelu", dtype="bfloat16", remat="full", attention_implementation="xla")
