"""`python -m wavlink_jax.convert` and the tower directories it writes (`wavlink_jax.convert.save`)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from train_fixtures import tiny_config

from wavlink_jax import checkpoint, optim, sharding, train_step
from wavlink_jax.convert import load_clip_text, load_whisper
from wavlink_jax.convert.__main__ import main
from wavlink_jax.convert.common import CheckpointError, assign_strict, check_filled, identity, transpose
from wavlink_jax.convert.save import assign_tower_state, load_tower
from wavlink_jax.models.clip_text import CLIPTextConfig, CLIPTextEncoder
from wavlink_jax.models.whisper import init_global_token


@pytest.fixture(scope="module")
def whisper_source(tmp_path_factory):
    """A random 2-layer, 64-wide HF WhisperModel (10 positions = 20 mel frames) saved as safetensors."""
    config = transformers.WhisperConfig(
        num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=256,
        max_source_positions=10, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=8, vocab_size=64,
        max_target_positions=8, pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("whisper_hf")
    transformers.WhisperModel(config).save_pretrained(directory)
    return directory


@nnx.jit
def _forward(model, mel):
    return model(mel)


@nnx.jit
def _forward_text(model, input_ids, attention_mask):
    return model(input_ids, attention_mask)


def _flat(module: nnx.Module, kind=nnx.Variable) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(module, kind))}


def test_whisper_cli_round_trip(tmp_path, whisper_source, capsys):
    out = tmp_path / "tower"
    assert main(["whisper", str(whisper_source), "--out", str(out), "--seed", "3"]) == 0
    assert "whisper tower" in capsys.readouterr().out

    original = load_whisper(whisper_source, seed=3)
    kind, config, state = load_tower(out)
    assert kind == "whisper" and config == dataclasses.asdict(original.config)
    assert json.loads((out / "tower.json").read_text())["config"]["global_token"] is True
    np.testing.assert_array_equal(state["global_token"], np.asarray(original.global_token.get_value()))
    assert state["encoder"]["layers"]["1"]["attn"]["key"]["kernel"].shape == (64, 64)
    assert "position_embedding" in state  # the fixed table travels with the parameters

    restored = load_whisper(out)  # a tower directory loads like any checkpoint; its token is kept
    expected, actual = _flat(original), _flat(restored)
    assert expected.keys() == actual.keys()
    for path in expected:
        np.testing.assert_array_equal(actual[path], expected[path], err_msg=str(path))
    mel = jnp.asarray(np.random.default_rng(0).normal(size=(2, 80, 20)).astype(np.float32))
    a, b = _forward(original, mel), _forward(restored, mel)
    np.testing.assert_array_equal(np.asarray(a.global_state), np.asarray(b.global_state))

    plain = load_whisper(out, global_token=False, dtype="bfloat16")  # token dropped, options overridable
    assert plain.global_token is None and plain.config.dtype == "bfloat16"


def test_whisper_cli_without_token(tmp_path, whisper_source):
    out = tmp_path / "plain"
    assert main(["whisper", str(whisper_source), "--out", str(out), "--no-global-token"]) == 0
    _, config, state = load_tower(out, kind="whisper")
    assert config["global_token"] is False and "global_token" not in state
    fresh = load_whisper(out, seed=5)  # asking for a token on a token-less tower: the documented new init
    expected = init_global_token(jax.random.key(5), 64).get_value()
    np.testing.assert_array_equal(np.asarray(fresh.global_token.get_value()), np.asarray(expected))


def test_cli_errors_are_messages_not_tracebacks(tmp_path, whisper_source):
    out = tmp_path / "tower"
    assert main(["whisper", str(whisper_source), "--out", str(out)]) == 0
    with pytest.raises(SystemExit, match="^error: .*already holds a converted tower"):  # one line, exit status 1
        main(["whisper", str(whisper_source), "--out", str(out)])
    # The output is checked before the source is read (a source that cannot be read shows it): a conversion
    # killed before tower.json was written is named as such, here and by the loader, and a file is refused.
    (out / "tower.json").unlink()
    with pytest.raises(SystemExit, match=r"^error: .*tower holds an interrupted conversion \(params/ without tower.json\)"):
        main(["whisper", str(tmp_path / "no such source"), "--out", str(out)])
    with pytest.raises(CheckpointError, match=r"no tower.json \(params/ without it: an interrupted conversion"):
        load_tower(out)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"^error: --out .*file: a file, not a directory"):
        main(["whisper", str(tmp_path / "no such source"), "--out", str(tmp_path / "file")])

    not_whisper = tmp_path / "not_whisper"
    not_whisper.mkdir()
    (not_whisper / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(SystemExit, match="^error: .*not 'whisper'"):
        main(["whisper", str(not_whisper), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_tower_directory_is_loaded_strictly(tmp_path, whisper_source):
    out = tmp_path / "tower"
    assert main(["whisper", str(whisper_source), "--out", str(out)]) == 0
    description = json.loads((out / "tower.json").read_text())
    description["config"]["num_layers"] = 1
    (out / "tower.json").write_text(json.dumps(description))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(\d+\): \['encoder/layers/1/"):
        load_whisper(out)
    description["kind"] = "clip_text"
    (out / "tower.json").write_text(json.dumps(description))
    with pytest.raises(CheckpointError, match="holds a 'clip_text' tower, not 'whisper'"):
        load_whisper(out)
    with pytest.raises(CheckpointError, match="no tower.json"):
        load_tower(tmp_path)
    description["kind"], description["config"]["n_mel"] = "whisper", 80  # a field WhisperConfig does not have
    (out / "tower.json").write_text(json.dumps(description))
    with pytest.raises(CheckpointError, match=rf"{out / 'tower.json'}: .*unexpected keyword argument 'n_mel'"):
        load_whisper(out)
    del description["config"]["n_mel"]
    (out / "tower.json").write_text(json.dumps(description))
    with pytest.raises(TypeError, match="dtyp") as refused:  # the caller's mistake, not the file's (it was blamed)
        load_whisper(out, dtyp="bfloat16")
    assert not isinstance(refused.value, CheckpointError)
    (out / "tower.json").write_text("[1, 2]")  # JSON, not an object: was a TypeError traceback
    with pytest.raises(CheckpointError, match=rf"{out / 'tower.json'}: expected JSON with 'kind' and 'config'"):
        load_whisper(out)
    description["config"]["num_layers"] = 2
    (out / "tower.json").write_text(json.dumps(description))
    for data in (out / "params").glob("ocdbt.process_*/d/*"):  # the arrays' data files, cut short
        data.write_bytes(data.read_bytes()[:100])  # tensorstore's words, naming no remedy, before
    with pytest.raises(CheckpointError, match=rf"{out / 'params'}: an array could not be read .*convert again"):
        load_whisper(out)
    with pytest.raises(SystemExit, match="^error: --out is empty; give the directory"):  # an empty $OUT: was "."
        main(["whisper", str(whisper_source), "--out", ""])


def test_clip_text_cli(tmp_path):
    config = transformers.CLIPTextConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=16, projection_dim=24, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    source = tmp_path / "clip"
    transformers.CLIPTextModelWithProjection(config).save_pretrained(source)
    out = tmp_path / "tower"
    assert main(["clip_text", str(source), "--out", str(out)]) == 0
    original = load_clip_text(source)
    kind, saved_config, state = load_tower(out)
    assert kind == "clip_text" and saved_config == dataclasses.asdict(original.config)

    restored = CLIPTextEncoder(CLIPTextConfig(**saved_config), rngs=nnx.Rngs(1))  # other random weights
    assign_tower_state(restored, state, source=str(out))  # strict: every variable, nothing else
    expected, actual = _flat(original), _flat(restored)
    assert expected.keys() == actual.keys()
    for path in expected:
        np.testing.assert_array_equal(actual[path], expected[path], err_msg=str(path))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 99, size=(2, 16)), jnp.int32)
    mask = jnp.asarray(np.arange(16)[None, :] < np.array([[16], [9]]), jnp.int32)
    a, b = _forward_text(original, ids, mask), _forward_text(restored, ids, mask)
    np.testing.assert_array_equal(np.asarray(a.embedding), np.asarray(b.embedding))
    np.testing.assert_array_equal(np.asarray(a.hidden_states), np.asarray(b.hidden_states))

    reloaded = load_clip_text(out, dtype="bfloat16")  # a tower directory loads like any checkpoint
    assert reloaded.config == dataclasses.replace(original.config, dtype="bfloat16")
    actual = _flat(reloaded)
    assert expected.keys() == actual.keys()
    for path in expected:
        np.testing.assert_array_equal(actual[path], expected[path], err_msg=str(path))
    with pytest.raises(CheckpointError, match="a converted tower keeps the projection it was converted with"):
        load_clip_text(out, new_projection=True)


def test_init_from_text_reads_a_converted_clip_tower(tmp_path):
    config = tiny_config()
    text = config.model.text
    torch.manual_seed(0)
    hf = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        vocab_size=text.vocab_size, hidden_size=text.width, num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads, intermediate_size=text.mlp_dim, max_position_embeddings=text.max_positions,
        projection_dim=text.projection_dim, eos_token_id=2,
    ))  # fmt: skip
    hf.save_pretrained(tmp_path / "clip")
    assert main(["clip_text", str(tmp_path / "clip"), "--out", str(tmp_path / "tower")]) == 0
    config.init_from.text = str(tmp_path / "tower")
    setup = train_step.build(config, sharding.create_mesh({"data": 1}, devices=jax.devices()[:1]), total_steps=2)
    state = optim.flatten(jax.device_get(checkpoint.apply_init_from(train_step.init_state(setup, seed=0), setup)))
    torch_weights = {name: value.numpy() for name, value in hf.state_dict().items()}
    np.testing.assert_array_equal(
        state["params/text/token_embedding/embedding"], torch_weights["text_model.embeddings.token_embedding.weight"]
    )
    np.testing.assert_array_equal(state["params/text/text_projection/kernel"], torch_weights["text_projection.weight"].T)


def test_module_entry_point():
    """The README's command line runs (as a real `python -m`)."""
    result = subprocess.run(
        [sys.executable, "-m", "wavlink_jax.convert", "whisper", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
    assert "--no-global-token" in result.stdout


def test_assign_strict_lists_missing_unexpected_and_mis_shaped_keys_in_one_error():
    """All three kinds at once (shape mismatches were reported only once the key lists were fixed)."""
    module = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    mapping = {"weight": (("kernel",), transpose), "bias": (("bias",), identity)}
    weights = {"weight": np.zeros((5, 3), np.float32), "extra": np.zeros(2, np.float32)}
    with pytest.raises(CheckpointError) as caught:
        assign_strict(module, weights, mapping, source="ckpt.safetensors")
    assert str(caught.value) == (
        "ckpt.safetensors: checkpoint does not match the model; missing keys (1): ['bias']; unexpected keys (1): "
        "['extra']; shape mismatches (1): ['weight: checkpoint (5, 3) (in our layout (3, 5)) vs model (3, 4)']"
    )


def test_check_filled_names_variables_no_mapping_entry_wrote():
    """A loader builds its module abstractly and fills it from the checkpoint; a variable its name map forgot
    (here the bias: neither mapped nor in the checkpoint, so `assign_strict` sees nothing wrong) would stay a
    shape placeholder. `check_filled` refuses it, naming the table and the variable."""
    module = nnx.eval_shape(lambda: nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
    assign_strict(
        module, {"weight": np.ones((4, 3), np.float32)}, {"weight": (("kernel",), transpose)}, source="ckpt"
    )
    with pytest.raises(KeyError, match=r"bug: the_map does not cover the variables \[\('bias',\)\]"):
        check_filled(module, "the_map")
    assign_strict(module, {"bias": np.zeros(4, np.float32)}, {"bias": (("bias",), identity)}, source="ckpt")
    check_filled(module, "the_map")  # every variable written
