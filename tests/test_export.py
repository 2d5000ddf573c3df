"""Export to PyTorch: a tiny model trained 3 steps is exported; transformers loads it (AutoModel, remote code);
PyTorch and JAX embeddings agree; the towers round-trip through the importers and transformers' own classes.

fp32 throughout (conftest sets `highest` matmul precision). Tolerance 1e-4 max abs on unit-norm embeddings
(DESIGN.md's parity bar); measured ~1e-7. Weight round trips are exact.
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

from wavlink_jax import audio, export, inference, torch_model, train, waveform_layout
from wavlink_jax.convert import load_clip_text, load_whisper
from wavlink_jax.convert.common import CheckpointError, write_safetensors
from wavlink_jax.data import synthetic
from train_fixtures import tiny_config
from xla_flags import host_devices

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4


def train_workdir(root: Path, *overrides: str, steps: int = 3) -> tuple[Path, Path]:
    """A workdir of `tests/train_fixtures.py`'s tiny model trained `steps` steps by the trainer's CLI (one CPU
    device) on a small generated data set, checkpoints every 2 steps and at the end; (workdir, data dir)."""
    data = synthetic.generate(root / "data", num_train=8, num_eval=0, max_seconds=1.5, captions_per_clip=1)
    workdir = root / "workdir"
    command = [
        sys.executable, "-m", "wavlink_jax.train",
        "--config", f"tests/train_fixtures.py:data_dir={data.root},steps={steps}",
        "--workdir", str(workdir), "--config.checkpoint_every_steps=2", *overrides,
    ]
    env = {**os.environ, "XLA_FLAGS": host_devices(1), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir, data.root


def sample_inputs(seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Waveforms shorter than, as long as and longer than the 1 s window; a caption longer than 16 tokens."""
    rng = np.random.default_rng(seed)
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 7000, 23000, 16000, 1200)]
    waves[3] = np.sin(np.arange(16000) * 0.05).astype(np.float32) * np.linspace(0, 1, 16000, dtype=np.float32)
    texts = ["a dog barks twice", "bell", "", "rain falls on a tin roof while thunder rumbles far away and a car "
             "passes by slowly"]
    return waves, texts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_workdir(tmp_path_factory.mktemp("run"))[0]


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "wavlink"
    export.main(["--workdir", str(trained), "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def torch_wavlink(exported):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(exported), trust_remote_code=True).eval()


@pytest.fixture(scope="module")
def jax_embedder(trained):
    return inference.load(trained, batch_size=8)


def test_directory_layout_and_exact_transformers_names(exported):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    files = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_wavlink.py", "tokenizer.json", "tokenizer_config.json"} <= files
    assert (exported / "modeling_wavlink.py").read_text() == Path(torch_model.__file__).read_text()
    assert (exported / "waveform_layout.py").read_text() == Path(waveform_layout.__file__).read_text()
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "wavlink" and config["auto_map"] == export.AUTO_MAP
    assert config["embed_dim"] == 32 and config["matryoshka_dims"] == [32, 16]
    assert config["window_seconds"] == 1.0 and config["max_text_length"] == 16
    assert config["audio_config"]["model_type"] == "whisper" and config["text_config"]["model_type"] == "clip_text_model"
    assert json.loads((exported / "tokenizer_config.json").read_text())["model_max_length"] == 16

    # The towers' tensors are exactly transformers' own modules' state dicts (names and shapes), nothing else.
    weights = load_file(str(exported / "model.safetensors"))
    expected = {}
    for prefix, module in (
        ("audio.", WhisperEncoder(WhisperConfig(**config["audio_config"]))),
        ("text.", CLIPTextModelWithProjection(CLIPTextConfig(**config["text_config"]))),
    ):
        expected.update({prefix + name: tuple(t.shape) for name, t in module.state_dict().items()})
    extra = {"audio_global_token": (32,), "audio_projection.weight": (32, 32), "audio_projection.bias": (32,),
             "text_projection.weight": (32, 32), "text_projection.bias": (32,), "clip_logit_scale": (),
             "sigmoid_logit_scale": (), "sigmoid_logit_bias": ()}
    expected.update(extra)
    assert {name: tuple(w.shape) for name, w in weights.items()} == expected
    assert all(w.dtype == np.float32 for w in weights.values())


def test_weights_get_the_same_file_mode_as_every_other_file(trained, tmp_path):
    """safetensors ≥ 0.8 alone leaves model.safetensors 0600 (its temporary file's mode): unreadable to the other
    users of a shared export. Under a umask of 027 every written file is 0640, the weights too."""
    old_umask = os.umask(0o027)
    try:
        out = export.export(trained, tmp_path / "wavlink")
        text = export.export_tower(out, "text", tmp_path / "text")
    finally:
        os.umask(old_umask)
    for directory in (out, text):
        modes = {path.name: path.stat().st_mode & 0o777 for path in directory.iterdir()}
        assert modes["model.safetensors"] == 0o640, modes
        assert set(modes.values()) == {0o640}, modes


def test_automodel_loads_every_tensor(exported, torch_wavlink):
    assert type(torch_wavlink).__name__ == "WavLinkModel"
    weights = load_file(str(exported / "model.safetensors"))
    state = torch_wavlink.state_dict()
    assert set(state) == set(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(state[name].numpy(), value, err_msg=name)


def test_exported_heads_and_scalars_are_the_trained_models_by_name(exported, jax_embedder):
    """Each head, the global token and each loss scalar is exported under its own name (the loaders read the
    same name map back, so a swap there would round-trip unnoticed): compared with the JAX model's attributes."""
    model = jax_embedder.loaded.model
    weights = load_file(str(exported / "model.safetensors"))
    expected = {
        "audio_global_token": model.audio.global_token,
        "clip_logit_scale": model.clip_logit_scale,
        "sigmoid_logit_scale": model.sigmoid_logit_scale,
        "sigmoid_logit_bias": model.sigmoid_logit_bias,
    }
    for head in ("audio_projection", "text_projection"):
        expected[f"{head}.bias"] = getattr(model, head).bias
    expected = {name: np.asarray(variable.get_value()) for name, variable in expected.items()}
    for head in ("audio_projection", "text_projection"):
        expected[f"{head}.weight"] = np.asarray(getattr(model, head).kernel.get_value()).T  # torch: (out, in)
    assert len({float(expected[name]) for name in export.SCALARS}) == 3  # distinct, so a swap would show
    for name, value in expected.items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)


@pytest.mark.parametrize("dim", [None, 16])
def test_pytorch_matches_jax(torch_wavlink, jax_embedder, dim):
    waves, texts = sample_inputs()
    jax_audio, jax_text = jax_embedder.embed_audio(waves, dim=dim), jax_embedder.embed_text(texts, dim=dim)
    torch_audio = torch_wavlink.embed_audio(waves, dim=dim, batch_size=2).numpy()
    torch_text = torch_wavlink.embed_text(texts, dim=dim).numpy()
    batched = torch_wavlink.embed_text(texts, dim=dim, batch_size=3).numpy()  # 4 texts: batches of 3 and 1
    assert batched.shape == torch_text.shape
    np.testing.assert_allclose(batched, torch_text, rtol=0, atol=1e-6)
    size = dim or 32
    assert torch_audio.shape == (len(waves), size) and torch_text.shape == (len(texts), size)
    assert np.abs(torch_audio - jax_audio).max() <= TOLERANCE
    assert np.abs(torch_text - jax_text).max() <= TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(torch_audio, axis=1), 1.0, atol=1e-6)
    # The embeddings are not degenerate: distinct inputs give distinct vectors.
    assert np.abs(jax_audio[0] - jax_audio[1]).max() > 1e-3 and np.abs(jax_text[0] - jax_text[1]).max() > 1e-3


@pytest.mark.parametrize("dim", [None, 16])
def test_long_clips_mean_is_the_weighted_mean_of_the_windows_in_pytorch_and_jax(torch_wavlink, jax_embedder, dim):
    """`long_clips="mean"` embeds each 1 s window of a clip and averages the window embeddings weighted by the
    audio each holds: 2 full windows equally, a quarter-window tail at a quarter, a 5-sample tail next to
    nothing; a clip within one window as "head" does. 9 windows: two JAX batches of 8, three PyTorch ones of 4.
    PyTorch and JAX agree; `dim` is the prefix of the full-size mean."""
    window = jax_embedder.window_samples
    rng = np.random.default_rng(3)
    noise = (0.1 * rng.standard_normal(2 * window)).astype(np.float32)
    tone = np.sin(np.arange(3 * window + 5) * 0.03).astype(np.float32)
    waves = [np.concatenate([noise[:window], tone[:window]]), np.concatenate([tone[:window], noise[: window // 4]]),
             noise[:7000], tone]
    ours = jax_embedder.embed_audio(waves, dim, long_clips="mean")
    theirs = torch_wavlink.embed_audio(waves, dim, batch_size=4, long_clips="mean").numpy()
    size = dim or 32
    assert ours.shape == theirs.shape == (4, size) and np.abs(ours - theirs).max() <= TOLERANCE

    def weighted_mean(wave: np.ndarray, weights: list[float]) -> np.ndarray:
        pieces = [wave[start : start + window] for start in range(0, len(wave), window)]
        mean = np.einsum("w,we->e", weights, jax_embedder.embed_audio(pieces).astype(np.float64))
        return mean / np.linalg.norm(mean)

    expected = np.stack([
        weighted_mean(waves[0], [1, 1]),
        weighted_mean(waves[1], [1, 0.25]),
        jax_embedder.embed_audio(waves[2:3])[0],
        weighted_mean(waves[3], [1, 1, 1, 5 / window]),
    ])
    if dim is not None:
        expected = expected[:, :dim] / np.linalg.norm(expected[:, :dim], axis=1, keepdims=True)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    head = jax_embedder.embed_audio(waves, dim)
    np.testing.assert_allclose(ours[2], head[2], rtol=0, atol=1e-6)  # the same, re-normalised in float64
    # A (B, samples) batch: each row is a clip to its end, zeros too, in numpy, jax and torch arrays alike.
    padded = np.pad(waves[1], (0, 2 * window - len(waves[1])))
    batch = np.stack([waves[0], tone[: 2 * window], padded])
    rows = jax_embedder.embed_audio(batch, dim, long_clips="mean")
    np.testing.assert_allclose(rows[0], ours[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(rows[2], jax_embedder.embed_audio([padded], dim, long_clips="mean")[0], atol=1e-6)
    assert np.abs(rows[2] - ours[1]).max() > 1e-4  # the padding's zeros count: not waves[1]'s own mean
    np.testing.assert_allclose(jax_embedder.embed_audio(jnp.asarray(batch), dim, long_clips="mean"), rows, atol=1e-6)
    from_torch = torch_wavlink.embed_audio(torch.from_numpy(batch), dim, long_clips="mean").numpy()
    assert np.abs(from_torch - rows).max() <= TOLERANCE
    assert np.abs(ours[:2] - head[:2]).max(axis=1).min() > 1e-3  # what follows the first window counts


def test_long_clips_are_checked_alike(torch_wavlink, jax_embedder, monkeypatch):
    """An unknown `long_clips` and an untrained `dim` are refused with the same words, before any embedding."""

    def embedded(*args, **kwargs):
        raise AssertionError("embedded before the request was checked")

    monkeypatch.setattr(jax_embedder, "_embed_windows", embedded)
    monkeypatch.setattr(torch_wavlink, "_embed_batches", embedded)
    for long_clips, dim, words in (("average", None, "long_clips = 'average': choose 'head'"),
                                   ("mean", 7, "embedding dim 7 is not a trained size of this model")):
        messages = []
        for embed_audio in (jax_embedder.embed_audio, torch_wavlink.embed_audio):
            with pytest.raises(ValueError, match=re.escape(words)) as caught:
                embed_audio([np.zeros(40000, np.float32)], dim, long_clips=long_clips)
            messages.append(str(caught.value).split(";")[0])
        assert len(set(messages)) == 1, messages


def test_window_plan_covers_a_clip_with_windows_weighted_by_their_audio():
    assert waveform_layout.window_plan(0, 10) == [(0, 1)]
    assert waveform_layout.window_plan(7, 10) == [(0, 7)]
    assert waveform_layout.window_plan(10, 10) == [(0, 10)]
    assert waveform_layout.window_plan(11, 10) == [(0, 10), (10, 1)]
    assert waveform_layout.window_plan(30, 10) == [(0, 10), (10, 10), (20, 10)]


def test_pytorch_matches_jax_with_large_weights(exported, tmp_path):
    """The tiny model trained 3 steps has small weights and activations, where the two implementations may differ
    in a function and still agree far inside TOLERANCE (a tanh-approximated GELU in the stem: 1.3e-6 on the
    embeddings). With every exported tensor perturbed by 0.1 · N(0, 1) (as the tower parity tests randomise their
    references), the O(1) states are compared: the audio tower's final-LayerNorm state at the global token and the
    text tower's hidden states (measured ≤ 2e-6; that tanh GELU moves the audio state by 2.8e-4)."""
    from transformers import AutoModel

    perturbed = tmp_path / "perturbed"
    shutil.copytree(exported, perturbed)
    rng = np.random.default_rng(0)
    weights = load_file(str(perturbed / export.WEIGHTS_FILE))
    weights = {name: np.asarray(w + 0.1 * rng.standard_normal(w.shape), np.float32) for name, w in weights.items()}
    write_safetensors(weights, perturbed / export.WEIGHTS_FILE, metadata=export.WEIGHTS_METADATA)
    ours = inference.read_exported(perturbed).model
    theirs = AutoModel.from_pretrained(str(perturbed), trust_remote_code=True).eval()
    waves, texts = sample_inputs()
    mel = torch_model.log_mel_spectrogram(theirs.prepare_waveforms(waves), 80)  # the same input for both
    tokens = theirs.tokenize(texts)
    with torch.no_grad():
        audio_state = theirs.encode_audio(mel).numpy()
        text = theirs.text(**tokens)
    ids, mask = (tokens[key].numpy().astype(np.int32) for key in ("input_ids", "attention_mask"))
    jax_state = nnx.jit(lambda model, x: model.audio(x).global_state)(ours, mel.numpy())
    jax_text = nnx.jit(lambda model, i, k: model.text(i, k))(ours, ids, mask)
    differences = {
        "audio state": np.abs(audio_state - np.asarray(jax_state)).max(),
        "text states": np.abs(text.last_hidden_state.numpy() - np.asarray(jax_text.hidden_states)).max(),
        "text embedding": np.abs(text.text_embeds.numpy() - np.asarray(jax_text.embedding)).max(),
    }
    assert all(difference <= TOLERANCE for difference in differences.values()), differences
    assert np.abs(audio_state).max() > 1 and np.abs(audio_state[0] - audio_state[1]).max() > 0.1  # O(1), distinct


def test_exported_model_has_no_dropout(exported, torch_wavlink):
    """The JAX model has no dropout, and the export sets the towers' dropouts to 0 (`hf_tower_configs`): trained
    further in PyTorch (training mode), the exported model computes the function it computes in evaluation mode."""
    waves, texts = sample_inputs()
    tokens = torch_wavlink.tokenize(texts)
    inputs = {"input_features": torch_model.log_mel_spectrogram(torch_wavlink.prepare_waveforms(waves), 80),
              "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
    with torch.no_grad():
        expected = torch_wavlink(**inputs)
        torch_wavlink.train()
        try:
            training = torch_wavlink(**inputs)
        finally:
            torch_wavlink.eval()
    for key, value in expected.items():
        np.testing.assert_allclose(training[key].numpy(), value.numpy(), rtol=0, atol=1e-6, err_msg=key)
    # Whisper's layer drop acts in transformers' own encoder forward (the exported audio tower, `export_tower`).
    assert json.loads((exported / "config.json").read_text())["audio_config"]["encoder_layerdrop"] == 0


def test_a_fresh_pytorch_model_starts_as_the_jax_model_does(exported):
    """`WavLinkModel(config)` (training in PyTorch from scratch) initialises WavLink's own parameters as the JAX
    model does: the global token normal(0.02), the losses' scalars at `WavLinkConfig`'s initial values."""
    from wavlink_jax.models.wavlink import WavLinkConfig as JaxWavLinkConfig

    config = json.loads((exported / "config.json").read_text())
    torch.manual_seed(0)
    fresh = torch_model.WavLinkModel(torch_model.WavLinkConfig(**{key: config[key] for key in export.CONFIG_KEYS}))
    initial = {field.name: field.default for field in dataclasses.fields(JaxWavLinkConfig)}
    for name in export.SCALARS:
        assert float(getattr(fresh, name).detach()) == pytest.approx(initial[f"{name}_init"], abs=1e-6), name
    token = fresh.audio_global_token.detach().numpy()
    assert token.shape == (32,) and 0.01 < token.std() < 0.03 and abs(token.mean()) < 0.01


def test_pytorch_tokenizer_and_log_mel_match_ours(torch_wavlink, jax_embedder):
    _, texts = sample_inputs()
    ours = jax_embedder.tokenizer(texts)
    theirs = torch_wavlink.tokenize(texts)
    np.testing.assert_array_equal(theirs["input_ids"].numpy(), ours[0])
    np.testing.assert_array_equal(theirs["attention_mask"].numpy(), ours[1])
    waves = torch_wavlink.prepare_waveforms(sample_inputs()[0])
    mel_torch = torch_model.log_mel_spectrogram(waves, 80).numpy()
    mel_jax = np.asarray(audio.log_mel_spectrogram(waves.numpy(), 80))
    assert np.abs(mel_torch - mel_jax).max() < 1e-4


def test_pytorch_rejects_untrained_dim(torch_wavlink):
    with pytest.raises(ValueError, match="not a trained size"):
        torch_wavlink.embed_text(["a dog"], dim=8)


def test_pytorch_config_requires_the_full_size_among_matryoshka_dims():
    """The exported config obeys the JAX config's rule: the trained sizes include `embed_dim`, the size
    `dim=None` serves (a hand-edited config.json that drops it is refused, not served untrained)."""
    assert torch_model.WavLinkConfig(embed_dim=32, matryoshka_dims=[32, 16]).matryoshka_dims == [32, 16]
    assert torch_model.WavLinkConfig(embed_dim=32).matryoshka_dims is None  # the full size only
    for dims in ([16, 8], [32, 16, 16], [64, 32], [32, 0]):
        with pytest.raises(ValueError, match=r"matryoshka_dims .* whose largest is embed_dim"):
            torch_model.WavLinkConfig(embed_dim=32, matryoshka_dims=dims)
    with pytest.raises(ValueError, match=r"e\.g\. \[32, 16, 8\]"):
        torch_model.WavLinkConfig(embed_dim=32, matryoshka_dims=[16, 8])


def test_towers_round_trip_through_importers_and_transformers(exported, jax_embedder, tmp_path):
    from transformers import AutoTokenizer, CLIPTextModelWithProjection
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    model = jax_embedder.loaded.model
    mel = audio.log_mel_spectrogram(jax_embedder.prepare_waveforms(sample_inputs()[0]), 80)
    audio_dir = export.export_tower(exported, "audio", tmp_path / "whisper")

    # load_whisper reads the exported Whisper encoder; with the exported token the tower is identical.
    encoder = load_whisper(audio_dir)
    encoder.global_token.set_value(model.audio.global_token.get_value())
    ours, loaded = model.audio(mel), encoder(mel)
    np.testing.assert_array_equal(np.asarray(loaded.hidden_states), np.asarray(ours.hidden_states))
    np.testing.assert_array_equal(np.asarray(loaded.global_state), np.asarray(ours.global_state))

    # transformers' WhisperEncoder runs the exported weights (plain Whisper: no token) like our encoder.
    plain = load_whisper(audio_dir, global_token=False)
    hf_encoder = WhisperEncoder.from_pretrained(str(audio_dir)).eval()
    with torch.no_grad():
        hf_states = hf_encoder(torch.from_numpy(np.array(mel))).last_hidden_state.numpy()
    assert np.abs(hf_states - np.asarray(plain(mel).hidden_states)).max() <= TOLERANCE

    text_dir = export.export_tower(exported, "text", tmp_path / "clip")
    ids, mask = jax_embedder.tokenizer(sample_inputs()[1])
    # The text tower carries the tokenizer, which transformers reads to the same ids as ours.
    tokenizer_files = [name for name in export.TOKENIZER_FILES if (exported / name).exists()]
    assert "tokenizer_config.json" in tokenizer_files and len(tokenizer_files) > 1
    for name in tokenizer_files:
        assert (text_dir / name).read_bytes() == (exported / name).read_bytes(), name
    hf_tokens = AutoTokenizer.from_pretrained(str(text_dir))(
        sample_inputs()[1], padding="max_length", truncation=True, return_tensors="np"
    )
    np.testing.assert_array_equal(hf_tokens["input_ids"], ids)
    np.testing.assert_array_equal(hf_tokens["attention_mask"], mask)
    text = load_clip_text(text_dir)
    np.testing.assert_array_equal(np.asarray(text(ids, mask).embedding), np.asarray(model.text(ids, mask).embedding))
    hf_text = CLIPTextModelWithProjection.from_pretrained(str(text_dir)).eval()
    with torch.no_grad():
        hf_embeds = hf_text(torch.from_numpy(ids).long(), torch.from_numpy(mask).long()).text_embeds.numpy()
    assert np.abs(hf_embeds - np.asarray(model.text(ids, mask).embedding)).max() <= TOLERANCE


def test_step_selection_and_refusals(trained, exported, tmp_path):
    earlier = export.export(trained, tmp_path / "step2", step=2)
    weights, latest = load_file(str(earlier / "model.safetensors")), load_file(str(exported / "model.safetensors"))
    assert np.abs(weights["audio_global_token"] - latest["audio_global_token"]).max() > 0  # step 3 trained on
    with pytest.raises(CheckpointError, match=r"no finished checkpoint of step 7; steps available: \[2, 3\]"):
        export.export(trained, tmp_path / "step7", step=7)
    with pytest.raises(FileExistsError, match="not empty"):
        export.export(trained, exported)
    with pytest.raises(CheckpointError, match=r"an exported model directory .*not a training workdir.*give the "
                                              r"training workdir it was exported from"):
        export.export(exported, tmp_path / "again")
    before = (exported / "config.json").read_text()
    with pytest.raises(CheckpointError, match=r"an exported model directory .*to train, give a new workdir"):
        train.train(tiny_config(), str(exported))  # it went on, and transformers could no longer load the export
    assert (exported / "config.json").read_text() == before
    with pytest.raises(SystemExit, match="^error: .*no config.json"):
        export.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "nothing")])


def test_an_output_that_cannot_be_a_directory_is_refused_before_the_checkpoint_is_read(tmp_path):
    """A link to nothing or a path under a file failed after the (slow) read, with errno's words alone."""
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(FileExistsError, match=rf"dangling is a link to {tmp_path / 'gone'}, which does not exist"):
        export.check_output(tmp_path / "dangling", overwrite=False, model_types=(export.MODEL_TYPE,))
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match=rf"{tmp_path / 'file'} is a file, not a directory"):
        export.check_output(tmp_path / "file" / "out", overwrite=False, model_types=(export.MODEL_TYPE,))
    export.check_output(tmp_path / "new" / "out", overwrite=False, model_types=(export.MODEL_TYPE,))


def test_paths_starting_with_a_tilde_are_expanded(trained, exported, tmp_path, monkeypatch):
    """The shell leaves `~` alone in `--workdir=~/run`; the tools expand it as for every other path."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "run").symlink_to(trained)
    export.main(["--workdir=~/run", "--out=~/exported", "--step=2"])
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    assert inference.read_model("~/exported").path == tmp_path / "exported"
    assert inference.read_model("~/run").step == 3
    assert export.export("~/run", "~/again", step=2) == tmp_path / "again"  # the path written, not "~/again"


def export_loaded(loaded: inference.LoadedModel, out: Path, **kwargs) -> Path:
    """`export.export_model` of a loaded model (or `model=`) with its tokenizer and the fixture's window and text
    length."""
    kwargs = {"model": loaded.model, "tokenizer_dir": loaded.tokenizer_dir, "window_seconds": 1.0,
              "max_text_length": 16, **kwargs}
    return export.export_model(out=out, **kwargs)


def test_overwrite_replaces_the_whole_previous_export(jax_embedder, tmp_path):
    """A second export with --overwrite leaves none of the first one's files: a stale tokenizer.json beside the
    new run's vocab.json + merges.txt was read instead of them (by JAX and PyTorch alike), a stale sharded index
    instead of model.safetensors."""
    from wavlink_jax.tokenizer import load_tokenizer, train_tokenizer

    loaded = jax_embedder.loaded
    classic = tmp_path / "classic_tokenizer"  # CLIP's vocab.json + merges.txt layout, another vocabulary
    train_tokenizer(["zebra quartz jumps over violin", "purple elephants sing opera loudly"] * 50, classic, 600)
    (classic / "tokenizer.json").unlink()
    out = export_loaded(loaded, tmp_path / "wavlink")
    assert (out / "tokenizer.json").exists()
    (out / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    export_loaded(loaded, out, tokenizer_dir=classic, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "merges.txt", "model.safetensors", "modeling_wavlink.py", "tokenizer_config.json", "vocab.json",
        "waveform_layout.py",
    ]
    texts = ["zebra quartz jumps"]
    np.testing.assert_array_equal(load_tokenizer(out, 16)(texts)[0], load_tokenizer(classic, 16)(texts)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classic_tokenizer", "wavlink"]  # no staging left


def test_refused_or_failed_export_writes_nothing(jax_embedder, tmp_path, monkeypatch):
    """A model the export refuses (an audio LayerNorm epsilon Whisper cannot express) leaves no half-written
    directory to block the retry; a failure while writing leaves a previous export as it was."""
    from flax import nnx

    from wavlink_jax.models.wavlink import WavLink

    loaded = jax_embedder.loaded
    config = loaded.model.config
    refused = WavLink(dataclasses.replace(config, audio=dataclasses.replace(config.audio, layer_norm_eps=1e-6)),
                      rngs=nnx.Rngs(0))
    out = tmp_path / "wavlink"
    for _ in range(2):
        with pytest.raises(ValueError, match="layer_norm_eps"):
            export_loaded(loaded, out, model=refused)
        assert not out.exists()
    export_loaded(loaded, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        export_loaded(loaded, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(OSError, match="disk full"):
        export_loaded(loaded, tmp_path / "new")
    assert [p.name for p in tmp_path.iterdir()] == ["wavlink"]


def test_an_existing_output_directory_is_filled_in_place(jax_embedder, tmp_path):
    """An existing --out is written into, never renamed or replaced: a shared directory keeps its mode (setgid
    included) and inode, with and without --overwrite. (Replacing it failed on a mount point, in a parent the user
    cannot write, and reset a shared directory's mode and group.) What a killed export left inside is ignored and
    deleted."""
    out = tmp_path / "shared"
    out.mkdir()
    out.chmod(0o2775)
    (out / f"{export.STAGING_PREFIX}dead").mkdir()  # a killed export's staging directory
    before = out.stat()
    for overwrite in (False, True):
        export_loaded(jax_embedder.loaded, out, overwrite=overwrite)
        after = out.stat()
        assert (after.st_ino, after.st_mode, after.st_gid) == (before.st_ino, before.st_mode, before.st_gid)
        assert oct(after.st_mode & 0o7777) == "0o2775"
        assert "model.safetensors" in {p.name for p in out.iterdir()}
        assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]


def test_the_current_directory_as_out(trained, tmp_path, monkeypatch):
    """`--out .` from an empty directory exports into it; the process's working directory stays where it was
    (it was renamed away, then deleted)."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    export.main(["--workdir", str(trained), "--out", ".", "--step", "2"])
    assert Path(os.getcwd()) == here and (here / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["here"]


def test_an_output_directory_in_a_read_only_parent(jax_embedder, tmp_path):
    """A writable --out whose parent the user cannot write (e.g. a directory made for them): nothing is written
    beside it."""
    parent = tmp_path / "parent"
    out = parent / "mine"
    out.mkdir(parents=True)
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("running as root: a read-only mode does not stop writing")
        export_loaded(jax_embedder.loaded, out)
    finally:
        parent.chmod(0o755)
    assert (out / "model.safetensors").is_file() and [p.name for p in parent.iterdir()] == ["mine"]


def test_overwrite_never_deletes_what_is_not_an_export(jax_embedder, exported, tmp_path):
    """--overwrite replaces a previous export as a whole, so it refuses a directory that is not one."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a previous export .*never other files"):
        export_loaded(jax_embedder.loaded, mine, overwrite=True)
    with pytest.raises(FileExistsError, match="not a previous export"):
        export.export_tower(exported, "text", mine, overwrite=True)
    with pytest.raises(FileExistsError, match="not a directory"):
        export_loaded(jax_embedder.loaded, mine / "notes.txt", overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]

    # A transformers checkpoint of a tower's model_type is not an export either: it held someone's fine-tuned
    # Whisper, whose generation config and notes --overwrite deleted.
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    theirs = tmp_path / "my-whisper-finetune"
    tiny = WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                         decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    WhisperForConditionalGeneration(tiny).save_pretrained(theirs)
    (theirs / "training_notes.txt").write_text("keep me")
    before = sorted(p.name for p in theirs.iterdir())
    with pytest.raises(FileExistsError, match=r"not a previous export \(config.json of model_type 'whisper' or "):
        export.export_tower(exported, "audio", theirs, overwrite=True)
    assert sorted(p.name for p in theirs.iterdir()) == before


def test_export_tower_refuses_a_non_empty_directory_unless_overwrite(exported, tmp_path):
    out = export.export_tower(exported, "text", tmp_path / "tower")
    with pytest.raises(FileExistsError, match="not empty; choose a new directory or pass --overwrite"):
        export.export_tower(exported, "audio", out)
    export.export_tower(exported, "audio", out, overwrite=True)  # a text tower replaced by the audio tower
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "whisper"


def test_export_tower_refuses_an_export_with_missing_or_unexpected_tensors(exported, tmp_path):
    """A tower was copied from whatever the directory held: without fc2's weight, transformers loaded the tower
    with a random one behind a warning. Now refused with the lists, as JAX inference refuses the directory."""
    from safetensors.numpy import load_file, save_file

    damaged = tmp_path / "damaged"
    shutil.copytree(exported, damaged)
    tensors = load_file(damaged / "model.safetensors")
    del tensors["audio.layers.0.fc2.weight"]
    tensors["audio.bogus"] = np.zeros(2, np.float32)
    save_file(tensors, damaged / "model.safetensors")
    for tower in ("audio", "text"):
        listed = r"missing keys \(1\): \['audio\.layers\.0\.fc2\.weight'\]; unexpected keys \(1\): \['audio\.bogus'\]"
        with pytest.raises(CheckpointError, match=listed):
            export.export_tower(damaged, tower, tmp_path / tower)
        assert not (tmp_path / tower).exists()


def test_export_tower_of_a_training_workdir_says_to_export_first(trained, tmp_path):
    with pytest.raises(CheckpointError, match=rf"{trained}: a training workdir: export it first"):
        export.export_tower(trained, "audio", tmp_path / "tower")


def test_an_export_whose_config_lacks_keys_is_named_with_the_way_out(exported, tmp_path):
    """A config.json without keys inference reads (edited by hand, cut short) named neither its directory nor
    the remedy (window_seconds: a bare KeyError)."""
    damaged = tmp_path / "damaged"
    shutil.copytree(exported, damaged)
    config = json.loads((damaged / "config.json").read_text())
    del config["embed_dim"], config["window_seconds"]
    (damaged / "config.json").write_text(json.dumps(config))
    message = re.escape(f"{damaged / 'config.json'} lacks ['embed_dim', 'window_seconds'], which every export "
                        "writes; export the training workdir again (python -m wavlink_jax.export --workdir W")
    with pytest.raises(CheckpointError, match=f"^{message}"):
        inference.load(damaged)


@pytest.mark.parametrize("damage", ["no_state", "empty_step", "cut_metadata"])
def test_a_damaged_checkpoint_step_is_named_with_the_way_out(trained, tmp_path, damage):
    """A step directory that lost its state/, an empty step directory, or a state/_METADATA cut short: readers
    (export, inference, evaluate) and the trainer's resume say which step is damaged, how, which steps remain and
    what to do, instead of orbax's KeyError / a bare JSON error. None of them falls back to another step."""
    from wavlink_jax import checkpoint

    workdir = tmp_path / "workdir"
    shutil.copytree(trained, workdir)
    checkpoints = workdir / "checkpoints"
    if damage == "no_state":
        shutil.rmtree(checkpoints / "3" / "state")
    elif damage == "cut_metadata":
        metadata = checkpoints / "3" / "state" / "_METADATA"
        metadata.write_bytes(metadata.read_bytes()[:1000])
    else:
        (checkpoints / "5").mkdir()
    step = 5 if damage == "empty_step" else 3
    problem = {"no_state": "it has no state/", "empty_step": "the directory is empty",
               "cut_metadata": r"state/_METADATA cannot be read \(JSONDecodeError"}[damage]
    step_dir = checkpoints / str(step)
    damaged = rf"{step_dir}: checkpoint step {step} is damaged: {problem}"
    others = [2, 3] if damage == "empty_step" else [2]
    way_out = re.escape(f"; other steps: {others}; read one of them (e.g. step={others[-1]}, or --step {others[-1]} "
                        "on the command line)")
    with pytest.raises(SystemExit, match=f"^error: {damaged}.*{way_out}"):
        export.main(["--workdir", str(workdir), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    resume = checkpoint.Checkpoints(workdir, keep=3, every=2)
    try:
        way_out = re.escape(f"; other steps: {others}; delete {step_dir} to resume from step {others[-1]}")
        with pytest.raises(CheckpointError, match=f"^{damaged}.*{way_out}$"):
            resume.restore(None, None)  # refused before the state template or data iterator is used
    finally:
        resume.close()


def test_stereo_arrays_are_refused_alike_and_batches_still_work(torch_wavlink, jax_embedder):
    """A (samples, channels) array, as soundfile.read gives for a stereo file, was embedded as 16000 clips of 2
    samples each, by JAX and PyTorch alike; both refuse it with the same words, as a numpy, jax or torch array (the
    JAX side checked numpy arrays only). (clips, samples) batches and single clips work in every kind of array."""
    stereo = np.random.default_rng(0).uniform(-0.5, 0.5, (16000, 2)).astype(np.float32)
    messages = []
    for embed_audio in (jax_embedder.embed_audio, torch_wavlink.embed_audio):
        for kind in (np.asarray, jnp.asarray, torch.from_numpy):
            with pytest.raises(ValueError, match=re.escape("(16000, 2) looks like (samples, channels); mix to mono, "
                                                           "e.g. y.mean(axis=1)")) as caught:
                embed_audio(kind(stereo))
            messages.append(str(caught.value))
    assert len(set(messages)) == 1
    batch = np.ascontiguousarray(stereo.T)
    ours, theirs = jax_embedder.embed_audio(batch), torch_wavlink.embed_audio(batch).numpy()
    assert ours.shape == theirs.shape == (2, 32) and np.abs(ours - theirs).max() <= TOLERANCE
    for kind in (jnp.asarray, torch.from_numpy):
        np.testing.assert_array_equal(jax_embedder.embed_audio(kind(batch)), ours)
        np.testing.assert_array_equal(jax_embedder.embed_audio(kind(batch[1])), ours[1:])  # was "shape ()"


def test_channels_last_is_told_from_a_batch_by_its_shape():
    """Up to 8 channels (7.1 surround), and more samples than channels, is (samples, channels); a wider or
    shorter array is a (clips, samples) batch, however short its clips."""
    for shape in ((16000, 1), (16000, 2), (16000, 8), (9, 8)):
        with pytest.raises(ValueError, match=re.escape(f"audio of shape {shape} looks like (samples, channels)")):
            waveform_layout.check_not_channels_last(shape)
    for shape in ((16000, 9), (2, 16000), (8, 8), (2, 5), (16000,), (2, 3, 4)):
        waveform_layout.check_not_channels_last(shape)


def test_integer_pcm_is_refused_alike_and_window_batches_are_not_copied(torch_wavlink, jax_embedder):
    """int16 samples (scipy.io.wavfile.read) were embedded as floats 32768 times too loud, by JAX and PyTorch
    alike; both refuse them with the same words, in any kind of array and inside a list. A float32 batch of
    windows reaches the JAX model as it is (an evaluation set's windows were copied whole)."""
    pcm = np.random.default_rng(0).integers(-3000, 3000, (2, 16000)).astype(np.int16)
    messages = []
    for embed_audio in (jax_embedder.embed_audio, torch_wavlink.embed_audio):
        for waveforms in (pcm, torch.from_numpy(pcm), [pcm[0] / 32768, pcm[1]]):
            refused = r"^waveform \d has (torch\.)?int16 samples; expected floats"
            with pytest.raises(ValueError, match=refused) as caught:
                embed_audio(waveforms)
            messages.append(re.sub(r"torch\.|waveform \d", "", str(caught.value)))
    assert len(set(messages)) == 1, messages
    windows = np.random.default_rng(1).uniform(-0.5, 0.5, (3, jax_embedder.window_samples)).astype(np.float32)
    assert jax_embedder.prepare_waveforms(windows) is windows
    np.testing.assert_array_equal(jax_embedder.embed_audio(windows), jax_embedder.embed_audio(list(windows)))


def test_non_finite_samples_are_refused_alike(torch_wavlink, jax_embedder):
    """A NaN or infinite sample gave a row of NaN, by JAX and PyTorch alike and without a word; both refuse it,
    naming the waveform, in a list, one clip, or a float32 (clips, samples) batch (which JAX checks uncopied)."""
    clips = np.random.default_rng(2).uniform(-0.5, 0.5, (3, 16000)).astype(np.float32)
    clips[2, 7] = np.nan
    clips[1, 9] = np.inf
    loud = np.full(16000, 1e39)  # finite in float64, infinite as the float32 the models take
    for embed_audio in (jax_embedder.embed_audio, torch_wavlink.embed_audio):
        for waveforms, index in ((list(clips), 1), (clips, 1), (clips[2], 0), (torch.from_numpy(clips[2:]), 0),
                                 ([clips[0], loud], 1)):
            with pytest.raises(ValueError, match=rf"^waveform {index} has NaN or infinite samples \(as float32\)"):
                embed_audio(waveforms)


def test_pytorch_model_files_import_neither_jax_nor_our_package():
    """The exported directory's code runs where only torch and transformers are installed: modeling_wavlink.py
    imports those, the standard library and (relatively) waveform_layout.py, which imports the standard library
    only. (The tests' environment has wavlink_jax and jax, so loading the export alone would not show it.)"""
    import ast

    def imported(module) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names.add("." * node.level + (node.module or "").split(".")[0])
        return names

    assert imported(waveform_layout) <= set(sys.stdlib_module_names)
    assert imported(torch_model) - set(sys.stdlib_module_names) == {"torch", "transformers", ".waveform_layout"}


def test_pytorch_refuses_no_texts_as_jax_does(torch_wavlink, jax_embedder):
    for embed_text in (jax_embedder.embed_text, torch_wavlink.embed_text):
        with pytest.raises(ValueError, match="^embed_text got no texts$"):
            embed_text([])


def test_pytorch_and_jax_take_any_sequence_of_texts_and_name_a_non_string(torch_wavlink, jax_embedder):
    texts = np.array(["a dog barks", "rain"])  # a numpy array (or pandas Series): its truth value is ambiguous
    np.testing.assert_allclose(
        torch_wavlink.embed_text(texts).numpy(), jax_embedder.embed_text(texts), atol=1e-4
    )
    for embed_text in (jax_embedder.embed_text, torch_wavlink.embed_text):
        with pytest.raises(TypeError, match="^embed_text: text 1 is NoneType None, not a string$"):
            embed_text(["a dog barks", None])


def test_pytorch_refuses_a_batch_size_below_one(torch_wavlink):
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1, got 0"):
        torch_wavlink.embed_text(["a"], batch_size=0)
    for long_clips in ("head", "mean"):
        with pytest.raises(ValueError, match="batch_size must be a whole number >= 1, got 0"):
            torch_wavlink.embed_audio([np.zeros(8000, np.float32)], batch_size=0, long_clips=long_clips)


def test_pytorch_model_without_tokenizer_files_names_them(torch_wavlink, tmp_path):
    """save_pretrained writes no tokenizer: embedding text from the saved copy names the directory and the files
    (transformers said only "Couldn't instantiate the backend tokenizer")."""
    torch_wavlink.save_pretrained(tmp_path / "resaved")
    assert (tmp_path / "resaved" / "waveform_layout.py").is_file()  # the code modeling_wavlink.py imports goes along
    resaved = torch_model.WavLinkModel.from_pretrained(str(tmp_path / "resaved")).eval()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'resaved'}: no tokenizer beside the model "
                                                          "(tokenizer.json, or vocab.json + merges.txt)")):
        resaved.embed_text(["a dog barks"])
    assert resaved.embed_audio([np.zeros(8000, np.float32)]).shape == (1, 32)  # the audio side needs none


@pytest.mark.parametrize("settings", ["none", "a current config without pad, an old map with one"])
def test_a_tokenizer_without_a_pad_token_exports_the_special_tokens_jax_uses(jax_embedder, tmp_path, settings):
    """A tokenizer directory whose settings name no pad token, as transformers reads them: no settings files, or a
    tokenizer_config.json with `added_tokens_decoder` (whose special_tokens_map.json transformers ignores, and so
    does `load_tokenizer`). JAX falls back to CLIP's tokens (pad = end-of-text), and the export writes those into
    its tokenizer_config.json, so that transformers begins, ends and pads captions with the ids JAX used."""
    from transformers import AutoTokenizer

    from wavlink_jax.tokenizer import BOS_TOKEN, EOS_TOKEN, load_tokenizer

    bare = tmp_path / "tokenizer"
    bare.mkdir()
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copyfile(jax_embedder.loaded.tokenizer_dir / name, bare / name)
    if settings != "none":
        tok = load_tokenizer(bare)
        decoder = {str(i): {"content": t, "special": True} for i, t in ((tok.bos_token_id, BOS_TOKEN),
                                                                         (tok.eos_token_id, EOS_TOKEN))}
        (bare / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
        (bare / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    out = export_loaded(jax_embedder.loaded, tmp_path / "wavlink", tokenizer_dir=bare)
    texts = sample_inputs()[1]
    ids, mask = load_tokenizer(bare, max_length=16)(texts)
    assert (ids[mask == 0] == ids[0, mask[0].sum() - 1]).all()  # padded with end-of-text
    theirs = AutoTokenizer.from_pretrained(str(out))(texts, padding="max_length", truncation=True, return_tensors="np")
    np.testing.assert_array_equal(theirs["input_ids"], ids)
    np.testing.assert_array_equal(theirs["attention_mask"], mask)


def test_a_model_variable_the_name_map_leaves_out_is_an_exporter_bug(jax_embedder, monkeypatch):
    """Every variable of the model is exported, or the export is refused (the exported model would run with that
    variable's initial value): a name map without the global token names it."""
    full = export.name_map
    monkeypatch.setattr(
        export, "name_map", lambda config: {k: v for k, v in full(config).items() if k != export.GLOBAL_TOKEN}
    )
    with pytest.raises(KeyError, match=r"exporter bug: .* the model variables \[\('audio', 'global_token'\)\]"):
        export.export_weights(jax_embedder.loaded.model)
