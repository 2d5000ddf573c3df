"""`WhisperEncoder` + `load_whisper` against random-weight `transformers` Whisper models saved to disk.

Parity bound: max abs diff ≤ 1e-4 on fp32 hidden states (the figures are printed and in assertion messages).
HF's encoder forward only accepts exactly `2 * max_source_positions` frames, so the width sweep uses models
with a 10-position table (20 frames), and windows shorter than the table, or with the global token, are
checked against `_torch_encoder`: the same PyTorch modules run by hand (itself checked against HF's forward).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file
from test_layers import layer_norm_epsilons
from transformers import WhisperConfig as HFWhisperConfig
from transformers import WhisperForConditionalGeneration, WhisperModel
from transformers.models.whisper.modeling_whisper import sinusoids as torch_sinusoids

from wavlink_jax.convert import load_whisper
from wavlink_jax.convert.common import CheckpointError
from wavlink_jax.models import layers
from wavlink_jax.models.whisper import PositionTable, WhisperConfig, WhisperEncoder, sinusoids

TOLERANCE = 1e-4
# bf16-compute vs fp32 outputs (LayerNorm outputs, unit scale), about 2x the measured diffs: max 0.048 /
# mean 0.0048 on the hidden states, 0.031 / 0.0053 on the global state.
BF16_TOLERANCE = 0.08
BF16_MEAN_TOLERANCE = 0.01


def _hf_config(width: int, heads: int, n_mels: int = 80, num_layers: int = 2, positions: int = 10) -> HFWhisperConfig:
    """A Whisper config with the given encoder and a minimal decoder (ignored by the loader)."""
    return HFWhisperConfig(
        num_mel_bins=n_mels,
        d_model=width,
        encoder_layers=num_layers,
        encoder_attention_heads=heads,
        encoder_ffn_dim=4 * width,
        max_source_positions=positions,
        decoder_layers=1,
        decoder_attention_heads=heads,
        decoder_ffn_dim=8,
        vocab_size=64,
        max_target_positions=8,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        decoder_start_token_id=0,
    )


def _hf_model(config: HFWhisperConfig, seed: int = 0, cls=WhisperModel):
    torch.manual_seed(seed)
    model = cls(config).eval()
    # Random but non-trivial LayerNorm affine parameters and biases (HF initialises them to 1 / 0).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name or name.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def _mel(batch: int, n_mels: int, frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, n_mels, frames)).astype(np.float32)


def _torch_encoder(encoder, mel: np.ndarray, token: np.ndarray | None = None) -> np.ndarray:
    """PyTorch Whisper's encoder modules run by hand on any window, optionally on [H0; token]."""
    with torch.no_grad():
        x = torch.nn.functional.gelu(encoder.conv1(torch.from_numpy(mel)))
        x = torch.nn.functional.gelu(encoder.conv2(x)).permute(0, 2, 1)
        x = x + encoder.embed_positions.weight[: x.shape[1]]
        if token is not None:
            x = torch.cat([x, torch.from_numpy(np.array(token)).expand(x.shape[0], 1, -1)], dim=1)
        for layer in encoder.layers:
            x = layer(x, None)
        return encoder.layer_norm(x).numpy()


@nnx.jit
def _forward(model: WhisperEncoder, mel: jax.Array):
    """Our encoder, compiled whole (far less CPU time than op-by-op eager dispatch)."""
    return model(mel)


def _max_diff(ours, reference) -> float:
    return float(np.abs(np.asarray(ours, dtype=np.float32) - reference).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The full tiny shape (4 layers, 384 wide, 6 heads, 1500 positions), saved as WhisperModel safetensors."""
    config = _hf_config(384, 6, num_layers=4, positions=1500)
    model = _hf_model(config)
    directory = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(directory)
    return model, directory


def test_full_tiny_matches_transformers(tiny):
    model, directory = tiny
    ours = load_whisper(directory, global_token=False)
    assert ours.config == WhisperConfig.preset("tiny", global_token=False)
    mel = _mel(1, 80, 3000)
    with torch.no_grad():
        reference = model.encoder(torch.from_numpy(mel)).last_hidden_state.numpy()
    output = _forward(ours, jnp.asarray(mel))
    assert output.global_state is None and output.hidden_states.shape == (1, 1500, 384)
    diff = _max_diff(output.hidden_states, reference)
    by_hand = _max_diff(_torch_encoder(model.encoder, mel), reference)
    print(f"\ntiny 30 s, no token: max abs diff {diff:.2e} (hand-run torch reference vs HF: {by_hand:.2e})")
    assert diff <= TOLERANCE, f"tiny: max abs diff {diff:.2e}"
    assert by_hand <= 1e-5, f"the hand-run PyTorch reference drifts from HF's forward: {by_hand:.2e}"


@pytest.mark.parametrize("frames", [3000, 1000, 101], ids=["30s", "10s", "odd"])  # odd: a 1.01 s window
def test_global_token_matches_torch_layers_on_appended_sequence(tiny, frames):
    model, directory = tiny
    ours = load_whisper(directory, global_token=True)
    token = np.asarray(ours.global_token.get_value())
    assert token.shape == (384,) and 0.01 < token.std() < 0.03  # the documented normal(0.02) init
    mel = _mel(1 if frames == 3000 else 2, 80, frames, seed=1)
    reference = _torch_encoder(model.encoder, mel, token)
    output = _forward(ours, jnp.asarray(mel))
    positions = (frames + 1) // 2  # the stride-2 stem's (PyTorch's) rule
    assert output.hidden_states.shape == (len(mel), positions, 384) and output.global_state.shape == (len(mel), 384)
    frames_diff = _max_diff(output.hidden_states, reference[:, :-1])
    token_diff = _max_diff(output.global_state, reference[:, -1])
    print(f"\ntiny {frames / 100:g} s with token: frames {frames_diff:.2e}, global state {token_diff:.2e}")
    assert frames_diff <= TOLERANCE and token_diff <= TOLERANCE, f"{frames_diff:.2e} / {token_diff:.2e}"
    # The training path: the last block computes only the token's row.
    token_only = nnx.jit(lambda m, x: m(x, global_only=True))(ours, jnp.asarray(mel))
    assert token_only.hidden_states is None
    only_diff = _max_diff(token_only.global_state, reference[:, -1])
    assert only_diff <= TOLERANCE, f"global_only: max abs diff {only_diff:.2e}"
    # The token changes the frame outputs (everything attends to it): a dropped token would not pass.
    plain = _torch_encoder(model.encoder, mel)
    assert np.abs(plain - reference[:, :-1]).max() > 1e-3


WIDTHS = [(384, 6, 80), (512, 8, 80), (768, 12, 80), (1024, 16, 80), (1280, 20, 80), (384, 6, 128), (1280, 20, 128)]


@pytest.mark.parametrize("width,heads,n_mels", WIDTHS, ids=[f"w{w}-m{m}" for w, _, m in WIDTHS])
def test_two_layer_widths_match_transformers(tmp_path, width, heads, n_mels):
    model = _hf_model(_hf_config(width, heads, n_mels), seed=width + n_mels)
    model.save_pretrained(tmp_path)
    ours = load_whisper(tmp_path, global_token=False)
    mel = _mel(2, n_mels, 20, seed=2)
    with torch.no_grad():
        reference = model.encoder(torch.from_numpy(mel)).last_hidden_state.numpy()
    diff = _max_diff(_forward(ours, jnp.asarray(mel)).hidden_states, reference)
    print(f"\nwidth {width}, {n_mels} mels, 2 layers: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE, f"width {width} / {n_mels} mels: max abs diff {diff:.2e}"


def test_relu_encoder_keeps_the_gelu_stem_and_matches_transformers(tmp_path):
    """`activation_function` is the blocks' activation only: transformers' stem convolutions always use GELU."""
    config = _hf_config(64, 4)
    config.activation_function = "relu"
    model = _hf_model(config, seed=7)
    model.save_pretrained(tmp_path)
    ours = load_whisper(tmp_path, global_token=False)
    assert ours.config.activation == "relu"
    mel = _mel(2, 80, 20, seed=7)
    with torch.no_grad():
        reference = model.encoder(torch.from_numpy(mel)).last_hidden_state.numpy()
    diff = _max_diff(_forward(ours, jnp.asarray(mel)).hidden_states, reference)
    assert diff <= TOLERANCE, f"relu blocks: max abs diff {diff:.2e}"


@pytest.fixture(scope="module")
def small_model():
    return _hf_model(_hf_config(64, 4), seed=3)


def _save_torch_bin(model, directory):
    directory.mkdir(exist_ok=True)
    model.config.to_json_file(directory / "config.json")
    torch.save(model.state_dict(), directory / "pytorch_model.bin")


@pytest.mark.parametrize(
    "layout",
    ["conditional_generation", "sharded", "pytorch_bin", "float16", "bfloat16", "safetensors_and_bin_index",
     "saved_whole_over_shards", "saved_sharded_over_whole"],
)
def test_checkpoint_layouts(tmp_path, small_model, layout):
    """ForConditionalGeneration naming, sharded safetensors, pytorch_model.bin, and half-precision upcast. A
    model.safetensors is read before a .bin index (a hub download of *.safetensors and *.json has the index
    without its shards, which were read and not found)."""
    model = small_model
    if layout == "conditional_generation":
        full = WhisperForConditionalGeneration(model.config).eval()
        full.model.load_state_dict(model.state_dict())
        full.save_pretrained(tmp_path)
        assert any(key.startswith("model.encoder.") for key in load_file(tmp_path / "model.safetensors"))
    elif layout == "sharded":
        model.save_pretrained(tmp_path, max_shard_size="100KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
    elif layout == "pytorch_bin":
        _save_torch_bin(model, tmp_path)
    elif layout == "safetensors_and_bin_index":
        model.save_pretrained(tmp_path)
        shards = {"weight_map": {"encoder.conv1.weight": "pytorch_model-00001-of-00002.bin"}}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(shards))
    elif layout.startswith("saved_"):  # saved into twice: save_pretrained leaves the other form's index (or file)
        other = _hf_model(model.config, seed=9)
        first, second = (other, model) if layout == "saved_whole_over_shards" else (model, other)
        first.save_pretrained(tmp_path, max_shard_size="100KB" if layout == "saved_whole_over_shards" else "1GB")
        second.save_pretrained(tmp_path, max_shard_size="1GB" if layout == "saved_whole_over_shards" else "100KB")
        assert (tmp_path / "model.safetensors").exists() and (tmp_path / "model.safetensors.index.json").exists()
        model = WhisperModel.from_pretrained(tmp_path).eval()  # the reference: the file transformers loads
    else:
        dtype = getattr(torch, layout)
        model = _hf_model(model.config, seed=3).to(dtype)
        model.save_pretrained(tmp_path)
        model = model.float()  # the reference: the same half-precision weights, upcast
    mel = _mel(2, 80, 20, seed=4)
    with torch.no_grad():
        reference = model.encoder(torch.from_numpy(mel)).last_hidden_state.numpy()
    ours = load_whisper(tmp_path, global_token=False)
    assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(ours)))
    diff = _max_diff(_forward(ours, jnp.asarray(mel)).hidden_states, reference)
    print(f"\n{layout}: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE, f"{layout}: max abs diff {diff:.2e}"


# OpenAI's names, written out independently of the converter's rename table.
_OPENAI_LAYER_NAMES = {
    "attn.query.weight": "self_attn.q_proj.weight",
    "attn.query.bias": "self_attn.q_proj.bias",
    "attn.key.weight": "self_attn.k_proj.weight",
    "attn.value.weight": "self_attn.v_proj.weight",
    "attn.value.bias": "self_attn.v_proj.bias",
    "attn.out.weight": "self_attn.out_proj.weight",
    "attn.out.bias": "self_attn.out_proj.bias",
    "attn_ln.weight": "self_attn_layer_norm.weight",
    "attn_ln.bias": "self_attn_layer_norm.bias",
    "mlp.0.weight": "fc1.weight",
    "mlp.0.bias": "fc1.bias",
    "mlp.2.weight": "fc2.weight",
    "mlp.2.bias": "fc2.bias",
    "mlp_ln.weight": "final_layer_norm.weight",
    "mlp_ln.bias": "final_layer_norm.bias",
}
_OPENAI_TOP_NAMES = {
    "conv1.weight": "conv1.weight",
    "conv1.bias": "conv1.bias",
    "conv2.weight": "conv2.weight",
    "conv2.bias": "conv2.bias",
    "positional_embedding": "embed_positions.weight",
    "ln_post.weight": "layer_norm.weight",
    "ln_post.bias": "layer_norm.bias",
}


def _write_openai_checkpoint(model, file, drop: str | None = None) -> None:
    """The encoder of `model` as an OpenAI `.pt` (fp16, like the released files), plus some decoder tensors."""
    encoder = {name: tensor.half() for name, tensor in model.encoder.state_dict().items()}
    state = {f"encoder.{ours}": encoder[hf] for ours, hf in _OPENAI_TOP_NAMES.items()}
    for index in range(model.config.encoder_layers):
        for ours, hf in _OPENAI_LAYER_NAMES.items():
            state[f"encoder.blocks.{index}.{ours}"] = encoder[f"layers.{index}.{hf}"]
    state["decoder.token_embedding.weight"] = torch.zeros(64, model.config.d_model, dtype=torch.float16)
    state["decoder.blocks.0.cross_attn.query.weight"] = torch.zeros(4, 4, dtype=torch.float16)
    state.pop(drop, None)
    config = model.config
    dims = dict(
        n_mels=config.num_mel_bins,
        n_audio_ctx=config.max_source_positions,
        n_audio_state=config.d_model,
        n_audio_head=config.encoder_attention_heads,
        n_audio_layer=config.encoder_layers,
        n_vocab=config.vocab_size,
        n_text_ctx=config.max_target_positions,
        n_text_state=config.d_model,
        n_text_head=config.decoder_attention_heads,
        n_text_layer=config.decoder_layers,
    )
    torch.save({"dims": dims, "model_state_dict": state}, file)


def test_openai_checkpoint(tmp_path, small_model):
    _write_openai_checkpoint(small_model, tmp_path / "small.pt")
    ours = load_whisper(tmp_path / "small.pt", global_token=False)
    reference_model = _hf_model(small_model.config, seed=3)
    reference_model.load_state_dict(small_model.state_dict())
    reference_model.half().float()  # the file is fp16: compare against the same rounded weights
    mel = _mel(2, 80, 20, seed=5)
    with torch.no_grad():
        reference = reference_model.encoder(torch.from_numpy(mel)).last_hidden_state.numpy()
    diff = _max_diff(_forward(ours, jnp.asarray(mel)).hidden_states, reference)
    print(f"\nOpenAI .pt (fp16): max abs diff {diff:.2e}")
    assert diff <= TOLERANCE, f"OpenAI .pt: max abs diff {diff:.2e}"


def test_bf16_compute_within_stated_tolerance(tiny):
    _, directory = tiny
    fp32 = load_whisper(directory)
    bf16 = load_whisper(directory, dtype="bfloat16")
    assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(bf16, nnx.Param)))
    mel = jnp.asarray(_mel(2, 80, 200, seed=6))
    reference, low = _forward(fp32, mel), _forward(bf16, mel)
    assert low.hidden_states.dtype == jnp.bfloat16
    for name in ("hidden_states", "global_state"):
        diff = np.abs(np.asarray(getattr(low, name), np.float32) - np.asarray(getattr(reference, name)))
        print(f"\nbf16 vs fp32 {name}: max abs diff {diff.max():.3f}, mean {diff.mean():.4f}")
        assert diff.max() <= BF16_TOLERANCE and diff.mean() <= BF16_MEAN_TOLERANCE, (
            f"bf16 {name}: max {diff.max():.3f} mean {diff.mean():.4f}"
        )


def test_remat_gives_the_same_gradients_and_only_params_train(tmp_path, small_model):
    small_model.save_pretrained(tmp_path)
    plain = load_whisper(tmp_path)
    remat = load_whisper(tmp_path, remat="full")
    mel = jnp.asarray(_mel(2, 80, 20))

    def loss(model):
        output = model(mel)
        return jnp.sum(output.global_state**2) + jnp.mean(output.hidden_states**2)

    grads_plain = nnx.jit(nnx.grad(loss))(plain)
    grads_remat = nnx.jit(nnx.grad(loss))(remat)
    for (path, a), (_, b) in zip(nnx.to_flat_state(grads_plain), nnx.to_flat_state(grads_remat)):
        np.testing.assert_allclose(
            np.asarray(a.get_value()), np.asarray(b.get_value()), rtol=1e-4, atol=1e-5, err_msg=str(path)
        )
    paths = {path for path, _ in nnx.to_flat_state(grads_plain)}
    assert ("global_token",) in paths and ("position_embedding",) not in paths
    assert np.abs(np.asarray(grads_plain["global_token"].get_value())).max() > 0


@pytest.mark.parametrize("length,channels", [(1500, 384), (1500, 1280), (10, 64)])
def test_sinusoids_match_openai_and_transformers(length, channels):
    """The position table: Whisper's formula in float64 (written out here: channel j < C/2 is
    sin(p · 10000^(-j/(C/2 - 1))), the rest the matching cos), and transformers' float32 version."""
    table = sinusoids(length, channels)
    assert table.shape == (length, channels) and table.dtype == np.float32
    half = channels // 2
    angle = np.arange(length, dtype=np.float64)[:, None] * 10000.0 ** (-np.arange(half) / (half - 1))[None, :]
    exact = np.concatenate([np.sin(angle), np.cos(angle)], axis=1)
    exact_diff = np.abs(table - exact).max()
    assert exact_diff <= 1e-6, f"vs float64 formula: {exact_diff:.2e}"  # float32 rounding: observed 3.0e-8
    # PyTorch computes the angles in float32: observed max diff 1.0e-4 at 1500 positions, 2.7e-7 at 10.
    torch_diff = np.abs(table - torch_sinusoids(length, channels).numpy()).max()
    assert torch_diff <= 2e-4, f"vs transformers: {torch_diff:.2e}"


def test_fresh_encoder_starts_with_the_sinusoid_table():
    config = WhisperConfig(n_mels=80, width=64, num_layers=1, num_heads=4, mlp_dim=128, max_positions=1500)
    model = WhisperEncoder(config, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(model.position_embedding.get_value()), sinusoids(1500, 64))


def test_logical_axes_on_every_variable():
    model = nnx.eval_shape(lambda: WhisperEncoder(WhisperConfig.preset("tiny", num_layers=1), rngs=nnx.Rngs(0)))
    axes = layers.logical_axes(model)
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert set(axes) == set(params)
    for path, names in axes.items():
        assert len(names) == params[path].get_value().ndim and any(names), f"{path}: {names}"
    assert axes[("conv1", "kernel")] == (None, None, "embed")
    assert axes[("global_token",)] == ("embed",)
    assert axes[("encoder", "layers", 0, "attn", "query", "kernel")] == ("embed", "heads")
    table = model.position_embedding
    assert isinstance(table, PositionTable) and not isinstance(table, nnx.Param)
    assert table.get_metadata()["out_sharding"] == (None, "embed")


@pytest.mark.parametrize(
    "preset,millions",
    [("base.en", 20), ("small.en", 88), ("large-v3", 637)],
)
def test_presets_match_the_paper_parameter_counts(preset, millions):
    """The paper's audio-tower sizes (MISSION.md): Whisper encoders incl. the position table, plus the token."""
    abstract = nnx.eval_shape(lambda: WhisperEncoder(WhisperConfig.preset(preset), rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(abstract)))
    assert abs(count / 1e6 - millions) < 1, f"{preset}: {count / 1e6:.2f}M parameters"
    assert WhisperConfig.preset(preset).n_mels == (128 if preset == "large-v3" else 80)


def test_config_refuses_bad_values_naming_the_field():
    """The checks shared with CLIPTextConfig (`layers.check_tower_config`; each one is exercised in
    test_clip_text.py) plus Whisper's own: an even width for the sinusoid table."""
    sizes = dict(n_mels=8, width=16, num_layers=1, num_heads=2, mlp_dim=32)
    with pytest.raises(ValueError, match=r"WhisperConfig.num_heads is 0; it must be a positive integer"):
        WhisperConfig(**{**sizes, "num_heads": 0})
    with pytest.raises(ValueError, match=r"WhisperConfig.width is 18; it must be divisible by num_heads \(4\)"):
        WhisperConfig(**{**sizes, "width": 18, "num_heads": 4})
    with pytest.raises(ValueError, match=r"WhisperConfig.remat is 'all'; expected 'none' or one of"):
        WhisperConfig(**sizes, remat="all")
    with pytest.raises(ValueError, match="width 15 must be even"):
        WhisperConfig(**{**sizes, "width": 15, "num_heads": 1})


def test_every_layer_norm_takes_the_configured_epsilon():
    """The blocks' and the final LayerNorm's epsilon is `layer_norm_eps` (a non-default value here)."""
    config = WhisperConfig(n_mels=8, width=16, num_layers=2, num_heads=2, mlp_dim=32, layer_norm_eps=1e-3)
    model = nnx.eval_shape(lambda: WhisperEncoder(config, rngs=nnx.Rngs(0)))
    assert layer_norm_epsilons(model) == [1e-3] * (2 * config.num_layers + 1)


def test_bad_mel_inputs_are_clear_errors():
    config = WhisperConfig(n_mels=80, width=32, num_layers=1, num_heads=4, mlp_dim=64, max_positions=10)
    model = nnx.eval_shape(lambda: WhisperEncoder(config, rngs=nnx.Rngs(0)))  # the checks need no weights
    with pytest.raises(ValueError, match=r"n_mels=80.*got \(1, 128, 20\)"):
        model(jnp.zeros((1, 128, 20)))
    with pytest.raises(ValueError, match=r"22 mel frames need 11 positions .* holds 10"):
        model(jnp.zeros((1, 80, 22)))
    assert nnx.eval_shape(lambda m, x: m(x), model, jnp.zeros((1, 80, 20))).hidden_states.shape == (1, 10, 32)
    plain = nnx.eval_shape(lambda: WhisperEncoder(dataclasses.replace(config, global_token=False), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="global_only=True needs an encoder built with global_token=True"):
        nnx.eval_shape(lambda m, x: m(x, global_only=True), plain, jnp.zeros((1, 80, 20)))


def _refusal_of_edited_checkpoint(directory, model, edit) -> str:
    """The CheckpointError message of loading `model` saved to `directory` with `edit(weights)` applied."""
    model.save_pretrained(directory)
    weights = load_file(directory / "model.safetensors")
    edit(weights)
    save_file(weights, directory / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_whisper(directory)
    return str(error.value)


def test_checkpoint_missing_or_extra_encoder_key(tmp_path, small_model):
    def edit(weights):
        del weights["encoder.layers.1.fc1.weight"]
        weights["encoder.layers.1.extra.weight"] = torch.zeros(3)
        weights["decoder.layers.0.fc1.weight"] = torch.zeros(3)  # decoder keys are ignored

    message = _refusal_of_edited_checkpoint(tmp_path, small_model, edit)
    assert "missing keys (1): ['encoder.layers.1.fc1.weight']" in message
    assert "unexpected keys (1): ['encoder.layers.1.extra.weight']" in message
    assert "decoder" not in message
    # conv1's weight is missing like any other (it was "no Whisper encoder weights": the prefix was found by it).
    stem = "encoder.conv1.weight"
    message = _refusal_of_edited_checkpoint(tmp_path / "stem", small_model, lambda weights: weights.pop(stem))
    assert message.endswith("missing keys (1): ['encoder.conv1.weight']")


def test_mis_shaped_weights_are_listed_in_the_checkpoints_layout(tmp_path, small_model):
    """A weight of another rank was numpy's 'axes don't match array' with no key; a mis-shaped one was shown in
    our (transposed) layout as if it were the checkpoint's."""
    def edit(weights):
        weights["encoder.conv1.weight"] = weights["encoder.conv1.weight"][:, :, 0].contiguous()  # 2-D, not 3-D
        weights["encoder.layers.0.fc1.weight"] = weights["encoder.layers.0.fc1.weight"][:-1].contiguous()

    message = _refusal_of_edited_checkpoint(tmp_path, small_model, edit)
    assert "shape mismatches (2)" in message
    assert "encoder.conv1.weight: checkpoint (64, 80) vs model (3, 80, 64)" in message
    assert "encoder.layers.0.fc1.weight: checkpoint (255, 64) (in our layout (64, 255)) vs model (64, 256)" in message


def test_corrupt_json_files_are_named(tmp_path, small_model):
    small_model.save_pretrained(tmp_path / "cut", max_shard_size="200KB")
    index = tmp_path / "cut" / "model.safetensors.index.json"
    index.write_text(index.read_text()[:40])
    with pytest.raises(CheckpointError, match=rf"{index}: not valid JSON"):
        load_whisper(tmp_path / "cut")
    index.write_text("{}")
    with pytest.raises(CheckpointError, match=rf"{index}: no 'weight_map'"):
        load_whisper(tmp_path / "cut")
    config = tmp_path / "cut" / "config.json"
    settings = json.loads(config.read_text())
    config.write_text("{bad")
    with pytest.raises(CheckpointError, match=rf"{config}: not valid JSON"):
        load_whisper(tmp_path / "cut")
    config.write_text("[1, 2]")  # JSON, but no settings: was an AttributeError traceback
    with pytest.raises(CheckpointError, match=rf"{config}: expected a JSON object of settings, got a list"):
        load_whisper(tmp_path / "cut")
    config.write_text(json.dumps({**settings, "activation_function": "silu"}))  # the file was not named
    with pytest.raises(CheckpointError, match=rf"{config}: WhisperConfig.activation is 'silu'"):
        load_whisper(tmp_path / "cut")
    config.write_text(json.dumps(settings))
    with pytest.raises(TypeError, match="dtyp"):  # the caller's mistake, not the file's
        load_whisper(tmp_path / "cut", dtyp="bfloat16")


def test_openai_checkpoint_missing_key(tmp_path, small_model):
    _write_openai_checkpoint(small_model, tmp_path / "broken.pt", drop="encoder.blocks.1.mlp.0.weight")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): \['encoder.blocks.1.mlp.0.weight'\]"):
        load_whisper(tmp_path / "broken.pt")


def test_openai_dims_refused_name_the_file(tmp_path, small_model):
    """A value or field of an OpenAI `.pt`'s dims that WhisperConfig refuses is the file's error, named (it was
    the bare error); an option of the caller's is the caller's."""
    file = tmp_path / "small.pt"
    _write_openai_checkpoint(small_model, file)
    checkpoint = torch.load(file)
    absent = object()
    for key, value, words in (("n_mels", "eighty", "invalid literal"), ("n_audio_head", 0, "num_heads"),
                              ("n_audio_ctx", None, "int"), ("n_mels", absent, "lacks 'n_mels'")):  # fmt: skip
        damaged = {**checkpoint["dims"], key: value}
        if value is absent:
            del damaged[key]
        torch.save({**checkpoint, "dims": damaged}, file)
        with pytest.raises(CheckpointError, match=rf"^{file}: .*{words}"):
            load_whisper(file)
    torch.save(checkpoint, file)
    with pytest.raises(TypeError, match="dtyp"):
        load_whisper(file, dtyp="bfloat16")


def test_non_whisper_sources_are_clear_errors(tmp_path, small_model):
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    (clip_dir / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(CheckpointError, match="model_type 'clip', not 'whisper'"):
        load_whisper(clip_dir)

    state_dict = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, state_dict)
    with pytest.raises(CheckpointError, match="not an OpenAI Whisper checkpoint"):
        load_whisper(state_dict)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_whisper(garbage)

    small_model.save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="pass the directory"):
        load_whisper(tmp_path / "hf" / "model.safetensors")

    with pytest.raises(CheckpointError, match="neither a local path nor a reachable Hugging Face hub id") as refused:
        load_whisper("openai/whisper-not-downloaded-here")
    assert "\n" not in str(refused.value)  # huggingface_hub's reason spans lines: the `error:` line was three


@pytest.mark.parametrize("repo_files, downloads", [
    (["config.json", "model.safetensors", "pytorch_model.bin", "model.fp32-00001-of-00002.safetensors"], 1),
    (["config.json", "pytorch_model.bin"], 2),
])
def test_hub_downloads_fetch_one_copy_of_the_weights(tmp_path, monkeypatch, repo_files, downloads):
    """A repo with safetensors and .bin weights (and fp32 copies) was downloaded whole: each copy, GBs for large-v3."""
    import fnmatch

    import huggingface_hub

    from wavlink_jax.convert.common import resolve_source

    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append(allow_patterns)
        for name in repo_files:
            if any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns):
                (tmp_path / name).write_text("x")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert resolve_source("openai/whisper-tiny") == tmp_path and len(calls) == downloads
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["config.json", "model.safetensors"] if downloads == 1 else ["config.json", "pytorch_model.bin"]
    )
