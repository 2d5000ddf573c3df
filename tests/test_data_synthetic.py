"""The generated data set: deterministic per seed, well-formed manifests, captions that match the events."""

import hashlib
import json

import numpy as np
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
