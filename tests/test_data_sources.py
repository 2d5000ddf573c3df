"""Manifest parsing: paths, defaults, errors that name the file and line, pickling for grain workers."""

import json
import pickle

import pytest

from wavlink_jax.data.sources import ManifestError, ManifestSource, open_source, write_manifest


def test_manifest_records_resolve_paths(tmp_path):
    absolute = tmp_path / "elsewhere" / "b.wav"
    lines = [
        {"audio": "clips/a.flac", "captions": ["a dog barks", "barking"], "label": "dog"},
        {"audio": str(absolute), "captions": ["rain"], "id": "clip-b", "label": "  "},  # blank: no label
        {"audio": "c.ogg", "label": " dog\n"},  # the first clip's class
    ]
    manifest = tmp_path / "data" / "train.jsonl"
    manifest.parent.mkdir()
    manifest.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    source = ManifestSource(manifest)
    assert len(source) == 3
    assert source[0] == {
        "id": "clips/a.flac",
        "audio": str(tmp_path / "data" / "clips" / "a.flac"),
        "sample_rate": 0,
        "captions": ["a dog barks", "barking"],
        "label": "dog",
        "fold": 0,
    }
    assert source[1]["audio"] == str(absolute) and source[1]["id"] == "clip-b" and source[1]["label"] == ""
    assert source[2]["captions"] == [] and source[2]["audio"] == str(tmp_path / "data" / "c.ogg")
    assert source[2]["label"] == "dog"
    for index in (3, -1):  # a negative index is out of range too, not the last line
        with pytest.raises(IndexError):
            source[index]
    clone = pickle.loads(pickle.dumps(source))
    assert [clone[i] for i in range(3)] == [source[i] for i in range(3)]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"audio": "a.wav", "captions": ["x"]', "not valid JSON"),
        ('{"captions": ["x"]}', 'missing the "audio" key'),
        ('["a.wav"]', "expected a JSON object"),
        ('{"audio": "a.wav", "captions": "one string"}', '"captions" must be a list of strings'),
        ('{"audio": "a.wav", "label": 3}', '"label" must be a string'),
        ('{"audio": "a.wav", "fold": "1"}', '"fold" must be an integer >= 0'),
        ('{"audio": "a.wav", "fold": -1}', '"fold" must be an integer >= 0'),
        ('{"audio": "a.wav", "fold": 1.5}', '"fold" must be an integer >= 0'),
        ('{"audio": "a.wav", "fold": true}', '"fold" must be an integer >= 0'),
        # A lone surrogate (a string cut through an emoji): valid JSON, but no text to tokenize or store.
        ('{"audio": "a.wav", "captions": ["fine", "emoji \\ud83d cut"]}', '"captions" holds \'emoji \\ud83d cut\''),
        ('{"audio": "a.wav", "id": "\\udc00"}', '"id" holds \'\\udc00\', which is not Unicode text'),
    ],
)
def test_manifest_errors_name_file_and_line(tmp_path, bad_line, message):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "ok.wav", "captions": ["fine"]}\n\n' + bad_line + "\n")
    with pytest.raises(ManifestError) as err:
        ManifestSource(manifest)
    assert f"{manifest}:3" in str(err.value) and message in str(err.value)


def test_blank_lines_count_in_the_offsets(tmp_path):
    """Records are re-read at their byte offsets: blank lines (several, or of spaces or CR) between entries count."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "a.wav"}\n\n  \n\r\n{"audio": "b.wav", "captions": ["x"]}\n\n\n{"audio": "c.wav"}\n')
    source = ManifestSource(manifest)
    assert [source[i]["id"] for i in range(len(source))] == ["a.wav", "b.wav", "c.wav"]
    assert source[1]["captions"] == ["x"]


def test_manifest_paths_expand_home_and_follow_the_path_as_given(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    target = write_manifest(tmp_path / "lists" / "m.jsonl", [{"audio": "~/clips/a.wav"}, {"audio": "b.wav"}])
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "m.jsonl").symlink_to(target)  # a manifest linked into the folder of its clips
    source = ManifestSource(tmp_path / "clips" / "m.jsonl")
    assert source[0]["audio"] == str(tmp_path / "home" / "clips" / "a.wav")
    assert source[1]["audio"] == str(tmp_path / "clips" / "b.wav")


def test_manifest_missing_or_empty(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        ManifestSource(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ManifestError, match="no entries"):
        ManifestSource(tmp_path / "empty.jsonl")


def test_open_source_specs(tmp_path):
    path = write_manifest(tmp_path / "m.jsonl", [{"audio": "a.wav", "captions": ["x"]}])
    assert len(open_source(path)) == 1
    assert len(open_source({"kind": "manifest", "path": str(path), "weight": 2.0})) == 1
    with pytest.raises(ValueError, match="unknown source kind"):
        open_source({"kind": "csv", "path": str(path)})
    with pytest.raises(ValueError, match="needs 'name'"):
        open_source({"kind": "tfds", "split": "train"})
    # A misspelt key is refused, not dropped (the mixture weight silently fell back to the source's size).
    with pytest.raises(ValueError, match=r"has unknown keys \['wieght'\]; it takes \['kind', 'path', 'weight'\]"):
        open_source({"kind": "manifest", "path": str(path), "wieght": 2.0})
    with pytest.raises(ValueError, match=r"tfds source .* has unknown keys \['data-dir'\]"):
        open_source({"kind": "tfds", "name": "clotho", "split": "train", "data-dir": "/data"})
