"""The trainer around the step: CLI config handling, NaN stop, init_from (towers and stage-1 workdirs), configs."""

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import grain
import jax
import numpy as np
import optax
import pytest
import torch
import transformers
from train_fixtures import tiny_config

from wavlink_jax import checkpoint, eval_tasks, inference, optim, sharding, train, train_step
from wavlink_jax.convert.common import CheckpointError
from wavlink_jax.data import pipeline, synthetic
from wavlink_jax.models import lora
from wavlink_jax.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(root, num_train=24, num_eval=8, max_seconds=1.5, captions_per_clip=2)
    return root


def one_device_mesh():
    return sharding.create_mesh({"data": 1}, devices=jax.devices()[:1])


def test_cli_refuses_unknown_override(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "wavlink_jax.train", "--config", "configs/quickstart.py", "--workdir", str(tmp_path),
         "--config.optim.learning_rat=0.1"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "learning_rat" in result.stderr
    assert not (tmp_path / "config.json").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir):
    # lr 1e30: the first update overflows whatever the random init (at 1e6 the step the loss turned NaN
    # depended on the initial weights).
    config = tiny_config(str(data_dir), total_steps=5, checkpoint_every_steps=1, **{"optim.learning_rate": 1e30})
    with pytest.raises(train.NonFiniteLoss, match=r"at step 2: training stopped.*last good checkpoint is step 1"):
        train.train(config, str(tmp_path))
    assert checkpoint.Checkpoints(tmp_path, keep=1, every=1).latest_step() == 1
    resolved = json.loads((tmp_path / "config.json").read_text())
    assert resolved["optim"]["learning_rate"] == 1e30 and resolved["total_steps"] == 5
    # Before any checkpoint, the message says so (it named "step None" in a checkpoints/ that did not exist).
    config.checkpoint_every_steps = 5
    with pytest.raises(train.NonFiniteLoss, match=r"at step 2: training stopped\. No checkpoint was saved before it"):
        train.train(config, str(tmp_path / "fresh"))


def test_non_finite_grad_norm_stops_even_with_finite_loss(tmp_path):
    # An Inf/NaN gradient norm with a still-finite loss must stop the run too (the next update is broken).
    checkpoints = checkpoint.Checkpoints(tmp_path, keep=1, every=1)
    with pytest.raises(train.NonFiniteLoss, match=r"'grad_norm': inf\} at step 3"):
        train._finite_or_stop(3, {"loss": 1.0, "grad_norm": float("inf")}, checkpoints)
    train._finite_or_stop(4, {"loss": 1.0, "grad_norm": 2.0}, checkpoints)
    checkpoints.close()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (lambda data: {"remat": "foo"}, r"config\.remat = 'foo' is not one of"),
        (lambda data: {"optim.end_lr_fraction": -1.0}, r"config\.optim\.end_lr_fraction"),
        (lambda data: {"data.tokenizer": "/nonexistent/tokenizer"}, r"/nonexistent/tokenizer"),
        (lambda data: {"eval.batch_size": 8, "eval.sets": (
            {"name": "long", "source": {"kind": "manifest", "path": f"{data}/eval.jsonl"}, "window_seconds": 60},)},
         r"config\.eval\.sets\[0\] \(long\) window_seconds"),
        (lambda data: {"init_from.audio": "/nonexistent/whisper"}, r"/nonexistent/whisper"),
        (lambda data: {"eval.max_clips": -1}, r"config: eval\.max_clips=-1 \(must be ≥ 0: 0 = every clip\)"),
        (lambda data: {"loss.clip_weight": 0.0, "loss.sigmoid_weight": 0.0}, r"not both 0"),  # was: after config.json
        (lambda data: {"accum_steps": 0}, r"config\.accum_steps = 0"),  # was: ZeroDivisionError
        (lambda data: {"total_steps": -1}, r"config: total_steps=-1 \(must be ≥ 0: 0 = from epochs\)"),
        (lambda data: {"data.sources": ({"kind": "manifest", "path": f"{data}/train.jsonl", "wieght": 2},)},
         r"has unknown keys \['wieght'\]"),  # was: trained with the default weight
    ],
)
def test_a_refused_config_writes_no_config_json(tmp_path, data_dir, capsys, overrides, message):
    """config.json is the config of a run that started: a config refused at start-up neither writes one in a new
    workdir nor replaces a resumed run's (which made the next, corrected run print 'note: the config differs')."""
    config = tiny_config(str(data_dir), **{"total_steps": 2, **overrides(data_dir)})
    with pytest.raises(ValueError, match=message):
        train.train(config, str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()  # nothing written: no config.json, no empty checkpoints/

    earlier = tmp_path / "earlier" / "config.json"
    earlier.parent.mkdir()
    earlier.write_text(tiny_config(str(data_dir), total_steps=2).to_json_best_effort(indent=2, sort_keys=True) + "\n")
    before = earlier.read_text()
    with pytest.raises(ValueError, match=message):
        train.train(config, str(earlier.parent))
    assert earlier.read_text() == before and "note: the config differs" not in capsys.readouterr().out


def test_a_workdir_under_home_is_expanded(tmp_path, data_dir, monkeypatch, capsys):
    """`--workdir=~/run` (the shell leaves that ~ alone) is $HOME/run, not a folder named '~' in the current
    directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    train.train(tiny_config(str(data_dir), total_steps=1), "~/run")
    run = tmp_path / "home" / "run"
    assert (run / "config.json").is_file() and (run / "checkpoints" / "1").is_dir()
    assert not (tmp_path / "~").exists()
    # A re-run with nothing left to do leaves config.json that of the run that made the checkpoints.
    before = (run / "config.json").read_text()
    train.train(tiny_config(str(data_dir), total_steps=1, log_every_steps=5), "~/run")
    assert (run / "config.json").read_text() == before
    # Resumed with more steps, the run says how its learning-rate schedule changes (silent before, when the
    # number came from `epochs` over sources that changed size).
    assert json.loads((run / "schedule.json").read_text()) == {"total_steps": 1}
    # A resume refused for a damaged metrics.jsonl leaves config.json and schedule.json as they were (it rewrote
    # them, so the run after the repair no longer said what had changed).
    records = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text('{"loss": 1.0}\n' + records)
    with pytest.raises(ValueError, match=r'metrics.jsonl: line 1 has no integer "step"'):
        train.train(tiny_config(str(data_dir), total_steps=2), "~/run")
    assert (run / "config.json").read_text() == before
    assert json.loads((run / "schedule.json").read_text()) == {"total_steps": 1}
    (run / "metrics.jsonl").write_text(records)
    # So does one refused for a damaged schedule.json (config.json was written before it was read).
    (run / "schedule.json").write_text('{"total_steps": 1')
    with pytest.raises(ValueError, match=r"schedule\.json: not valid JSON"):
        train.train(tiny_config(str(data_dir), total_steps=2), "~/run")
    assert (run / "config.json").read_text() == before
    (run / "schedule.json").write_text('{"total_steps": 1}\n')
    capsys.readouterr()
    train.train(tiny_config(str(data_dir), total_steps=2), "~/run")
    assert "note: this run has 2 steps, the run it resumes 1: the learning-rate schedule changes (at step 1: 0 → " in (
        capsys.readouterr().out
    )
    assert json.loads((run / "schedule.json").read_text()) == {"total_steps": 2}


def test_only_process_zero_reads_and_writes_the_run_files(tmp_path, data_dir, monkeypatch):
    """config.json and schedule.json are process 0's: another process that read them while process 0 replaced them
    found a file cut short (a two-process resume failed on schedule.json in CI). Process 0 replaces them whole."""
    config = tiny_config(str(data_dir), total_steps=4)
    schedule = tmp_path / train.SCHEDULE_FILE
    schedule.write_text("")  # what the other process saw: process 0 between truncating and writing
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    train.write_config(config, str(tmp_path))
    train.keep_schedule(config, str(tmp_path), total_steps=4, start_step=2, before=4)
    assert [p.name for p in tmp_path.iterdir()] == [train.SCHEDULE_FILE] and schedule.read_text() == ""
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    schedule.write_text('{"total_steps": 4}\n')
    train.write_config(config, str(tmp_path))
    written = {path: path.stat().st_ino for path in (schedule, tmp_path / "config.json")}
    train.write_config(config, str(tmp_path))
    train.keep_schedule(config, str(tmp_path), total_steps=4, start_step=2, before=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", train.SCHEDULE_FILE]  # no .partial left
    assert json.loads(schedule.read_text()) == {"total_steps": 4}
    # Replaced by a rename (another file), not truncated and written again in place.
    assert all(path.stat().st_ino != inode for path, inode in written.items())


def test_total_steps_from_epochs_cover_every_clip_of_every_source(data_dir):
    """total_steps = 0: ceil(epochs × clips of all training sources / batch_size), so a last partial batch's worth
    of clips is trained on; a set total_steps stands; no step at all is refused."""
    manifest = {"kind": "manifest", "path": f"{data_dir}/train.jsonl"}  # 24 clips, batch 8
    for epochs, sources, steps in ((1.0, (manifest,), 3), (1.1, (manifest,), 4), (1.1, (manifest, manifest), 7)):
        config = tiny_config(str(data_dir), total_steps=0, epochs=epochs, **{"data.sources": sources})
        assert train.resolve_total_steps(config) == steps, (epochs, len(sources))
    assert train.resolve_total_steps(tiny_config(str(data_dir), total_steps=5, epochs=1.0)) == 5
    with pytest.raises(ValueError, match=r"config.epochs=0.0 over 24 clips gives no steps; set total_steps"):
        train.resolve_total_steps(tiny_config(str(data_dir), total_steps=0, epochs=0.0))


def test_eval_sets_sharing_a_name_are_refused_before_training(tmp_path, data_dir):
    """Their metrics (eval/<name>/...) would overwrite each other's."""
    eval_set = {"name": "synthetic", "source": {"kind": "manifest", "path": f"{data_dir}/eval.jsonl"}}
    config = tiny_config(str(data_dir), total_steps=2, **{"eval.sets": (eval_set, dict(eval_set)), "eval.batch_size": 8})
    with pytest.raises(ValueError, match=r"^config\.eval\.sets names \['synthetic'\] more than once"):
        train.train(config, str(tmp_path))
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


def test_an_evaluation_step_is_also_a_log_step(tmp_path, data_dir):
    """Every metrics.jsonl record has `step` and `loss`, also at an evaluation between two log steps."""
    eval_set = {"name": "synthetic", "source": {"kind": "manifest", "path": f"{data_dir}/eval.jsonl"}}
    config = tiny_config(str(data_dir), total_steps=2, log_every_steps=2, eval_every_steps=1,
                         **{"eval.sets": (eval_set,), "eval.batch_size": 8})
    train.train(config, str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert "loss" in record and "grad_norm" in record and "eval/synthetic/t2a_R@1" in record, record["step"]
    # The evaluation scores the parameters of its step: step 2's figures are those of the final checkpoint, read
    # back and scored by the standalone path (only the keys were checked, and scoring the initial state passed).
    embedder = inference.load(str(tmp_path), batch_size=8)
    data = eval_tasks.load_eval_data("synthetic", eval_set["source"], window_seconds=config.data.window_seconds)
    (scored,) = eval_tasks.evaluate_data(embedder, data, [embedder.config.matryoshka_dims[0]]).values()
    in_training = {key.removeprefix("eval/synthetic/"): value for key, value in records[1].items()}
    assert {key: in_training[key] for key in scored} == pytest.approx(scored, abs=1e-4)


def test_sigterm_saves_its_step_and_the_resumed_run_logs_what_an_uninterrupted_one_would(
    tmp_path, data_dir, monkeypatch
):
    """In process (tests/test_train_resume.py does it with the CLI): SIGTERM in step 1 (off the checkpoint
    interval) saves step 1 and stops with Preempted, and the previous SIGTERM handler is back; SIGTERM in the last
    step finishes the run as usual. The resumed run's records: samples_per_second over each record's own steps
    (a clock that only the steps advance, 0.5 s each) and every skip count of the data read up to the record's
    step, counted across the resume (two clips of the manifest are missing)."""
    records = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    gone = [{"audio": str(tmp_path / f"gone{i}.wav"), "captions": ["nothing"]} for i in range(2)]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in
                                [{**r, "audio": str(data_dir / r["audio"])} for r in records] + gone))
    config = tiny_config(str(data_dir), total_steps=4, log_every_steps=2, checkpoint_every_steps=2,
                         **{"data.sources": ({"kind": "manifest", "path": str(manifest)},)})
    clock = [0.0]
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    make = train_step.make_train_step

    def terminated_at(call):
        def make_terminated(setup):
            step_fn, calls = make(setup), []

            def step(*args):
                calls.append(1)
                clock[0] += 0.5
                if len(calls) == call:
                    os.kill(os.getpid(), signal.SIGTERM)
                return step_fn(*args)

            return step

        return make_terminated

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(train_step, "make_train_step", terminated_at(1))
    with pytest.raises(train.Preempted, match=r"^stopped at step 1 of 4 on SIGTERM \(preemption\); checkpoint 1 is"):
        train.train(config, str(tmp_path / "run"))
    assert signal.getsignal(signal.SIGTERM) is before
    assert checkpoint.Checkpoints(tmp_path / "run", keep=1, every=1).latest_step() == 1
    monkeypatch.setattr(train_step, "make_train_step", terminated_at(3))  # steps 2, 3, 4: the last
    last = train.train(config, str(tmp_path / "run"))
    assert signal.getsignal(signal.SIGTERM) is before
    assert checkpoint.Checkpoints(tmp_path / "run", keep=1, every=1).latest_step() == 4
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 4] and logged[-1] == {"step": 4, **last}
    assert [r["samples_per_second"] for r in logged] == [8 / 0.5, 8 / 0.5]  # windows of 1 and 2 steps
    tokenizer = load_tokenizer(config.data.tokenizer, max_length=config.data.max_text_length)
    data = pipeline.make_train_iterator(config.data, global_batch_size=8, seed=config.seed, tokenizer=tokenizer,
                                        process_index=0, process_count=1)
    counts = []  # after each batch of an uninterrupted read
    for _ in range(4):
        next(data)
        counts.append(data.skip_counts)
    data.close()
    assert counts[-1]["missing"] >= 2  # the first epoch, both missing clips in it, is read by step 4
    for record in logged:
        skipped = {key.removeprefix("data/skipped/"): n for key, n in record.items() if key.startswith("data/skipped/")}
        assert skipped == counts[record["step"] - 1], record["step"]


def hf_towers(tmp_path, config, whisper_settings=None, text_settings=None):
    """Random Hugging Face Whisper and CLIP checkpoints with the tiny config's tower shapes, saved to disk
    (`whisper_settings` / `text_settings`: extra `transformers` config keys, e.g. another activation)."""
    audio, text = config.model.audio, config.model.text
    torch.manual_seed(0)
    whisper = transformers.WhisperModel(transformers.WhisperConfig(
        num_mel_bins=audio.n_mels, d_model=audio.width, encoder_layers=audio.num_layers,
        encoder_attention_heads=audio.num_heads, encoder_ffn_dim=audio.mlp_dim,
        max_source_positions=audio.max_positions, decoder_layers=1, decoder_attention_heads=audio.num_heads,
        decoder_ffn_dim=8, vocab_size=64, max_target_positions=8, pad_token_id=0, bos_token_id=0, eos_token_id=0,
        decoder_start_token_id=0, **(whisper_settings or {}),
    ))
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=text.vocab_size, hidden_size=text.width, num_hidden_layers=text.num_layers,
                         num_attention_heads=text.num_heads, intermediate_size=text.mlp_dim,
                         max_position_embeddings=text.max_positions, eos_token_id=2, **(text_settings or {})),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=16),
        projection_dim=text.projection_dim,
    ))
    whisper.save_pretrained(tmp_path / "whisper")
    clip.save_pretrained(tmp_path / "clip")
    return whisper, clip


def test_init_from_towers_loads_both_and_keeps_global_token(tmp_path):
    config = tiny_config()
    whisper, clip = hf_towers(tmp_path, config)
    config.init_from.audio, config.init_from.text = str(tmp_path / "whisper"), str(tmp_path / "clip")
    setup = train_step.build(config, one_device_mesh(), total_steps=10)
    fresh = train_step.init_state(setup, seed=0)
    fresh_token = np.asarray(fresh["params"]["audio"]["global_token"])
    state = optim.flatten(jax.device_get(checkpoint.apply_init_from(fresh, setup)["params"]))
    torch_whisper = {k: v.numpy() for k, v in whisper.state_dict().items()}
    torch_clip = {k: v.numpy() for k, v in clip.state_dict().items()}
    np.testing.assert_array_equal(
        state["audio/encoder/layers/0/attn/query/kernel"], torch_whisper["encoder.layers.0.self_attn.q_proj.weight"].T
    )
    np.testing.assert_array_equal(state["text/token_embedding/embedding"],
                                  torch_clip["text_model.embeddings.token_embedding.weight"])
    np.testing.assert_array_equal(state["text/text_projection/kernel"], torch_clip["text_projection.weight"].T)
    np.testing.assert_array_equal(state["audio/global_token"], fresh_token)  # no checkpoint has it


def test_init_from_towers_into_a_bfloat16_remat_run(tmp_path):
    """The run settings (compute dtype, remat, attention implementation) say how to compute, not what: a bfloat16
    run with remat (the paper configs compute in bfloat16) starts from the float32 checkpoints as they are."""
    config = tiny_config()
    config.dtype, config.remat, config.attention_implementation = "bfloat16", "full", "xla"
    whisper, clip = hf_towers(tmp_path, config)
    config.init_from.audio, config.init_from.text = str(tmp_path / "whisper"), str(tmp_path / "clip")
    setup = train_step.build(config, one_device_mesh(), total_steps=10)
    assert setup.model_config.audio.dtype == "bfloat16" and setup.model_config.text.remat == "full"
    state = optim.flatten(jax.device_get(checkpoint.apply_init_from(train_step.init_state(setup, seed=0), setup)))
    np.testing.assert_array_equal(
        state["params/audio/encoder/layers/0/fc1/kernel"], whisper.state_dict()["encoder.layers.0.fc1.weight"].numpy().T
    )
    np.testing.assert_array_equal(
        state["params/text/token_embedding/embedding"],
        clip.state_dict()["text_model.embeddings.token_embedding.weight"].numpy(),
    )


@pytest.mark.parametrize("tower", ["audio", "text"])
def test_init_from_a_workdir_and_a_tower_is_refused(tower):
    """A stage-1 workdir already holds both towers: a pretrained tower besides it is one or the other too many."""
    config = tiny_config(**{"init_from.workdir": "/runs/stage1", f"init_from.{tower}": "/towers/pretrained"})
    with pytest.raises(ValueError, match=r"^config.init_from: set either workdir, or audio/text, not both$"):
        checkpoint.apply_init_from({}, types.SimpleNamespace(config=config))


def test_init_from_tower_with_wrong_shape_lists_keys(tmp_path):
    config = tiny_config()
    hf_towers(tmp_path, config)
    config.model.audio.mlp_dim = 96  # the checkpoint has 64
    config.init_from.audio = str(tmp_path / "whisper")
    setup = train_step.build(config, one_device_mesh(), total_steps=10)
    with pytest.raises(CheckpointError) as err:
        checkpoint.apply_init_from(train_step.init_state(setup, seed=0), setup)
    assert "audio/encoder/layers/0/fc1/kernel" in str(err.value)


@pytest.mark.parametrize(
    "tower, checkpoint_settings, config_change, expected",
    [
        # the review's case: a CLIP checkpoint with exact GELU, while the run's config says quick_gelu
        ("text", {"hidden_act": "gelu"}, {}, {"activation": "checkpoint 'gelu' vs config 'quick_gelu'"}),
        # transformers' Whisper encoder fixes its LayerNorm eps at 1e-5: a config with another eps is another model
        ("audio", {"activation_function": "relu"}, {"layer_norm_eps": 1e-6},
         {"activation": "checkpoint 'relu' vs config 'gelu'", "layer_norm_eps": "checkpoint 1e-05 vs config 1e-06"}),
    ],
)
def test_init_from_tower_with_other_model_settings_is_refused(
    tmp_path, tower, checkpoint_settings, config_change, expected
):
    config = tiny_config()
    settings = {"whisper_settings" if tower == "audio" else "text_settings": checkpoint_settings}
    hf_towers(tmp_path, config, **settings)
    config.model[tower].update(config_change)
    config.init_from[tower] = str(tmp_path / ("whisper" if tower == "audio" else "clip"))
    setup = train_step.build(config, one_device_mesh(), total_steps=10)
    with pytest.raises(CheckpointError) as err:
        checkpoint.apply_init_from(train_step.init_state(setup, seed=0), setup)
    message = str(err.value)
    assert config.init_from[tower] in message
    for field, values in expected.items():
        assert f"{field}: {values}" in message and f"--config.model.{tower}.{field}=" in message  # says what to set
    # only the differing fields (dtype, remat, the audio tower's global token: not compared)
    assert message.count(" vs config ") == len(expected)


def test_init_from_stage1_workdir_restores_buffers(tmp_path):
    """Stage 1's fixed tables (Whisper's position table, imported from the pretrained checkpoint and not equal
    to a freshly computed sinusoid) carry over to stage 2 bit for bit, as its parameters do."""
    stage1 = tiny_config()
    setup = train_step.build(stage1, one_device_mesh(), total_steps=10)
    state = jax.device_get(train_step.init_state(setup, seed=0))
    table = state["buffers"]["audio"]["position_embedding"]
    state["buffers"]["audio"]["position_embedding"] = table + np.float32(1e-4) * np.sign(table)
    manager = checkpoint.Checkpoints(tmp_path / "stage1", keep=1, every=1)
    manager.save(1, state, iter(grain.MapDataset.range(4).to_iter_dataset()))
    manager.close()
    (tmp_path / "stage1" / "config.json").write_text(stage1.to_json())

    stage2 = tiny_config(**{"init_from.workdir": str(tmp_path / "stage1")})
    setup = train_step.build(stage2, one_device_mesh(), total_steps=10)
    fresh = train_step.init_state(setup, seed=1)
    loaded = jax.device_get(checkpoint.apply_init_from(fresh, setup))
    for kind in ("buffers", "params"):
        expected, got = optim.flatten(state[kind]), optim.flatten(loaded[kind])
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{kind}/{key}")
    assert not np.array_equal(loaded["buffers"]["audio"]["position_embedding"],
                              np.asarray(fresh["buffers"]["audio"]["position_embedding"]))
    # A LoRA stage 2 loads every model weight and keeps its fresh adapters (B = 0: it starts as stage 1's model).
    lora_stage2 = tiny_config(**{"init_from.workdir": str(tmp_path / "stage1"), "optim.mode": "lora"})
    setup = train_step.build(lora_stage2, one_device_mesh(), total_steps=10)
    adapted = optim.flatten(jax.device_get(checkpoint.apply_init_from(train_step.init_state(setup, seed=1), setup)))
    adapters = [key for key in adapted if lora.is_adapter(key)]
    assert adapters and all(not np.any(adapted[key]) for key in adapters if key.endswith("lora_b"))
    for key, value in optim.flatten({kind: state[kind] for kind in ("params", "buffers")}).items():
        np.testing.assert_array_equal(adapted[key], value, err_msg=key)
    # A stage 2 whose towers are set up differently (same shapes) is refused, as for pretrained towers.
    other = tiny_config(**{"init_from.workdir": str(tmp_path / "stage1"), "model.text.activation": "gelu"})
    setup = train_step.build(other, one_device_mesh(), total_steps=10)
    with pytest.raises(CheckpointError, match=r"text tower .*\(activation: checkpoint 'quick_gelu' vs config 'gelu'\)"):
        checkpoint.apply_init_from(train_step.init_state(setup, seed=1), setup)


def test_init_from_stage1_workdir_merges_lora(tmp_path, data_dir, capsys):
    stage1 = tiny_config(str(data_dir), total_steps=2, **{"optim.mode": "lora"})
    train.train(stage1, str(tmp_path / "stage1"))
    saved = checkpoint.read_workdir_state(tmp_path / "stage1", items=("params",))[0]["params"]
    # The logged param_norm is that of the trainable parameters (here the LoRA factors and what the mode trains
    # besides) after the step's update: the final record's equals the final checkpoint's.
    trainable = optim.partition(saved, train_step.build(stage1, one_device_mesh(), total_steps=2).trainable)[0]
    final = json.loads((tmp_path / "stage1" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["step"] == 2 and final["param_norm"] == pytest.approx(float(optax.tree.norm(trainable)), rel=1e-6)
    assert float(optax.tree.norm(saved)) > 1.2 * final["param_norm"]  # the frozen towers are left out (21.4 vs 14.5)
    stage2 = tiny_config(str(data_dir), **{"init_from.workdir": str(tmp_path / "stage1")})
    setup = train_step.build(stage2, one_device_mesh(), total_steps=10)
    state = checkpoint.apply_init_from(train_step.init_state(setup, seed=1), setup)
    loaded = optim.flatten(jax.device_get(state["params"]))
    expected = optim.flatten(lora.merge(saved, lora.scale(stage1.lora.rank, stage1.lora.alpha)))
    assert loaded.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(loaded[key], expected[key], rtol=1e-6, atol=1e-7, err_msg=key)
    assert int(state["step"]) == 0  # a new stage starts its own schedule
    # The trainer's start says what it loaded.
    capsys.readouterr()
    train.initial_state(setup, checkpoint.Checkpoints(tmp_path / "stage2", keep=1, every=1), data=None)
    assert f"initialised from init_from.workdir={tmp_path / 'stage1'}" in capsys.readouterr().out
    # Resumed with another LoRA scale, the run rewrites config.json; step 2 is still read with the scale it was
    # trained with (each step keeps its config; inference, export and init_from merged step 2 with the new one).
    train.train(tiny_config(str(data_dir), total_steps=4, **{"optim.mode": "lora", "lora.alpha": 1.0}),
                str(tmp_path / "stage1"))
    assert json.loads((tmp_path / "stage1" / "config.json").read_text())["lora"]["alpha"] == 1.0
    alphas = {step: checkpoint.read_workdir_state(tmp_path / "stage1", step)[1]["lora"]["alpha"] for step in (2, 4)}
    assert alphas == {2: stage1.lora.alpha, 4: 1.0}


@pytest.mark.parametrize("name", ["wavlink_base", "wavlink_small", "wavlink_large"])
def test_paper_configs_build_sharded_states(name):
    import importlib

    module = importlib.import_module(f"configs.{name}")
    stage1 = module.get_config("stage=1")
    assert (stage1.batch_size, stage1.optim.learning_rate, stage1.optim.warmup_fraction) == (768, 1e-4, 0.05)
    assert stage1.dtype == "bfloat16" and stage1.epochs == 3 and stage1.init_from.audio.startswith("openai/whisper")
    with pytest.raises(ValueError, match="stage1_workdir"):
        module.get_config("stage=2")
    stage2 = module.get_config("stage=2,stage1_workdir=/runs/stage1")
    assert stage2.init_from.workdir == "/runs/stage1" and not stage2.init_from.audio
    # Shapes and shardings only (jax.eval_shape): nothing is allocated.
    mesh = sharding.create_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    setup = train_step.build(stage1, mesh, total_steps=100)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state["params"]))
    paper = {"wavlink_base": 84e6, "wavlink_small": 152e6, "wavlink_large": 761e6}[name]
    assert abs(count - paper) / paper < 0.05, count  # the paper's parameter counts (audio + text)
    kernel = setup.shardings["params"]["audio"]["encoder"]["layers"]["0"]["fc1"]["kernel"]
    assert tuple(kernel.spec) == ("fsdp", None)


def test_metrics_logger_jsonl_tensorboard_and_resume_truncation(tmp_path):
    from wavlink_jax.metrics_log import FLUSH_SECONDS, MetricsLogger, keep_records_through

    log = MetricsLogger(tmp_path, total_steps=4, start_step=0, progress=False)
    for step in range(1, 5):
        log.write(step, {"loss": 1.0 / step, "grad_norm": float("nan") if step == 4 else 1.0})
    # On disk within seconds, before close: a process ended by another one's failure (sharding.stop_job) never
    # closes it.
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    deadline = time.monotonic() + 5 * FLUSH_SECONDS
    while events.read_bytes().count(b"loss") < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert events.read_bytes().count(b"loss") == 4
    log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[1]["loss"] == 0.5
    assert records[3]["grad_norm"] == "nan"  # JSON has no NaN literal
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    # Resuming from step 2 drops what a killed run logged after its checkpoint.
    keep_records_through(tmp_path, 2)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_compilation_cache_setting_resolves_to_a_folder(tmp_path, monkeypatch):
    """`config.compilation_cache_dir`: "auto" keeps a folder jax was given (JAX_COMPILATION_CACHE_DIR), else the
    default under the home folder; a path is used as given (with ~ expanded); "off" turns the cache off."""
    monkeypatch.setenv("HOME", str(tmp_path))
    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert train.use_compilation_cache("auto") == str(tmp_path / ".cache/wavlink_jax/xla")
        jax.config.update("jax_compilation_cache_dir", "/somewhere/set/by/env")
        assert train.use_compilation_cache("auto") == "/somewhere/set/by/env"
        assert train.use_compilation_cache("~/mine") == str(tmp_path / "mine")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
        assert train.use_compilation_cache("off") is None and jax.config.jax_compilation_cache_dir is None
        with pytest.raises(ValueError, match='compilation_cache_dir is empty; give a folder, "auto" or "off"'):
            train.use_compilation_cache("")
    finally:
        train.use_compilation_cache(before or "off")
