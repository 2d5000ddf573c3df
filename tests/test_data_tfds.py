"""TFDS builders: each official layout, faked with generated tones, built to array_record and read back.

Every fake layout mirrors the official download (file names, CSV columns, folders), uses 44.1 / 22.05 /
48 kHz audio (some stereo), and references one file that does not exist (US8K also a non-audio and a cut-off
file), which must be skipped and counted.
Each clip is a tone of its own frequency, so reading it back checks that the right audio reached the right
id, resampled to 16 kHz int16.
"""

import csv
import dataclasses
import itertools
import json
import pickle
import shutil
import sys
import unicodedata

import numpy as np
import pytest
import soundfile
from array_record.python import array_record_module

from wavlink_jax.data import pipeline, sources
from wavlink_jax.data import tfds_builders as tb

SECONDS = 0.5
# Distinct within a test, and below 7 kHz, where resampling to 16 kHz keeps the amplitude (the counter runs on
# across the tests, so a module with more tones would otherwise reach the resampler's cut-off at 8 kHz).
_next_frequency = itertools.cycle(range(300, 7000, 170))


@dataclasses.dataclass
class Expected:
    frequency: float
    captions: list
    label: str = ""
    fold: int = 0


def write_tone(path, rate, channels=1):
    """A 0.5 s tone at `rate` Hz sampling; returns its frequency (distinct per call)."""
    frequency = float(next(_next_frequency))
    t = np.arange(int(rate * SECONDS)) / rate
    wave = 0.5 * np.sin(2 * np.pi * frequency * t)
    if channels == 2:  # mono mix = the tone at amplitude 0.5
        wave = np.stack([1.6 * wave, 0.4 * wave], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, wave, rate)
    return frequency


def write_csv(path, rows, header=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def dominant_frequency(samples):
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64) * np.hanning(len(samples))))
    return np.argmax(spectrum) * 16000 / len(samples)


# --- fake manual directories, one per data set: return ({split: {id: Expected}}, {split: {reason: n}}) ----


def fake_audiocaps(m):
    header = ["audiocap_id", "youtube_id", "start_time", "caption"]
    f1 = write_tone(m / "audio" / "train" / "abcdefghijk.wav", 44100)
    f2 = write_tone(m / "audio" / "train" / "Y-_bcdefghij.flac", 48000)  # AudioSet-style "Y" prefix
    write_csv(m / "train.csv", [[1, "abcdefghijk", 30, "a dog barks"], [2, "-_bcdefghij", 0, "rain falls"],
                                [3, "missing0000", 10, "never downloaded"]], header)
    f3 = write_tone(m / "audio" / "val" / "vvvvvvvvvvv.wav", 22050)
    val_caps = [f"val caption {i}" for i in range(5)]
    write_csv(m / "val.csv", [[10 + i, "vvvvvvvvvvv", 20, c] for i, c in enumerate(val_caps)], header)
    f4 = write_tone(m / "audio" / "test" / "ttttttttttt.wav", 44100, channels=2)
    write_csv(m / "test.csv", [[20, "ttttttttttt", 0, "first"], [21, "ttttttttttt", 0, "second"]], header)
    expected = {
        "train": {"abcdefghijk": Expected(f1, ["a dog barks"]), "-_bcdefghij": Expected(f2, ["rain falls"])},
        "validation": {"vvvvvvvvvvv": Expected(f3, val_caps)},
        "test": {"ttttttttttt": Expected(f4, ["first", "second"])},
    }
    return expected, {"train": {"missing": 1}, "validation": {}, "test": {}}


def fake_clotho(m):
    header = ["file_name"] + [f"caption_{i}" for i in range(1, 6)]
    expected = {}
    layout = {  # audio folders in the forms the builder accepts
        "train": ("development", "clotho_audio_development"),
        "validation": ("validation", "validation"),
        "test": ("evaluation", "clotho_audio_files/evaluation"),
    }
    for split, (part, folder) in layout.items():
        names = [f"{part} one.wav", f"Bird, song \u00e9 {part}.wav"]  # commas and accents, as in Clotho
        expected[split] = {}
        rows = []
        for name in names:
            captions = [f"{name} caption {i}" for i in range(1, 6)]
            expected[split][name] = Expected(write_tone(m / folder / name, 44100), captions)
            rows.append([name, *captions])
        if split == "train":
            rows.append(["gone.wav"] + [f"gone {i}" for i in range(5)])
        write_csv(m / f"clotho_captions_{part}.csv", rows, header)
    return expected, {"train": {"missing": 1}, "validation": {}, "test": {}}


def fake_esc50(m):
    header = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
    f1 = write_tone(m / "audio" / "1-100032-A-0.wav", 44100)
    f2 = write_tone(m / "audio" / "5-9032-A-14.wav", 44100)
    write_csv(m / "meta" / "esc50.csv", [
        ["1-100032-A-0.wav", 1, 0, "dog", True, 100032, "A"],
        ["5-9032-A-14.wav", 5, 14, "chirping_birds", False, 9032, "A"],
        ["2-0000-A-1.wav", 2, 1, "rooster", False, 0, "A"],
    ], header)
    expected = {"train": {"1-100032-A-0.wav": Expected(f1, [], "dog", 1),
                          "5-9032-A-14.wav": Expected(f2, [], "chirping birds", 5)}}
    return expected, {"train": {"missing": 1}}


def fake_us8k(m):
    header = ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"]
    f1 = write_tone(m / "audio" / "fold1" / "100032-3-0-0.wav", 22050)
    f2 = write_tone(m / "audio" / "fold10" / "99812-1-2-0.wav", 48000, channels=2)
    (m / "audio" / "fold3").mkdir(parents=True)
    (m / "audio" / "fold3" / "7383-3-0-0.wav").write_bytes(b"not audio at all")
    write_tone(m / "audio" / "fold4" / "7064-6-0-0.wav", 44100)
    cut = (m / "audio" / "fold4" / "7064-6-0-0.wav").read_bytes()
    (m / "audio" / "fold4" / "7064-6-0-0.wav").write_bytes(cut[: len(cut) // 2])  # a download cut short
    write_csv(m / "metadata" / "UrbanSound8K.csv", [
        ["100032-3-0-0.wav", 100032, 0.0, 0.3, 1, 1, 3, "dog_bark"],
        ["99812-1-2-0.wav", 99812, 1.0, 1.5, 2, 10, 1, "car_horn"],
        ["7383-3-0-0.wav", 7383, 0.0, 0.5, 1, 3, 3, "dog_bark"],
        ["7064-6-0-0.wav", 7064, 0.0, 0.5, 1, 4, 6, "gun_shot"],
        ["1-1-1-1.wav", 1, 0.0, 0.5, 1, 2, 9, "street_music"],
    ], header)
    expected = {"train": {"100032-3-0-0.wav": Expected(f1, [], "dog bark", 1),
                          "99812-1-2-0.wav": Expected(f2, [], "car horn", 10)}}
    return expected, {"train": {"missing": 1, "not_audio": 1, "truncated": 1}}


def fake_vggsound(m):
    f1 = write_tone(m / "audio" / "---g-f_I2yQ_000001.wav", 44100)
    f2 = write_tone(m / "audio" / "sub" / "aaaaaaaaaaa_30.flac", 48000)  # unpadded start also accepted
    f3 = write_tone(m / "audio" / "bbbbbbbbbbb_000120.wav", 22050)
    write_tone(m / "audio" / "ddddddddddd_000007.wav", 16000)  # a conflicting id's audio is not built
    write_csv(m / "vggsound.csv", [
        ["---g-f_I2yQ", 1, "people marching, drums", "test"],
        ["aaaaaaaaaaa", 30, "dog barking", "train"],
        ["bbbbbbbbbbb", 120, "rain", "train"],
        ["ccccccccccc", 5, "rain", "train"],
        ["ddddddddddd", 7, "rain", "train"],  # one clip with two labels: left out and counted
        ["ddddddddddd", 7, "dog barking", "train"],
        ["ddddddddddd", 7, "rain", "train"],  # agrees with the first row, but the id stays out
    ])  # the official file has no header
    expected = {
        "train": {"aaaaaaaaaaa_000030": Expected(f2, [], "dog barking"),
                  "bbbbbbbbbbb_000120": Expected(f3, [], "rain")},
        "test": {"---g-f_I2yQ_000001": Expected(f1, [], "people marching, drums")},
    }
    return expected, {"train": {"missing": 1, "conflicting_id": 1}, "test": {}}


def fake_audiosetcaps(m):
    f1 = write_tone(m / "audio" / "audioset" / "Yabcdefghijk.wav", 44100)
    f2 = write_tone(m / "audio" / "vggsound" / "OxPnZzn1_L8_000883.flac", 48000)
    f3 = write_tone(m / "audio" / "yt8m" / "9eUrEyAR3xk_84_10.wav", 22050)
    write_csv(m / "Dataset" / "AudioSetCaps_caption.csv",
              [["Yabcdefghijk", "A solemn cello piece."], ["Ymissingmiss", "Lost."]], ["id", "caption"])
    write_csv(m / "VGGSound_AudioSetCaps_caption.csv", [["OxPnZzn1_L8_000883", "An engine idles."]], ["id", "caption"])
    write_csv(m / "Dataset" / "YouTube-8M_AudioSetCaps_caption.csv",
              [["9eUrEyAR3xk_84_10", "A woman speaks."]], ["id", "caption"])
    expected = {"train": {"Yabcdefghijk": Expected(f1, ["A solemn cello piece."]),
                          "OxPnZzn1_L8_000883": Expected(f2, ["An engine idles."]),
                          "9eUrEyAR3xk_84_10": Expected(f3, ["A woman speaks."])}}
    return expected, {"train": {"missing": 1}}


def fake_autoacd(m):
    f1 = write_tone(m / "audio" / "oPRC3zComfA_000117.wav", 44100)
    f2 = write_tone(m / "audio" / "mAJAqzo-Y_Y.flac", 48000)  # listed as "YmAJAqzo-Y_Y", file without "Y"
    f3 = write_tone(m / "audio" / "test" / "Tdxa6DYIo-Y_000469.wav", 22050)
    write_csv(m / "train.csv", [["oPRC3zComfA_000117", "Electronic music plays."],
                                ["YmAJAqzo-Y_Y", "A woman talks quietly."],
                                ["zzzzzzzzzzz_000001", "Missing."]], ["youtube_id", "caption"])
    write_csv(m / "test.csv", [["Tdxa6DYIo-Y_000469", "A clarinet plays."]], ["youtube_id", "caption"])
    expected = {"train": {"oPRC3zComfA_000117": Expected(f1, ["Electronic music plays."]),
                          "YmAJAqzo-Y_Y": Expected(f2, ["A woman talks quietly."])},
                "test": {"Tdxa6DYIo-Y_000469": Expected(f3, ["A clarinet plays."])}}
    return expected, {"train": {"missing": 1}, "test": {}}


FAKES = {
    "audiocaps": fake_audiocaps,
    "clotho": fake_clotho,
    "esc50": fake_esc50,
    "us8k": fake_us8k,
    "vggsound": fake_vggsound,
    "audiosetcaps": fake_audiosetcaps,
    "autoacd": fake_autoacd,
}


def check_prepared(name, data_dir, expected, skipped):
    for split, clips in expected.items():
        source = tb.load_source(name, data_dir, split)
        records = [source[i] for i in range(len(source))]
        assert sorted(r["id"] for r in records) == sorted(clips), split
        for record in records:
            want = clips[record["id"]]
            assert record["captions"] == want.captions
            assert record["label"] == want.label and record["fold"] == want.fold
            assert record["sample_rate"] == 16000
            audio = record["audio"]
            assert audio.dtype == np.int16 and audio.shape == (int(16000 * SECONDS),)
            assert abs(dominant_frequency(audio) - want.frequency) <= 4.0, (record["id"], want.frequency)
            # amplitude 0.5 of full scale survives mono mixing, resampling and int16 conversion
            assert 0.47 * 32768 < np.abs(audio[100:-100]).max() < 0.53 * 32768
        assert source.build_skipped == skipped[split]
    summary = tb.summary(name, data_dir)
    assert summary["splits"] == {split: len(clips) for split, clips in expected.items()}
    clips_only = {split: {k: n for k, n in counts.items() if k != "blank_captions"} for split, counts in skipped.items()}
    assert summary["skipped"] == clips_only


def test_audio_files_are_found_whatever_their_suffix(tmp_path):
    """An AIFF (libsndfile reads it) was counted as missing, and so was a downloader's .m4a, which libsndfile cannot
    read: now it is not_audio, named. A file with an audio suffix wins over another file of its stem (a thumbnail
    sorted first)."""
    manual = tmp_path / "manual"
    f1 = write_tone(manual / "audio" / "aaaaaaaaaaa.aiff", 44100)
    (manual / "audio" / "bbbbbbbbbbb.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(64))
    (manual / "audio" / "ccccccccccc.jpg").write_bytes(b"\xff\xd8\xff\xe0")
    f3 = write_tone(manual / "audio" / "ccccccccccc.wav", 16000)
    rows = [["aaaaaaaaaaa", "an aiff"], ["bbbbbbbbbbb", "an m4a"], ["ccccccccccc", "a wav"]]
    write_csv(manual / "train.csv", rows, ["youtube_id", "caption"])
    result = tb.build("autoacd", manual, tmp_path / "data")
    assert result["skipped"] == {"train": {"not_audio": 1}}
    expected = {"aaaaaaaaaaa": Expected(f1, ["an aiff"]), "ccccccccccc": Expected(f3, ["a wav"])}
    check_prepared("autoacd", tmp_path / "data", {"train": expected}, {"train": {"not_audio": 1}})


@pytest.mark.parametrize("name", sorted(FAKES))
def test_builder_reads_official_layout(tmp_path, name):
    assert sorted(FAKES) == sorted(tb.BUILDERS)
    manual = tmp_path / "manual"
    expected, skipped = FAKES[name](manual)
    result = tb.build(name, manual, tmp_path / "data")
    assert result["skipped"] == skipped
    check_prepared(name, tmp_path / "data", expected, skipped)
    meta = json.loads((tb.prepared_path(name, tmp_path / "data") / "metadata.json").read_text())
    for split, reasons in skipped.items():  # the skipped clips are named, with where they were looked for
        assert sum(len(v) for v in meta["skipped_examples"][split].values()) == sum(reasons.values())


def test_blank_captions_are_dropped_and_counted(tmp_path):
    manual = tmp_path / "manual"
    expected, skipped = fake_clotho(manual)
    header = ["file_name"] + [f"caption_{i}" for i in range(1, 6)]
    rows = [[name, *want.captions] for name, want in expected["validation"].items()]
    rows[0][3] = rows[0][5] = " "  # two empty caption columns
    write_csv(manual / "clotho_captions_validation.csv", rows, header)
    first = expected["validation"][rows[0][0]]
    first.captions = [c for c in first.captions if c not in (first.captions[2], first.captions[4])]
    result = tb.build("clotho", manual, tmp_path / "data")
    assert result["blank_captions"] == {"train": 0, "validation": 2, "test": 0}
    skipped["validation"] = {**skipped["validation"], "blank_captions": 2}
    check_prepared("clotho", tmp_path / "data", expected, skipped)


def test_decoding_in_worker_processes(tmp_path):
    expected, skipped = fake_esc50(tmp_path / "manual")
    tb.build("esc50", tmp_path / "manual", tmp_path / "data", num_workers=2)
    check_prepared("esc50", tmp_path / "data", expected, skipped)


def test_manifest_command(tmp_path):
    clips = tmp_path / "clips"
    f1, f2, f3 = (write_tone(clips / f"{i}.flac", rate) for i, rate in enumerate((44100, 22050, 48000)))
    train = sources.write_manifest(tmp_path / "train.jsonl", [
        {"audio": "clips/0.flac", "captions": ["low tone"], "label": "low"},
        {"audio": "clips/0.flac", "captions": ["a second caption"], "label": "low"},  # same id: merged
        {"audio": str(clips / "1.flac"), "captions": ["high tone"], "id": "high", "fold": 3},
        {"audio": "clips/nowhere.flac", "captions": ["gone"]},
        {"audio": str(clips / "1.flac"), "captions": ["  "], "id": "high", "fold": 3},  # a blank caption: dropped
    ])
    test = sources.write_manifest(tmp_path / "eval" / "test.jsonl", [{"audio": "../clips/2.flac", "captions": []}])
    result = tb.main(["manifest", "--manifest", str(train), "--manifest", f"test={test}",
                      "--name", "my_clips", "--data-dir", str(tmp_path / "data"), "--num-workers", "0"])
    expected = {
        "train": {"clips/0.flac": Expected(f1, ["low tone", "a second caption"], "low"),
                  "high": Expected(f2, ["high tone"], fold=3)},
        "test": {"../clips/2.flac": Expected(f3, [])},
    }
    check_prepared("my_clips", tmp_path / "data", expected, {"train": {"missing": 1, "blank_captions": 1}, "test": {}})
    assert result["splits"] == {"train": 2, "test": 1}
    # An evaluation on the prepared split counts what its build left out, as one on the manifest does.
    spec = {"kind": "tfds", "name": "my_clips", "data_dir": str(tmp_path / "data"), "split": "train"}
    prepared, direct = (pipeline.make_eval_set(s, window_seconds=1.0).skip_counts for s in (spec, train))
    assert prepared == direct and prepared["missing"] == 1 and prepared["blank_captions"] == 1
    source = sources.open_source({"kind": "tfds", "name": "my_clips", "data_dir": str(tmp_path / "data"),
                                  "split": "train"})
    clone = pickle.loads(pickle.dumps(source))  # grain workers receive the source pickled
    assert [clone[i]["id"] for i in range(len(clone))] == [source[i]["id"] for i in range(len(source))]
    assert np.array_equal(clone[1]["audio"], source[1]["audio"])
    assert "tensorflow" not in sys.modules
    # Shards are rewritten uncompressed unless asked to keep TFDS's zstd; the records are the same.
    tb.build_manifest("my_clips", {"train": train}, tmp_path / "zstd", compress=True)
    compressed = tb.load_source("my_clips", tmp_path / "zstd", "train")
    assert [compressed[i]["id"] for i in range(2)] == [source[i]["id"] for i in range(2)]
    assert all(np.array_equal(compressed[i]["audio"], source[i]["audio"]) for i in range(2))
    for folder, option in ((tmp_path / "data", "uncompressed"), (tmp_path / "zstd", "zstd:3")):
        (shard,) = tb.prepared_path("my_clips", folder).glob("*-train.array_record-*")
        assert option in array_record_module.ArrayRecordReader(str(shard)).writer_options_string().split(",")


def test_manifest_build_of_other_manifests_under_an_existing_name_is_refused(tmp_path):
    """An existing build of NAME is reused only for the manifests it was built from; other manifests under the
    same name were silently answered with the old build (only an absl INFO line said 'Reusing dataset')."""
    for name in ("a.wav", "b.wav"):  # not write_tone: its distinct frequencies are counted for the other tests
        soundfile.write(tmp_path / name, np.full(8000, 0.1, np.float32), 16000)
    first = sources.write_manifest(tmp_path / "first.jsonl", [{"audio": "a.wav", "captions": ["a"]}])
    other = sources.write_manifest(tmp_path / "other.jsonl", [{"audio": "b.wav", "captions": ["b"]}])
    data = tmp_path / "data"
    built = tb.build_manifest("my_clips", {"train": first}, data)
    assert tb.build_manifest("my_clips", {"train": first}, data) == built  # the same manifests: reused
    (tmp_path / "linked").symlink_to(tmp_path, target_is_directory=True)
    assert tb.build_manifest("my_clips", {"train": tmp_path / "linked" / first.name}, data) == built  # the same file
    folder = tb.prepared_path("my_clips", data)
    for requested in ({"train": other}, {"train": first, "test": other}):
        with pytest.raises(ValueError) as error:
            tb.build_manifest("my_clips", requested, data)
        message = str(error.value)
        assert f"{folder} holds data set 'my_clips' built from manifests {{'train': '{first}'}}" in message
        assert all(str(path) in message for path in requested.values())
        assert "another name (--name)" in message and f"delete {folder} to rebuild" in message
    assert tb.load_source("my_clips", data, "train")[0]["id"] == "a.wav"  # the earlier build is untouched
    with pytest.raises(SystemExit) as exit_info:  # the command line: one `error:` line, exit status 1
        tb.main(["manifest", "--manifest", str(other), "--name", "my_clips", "--data-dir", str(data),
                 "--num-workers", "0"])
    assert str(exit_info.value.code).startswith(f"error: {folder} holds data set 'my_clips'")
    with pytest.raises(SystemExit) as exit_info:  # a split given twice kept only the last manifest
        tb.main(["manifest", "--manifest", str(first), "--manifest", str(other), "--name", "twice",
                 "--data-dir", str(data), "--num-workers", "0"])
    assert str(exit_info.value.code).startswith(f"error: --manifest: split 'train' is given twice ({first} and {other})")
    assert not (data / "twice").exists()


def test_entries_sharing_an_id_must_be_one_clip(tmp_path):
    """A repeated id with another file, label or fold is refused, not silently stored as the first one."""
    write_tone(tmp_path / "c0.wav", 16000)
    write_tone(tmp_path / "c1.wav", 16000)
    manifest = sources.write_manifest(tmp_path / "m.jsonl", [
        {"id": "x", "audio": "c0.wav", "captions": ["a"], "label": "dog"},
        {"id": "x", "audio": "c1.wav", "captions": ["b"], "label": "dog"},
    ])
    with pytest.raises(sources.ManifestError) as error:
        tb.build_manifest("dupe", manifest, tmp_path / "data")
    assert f"manifest {manifest}: id 'x' has audio '{tmp_path / 'c0.wav'}' and also '{tmp_path / 'c1.wav'}'" in str(error.value)
    clips = [tb.Clip("a.wav", "/m/a.wav", ["one"], label="dog", fold=1), tb.Clip("a.wav", "/m/a.wav", ["two"], label="dog", fold=2)]
    with pytest.raises(sources.ManifestError, match=r"^esc50 train metadata: id 'a.wav' has fold 1 and also 2"):
        tb.merge_clips(clips, "esc50 train metadata")
    clips[1].fold = 1
    assert tb.merge_clips(clips, "esc50 train metadata") == [tb.Clip("a.wav", "/m/a.wav", ["one", "two"], label="dog", fold=1)]
    assert clips[0].captions == ["one"]  # the inputs are left as they were


def test_full_scale_samples_are_stored_at_the_int16_limits(tmp_path):
    """+1.0 scales to 32768, one past int16: it is clipped to 32767, not wrapped to -32768 (a full-scale click)."""
    soundfile.write(tmp_path / "loud.wav", np.array([1.0, -1.0, 0.5, -0.5, 0.0] * 400), 16000, subtype="FLOAT")
    assert tb.decode_to_16k_int16(str(tmp_path / "loud.wav"))[:5].tolist() == [32767, -32768, 16384, -16384, 0]


def test_audio_index_matches_names_in_either_unicode_form(tmp_path):
    """A file extracted on a file system that stores names decomposed (NFD, macOS) is found by its CSV name (NFC)."""
    name = unicodedata.normalize("NFD", "Bird song \u00e9")
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / f"{name}.wav").write_bytes(b"")
    assert tb.AudioIndex(tmp_path / "audio").find(["Bird song \u00e9"]) == str(tmp_path / "audio" / f"{name}.wav")


def test_build_command_and_errors(tmp_path, capsys):
    fake_esc50(tmp_path / "manual")
    data = str(tmp_path / "data")
    tb.main(["build", "esc50", "--manual-dir", str(tmp_path / "manual"), "--data-dir", data, "--num-workers", "0"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["splits"] == {"train": 2} and printed["skipped"] == {"train": {"missing": 1}}
    with pytest.raises(ValueError, match="no split 'test'.*prepared splits: train"):
        tb.load_source("esc50", data, "test")
    assert len(tb.load_source("esc50", data, "train[:1]")) == 1
    with pytest.raises(FileNotFoundError, match="no prepared data set 'clotho'.*tfds_builders build clotho"):
        tb.load_source("clotho", data, "train")
    with pytest.raises(ValueError, match="unknown data set 'esc"):
        tb.build("esc", tmp_path / "manual", data)
    # A manual directory that is not there or empty: TFDS raised an AssertionError (a traceback on the command
    # line) and left empty folders in the data directory.
    (tmp_path / "empty").mkdir()
    for manual, state in ((tmp_path / "nowhere", "does not exist"), (tmp_path / "empty", "is empty")):
        refused = rf"(?s)^esc50: the manual directory {manual} {state}; expected layout:\n.*meta/esc50\.csv"
        with pytest.raises(FileNotFoundError, match=refused):
            tb.build("esc50", manual, tmp_path / "other")
    assert not (tmp_path / "other").exists()
    with pytest.raises(ValueError, match="data set name"):
        tb.build_manifest("My-Clips", tmp_path / "m.jsonl", data)


def test_csv_errors_name_file_and_line(tmp_path):
    manual = tmp_path / "manual"
    (manual / "audio").mkdir(parents=True)
    write_csv(manual / "meta" / "esc50.csv", [["a.wav", 1, 0, "dog"]], ["filename", "fold", "target", "kategorie"])
    with pytest.raises(ValueError, match=r"esc50\.csv: missing column\(s\) \['category'\]"):
        tb.build("esc50", manual, tmp_path / "data")
    write_csv(manual / "vggsound.csv", [["aaaaaaaaaaa", 1, "rain", "train"], ["bbbbbbbbbbb", 2, "rain", "valid"]])
    with pytest.raises(ValueError, match=r"vggsound\.csv:2: split 'valid'"):
        tb.build("vggsound", manual, tmp_path / "data")
    write_csv(manual / "vggsound.csv", [["aaaaaaaaaaa", "1.5", "rain", "train"]] * 2)
    with pytest.raises(ValueError, match=r"vggsound\.csv:2: column 'start_seconds' should be an integer"):
        tb.build("vggsound", manual, tmp_path / "data")
    write_csv(manual / "train.csv", [["oPRC3zComfA_000117"]], ["youtube_id", "caption"])
    with pytest.raises(ValueError, match=r"train\.csv:2: no value for column\(s\) \['caption'\]"):
        tb.build("autoacd", manual, tmp_path / "data")
    # A comma in a caption that is not quoted: the caption was cut at it, the rest dropped without a word.
    (manual / "train.csv").write_text("youtube_id,caption\noPRC3zComfA,A dog barks, then a car passes by\n")
    with pytest.raises(ValueError, match=r"train\.csv:2: 1 field\(s\) more than the 2 columns \(a comma in a value"):
        tb.build("autoacd", manual, tmp_path / "data")
    # Latin-1 in the first block of text, which reading the header decodes: named as any other line's bad byte.
    (manual / "train.csv").write_bytes("youtube_id,caption\noPRC3zComfA,un caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"train\.csv: not UTF-8 text \('utf-8' codec can't decode byte 0xe9"):
        tb.build("autoacd", manual, tmp_path / "data")


def test_split_without_audio_is_left_out_and_named(tmp_path, caplog):
    """The usual evaluation download: test audio only, while the metadata lists train (and validation) rows too.
    The splits without any audio file are left out, warned about and recorded; the others build and load."""
    manual = tmp_path / "vggsound"
    f0 = write_tone(manual / "audio" / "abcdefghij0_000030.wav", 44100)
    f1 = write_tone(manual / "audio" / "abcdefghij1_000030.wav", 44100)
    write_csv(manual / "vggsound.csv", [["abcdefghij0", 30, "male speech, man speaking", "test"],
                                        ["abcdefghij1", 30, "dog barking", "test"],
                                        ["abcdefghij2", 30, "dog barking", "train"]])
    caplog.set_level("WARNING", logger=tb.__name__)
    result = tb.main(["build", "vggsound", "--manual-dir", str(manual), "--data-dir", str(tmp_path / "data"),
                      "--num-workers", "0"])
    assert result["splits"] == {"test": 2}
    looked_for = f"abcdefghij2_000030 looked for as {manual}/audio/**/{{abcdefghij2_000030,"
    assert result["splits_left_out"]["train"]["clips"] == 1
    assert result["splits_left_out"]["train"]["example"].startswith(looked_for)
    assert "split 'train' left out: none of its 1 clips has an audio file" in caplog.text
    meta = json.loads((tb.prepared_path("vggsound", tmp_path / "data") / "metadata.json").read_text())
    assert meta["splits_left_out"] == result["splits_left_out"]
    expected = {"test": {"abcdefghij0_000030": Expected(f0, [], "male speech, man speaking"),
                         "abcdefghij1_000030": Expected(f1, [], "dog barking")}}
    check_prepared("vggsound", tmp_path / "data", expected, {"test": {}})
    with pytest.raises(ValueError, match=r"split 'train' was left out when this data set was built: none of its 1 "
                                         r"clips had an audio file \(e\.g\. abcdefghij2_000030 .*prepared splits: test"):
        tb.load_source("vggsound", tmp_path / "data", "train")

    # AudioCaps ships train/val/test CSVs together; only the test audio is here.
    manual = tmp_path / "audiocaps"
    f2 = write_tone(manual / "audio" / "ttttttttttt.wav", 22050)
    header = ["audiocap_id", "youtube_id", "start_time", "caption"]
    write_csv(manual / "train.csv", [[1, "aaaaaaaaaaa", 30, "a dog barks"]], header)
    write_csv(manual / "val.csv", [[2, "vvvvvvvvvvv", 0, "rain"], [3, "vvvvvvvvvvv", 0, "rain falls"]], header)
    write_csv(manual / "test.csv", [[4, "ttttttttttt", 0, "a tone"], [5, "xxxxxxxxxxx", 0, "gone"]], header)
    result = tb.build("audiocaps", manual, tmp_path / "data")
    assert result["splits"] == {"test": 1} and result["skipped"] == {"test": {"missing": 1}}
    assert {split: left["clips"] for split, left in result["splits_left_out"].items()} == {"train": 1, "validation": 1}
    check_prepared("audiocaps", tmp_path / "data", {"test": {"ttttttttttt": Expected(f2, ["a tone"])}},
                   {"test": {"missing": 1}})

    # Clotho's three caption CSVs are small and come together; without a split's audio folder (here only the
    # evaluation archive is extracted) that split is left out too (the build stopped on the missing folder).
    manual = tmp_path / "clotho"
    expected, _ = fake_clotho(manual)
    shutil.rmtree(manual / "clotho_audio_development")
    shutil.rmtree(manual / "validation")
    result = tb.build("clotho", manual, tmp_path / "data")
    assert result["splits"] == {"test": 2}
    assert {split: left["clips"] for split, left in result["splits_left_out"].items()} == {"train": 3, "validation": 2}
    assert result["splits_left_out"]["train"]["example"] == (
        f"development one.wav looked for as {manual / 'clotho_audio_development' / 'development one.wav'}")
    check_prepared("clotho", tmp_path / "data", {"test": expected["test"]}, {"test": {}})


def test_no_audio_for_any_split_is_one_error(tmp_path, capsys):
    """A layout other than the documented one finds no file at all: one error with the counts, where the clips
    were looked for and the expected layout, instead of TFDS's "No examples were yielded" traceback."""
    manual = tmp_path / "us8k"
    write_tone(manual / "audio" / "100032-3-0-0.wav", 22050)  # not in audio/fold1/
    write_tone(manual / "audio" / "99812-1-2-0.wav", 22050)
    write_csv(manual / "metadata" / "UrbanSound8K.csv", [
        ["100032-3-0-0.wav", 100032, 0.0, 0.3, 1, 1, 3, "dog_bark"],
        ["99812-1-2-0.wav", 99812, 1.0, 1.5, 2, 10, 1, "car_horn"],
    ], ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"])
    with pytest.raises(pipeline.DataError) as error:
        tb.build("us8k", manual, tmp_path / "data")
    message = str(error.value)
    assert message.startswith(f"us8k: no audio file found in {manual} for any split (train: 0 of 2 clips "
                              f"(100032-3-0-0.wav looked for as {manual}/audio/fold1/100032-3-0-0.wav)); expected layout:")
    assert "M/audio/fold{1..10}/{slice_file_name}" in message
    assert not list((tmp_path / "data").glob("us8k/*/dataset_info.json"))

    manual = tmp_path / "audiocaps"  # files named {youtube_id}_{start}, not {youtube_id}
    write_tone(manual / "audio" / "ttttttttttt_30.wav", 22050)
    write_csv(manual / "test.csv", [[4, "ttttttttttt", 30, "a tone"]], ["audiocap_id", "youtube_id", "start_time", "caption"])
    with pytest.raises(SystemExit) as exit_info:
        tb.main(["build", "audiocaps", "--manual-dir", str(manual), "--data-dir", str(tmp_path / "data"),
                 "--num-workers", "0"])
    first_line = str(exit_info.value.code).splitlines()[0]
    assert first_line.startswith("error: audiocaps: no audio file found") and "test: 0 of 1 clips" in first_line
    assert "Traceback" not in capsys.readouterr().err


def test_split_whose_clips_all_fail_to_decode_is_one_error(tmp_path):
    manual = tmp_path / "manual"
    for name in ("1-100032-A-0.wav", "5-9032-A-14.wav"):
        (manual / "audio").mkdir(parents=True, exist_ok=True)
        (manual / "audio" / name).write_bytes(b"<html>not the audio</html>")
    write_csv(manual / "meta" / "esc50.csv", [["1-100032-A-0.wav", 1, 0, "dog", True, 100032, "A"],
                                              ["5-9032-A-14.wav", 5, 14, "chirping_birds", False, 9032, "A"]],
              ["filename", "fold", "target", "category", "esc10", "src_file", "take"])
    with pytest.raises(pipeline.DataError, match=r"^esc50/train: none of its 2 clips could be stored "
                                                 r"\(\{'not_audio': 2\}; e\.g\. 1-100032-A-0\.wav: .*expected layout:"):
        tb.build("esc50", manual, tmp_path / "data")


def _one_clip_manifest(tmp_path):
    soundfile.write(tmp_path / "a.wav", np.full(8000, 0.1, np.float32), 16000)  # not write_tone (see above)
    return sources.write_manifest(tmp_path / "train.jsonl", [{"audio": "a.wav", "captions": ["a"]}])


def test_a_stopped_uncompressed_rewrite_names_the_shard_and_the_next_build_completes_it(tmp_path, monkeypatch):
    """A rewrite stopped part way (disk full, file-size limit) ended in array_record's RuntimeError and left
    "<shard>.uncompressed-partial", which the next build's glob took for a shard and crashed on (AttributeError)."""
    manifest, data = _one_clip_manifest(tmp_path), tmp_path / "data"
    tb.build_manifest("my_clips", {"train": manifest}, data, compress=True)
    folder = tb.prepared_path("my_clips", data)
    (shard,) = folder.glob("my_clips-train.array_record-*")
    zstd = shard.read_bytes()

    class FullDisk:
        def __init__(self, path, options):
            open(path, "wb").write(b"part")

        def write(self, record):
            raise RuntimeError("write() failed: No space left on device")

    monkeypatch.setattr(tb.array_record_module, "ArrayRecordWriter", FullDisk)
    with pytest.raises(OSError) as error:
        tb.rewrite_uncompressed(folder)
    assert str(error.value).startswith(f"{shard}: rewriting this shard without compression failed (write() failed")
    assert "run the same build again" in str(error.value) and "--compress" in str(error.value)
    monkeypatch.undo()
    assert shard.read_bytes() == zstd and sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []
    # What a killed rewrite leaves: the temporary file of `replaced`, whose name also ends like a shard's.
    leftover = folder / f".my_clips-train.partial-99999{shard.suffix}"
    leftover.write_bytes(b"cut")
    tb.build_manifest("my_clips", {"train": manifest}, data)
    assert not leftover.exists()
    assert "uncompressed" in array_record_module.ArrayRecordReader(str(shard)).writer_options_string().split(",")
    assert tb.load_source("my_clips", data, "train")[0]["id"] == "a.wav"
    for damaged in (zstd[:40], bytes(70_000)):  # a shard cut short, or damaged: an AttributeError on no options
        shard.write_bytes(damaged)
        with pytest.raises(OSError, match=rf"^{shard}: not a readable ArrayRecord shard \(cut short\?\); delete {folder}"):
            tb.rewrite_uncompressed(folder)


def test_a_damaged_metadata_json_is_named(tmp_path):
    """A prepared folder whose metadata.json is not JSON: the build and load_source ended in a JSONDecodeError
    naming no file."""
    manifest, data = _one_clip_manifest(tmp_path), tmp_path / "data"
    tb.build_manifest("my_clips", {"train": manifest}, data, compress=True)
    folder = tb.prepared_path("my_clips", data)
    (folder / "metadata.json").write_text('{"skipped": {')
    with pytest.raises(ValueError, match=f"^{folder}/metadata.json: not valid JSON .* or delete {folder} to build"):
        tb.build_manifest("my_clips", {"train": manifest}, data)
    with pytest.raises(ValueError, match=f"^{folder}: not a readable prepared data set .* delete {folder} and build"):
        tb.load_source("my_clips", data, "train")
