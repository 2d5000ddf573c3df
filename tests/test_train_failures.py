"""The trainer in the face of mistakes: a bad setting is refused before the first step, and an evaluation that
fails keeps the training done so far in a checkpoint."""

import json
import types
from pathlib import Path

import pytest
from train_fixtures import tiny_config

from wavlink_jax import checkpoint, evaluate, train
from wavlink_jax.data import synthetic


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(root, num_train=24, num_eval=4, max_seconds=1.5, captions_per_clip=2)
    return root


def with_eval(config, data_dir, batch_size):
    config.eval.sets = ({"name": "synthetic", "source": {"kind": "manifest", "path": f"{data_dir}/eval.jsonl"}},)
    config.eval.batch_size = batch_size
    return config


def test_eval_batch_size_is_checked_before_training(tmp_path, data_dir):
    config = with_eval(tiny_config(str(data_dir), total_steps=2), data_dir, batch_size=12)  # 8 devices
    with pytest.raises(ValueError, match=r"eval batch size 12 \(config.eval.batch_size.*multiple of 8"):
        train.train(config, str(tmp_path))
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before the first step


@pytest.mark.parametrize("key,value,least", [("log_every_steps", 0, 1), ("checkpoint_every_steps", 0, 1),
                                             ("eval_every_steps", -1, 0)])
def test_step_intervals_must_be_positive(tmp_path, data_dir, key, value, least):
    with pytest.raises(ValueError, match=rf"config: {key}={value} \(must be ≥ {least}"):
        train.train(tiny_config(str(data_dir), **{key: value}), str(tmp_path))


def test_a_failing_evaluation_keeps_the_training_in_a_checkpoint(tmp_path, data_dir, monkeypatch, capsys):
    """Evaluation at step 2 (between checkpoints every 3 steps) fails: step 2 is saved before the error, with its
    training record (it was lost, and a resumed run, starting after step 2, never wrote it: a gap in the log). A
    final evaluation that failed is done by the same command again."""
    config = with_eval(tiny_config(str(data_dir), total_steps=4, checkpoint_every_steps=3), data_dir, batch_size=8)
    config.eval_every_steps = 2

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(evaluate, "evaluate_during_training", broken)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        train.train(config, str(tmp_path))
    assert checkpoint.Checkpoints(tmp_path, keep=3, every=1).latest_step() == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and "loss" in records[1]
    assert not any(key.startswith("eval/") for key in records[1])
    # As a run of 2 steps, step 2 is the final checkpoint, whose evaluation failed: the command again evaluates it
    # and adds the figures to step 2's record (it said "nothing to do", and no record ever had them).
    # A record past the checkpoint (a killed run's) is dropped, as a resume drops it.
    monkeypatch.undo()
    config.total_steps = 2
    with (tmp_path / "metrics.jsonl").open("a") as log:
        log.write('{"step": 3, "loss": 1.0}\n')
    returned = train.train(config, str(tmp_path))
    assert "(step 2 of 2); metrics.jsonl has no evaluation of it: evaluating" in capsys.readouterr().out
    evaluated = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert evaluated == [records[0], {"step": 2, **returned}]
    assert returned["loss"] == records[1]["loss"] and "eval/synthetic/t2a_R@1" in returned
    train.train(config, str(tmp_path))
    assert "(step 2 of 2); nothing to do" in capsys.readouterr().out


def test_resume_drops_a_metrics_line_cut_short_by_a_kill(tmp_path):
    from wavlink_jax.metrics_log import keep_records_through

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # killed mid-append
    keep_records_through(tmp_path, 2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.5}\n')  # damaged inside
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a JSON record"):
        keep_records_through(tmp_path, 2)
    path.write_bytes(b'\xff\xfe{"step": 1}\n')  # the error did not name the file
    with pytest.raises(ValueError, match=r"metrics.jsonl: not UTF-8 text \(.*\); repair or remove it"):
        keep_records_through(tmp_path, 2)


def test_cli_reports_an_unusable_source_as_one_error_line(tmp_path, data_dir):
    """The trainer's own errors (here: every clip of the training manifest missing) end the CLI with
    `error: <what to do>`, not a traceback."""
    import shutil
    import subprocess
    import sys

    from wavlink_jax.data.sources import write_manifest

    broken = tmp_path / "data"
    shutil.copytree(data_dir / "tokenizer", broken / "tokenizer")
    write_manifest(broken / "train.jsonl", [{"audio": f"gone{i}.wav", "captions": ["x"]} for i in range(40)])
    result = subprocess.run(
        [sys.executable, "-m", "wavlink_jax.train", "--config", f"tests/train_fixtures.py:data_dir={broken}",
         "--workdir", str(tmp_path / "w"), "--config.data.max_consecutive_skips=20"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"error: 20 records in a row of the manifest {broken / 'train.jsonl'} were skipped" in result.stderr and "Traceback" not in result.stderr


def test_url_workdirs_are_refused_before_anything_is_written(tmp_path, data_dir, monkeypatch):
    """pathlib would turn gs://bucket/run into a local folder gs:/bucket/run and write the logs there."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"workdir 'gs://bucket/run': URLs are not supported; mount the bucket"):
        train.train(tiny_config(str(data_dir)), "gs://bucket/run")
    with pytest.raises(ValueError, match="URLs are not supported"):
        checkpoint.read_workdir_state("gs://bucket/run")
    assert not any(tmp_path.iterdir())


def test_a_workdir_that_is_a_file_or_missing_is_named(tmp_path, data_dir):
    """A file as workdir was `[Errno 17] File exists`; a missing workdir read back was 'no config.json'."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(ValueError, match=rf"workdir {notes} is a file; a workdir is a directory"):
        train.train(tiny_config(str(data_dir)), str(notes))
    assert notes.read_text() == "mine"
    with pytest.raises(checkpoint.CheckpointError, match=rf"{tmp_path / 'gone'}: no such directory"):
        checkpoint.read_workdir_state(tmp_path / "gone")


def test_cli_reports_a_bad_choice_before_tracing_as_one_error_line(tmp_path, data_dir):
    """Any ValueError of the trainer (here train_step.build's check of config.remat) is one `error:` line."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "wavlink_jax.train", "--config", f"tests/train_fixtures.py:data_dir={data_dir}",
         "--workdir", str(tmp_path / "w"), "--config.remat=ful"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: config.remat = 'ful' is not one of ('none', 'full', 'dots_saveable', "
                      "'dots_with_no_batch_dims_saveable', 'nothing_saveable')"], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "w" / "metrics.jsonl").exists()


def test_an_evaluation_set_can_have_its_own_window(tmp_path, data_dir, monkeypatch):
    """`window_seconds` in an eval set crops its clips to that window (here half the training window) and the
    evaluation runs at that length."""
    from wavlink_jax import eval_tasks

    config = with_eval(tiny_config(str(data_dir), total_steps=1), data_dir, batch_size=8)
    config.eval.sets = ({**config.eval.sets[0], "window_seconds": 0.5},)
    decoded = []
    load = eval_tasks.load_eval_data
    monkeypatch.setattr(eval_tasks, "load_eval_data", lambda *a, **k: decoded.append(load(*a, **k)) or decoded[-1])
    last = train.train(config, str(tmp_path))
    assert decoded[0].waveforms.shape == (4, 8000) and config.data.window_seconds == 1.0
    assert last["eval/synthetic/clips"] == 4 and 0 <= last["eval/synthetic/t2a_R@1"] <= 100


def test_an_evaluation_set_scored_by_the_mean_of_windows_as_the_evaluate_command_scores_it(
    tmp_path, data_dir, monkeypatch
):
    """`long_clips: "mean"` keeps a set's clips whole (up to 1.5 s, in 1 s windows) and scores each as the mean of
    its windows' embeddings: the figures `python -m wavlink_jax.evaluate --long-clips mean` gives the checkpoint."""
    from wavlink_jax import eval_tasks, inference

    config = with_eval(tiny_config(str(data_dir), total_steps=1), data_dir, batch_size=8)
    config.eval.sets = ({**config.eval.sets[0], "long_clips": "mean"},)
    decoded = []
    load = eval_tasks.load_eval_data
    monkeypatch.setattr(eval_tasks, "load_eval_data", lambda *a, **k: decoded.append(load(*a, **k)) or decoded[-1])
    last = train.train(config, str(tmp_path))
    (data,) = decoded
    assert data.long_clips == "mean" and max(len(clip) for clip in data.waveforms) > data.window_samples == 16000
    embedder = inference.load(str(tmp_path), batch_size=8)
    (scored,) = eval_tasks.evaluate_data(embedder, data, [embedder.config.matryoshka_dims[0]]).values()
    assert {key: last[f"eval/synthetic/{key}"] for key in scored} == pytest.approx(scored, abs=1e-4)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"long_clips": "avg"}, r"config.eval.sets\[1\] \(synthetic\) long_clips = 'avg': choose 'head'"),
        ({"window_seconds": 2.0}, r"config.eval.sets\[1\] \(synthetic\) window_seconds = 2 s: .* at most 1 s \(50 positions\)"),
        ({"window_seconds": 0.001},  # a window the log-mel cannot take: it failed after decoding, in the STFT's words
         r"config.eval.sets\[1\] \(synthetic\) window_seconds = 0.001 s: .* more than 0.0125 s \(half the STFT"),
        ({"windows": 0.5}, r"config.eval.sets\[1\] has unknown keys \['windows'\] / lacks \[\]"),
    ],
)
def test_a_bad_evaluation_set_is_refused_before_training(tmp_path, data_dir, change, message, monkeypatch):
    """Refused before training, and before the sets ahead of it are decoded."""
    from wavlink_jax import eval_tasks

    config = with_eval(tiny_config(str(data_dir), total_steps=1), data_dir, batch_size=8)
    config.eval.sets = (config.eval.sets[0], {**config.eval.sets[0], **change})
    decoded = []
    monkeypatch.setattr(eval_tasks, "load_eval_data", lambda *args, **kwargs: decoded.append(args))
    with pytest.raises(ValueError, match=message):
        train.train(config, str(tmp_path))
    assert decoded == [] and not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "eos_token_id, tokenizer_eos, message",
    [
        (7, 99, r"config.model.text.eos_token_id is 7 but the end-of-text id of the tokenizer in .* is 99: .*"
                r"eos_token_id=99$"),
        (2, 50, r"eos_token_id is 2, Hugging Face's legacy rule .* is 50, not its largest id 99; .*eos_token_id=50$"),
        (2, 99, None),  # CLIP's own tokenizers: end-of-text is the largest id
        (99, 99, None),
    ],
)
def test_the_text_pooling_must_find_the_tokenizers_end_of_text(eos_token_id, tokenizer_eos, message):
    config = tiny_config()
    config.model.text.eos_token_id = eos_token_id
    tokenizer = types.SimpleNamespace(eos_token_id=tokenizer_eos, vocab_size=100, max_length=8)
    config.model.text.vocab_size = 100
    if message is None:
        train.check_tokenizer(config, tokenizer)
    else:
        with pytest.raises(ValueError, match=message):
            train.check_tokenizer(config, tokenizer)


def test_a_training_window_longer_than_the_audio_tower_takes_is_refused_before_anything_runs(tmp_path, data_dir):
    config = tiny_config(str(data_dir), total_steps=1)
    config.data.window_seconds = 2.0
    with pytest.raises(ValueError, match=r"^config.data.window_seconds = 2 s: .* at most 1 s \(50 positions\)"):
        train.train(config, str(tmp_path))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_cudnn_attention_is_refused_off_a_gpu():
    """`attention_implementation="cudnn"` on a CPU failed inside jax ("cuDNN is not detected") at the first step,
    after config.json was written; it is refused at start-up, naming the key."""
    for name in ("cudnn", "cudnn_unpadded"):
        config = tiny_config(attention_implementation=name)
        with pytest.raises(ValueError, match=rf"config\.attention_implementation = '{name}' needs an NVIDIA GPU"):
            train.check_attention_backend(config, backend="cpu")
        train.check_attention_backend(config, backend="gpu")
    train.check_attention_backend(tiny_config(attention_implementation="xla"), backend="cpu")
