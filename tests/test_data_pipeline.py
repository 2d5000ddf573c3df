"""The grain pipeline: batches, epochs, exact resume, host split, mixture, bad-input counting, sharding, eval."""

import collections
import dataclasses
import json
import multiprocessing
import re
import threading

import grain
import jax
import ml_collections
import numpy as np
import pytest
import soundfile as sf
from jax.sharding import PartitionSpec

from wavlink_jax.data import pipeline
from wavlink_jax.data.audio_io import SKIP_REASONS
from wavlink_jax.data.sources import ManifestError, write_manifest
from wavlink_jax.tokenizer import load_tokenizer, train_tokenizer

RATE = 16000
WINDOW = 0.25  # seconds; the clips last 0.5 s


def _clip(clip_id: int) -> np.ndarray:
    """0.5 s whose every sample tells its clip (floor(100 x) = id) and its position (a ramp)."""
    return (clip_id * 0.01 + 0.002 + 0.005 * np.arange(RATE // 2) / (RATE // 2)).astype(np.float32)


def _ids(waveforms: np.ndarray) -> list[int]:
    return [int(np.floor(w[0] * 100)) for w in waveforms]


def _manifest(folder, clip_ids, name="m.jsonl", extra=()):
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in clip_ids:
        sf.write(folder / f"{i}.wav", _clip(i), RATE, subtype="FLOAT")
        entries.append({"audio": f"{i}.wav", "captions": [f"clip {i} {w}" for w in ("alpha", "beta", "gamma")], "label": f"c{i % 3}"})
    return write_manifest(folder / name, entries + list(extra))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tokenizer of the clips' captions, saved with model_max_length 8."""
    texts = [f"clip {i} {w}" for i in range(100) for w in ("alpha", "beta", "gamma")]
    directory = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, directory, vocab_size=600, max_length=8)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def _config(*manifests, weights=None, **overrides):
    """Manifest sources with the given mixture weights (default: none given, i.e. "size")."""
    sources = [{"kind": "manifest", "path": str(m)} for m in manifests]
    for source, weight in zip(sources, weights or ()):
        source["weight"] = weight
    return pipeline.DataConfig(sources=sources, window_seconds=WINDOW, min_seconds=0.1, **overrides)


def _iterator(config, tokenizer, batch, seed=0, **kwargs):
    kwargs.setdefault("process_index", 0)
    kwargs.setdefault("process_count", 1)
    return pipeline.make_train_iterator(config, global_batch_size=batch, seed=seed, tokenizer=tokenizer, **kwargs)


def test_batches_pair_each_crop_with_its_own_caption(tmp_path, tokenizer):
    batch = next(_iterator(_config(_manifest(tmp_path, range(1, 11))), tokenizer, batch=6))
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
        "waveform": (np.float32, (6, 4000)),
        "input_ids": (np.int32, (6, 8)),
        "attention_mask": (np.int32, (6, 8)),
    }
    for waveform, ids, clip_id in zip(batch["waveform"], batch["input_ids"], _ids(batch["waveform"])):
        full = _clip(clip_id)
        start = int(np.argmin(np.abs(full - waveform[0])))
        np.testing.assert_array_equal(waveform, full[start : start + 4000])  # a window of its own clip
        words = tokenizer.decode(ids).split()  # CLIP splits numbers into digits: "clip 1 0 beta"
        assert words[0] == "clip" and int("".join(words[1:-1])) == clip_id


def test_epochs_shuffle_and_cover_every_clip(tmp_path, tokenizer):
    config = _config(_manifest(tmp_path, range(1, 11)))
    seen = [_ids(b["waveform"]) for b in _iterator(config, tokenizer, batch=5, num_epochs=3)]
    epochs = [sum(seen[2 * e : 2 * e + 2], []) for e in range(3)]
    assert len(seen) == 6 and all(sorted(e) == list(range(1, 11)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]  # a new permutation every epoch
    captions = {tokenizer.decode(b["input_ids"][0]) for b in _iterator(_config(_manifest(tmp_path / "one", [7])), tokenizer, batch=1, num_epochs=12)}
    assert len(captions) > 1  # one random caption per clip per epoch


def _captions_of_one_clip(folder, tokenizer, captions, epochs):
    """The caption drawn for a clip listed alone, in each of `epochs` epochs."""
    folder.mkdir(parents=True, exist_ok=True)
    sf.write(folder / "7.wav", _clip(7), RATE, subtype="FLOAT")
    manifest = write_manifest(folder / "m.jsonl", [{"audio": "7.wav", "captions": captions}])
    batches = _iterator(_config(manifest), tokenizer, batch=1, num_epochs=epochs)
    return [tokenizer.decode(b["input_ids"][0]) for b in batches]


def test_every_caption_is_drawn_about_equally_often(tmp_path, tokenizer):
    """A draw of range(n - 1) never picked the last caption."""
    captions = [f"clip 7 {w}" for w in ("alpha", "beta", "gamma")]
    drawn = collections.Counter(_captions_of_one_clip(tmp_path, tokenizer, captions, 60))
    assert set(drawn) == {"clip 7 alpha", "clip 7 beta", "clip 7 gamma"}
    assert all(12 <= count <= 28 for count in drawn.values()), drawn  # 20-47% each of the 60 (seeded)


def test_a_blank_caption_is_never_drawn_for_training(tmp_path, tokenizer):
    """The draw indexes the cleaned captions: indexing the record's (blanks included) gave the blank "  "."""
    assert set(_captions_of_one_clip(tmp_path, tokenizer, ["  ", "clip 7 alpha", ""], 6)) == {"clip 7 alpha"}


def test_training_crops_are_random(tmp_path, tokenizer):
    """Each epoch crops a clip at a random start (the training rng reaches the decoder), not at its head."""
    config = _config(_manifest(tmp_path, [7]))
    starts = set()
    for batch in _iterator(config, tokenizer, batch=1, num_epochs=8):
        waveform = batch["waveform"][0]
        start = int(np.argmin(np.abs(_clip(7) - waveform[0])))
        np.testing.assert_array_equal(waveform, _clip(7)[start : start + 4000])
        starts.add(start)
    assert len(starts) > 4, starts


def test_the_tokenizer_from_the_config_cuts_to_max_text_length(tmp_path, tokenizer_dir):
    """Without tokenizer=, the config's tokenizer is loaded at max_text_length, not at its saved length (8)."""
    config = _config(_manifest(tmp_path, range(1, 3)), tokenizer=str(tokenizer_dir), max_text_length=12)
    batch = next(_iterator(config, None, batch=2))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 12)


def test_sources_of_equal_size_are_shuffled_differently(tmp_path, tokenizer):
    """Each source has its own shuffle seed: one seed for all walked equal-size sources in the same order."""
    config = _config(_manifest(tmp_path / "a", range(1, 11)), _manifest(tmp_path / "b", range(51, 61)))
    iterator = _iterator(config, tokenizer, batch=10)
    ids = sum((_ids(next(iterator)["waveform"]) for _ in range(4)), [])
    order_a, order_b = [i for i in ids if i < 50][:10], [i - 50 for i in ids if i > 50][:10]
    assert sorted(order_a) == sorted(order_b) == list(range(1, 11))
    assert order_a != order_b


def test_resume_sees_exactly_the_same_batches(tmp_path, tokenizer):
    config = _config(_manifest(tmp_path, range(1, 14)))
    original = _iterator(config, tokenizer, batch=4, seed=3)
    for _ in range(5):  # crosses an epoch boundary
        next(original)
    state = json.loads(json.dumps(original.get_state()))
    expected = [next(original) for _ in range(6)]
    resumed = _iterator(config, tokenizer, batch=4, seed=3)
    resumed.set_state(state)
    for want, got in zip(expected, (next(resumed) for _ in range(6))):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])
    fresh, other = _iterator(config, tokenizer, batch=4, seed=3), _iterator(config, tokenizer, batch=4, seed=4)
    first = next(fresh)["waveform"]
    assert np.array_equal(first, next(_iterator(config, tokenizer, batch=4, seed=3))["waveform"])
    assert not np.array_equal(first, next(other)["waveform"])


def test_hosts_split_every_global_batch(tmp_path, tokenizer):
    config = _config(_manifest(tmp_path, range(1, 21)))
    single = _iterator(config, tokenizer, batch=8)
    hosts = [_iterator(config, tokenizer, batch=8, process_index=i, process_count=2) for i in range(2)]
    for _ in range(4):
        whole = next(single)
        parts = [next(h) for h in hosts]
        assert all(len(p["waveform"]) == 4 for p in parts)
        for key in whole:  # in process order, row for row: same examples, crops and captions
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    with pytest.raises(ValueError, match="not divisible"):
        _iterator(config, tokenizer, batch=9, process_index=0, process_count=2)


def test_host_shares_of_a_finite_stream():
    # Blocks of 4 in turn; the last, partial round goes to the hosts in order.
    shares = [list(pipeline._HostShare(grain.MapDataset.range(22), 4, index, 2)) for index in range(2)]
    assert shares == [[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19], [4, 5, 6, 7, 12, 13, 14, 15, 20, 21]]
    # A last round shorter than one block: the hosts past its end get none of it (their length must not shrink).
    shares = [list(pipeline._HostShare(grain.MapDataset.range(18), 4, index, 2)) for index in range(2)]
    assert shares == [[0, 1, 2, 3, 8, 9, 10, 11, 16, 17], [4, 5, 6, 7, 12, 13, 14, 15]]


def test_mixture_weights_are_honoured(tmp_path, tokenizer):
    config = _config(_manifest(tmp_path / "a", range(1, 11)), _manifest(tmp_path / "b", range(50, 55)), weights=[3.0, 1.0])
    iterator = _iterator(config, tokenizer, batch=10)
    ids = sum((_ids(next(iterator)["waveform"]) for _ in range(20)), [])
    share_a = np.mean([i < 50 for i in ids])
    assert abs(share_a - 0.75) < 0.03, share_a
    assert set(ids) == set(range(1, 11)) | set(range(50, 55))
    # A number is on the scale of "size" (a source's number of records): 5 records at weight 10 = 10 at "size".
    config = _config(config.sources[0]["path"], config.sources[1]["path"], weights=["size", 10])
    iterator = _iterator(config, tokenizer, batch=10)
    ids = sum((_ids(next(iterator)["waveform"]) for _ in range(4)), [])
    assert sum(i < 50 for i in ids) == 20


def test_unweighted_sources_are_drawn_in_proportion_to_their_sizes(tmp_path, tokenizer):
    """By default a source's weight is its size: the mixture is a shuffled concatenation, so `epochs` epochs of
    the stream (the trainer's count: epochs × all records / batch) are `epochs` epochs of every source. (With
    equal weights, 3 epochs' worth of batches gave the 40-clip source 1.8 epochs and the 8-clip one 9.)"""
    config = _config(_manifest(tmp_path / "big", range(1, 41)), _manifest(tmp_path / "small", range(50, 58)))
    iterator = _iterator(config, tokenizer, batch=8)
    ids = sum((_ids(next(iterator)["waveform"]) for _ in range(3 * 48 // 8)), [])
    counts = collections.Counter(ids)
    assert sum(i < 50 for i in ids) == 120 and sum(i >= 50 for i in ids) == 24  # 40 : 8
    assert set(counts) == set(range(1, 41)) | set(range(50, 58)) and set(counts.values()) == {3}  # 3 epochs of each


@pytest.mark.parametrize("weight", ["half", 0, -1.0, float("nan"), None])
def test_a_bad_mixture_weight_is_refused(tmp_path, tokenizer, weight):
    manifest = _manifest(tmp_path, range(1, 3))
    with pytest.raises(ValueError, match=rf'manifest {re.escape(str(manifest))}: weight must be "size" .* got'):
        _iterator(_config(manifest, weights=[weight]), tokenizer, batch=2)


def test_a_source_without_records_is_refused(tmp_path, tokenizer):
    """Its "size" weight would be 0, which grain's mixture cannot use."""
    config = _config(_manifest(tmp_path, range(1, 3)))
    config.sources.append({"kind": "source", "source": []})
    with pytest.raises(pipeline.DataError, match="in-memory source holds no records"):
        _iterator(config, tokenizer, batch=2)


def _bad_manifest(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "page.wav").write_text("<html>not audio</html>" * 10)
    sf.write(folder / "long.flac", np.random.default_rng(0).uniform(-0.5, 0.5, RATE), RATE)
    flac = (folder / "long.flac").read_bytes()
    (folder / "cut.flac").write_bytes(flac[: len(flac) // 2])
    sf.write(folder / "short.wav", _clip(1)[:800], RATE)  # 0.05 s < min_seconds
    damaged = np.random.default_rng(1).uniform(-0.5, 0.5, RATE).astype(np.float32)
    damaged[::100] = np.nan  # every window holds some
    sf.write(folder / "nan.wav", damaged, RATE, subtype="FLOAT")
    caption = {"captions": ["clip 0 alpha"]}
    bad = [
        {"audio": "nope.wav", **caption},
        {"audio": "empty.wav", **caption},
        {"audio": "page.wav", **caption},
        {"audio": "cut.flac", **caption},
        {"audio": "short.wav", **caption},
        {"audio": "nan.wav", **caption},
        {"audio": "long.flac", "captions": []},
        {"audio": "long.flac", "captions": ["", "  "]},  # blank captions are none
        {"audio": "gone.flac", **caption},
    ]
    return _manifest(folder, range(1, 9), extra=bad)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_input_is_skipped_and_counted(tmp_path, tokenizer, num_workers):
    """Counts are exact also when worker processes fill the batches; a resumed iterator goes on identically."""
    config = _config(_bad_manifest(tmp_path), num_workers=num_workers)
    dataset = pipeline.build_train_dataset(config, tokenizer=tokenizer, batch_size=3, seed=0, num_epochs=2, drop_remainder=False)
    iterator = iter(dataset)
    head = [next(iterator) for _ in range(2)]
    state = json.loads(json.dumps(iterator.get_state()))
    tail = list(iterator)
    iterator.close()
    ids = sum((_ids(b["waveform"]) for b in head + tail), [])
    assert sorted(ids) == sorted(list(range(1, 9)) * 2)  # every good clip, twice; nothing substituted
    expected = {"missing": 2, "empty": 1, "not_audio": 1, "truncated": 1, "not_finite": 1, "too_short": 1, "no_captions": 2}
    assert iterator.skip_counts == {reason: 2 * expected[reason] for reason in SKIP_REASONS}

    resumed = iter(dataset)
    resumed.set_state(state)
    for want, got in zip(tail, resumed, strict=True):
        np.testing.assert_array_equal(want["waveform"], got["waveform"])
        np.testing.assert_array_equal(want["input_ids"], got["input_ids"])
    resumed.close()
    assert resumed.skip_counts == iterator.skip_counts


def test_skip_counts_survive_a_resume(tmp_path, tokenizer):
    config = _config(_bad_manifest(tmp_path))
    iterator = _iterator(config, tokenizer, batch=4)
    per_batch = [next(iterator) and iterator.last_skip_counts for _ in range(10)]
    totals = {r: sum(c[r] for c in per_batch) for r in SKIP_REASONS}
    assert iterator.skip_counts == totals and sum(totals.values()) > 0
    resumed = _iterator(config, tokenizer, batch=4)
    resumed.set_state(json.loads(json.dumps(iterator.get_state())))
    assert resumed.skip_counts == totals
    next(iterator), next(resumed)
    assert resumed.skip_counts == iterator.skip_counts


def _missing_manifest(folder, count):
    """A manifest of `count` clips none of which exists (as with a wrong audio root)."""
    return write_manifest(folder / "missing.jsonl", [{"audio": f"gone/{i}.wav", "captions": ["x"]} for i in range(count)])


def _next_or_error(iterator, hang_guard_s=120):
    """next(iterator) → (batch, None) or (None, the exception); fails instead of hanging forever."""
    outcome = {}

    def run():
        try:
            outcome["batch"] = next(iterator)
        except Exception as err:  # handed to the test
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(hang_guard_s)
    assert not thread.is_alive(), f"next() still blocked after {hang_guard_s} s"
    return outcome.get("batch"), outcome.get("error")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_all_bad_source_stops_with_a_clear_error(tmp_path, tokenizer, num_workers):
    """An endless stream of bad records raises DataError (also from a worker process) instead of filling forever."""
    manifest = _missing_manifest(tmp_path, 1500)
    config = _config(manifest, num_workers=num_workers)  # the default limit, 1000
    assert config.max_consecutive_skips == 1000
    iterator = _iterator(config, tokenizer, batch=4)
    try:
        batch, error = _next_or_error(iterator)
    finally:
        iterator.close()
    assert batch is None and isinstance(error, pipeline.DataError), error
    message = str(error)
    assert message.startswith(f"1000 records in a row of the manifest {manifest} were skipped while filling training batches (missing: 1000)")
    assert re.search(r"the last: missing: \S+/gone/\d+\.wav: file not found", message)
    assert f"`python -m wavlink_jax.data check {manifest}`" in message and "--config.data.max_consecutive_skips" in message
    assert multiprocessing.active_children() == []  # the worker processes are gone


def test_the_limit_counts_records_in_a_row_exactly(tmp_path, tokenizer):
    """Scattered bad records train through; the limit trips exactly at the longest run of them."""
    config = _config(_bad_manifest(tmp_path), max_consecutive_skips=0)
    # With batches of one clip, each batch's skip count is the run of bad records just before its clip.
    single = iter(pipeline.build_train_dataset(config, tokenizer=tokenizer, batch_size=1, seed=0, num_epochs=3))
    runs = [sum(next(single) and single.last_skip_counts.values()) for _ in range(3 * 8)]
    assert next(single, None) is None  # the stream ends; skips after the last clip form one more run
    total = sum(single.skip_counts.values())
    longest = max(runs + [total - sum(runs)])
    assert 1 < longest < total  # scattered: a limit must not count skips in total

    def epochs(limit):
        limited = dataclasses.replace(config, max_consecutive_skips=limit)
        iterator = iter(pipeline.build_train_dataset(limited, tokenizer=tokenizer, batch_size=3, seed=0, num_epochs=3))
        return [_ids(batch["waveform"]) for batch in iterator], iterator.skip_counts

    assert epochs(longest + 1) == epochs(0) and sum(epochs(0)[1].values()) == total
    with pytest.raises(pipeline.DataError, match=f"^{longest} records in a row of the manifest"):
        epochs(longest)


def _until_error(iterator, limit=200):
    """How many batches `iterator` yields before it raises DataError (fails if it never does within `limit`)."""
    for count in range(limit):
        try:
            next(iterator)
        except pipeline.DataError as error:
            return count, error
    pytest.fail(f"no DataError within {limit} batches")


def test_a_broken_source_in_a_mixture_is_caught_and_named(tmp_path, tokenizer):
    """The good source's clips come between the broken source's records; the run is counted per source."""
    good = _manifest(tmp_path / "good", range(1, 11))
    broken = _missing_manifest(tmp_path, 300)
    config = _config(good, broken, weights=[1.0, 1.0], max_consecutive_skips=50)
    batches, error = _until_error(_iterator(config, tokenizer, batch=4))
    assert 10 <= batches <= 15  # 50 bad records in a row, about one per good clip at equal weights
    message = str(error)
    assert message.startswith(f"50 records in a row of the manifest {broken} were skipped while filling training batches (missing: 50)")
    assert f"`python -m wavlink_jax.data check {broken}`" in message and str(good) not in message

    unlimited = _iterator(dataclasses.replace(config, max_consecutive_skips=0), tokenizer, batch=4)
    ids = sum((_ids(next(unlimited)["waveform"]) for _ in range(batches + 5)), [])
    assert set(ids) == set(range(1, 11)) and unlimited.skip_counts["missing"] >= len(ids) - 4  # trains on the good one


def test_runs_of_skips_survive_a_resume(tmp_path, tokenizer):
    """A source's run of skips spans batches, so it is part of the state: a resumed iterator stops at the same batch.
    A state written before runs were counted per source (the parent's state alone) still resumes."""
    config = _config(
        _manifest(tmp_path / "good", range(1, 11)), _missing_manifest(tmp_path, 300), weights=[1.0, 1.0], max_consecutive_skips=50
    )
    batches, _ = _until_error(_iterator(config, tokenizer, batch=4))
    original = _iterator(config, tokenizer, batch=4)
    for _ in range(batches - 3):
        next(original)
    state = json.loads(json.dumps(original.get_state()))
    resumed = _iterator(config, tokenizer, batch=4)
    resumed.set_state(state)
    assert _until_error(resumed)[0] == 3

    # Resumed with a lower limit than the saved run's length: it stops at its first batch (the run only grew past
    # the limit, never equal to it, and trained on with the broken source unreported).
    lower = _iterator(dataclasses.replace(config, max_consecutive_skips=8), tokenizer, batch=4)
    lower.set_state(state)
    assert max(run and sum(run["reasons"].values()) or 0 for run in state["pipeline"]["skip_runs"]) > 8
    assert _until_error(lower)[0] == 0

    state["pipeline"] = state["pipeline"]["parent"]  # the earlier format: runs start afresh, batches are the same
    earlier = _iterator(config, tokenizer, batch=4)
    earlier.set_state(state)
    np.testing.assert_array_equal(next(earlier)["waveform"], next(original)["waveform"])


def test_a_saved_state_does_not_change_as_the_iterator_goes_on(tmp_path, tokenizer):
    """`get_state` is a snapshot: the runs of skips in it must not be the iterator's own, which it updates."""
    config = _config(
        _manifest(tmp_path / "good", range(1, 11)), _missing_manifest(tmp_path, 300), weights=[1.0, 1.0],
        max_consecutive_skips=0,
    )
    iterator = _iterator(config, tokenizer, batch=4)
    next(iterator)
    state = iterator.get_state()
    saved = json.loads(json.dumps(state))
    assert any(state["pipeline"]["skip_runs"])  # the broken source's run goes on
    for _ in range(3):
        next(iterator)
    assert state == saved


def test_limit_zero_reads_an_all_bad_source_to_its_end(tmp_path, tokenizer):
    manifest = _missing_manifest(tmp_path, 1200)
    dataset = pipeline.build_train_dataset(
        _config(manifest, max_consecutive_skips=0), tokenizer=tokenizer, batch_size=4, seed=0, num_epochs=1
    )
    iterator = iter(dataset)
    assert list(iterator) == [] and iterator.skip_counts["missing"] == 1200
    with pytest.raises(ValueError, match=r"data\.max_consecutive_skips = -1: give a whole number ≥ 0"):
        pipeline.build_train_dataset(_config(manifest, max_consecutive_skips=-1), tokenizer=tokenizer, batch_size=4, seed=0)

    from wavlink_jax.data.__main__ import check

    report = check(str(manifest), min_seconds=0.1, progress=False)
    assert report["ok"] == 0 and report["skipped"] == {"missing": 1200}  # `check` counts them all, never stops


def test_an_eval_set_without_a_usable_clip_is_a_clear_error(tmp_path):
    manifest = _missing_manifest(tmp_path, 3)
    with pytest.raises(pipeline.DataError) as error:
        pipeline.make_eval_set(manifest, window_seconds=WINDOW)
    assert str(error.value).startswith(f"evaluation manifest {manifest}: no usable clip among 3 (missing: 3); the last: missing: ")
    assert "gone/2.wav: file not found" in str(error.value) and f"`python -m wavlink_jax.data check {manifest}`" in str(error.value)
    records = [{"id": "r", "audio": np.zeros(10, np.int16), "sample_rate": RATE, "captions": ["x"], "label": ""}]
    with pytest.raises(pipeline.DataError, match=r"^evaluation in-memory source: no usable clip among 1 \(too_short: 1\)"):
        pipeline.make_eval_set({"kind": "source", "source": records}, window_seconds=WINDOW, min_seconds=0.1)


@pytest.mark.parametrize("batch_axes, shard_rows", [("data", 2), (("data", "model"), 1)])
def test_global_batch_is_sharded_over_the_batch_axes(batch_axes, shard_rows):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    local = {"waveform": np.arange(8 * 5, dtype=np.float32).reshape(8, 5), "input_ids": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
    global_batch = pipeline.to_global_batch(local, mesh, batch_axes)
    for key, array in global_batch.items():
        assert array.shape == local[key].shape and array.dtype == local[key].dtype
        assert array.sharding.spec == PartitionSpec(batch_axes)
        assert {shard.data.shape[0] for shard in array.addressable_shards} == {shard_rows}
        np.testing.assert_array_equal(np.asarray(array), local[key])


def test_global_batch_defaults_to_the_train_steps_batch_axes():
    """The default was "data" alone: on a data × fsdp mesh the batch did not fit the jitted train step's input
    sharding (sharding.batch_sharding: data and fsdp) and the step failed with a sharding mismatch."""
    from wavlink_jax import sharding

    mesh = sharding.create_mesh({"data": 2, "fsdp": 4})
    global_batch = pipeline.to_global_batch({"waveform": np.zeros((16, 5), np.float32)}, mesh)
    assert global_batch["waveform"].sharding == sharding.batch_sharding(mesh)


def test_eval_set_keeps_order_captions_and_labels(tmp_path):
    labelled_only = {"audio": "5.wav", "captions": [], "label": "c2"}
    blank = {"audio": "1.wav", "captions": ["a blank follows", " "], "id": "1b"}  # the blank caption is dropped
    manifest = _manifest(tmp_path, range(1, 5), extra=[blank, labelled_only, {"audio": "nope.wav", "captions": ["x"]}])
    eval_set = pipeline.make_eval_set(manifest, window_seconds=0.4)
    assert eval_set.ids == ["1.wav", "2.wav", "3.wav", "4.wav", "1b"] and eval_set.labels[:4] == ["c1", "c2", "c0", "c1"]
    assert eval_set.captions[:4] == ["clip 1 alpha", "clip 1 beta", "clip 1 gamma", "clip 2 alpha"]
    assert eval_set.captions[12:] == ["a blank follows"]
    np.testing.assert_array_equal(eval_set.text_to_audio, [*np.repeat(np.arange(4), 3), 4])
    np.testing.assert_array_equal(eval_set.waveforms[2], _clip(3)[:6400])  # head crop
    assert eval_set.skip_counts["no_captions"] == 1 and eval_set.skip_counts["missing"] == 1
    assert eval_set.skip_counts["blank_captions"] == 1
    sf.write(tmp_path / "5.wav", _clip(5), RATE, subtype="FLOAT")
    zero_shot = pipeline.make_eval_set(manifest, window_seconds=0.6, require_captions=False)
    assert zero_shot.labels[-1] == "c2" and len(zero_shot.captions) == 13 and zero_shot.waveforms.shape == (6, 9600)
    assert not zero_shot.waveforms[:, 8000:].any()  # padded
    assert eval_set.folds is None
    whole = pipeline.make_eval_set(manifest, window_seconds=None)  # every clip whole, a list (lengths may differ)
    assert isinstance(whole.waveforms, list) and whole.ids == eval_set.ids
    for clip_id, waveform in zip((1, 2, 3, 4, 1), whole.waveforms):
        np.testing.assert_array_equal(waveform, _clip(clip_id))


def test_eval_set_from_int16_records_with_folds():
    records = [
        {"id": f"r{i}", "audio": (_clip(i) * 32768).astype(np.int16), "sample_rate": RATE, "captions": [], "label": f"c{i}", "fold": 1 + i % 2}
        for i in range(1, 5)
    ]
    eval_set = pipeline.make_eval_set({"kind": "source", "source": records}, window_seconds=0.25, require_captions=False)
    np.testing.assert_array_equal(eval_set.folds, [2, 1, 2, 1])
    np.testing.assert_allclose(eval_set.waveforms[0], _clip(1)[:4000], atol=1 / 32768)
    assert eval_set.captions == [] and eval_set.labels == ["c1", "c2", "c3", "c4"]


def test_eval_set_merges_manifest_lines_that_share_an_id(tmp_path):
    """AudioCaps style: one line per caption. Each clip must be one retrieval target holding all its captions."""
    lines = [{"audio": f"{i}.wav", "captions": [f"clip {i} {w}"], "id": f"clip{i}", "label": "x"} for w in ("alpha", "beta") for i in (1, 2, 3)]
    lines.append({"audio": "3.wav", "captions": ["clip 3 gamma"]})  # no id: the path is its id, another clip
    _manifest(tmp_path, [1, 2, 3])  # writes the clips
    manifest = write_manifest(tmp_path / "per_caption.jsonl", lines)
    eval_set = pipeline.make_eval_set(manifest, window_seconds=WINDOW)
    assert eval_set.ids == ["clip1", "clip2", "clip3", "3.wav"] and len(eval_set.waveforms) == 4
    assert eval_set.captions == ["clip 1 alpha", "clip 1 beta", "clip 2 alpha", "clip 2 beta", "clip 3 alpha", "clip 3 beta", "clip 3 gamma"]
    np.testing.assert_array_equal(eval_set.text_to_audio, [0, 0, 1, 1, 2, 2, 3])
    assert _ids(eval_set.waveforms) == [1, 2, 3, 3]
    assert len(pipeline.make_eval_set(manifest, window_seconds=WINDOW, max_clips=2)) == 2  # counts merged clips


@pytest.mark.parametrize("limit", [0, -1])
def test_eval_set_refuses_a_clip_limit_below_one(tmp_path, limit):
    """A slice by 0 would keep no clip and one by -1 drop the last clip silently: library callers are refused as
    the command line and the trainer's config are."""
    manifest = _manifest(tmp_path, [1, 2])
    with pytest.raises(ValueError, match=rf"max_clips={limit}: give a number ≥ 1"):
        pipeline.make_eval_set(manifest, window_seconds=WINDOW, max_clips=limit)


@pytest.mark.parametrize("key, second", [("audio", "2.wav"), ("label", "cat"), ("fold", 2)])
def test_eval_manifest_lines_sharing_an_id_must_be_one_clip(tmp_path, key, second):
    first = {"audio": "1.wav", "captions": ["a"], "id": "x", "label": "dog", "fold": 1}
    manifest = write_manifest(tmp_path / "m.jsonl", [first, {**first, "captions": ["b"], key: second}])
    with pytest.raises(ManifestError) as error:
        pipeline.make_eval_set(manifest, window_seconds=WINDOW)
    shown = str(tmp_path / second) if key == "audio" else second
    assert f"manifest {manifest}: id 'x' has {key} " in str(error.value) and repr(shown) in str(error.value)


def test_eval_summaries_count_blank_captions(tmp_path):
    from wavlink_jax import eval_tasks

    _manifest(tmp_path, [1, 2])  # writes the clips
    manifest = write_manifest(tmp_path / "e.jsonl", [
        {"audio": "1.wav", "captions": ["one", "  ", "three", "", ""]},
        {"audio": "2.wav", "captions": ["x", "y", "z", "w", "v"]},
    ])
    eval_set = pipeline.make_eval_set(manifest, window_seconds=WINDOW)
    assert eval_set.skip_counts["blank_captions"] == 3 and eval_set.captions[:2] == ["one", "three"]
    data = eval_tasks.load_eval_data("blank", manifest, window_seconds=WINDOW)
    assert data.summary()["skipped"] == {"blank_captions": 3}  # the summary written with the results


def test_eval_set_folds_from_a_manifest(tmp_path):
    entries = [{"audio": f"{i}.wav", "captions": [], "label": f"c{i % 2}", "fold": 1 + i // 2} for i in range(1, 5)]
    manifest = _manifest(tmp_path, [], extra=entries)
    for i in range(1, 5):
        sf.write(tmp_path / f"{i}.wav", _clip(i), RATE, subtype="FLOAT")
    eval_set = pipeline.make_eval_set(manifest, window_seconds=WINDOW, require_captions=False)
    np.testing.assert_array_equal(eval_set.folds, [1, 2, 2, 3])
    assert eval_set.labels == ["c1", "c0", "c1", "c0"]


def test_config_schema(tmp_path):
    config = pipeline.default_data_config()
    config.sources = [{"kind": "manifest", "path": "x.jsonl", "weight": 2.0}]
    config.window_seconds = 5.0
    coerced = pipeline.DataConfig.coerce(config)
    assert coerced.window_samples == 80000 and coerced.sources[0]["weight"] == 2.0
    with pytest.raises(ValueError, match="unknown data config keys \\['window'\\]"):
        pipeline.DataConfig.coerce({"window": 3})
    # Settings that fed the model wrong audio (8 kHz read as 16 kHz) or failed deep in numpy are refused by name.
    with pytest.raises(ValueError, match=r"data\.sample_rate = 8000: the audio tower's log-mel takes 16000 Hz"):
        pipeline.DataConfig.coerce({"sample_rate": 8000})
    for window, minimum in ((-1.0, 0.5), (0.0, 0.5), (5.0, -0.1)):
        with pytest.raises(ValueError, match=rf"data\.window_seconds = {window}, data\.min_seconds = {minimum}"):
            pipeline.DataConfig.coerce({"window_seconds": window, "min_seconds": minimum})
    # Counts below their least: grain's or the tokenizer's words (naming neither the key nor the config), or
    # -1 workers taken for none.
    for name, value, least in (("prefetch_buffer", -1, 0), ("max_text_length", 0, 2), ("num_workers", -1, 0),
                               ("read_threads", 0, 1), ("worker_buffer", 2.5, 1)):
        with pytest.raises(ValueError, match=rf"^data\.{name} = {value}: give a whole number ≥ {least}$"):
            pipeline.DataConfig.coerce({name: value})
    with pytest.raises(ValueError, match=r"^window_seconds = 0\.0, min_seconds = 0\.0"):
        pipeline.make_eval_set("unused.jsonl", window_seconds=0.0)
    with pytest.raises(ValueError, match="no sources"):
        pipeline.make_train_iterator({}, global_batch_size=2, seed=0, tokenizer=object(), process_index=0, process_count=1)


def test_check_command_reports_every_bad_clip(tmp_path, tokenizer):
    import subprocess
    import sys

    manifest = _bad_manifest(tmp_path)
    tokenizer_dir = tmp_path / "tok"
    train_tokenizer(["clip 1 alpha", "clip 2 beta"] * 3, tokenizer_dir, vocab_size=600)
    command = [sys.executable, "-m", "wavlink_jax.data", "check", str(manifest), "--min-seconds", "0.1"]
    # "clip i gamma" is 9 tokens with this tokenizer ("gamma" is not in its vocabulary), the other captions 5.
    command += ["--tokenizer", str(tokenizer_dir), "--max-text-length", "8"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # The two caption-less clips decode: ok, and counted apart (training skips them; a label-only set is all such).
    assert report["examples"] == 17 and report["ok"] == 10 and report["clips_per_s"] > 0
    assert report["captions_cut"] == 8  # each good clip's gamma caption
    assert report["skipped"] == {"missing": 2, "empty": 1, "not_audio": 1, "truncated": 1, "not_finite": 1, "too_short": 1}
    assert report["without_captions"] == 2
    assert "nope.wav: file not found" in result.stderr  # the skipped files are named in the log


def test_check_command_names_a_source_it_cannot_open(tmp_path):
    from wavlink_jax.data.__main__ import main

    (tmp_path / "bad.jsonl").write_text('{"audio": "a.wav", "fold": "one"}\n')
    cases = {
        ("check", str(tmp_path / "nope.jsonl")): f"error: {tmp_path / 'nope.jsonl'}: manifest not found",
        ("check", str(tmp_path / "bad.jsonl")): f"error: {tmp_path / 'bad.jsonl'}:1: \"fold\" must be an integer",
        ("check", "clotho", "--data-dir", str(tmp_path / "nodata")): "error: no prepared data set 'clotho'",
    }
    # A folder (a generated data set's) is neither a manifest nor a prepared set's name: the error says which file.
    (tmp_path / "synth").mkdir()
    (tmp_path / "synth" / "train.jsonl").write_text("")
    folder = str(tmp_path / "synth")
    cases[("check", folder, "--data-dir", str(tmp_path / "nodata"))] = (
        f"error: no prepared data set {folder!r}"
    )
    for argv, message in cases.items():
        with pytest.raises(SystemExit) as exit:  # the message is its code: one line on stderr, exit status 1
            main(list(argv))
        err = str(exit.value.code)
        assert err.startswith(message) and len(err.splitlines()) == 1, err
    assert err.endswith(f"{folder} is a folder here: to check a manifest, name the file ({folder}/train.jsonl)")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_check_decodes_whole_clips(tmp_path, num_workers):
    """A clip damaged only at its end passes most training crops; `check` decodes it whole and counts it, like
    every other bad record, also with worker processes; the good clips' hours are reported."""
    from wavlink_jax.data.__main__ import check

    manifest = _bad_manifest(tmp_path)
    tail = np.random.default_rng(2).uniform(-0.5, 0.5, 4 * RATE).astype(np.float32)
    tail[-100:] = np.inf  # the last 6 ms of 4 s: a 0.25 s crop misses it 98% of the time
    sf.write(tmp_path / "tail.wav", tail, RATE, subtype="FLOAT")
    with open(manifest, "a") as lines:
        lines.write(json.dumps({"audio": "tail.wav", "captions": ["clip 0 alpha"]}) + "\n")
    report = check(str(manifest), min_seconds=0.1, num_workers=num_workers, progress=False)
    expected = {"missing": 2, "empty": 1, "not_audio": 1, "truncated": 1, "not_finite": 2, "too_short": 1}
    assert report["skipped"] == expected and report["ok"] == 10 and report["examples"] == 18
    assert report["without_captions"] == 2 and report["hours"] == round((8 * 0.5 + 2 * 1.0) / 3600, 3)
    assert multiprocessing.active_children() == []


def test_check_decodes_a_label_only_set(tmp_path):
    """A classification set (ESC-50 style: labels, no captions) was reported as all `no_captions`, ok 0, and a
    missing file in it went unreported: its audio is checked like any other."""
    from wavlink_jax.data.__main__ import check

    _manifest(tmp_path, [1, 2])
    entries = [{"audio": f"{i}.wav", "captions": [], "label": "dog"} for i in (1, 2)]
    entries.append({"audio": "gone.wav", "captions": [], "label": "cat"})
    report = check(str(write_manifest(tmp_path / "labels.jsonl", entries)), min_seconds=0.1, progress=False)
    assert report["ok"] == 2 and report["without_captions"] == 2 and report["skipped"] == {"missing": 1}


def test_check_and_training_batches_from_a_prepared_tfds_source(tmp_path, tokenizer):
    from wavlink_jax.data import tfds_builders
    from wavlink_jax.data.__main__ import check

    gone = [{"audio": "gone.wav", "captions": ["a clip the build cannot read"]}]
    manifest = _manifest(tmp_path / "clips", range(1, 7), extra=gone)
    tfds_builders.build_manifest("tiny_clips", {"train": manifest}, tmp_path / "tfds")
    report = check("tiny_clips", data_dir=str(tmp_path / "tfds"), min_seconds=0.1, progress=False)
    assert report["examples"] == 6 and report["ok"] == 6 and report["skipped"] == {} and report["hours"] == round(3 / 3600, 3)
    assert report["without_captions"] == 0
    assert report["left_out_by_build"] == {"missing": 1}  # what the build dropped was in no report of check's
    spec = {"kind": "tfds", "name": "tiny_clips", "data_dir": str(tmp_path / "tfds"), "split": "train"}
    batch = next(_iterator(pipeline.DataConfig(sources=[spec], window_seconds=WINDOW, min_seconds=0.1), tokenizer, batch=6))
    for waveform, ids, clip_id in zip(batch["waveform"], batch["input_ids"], _ids(batch["waveform"])):
        full = _clip(clip_id)
        start = int(np.argmin(np.abs(full - waveform[0])))
        np.testing.assert_allclose(waveform, full[start : start + 4000], atol=1 / 32768)  # stored as int16
        words = tokenizer.decode(ids).split()
        assert int("".join(words[1:-1])) == clip_id


def test_a_bad_prepared_clip_is_named_by_its_id():
    """A prepared (TFDS) record holds its audio as an array: skip messages name the record, not '<array>'."""
    prepare = pipeline._PrepareExample(window_samples=16000, min_samples=8000, sample_rate=16000, train=False)
    record = {"id": "clips/dog.wav", "audio": np.zeros(1600, np.int16), "sample_rate": 16000, "captions": ["a dog"],
              "label": "", "source": "my_clips"}
    skipped = prepare(record)
    assert skipped["skip"] == "too_short" and skipped["message"] == "too_short: clips/dog.wav: 0.100 s, shorter than 0.500 s"


def test_config_dict_sources_keep_their_weights(tmp_path, tokenizer):
    """A config file may give a source as an ml_collections.ConfigDict, which is not a Mapping: its weight was
    ignored ("size" drawn instead) and a bad one accepted. Through the trainer's path: config.data as a
    ConfigDict with such sources, into make_train_iterator."""
    a, b = _manifest(tmp_path / "a", range(1, 11)), _manifest(tmp_path / "b", range(50, 55))
    config = pipeline.default_data_config()
    config.update(window_seconds=WINDOW, min_seconds=0.1)
    config.sources = tuple(ml_collections.ConfigDict({"kind": "manifest", "path": str(path), "weight": weight})
                           for path, weight in ((a, 3.0), (b, 1.0)))
    iterator = _iterator(config, tokenizer, batch=10)
    ids = sum((_ids(next(iterator)["waveform"]) for _ in range(20)), [])
    assert abs(np.mean([i < 50 for i in ids]) - 0.75) < 0.03  # "size" would give 10 / 15
    assert [weight for _, weight in pipeline._open_sources(config.sources)] == [3.0, 1.0]
    config.sources = (ml_collections.ConfigDict({"kind": "manifest", "path": str(a), "weight": "half"}),)
    with pytest.raises(ValueError, match=rf"manifest {re.escape(str(a))}: weight must be \"size\" .* got 'half'"):
        _iterator(config, tokenizer, batch=2)


def test_a_position_is_restored_only_with_its_num_workers(tmp_path, tokenizer):
    """grain keeps one position per worker process, so a position saved with another `num_workers` cannot be set
    (grain failed with a bare KeyError 'next_index' / 'exhausted' or an IndexError). A state written before the
    count was recorded tells it by its shape."""
    manifest = _manifest(tmp_path, range(1, 9))
    iterators = {workers: _iterator(_config(manifest, num_workers=workers), tokenizer, batch=2) for workers in (0, 2)}
    states = {}
    for workers, iterator in iterators.items():
        next(iterator)
        states[workers] = json.loads(json.dumps(iterator.get_state()))
        iterator.close()
        assert states[workers]["num_workers"] == workers
        earlier = {key: value for key, value in states[workers].items() if key != "num_workers"}
        assert pipeline.saved_num_workers(earlier) == workers
    for saved, current in ((2, 0), (0, 2)):
        fresh = _iterator(_config(manifest, num_workers=current), tokenizer, batch=2)
        with pytest.raises(pipeline.WorkersMismatch, match=(
                rf"^the data position was saved with num_workers={saved}, this iterator has num_workers={current}; "
                rf"a position belongs to its number of worker processes: restore it with data.num_workers={saved}$")):
            fresh.set_state(states[saved])
        fresh.close()
    # A position of another layout (a damaged or hand-edited file) is one error the checkpoint reader names as
    # damage (it was grain's KeyError 'pipeline' and a traceback).
    fresh = _iterator(_config(manifest, num_workers=0), tokenizer, batch=2)
    no_pipeline = {key: value for key, value in states[0].items() if key != "pipeline"}
    for layout in ({"x": 1}, no_pipeline, {**states[0], "skip_counts": []}):
        with pytest.raises(pipeline.PositionUnreadable, match=r"^not a data position this pipeline saves \("):
            fresh.set_state(layout)
    fresh.close()
