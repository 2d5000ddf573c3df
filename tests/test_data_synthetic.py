"""The generated data set: deterministic per seed, well-formed manifests, captions that match the events."""

import hashlib
import json
import re

import numpy as np
import pytest
import soundfile as sf

from wavlink_jax.data import synthetic
from wavlink_jax.data.sources import ManifestSource
from wavlink_jax.tokenizer import load_tokenizer


def _digest(root, manifest):
    lines = [json.loads(line) for line in open(manifest)]
    audio = [hashlib.sha256((root / line["audio"]).read_bytes()).hexdigest() for line in lines]
    return lines, audio


def test_generate_is_deterministic_and_well_formed(tmp_path):
    a = synthetic.generate(tmp_path / "a", num_train=12, num_eval=4, seed=7)
    b = synthetic.generate(tmp_path / "b", num_train=5, num_eval=4, seed=7)
    c = synthetic.generate(tmp_path / "c", num_train=3, num_eval=4, seed=8)
    # Clip i depends only on (seed, split, i): same bytes and captions in both runs, whatever num_train is.
    assert _digest(a.root, a.eval) == _digest(b.root, b.eval)
    train_a, train_b = _digest(a.root, a.train), _digest(b.root, b.train)
    assert (train_a[0][:5], train_a[1][:5]) == train_b
    assert _digest(a.root, a.eval)[1] != _digest(c.root, c.eval)[1]  # another seed, other clips
    assert not set(train_a[1]) & set(_digest(a.root, a.eval)[1])  # the split is in the seed: eval clips are not train's
    for line in train_a[0]:  # the label is the class of the first event ("events": "<class> x<count>", in order)
        assert line["label"] == line["events"][0].rsplit(" x", 1)[0], line
    assert json.loads(a.classes.read_text()) == list(synthetic.CLASSES) and len(synthetic.CLASSES) == 10

    source = ManifestSource(a.train)
    rates = set()
    for i in range(len(source)):
        record = source[i]
        info = sf.info(record["audio"])
        rates.add(info.samplerate)
        assert 1.0 <= info.duration <= 4.0 + 1e-3
        assert len(record["captions"]) == 5 and len(set(record["captions"])) >= 3
        assert record["label"] in synthetic.CLASSES
    assert 16000 in rates and len(rates) > 1  # some clips need resampling

    ids, mask = load_tokenizer(a.tokenizer)(ManifestSource(a.eval)[0]["captions"])
    assert ids.shape == mask.shape and ids.shape[0] == 5 and mask.sum(1).min() >= 3


def test_captions_describe_kind_count_and_order():
    rng = np.random.default_rng(0)
    events = [synthetic.Event("click", 3, 0.1, 0.5), synthetic.Event("low", 1, 0.8, 0.6)]
    words = {"click": ("click", "tick", "snap"), "low": ("low", "deep")}
    for _ in range(50):
        text = synthetic.caption(events, rng)
        assert "three" in text
        positions = {kind: min(text.find(w) for w in ws if w in text) for kind, ws in words.items()}
        before = " after " not in text  # "B after A" reverses the word order
        assert (positions["click"] < positions["low"]) == before, text


def test_clip_signal_has_events_at_planned_times():
    audio, rate, events = synthetic.make_clip(np.random.default_rng(3), 4.0)
    mono = audio.mean(axis=1)
    floor = np.abs(mono[: int(events[0].start * rate)]).max() if events[0].start > 0.02 else 0.0
    for event in events:
        segment = mono[int(event.start * rate) : int((event.start + event.duration) * rate)]
        assert np.abs(segment).max() > max(5 * floor, 0.1)


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _small(out, num_train, num_eval, seed=0):
    return synthetic.generate(out, num_train, num_eval, seed, max_seconds=1.5, captions_per_clip=1)


def test_a_rerun_replaces_the_earlier_data_set_whole(tmp_path, caplog):
    """A rerun over an earlier run's folder kept that run's files it did not write (audio of higher indices, and
    eval.jsonl with num_eval 0, which generate returned as this run's eval split)."""
    out = tmp_path / "synth"
    _small(out, 6, 4)
    (out / synthetic.MARKER).unlink()  # as made before the marker existed: recognised by its classes.json
    (tmp_path / ".synth.partial-99999").mkdir()  # what a killed run leaves beside the folder
    paths = _small(out, 3, 0, seed=1)
    assert paths.eval is None and not (out / "eval.jsonl").exists()
    assert sorted(p.name for p in (out / "audio" / "train").iterdir()) == ["000000.flac", "000001.flac", "000002.flac"]
    assert not any((out / "audio" / "eval").iterdir())
    assert json.loads((out / synthetic.MARKER).read_text())["num_train"] == 3
    assert f"{out} holds a data set generated earlier" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]


def test_a_folder_holding_other_files_is_refused_and_left_alone(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("someone's work")
    message = f"{mine} exists and is no data set made by this generator (no {synthetic.MARKER} in it)"
    with pytest.raises(FileExistsError, match=re.escape(message)):
        _small(mine, 2, 1)
    with pytest.raises(SystemExit) as exit_info:  # the command line: one `error:` line
        synthetic.main(["--out", str(mine), "--num-train", "2", "--num-eval", "1", "--seconds", "1.5"])
    assert str(exit_info.value.code).startswith(f"error: {message}")
    assert _files(tmp_path) == ["mine", "mine/notes.txt"]


def test_a_failed_run_keeps_the_earlier_data_set(tmp_path, monkeypatch):
    """A run that stops part way (killed, or an error) left a mix of both runs' files."""
    out = tmp_path / "synth"
    _small(out, 2, 1)
    before = {name: (out / name).read_bytes() for name in _files(out) if (out / name).is_file()}

    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("wavlink_jax.tokenizer.train_tokenizer", fail)
    with pytest.raises(OSError, match="No space left"):
        _small(out, 3, 2, seed=1)
    assert {name: (out / name).read_bytes() for name in _files(out) if (out / name).is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]


@pytest.mark.parametrize("option, value", [("--num-train", "0"), ("--num-eval", "-1"), ("--captions-per-clip", "0")])
def test_counts_out_of_range_are_refused_before_anything_is_written(tmp_path, option, value, capsys):
    """--captions-per-clip 0 wrote a data set of caption-less clips, which training skips to its 1000-skip limit."""
    with pytest.raises(SystemExit) as exit_info:  # an option given wrongly: argparse's usage and status 2
        synthetic.main(["--out", str(tmp_path / "out"), option, value, "--seconds", "1.5"])
    assert exit_info.value.code == 2
    assert "error: need num_train (--num-train) >= 1, num_eval (--num-eval) >= 0 and captions_per_clip " in (
        capsys.readouterr().err
    )
    assert _files(tmp_path) == []
    with pytest.raises(ValueError, match=r"^need num_train \(--num-train\) >= 1"):  # the function: a ValueError
        synthetic.generate(tmp_path / "out", int(value), 0)


@pytest.mark.parametrize("seconds", ["1.4", "nan", "inf"])
def test_a_longest_clip_that_is_too_short_or_not_finite_is_refused(tmp_path, seconds, capsys):
    """--seconds nan failed with "cannot convert float NaN to integer", and inf wrote `Infinity` (not JSON) into
    generated.json."""
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--out", str(tmp_path / "out"), "--seconds", seconds])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith(
        f"error: max_seconds (--seconds) must be at least 1.5 (three events need room) and finite, got "
        f"{float(seconds)}\n"
    )
    assert _files(tmp_path) == []
