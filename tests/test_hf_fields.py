"""The towers' Hugging Face config correspondence (`HF_FIELDS` tables): `from_hf` and `to_hf` are inverses,
every config field is mapped or listed as not representable, the table's keys and defaults are
`transformers`' own, and `to_hf` loads into `transformers`' config class with the values a hand-written
expectation names (so a mis-mapped or dropped field fails here even though both directions share the table).
"""

import dataclasses

import pytest
import transformers

from wavlink_jax.models import clip_text, whisper
from wavlink_jax.models.clip_text import CLIPTextConfig
from wavlink_jax.models.whisper import WhisperConfig

TOWERS = {
    "whisper": (whisper, WhisperConfig, transformers.WhisperConfig),
    "clip_text": (clip_text, CLIPTextConfig, transformers.CLIPTextConfig),
}

# Every field changed from both our default and transformers' default; not-in-HF fields changed too, except
# Whisper's layer_norm_eps, which to_hf refuses to change (tested below).
NON_DEFAULT = {
    "whisper": WhisperConfig(
        n_mels=128, width=64, num_layers=3, num_heads=4, mlp_dim=96, max_positions=20, activation="relu",
        global_token=False, dtype="bfloat16", attention_implementation="xla", remat="full",
    ),
    "clip_text": CLIPTextConfig(
        vocab_size=99, width=32, num_layers=2, num_heads=4, mlp_dim=48, max_positions=16, activation="gelu",
        layer_norm_eps=1e-6, projection_dim=24, eos_token_id=5, dtype="bfloat16", attention_implementation="cudnn",
        remat="dots_saveable",
    ),
}


def _expected_hf(tower: str, config) -> dict:
    """Written out by hand (not from the table): which transformers key must carry which of our fields."""
    if tower == "whisper":
        return dict(
            num_mel_bins=config.n_mels, d_model=config.width, encoder_layers=config.num_layers,
            encoder_attention_heads=config.num_heads, encoder_ffn_dim=config.mlp_dim,
            max_source_positions=config.max_positions, activation_function=config.activation,
        )
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.width, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, intermediate_size=config.mlp_dim,
        max_position_embeddings=config.max_positions, hidden_act=config.activation,
        layer_norm_eps=config.layer_norm_eps, projection_dim=config.projection_dim, eos_token_id=config.eos_token_id,
    )


def _not_in_hf_values(module, config) -> dict:
    return {name: getattr(config, name) for name in module.HF_FIELDS.not_in_hf}


@pytest.mark.parametrize("tower", TOWERS)
def test_every_field_is_mapped_once_or_declared_unrepresentable(tower):
    module, config_class, _ = TOWERS[tower]
    table = module.HF_FIELDS
    ours = [field.ours for field in table.fields]
    hf_keys = [field.hf for field in table.fields]
    assert len(set(ours)) == len(ours) and len(set(hf_keys)) == len(hf_keys)
    assert not set(ours) & set(table.not_in_hf)
    assert set(ours) | set(table.not_in_hf) == {field.name for field in dataclasses.fields(config_class)}
    assert all(isinstance(reason, str) and reason for reason in table.not_in_hf.values())


@pytest.mark.parametrize("tower", TOWERS)
def test_table_keys_and_defaults_are_transformers_own(tower):
    module, config_class, hf_class = TOWERS[tower]
    hf_default = hf_class()
    for field in module.HF_FIELDS.fields:
        assert getattr(hf_default, field.hf) == field.default, field
    assert config_class.from_hf({}) == config_class.from_hf(hf_default.to_dict())


@pytest.mark.parametrize(
    "tower,preset",
    [("whisper", name) for name in whisper.PRESETS] + [("clip_text", name) for name in clip_text.PRESETS],
)
def test_presets_round_trip(tower, preset):
    module, config_class, hf_class = TOWERS[tower]
    config = module.PRESETS[preset]
    assert config_class.from_hf(config.to_hf()) == config
    assert config_class.from_hf(hf_class(**config.to_hf()).to_dict()) == config


@pytest.mark.parametrize("tower", TOWERS)
def test_non_default_config_round_trips_through_transformers(tower):
    module, config_class, hf_class = TOWERS[tower]
    config = NON_DEFAULT[tower]
    for field in module.HF_FIELDS.fields:  # else a dropped field would still round-trip through the defaults
        assert getattr(config, field.ours) != field.default, field
        assert getattr(config, field.ours) != getattr(config_class.from_hf({}), field.ours), field

    expected = _expected_hf(tower, config)
    assert config.to_hf() == expected
    loaded = hf_class(**config.to_hf())
    assert {key: getattr(loaded, key) for key in expected} == expected

    unrepresentable = _not_in_hf_values(module, config)
    assert config_class.from_hf(loaded.to_dict(), **unrepresentable) == config
    # Without them, exactly the not-in-HF fields fall back to our defaults.
    restored = config_class.from_hf(loaded.to_dict())
    default = config_class.from_hf({})
    for field in dataclasses.fields(config_class):
        want = getattr(default if field.name in unrepresentable else config, field.name)
        assert getattr(restored, field.name) == want, field.name


@pytest.mark.parametrize("tower", TOWERS)
def test_to_hf_extra_settings_are_added_and_cannot_replace_fields(tower):
    _, _, hf_class = TOWERS[tower]
    config = NON_DEFAULT[tower]
    settings = config.to_hf(attention_dropout=0.0, pad_token_id=3)
    assert settings == {**config.to_hf(), "attention_dropout": 0.0, "pad_token_id": 3}
    assert hf_class(**settings).pad_token_id == 3
    mapped_key = next(iter(config.to_hf()))
    with pytest.raises(ValueError, match=mapped_key):
        config.to_hf(**{mapped_key: 1})


def test_whisper_to_hf_refuses_a_layer_norm_eps_transformers_cannot_hold():
    config = dataclasses.replace(NON_DEFAULT["whisper"], layer_norm_eps=1e-6)
    with pytest.raises(ValueError, match="layer_norm_eps is 1e-06.*fixes it at 1e-05"):
        config.to_hf()


def test_clip_text_projection_dim_argument_overrides_the_dict():
    config = NON_DEFAULT["clip_text"]
    restored = CLIPTextConfig.from_hf(config.to_hf(), 40, **_not_in_hf_values(clip_text, config))
    assert restored == dataclasses.replace(config, projection_dim=40)
