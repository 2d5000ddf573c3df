"""Data sources: random-access collections of captioned clips, and the record format every source yields.

The record contract (shared by the manifest source here, the TFDS builders in `tfds_builders.py`, the
pipeline and the evaluator). A *source* is a grain-compatible random-access data source: `len(source)` and
`source[i]` for `0 <= i < len(source)`, picklable (it travels to grain worker processes), and `source[i]`
is a plain dict:

    {"id": str,            # unique within the source (manifest: the "id" key, else the audio path as written)
     "audio": str | np.ndarray,
                           # a file path (any format libsndfile reads: wav, flac, ogg, mp3, ...), or the
                           # decoded samples as a 1-D int16 (full scale 32768) or float32 (full scale 1.0) array
     "sample_rate": int,   # Hz of an array; 0 for a file path (the file's header is authoritative)
     "captions": list[str],  # possibly empty (classification sets); training needs at least one
     "label": str,         # class name for zero-shot evaluation (white space around it dropped), "" if none
     "fold": int}          # optional: cross-validation fold (ESC-50 1-5, US8K 1-10), 0 or absent if none

`Record` below is that dict as a TypedDict. Records are not validated for audio content here: decoding and
the bad-input policy (missing/empty/truncated/... files are skipped and counted) live in `audio_io.py` and
`pipeline.py`, so a source stays cheap to index.

A manifest (JSONL, one clip a line) is
    {"audio": "clips/a.flac", "captions": ["a dog barks", ...], "label": "dog", "fold": 1, "id": "optional"}
with `audio` relative to the folder of the manifest's path as given (for a symlinked manifest, the link's
folder, not its target's) or absolute (`~` expanded); `label`, `fold` (an int >= 0, 0 = none) and `id`
optional. `ManifestSource` validates every line when it opens the file (a line that is not a JSON object,
lacks "audio" or has a key of the wrong type is an error naming the file and line)
and keeps only the byte offsets and lengths of the lines, so an 8M-line manifest costs ~100 MB of memory, not
gigabytes; `source[i]` re-reads line i (a positional read, safe from grain's reader threads).

Lines that share an `id` (an AudioCaps-style manifest has one line per caption; without "id" keys, lines with
the same audio path) are one clip for evaluation (`ManifestSource.clips()`) and for the TFDS manifest builder:
both merge them with `merge_by_id`, which keeps all their captions in order and refuses lines that share an id
but differ in audio, label or fold. Training reads one record per line: each line is one (clip, captions) pair,
so a clip with several lines is simply drawn more often.
"""

from __future__ import annotations

import json
import operator
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NotRequired, Protocol, Sequence, TypedDict, TypeVar, runtime_checkable

import numpy as np


class Record(TypedDict):
    """One clip, as every source yields it (see the module docstring)."""

    id: str
    audio: str | np.ndarray
    sample_rate: int
    captions: list[str]
    label: str
    fold: NotRequired[int]


@runtime_checkable
class Source(Protocol):
    """A grain random-access data source of `Record`s."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...


class ManifestError(ValueError):
    """A manifest that cannot be read: the message names the file, the line and what is wrong."""


def _check_entry(entry: Any, where: str) -> None:
    """Raise ManifestError unless `entry` is a manifest object with the right key types."""
    if not isinstance(entry, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    if "audio" not in entry:
        raise ManifestError(f'{where}: missing the "audio" key (the path of the clip)')
    if not isinstance(entry["audio"], str) or not entry["audio"]:
        raise ManifestError(f'{where}: "audio" must be a non-empty path string, got {entry["audio"]!r}')
    captions = entry.get("captions", [])
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise ManifestError(f'{where}: "captions" must be a list of strings, got {captions!r}')
    for key in ("label", "id"):
        if key in entry and not isinstance(entry[key], str):
            raise ManifestError(f'{where}: "{key}" must be a string, got {entry[key]!r}')
    texts = [("captions", caption) for caption in captions]
    texts += [(key, entry[key]) for key in ("label", "id") if key in entry]
    for key, text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate ("\ud83d"): a string cut through an emoji
            raise ManifestError(f'{where}: "{key}" holds {text!r}, which is not Unicode text ({err.reason})') from err
    fold = entry.get("fold", 0)
    if not isinstance(fold, int) or isinstance(fold, bool) or fold < 0:
        raise ManifestError(f'{where}: "fold" must be an integer >= 0 (0 = no fold), got {fold!r}')


T = TypeVar("T")
MERGED_FIELDS = ("audio", "label", "fold")  # what entries sharing an id must agree on to be one clip


def merge_by_id(
    items: Iterable[T],
    where: str,
    *,
    field: Callable[[T, str], Any],
    with_captions: Callable[[T, list[str]], T],
    conflicts: dict[str, str] | None = None,
) -> list[T]:
    """Items sharing an id merged into one clip, in first-seen order, with all their captions in order.

    Items are manifest records or the TFDS builders' clips: `field(item, name)` reads "id", "captions" and the
    `MERGED_FIELDS`; `with_captions(item, captions)` is a copy of `item` with those captions (the inputs are
    left unchanged). Items that share an id but differ in audio, label or fold are a ManifestError naming
    `where` (the manifest or metadata file), the id and the two values; with a `conflicts` dict (for published
    metadata the user cannot fix) that id is left out instead and `conflicts[id]` says why.
    """
    merged: dict[str, T] = {}
    for item in items:
        clip_id = field(item, "id")
        if conflicts is not None and clip_id in conflicts:
            continue
        first = merged.get(clip_id)
        if first is None:
            merged[clip_id] = with_captions(item, list(field(item, "captions")))
            continue
        name = next((name for name in MERGED_FIELDS if field(first, name) != field(item, name)), None)
        if name is not None:
            problem = f"id {clip_id!r} has {name} {field(first, name)!r} and also {field(item, name)!r}"
            if conflicts is None:
                raise ManifestError(
                    f"{where}: {problem}; entries that share an id are one clip (their captions are joined) and "
                    f"must agree on {', '.join(MERGED_FIELDS)}: give different clips different ids"
                )
            conflicts[clip_id] = problem
            del merged[clip_id]
            continue
        field(first, "captions").extend(field(item, "captions"))
    return list(merged.values())


class ManifestSource:
    """The lines of a JSONL manifest, as `Record`s with absolute audio paths (`clips()`: merged by id)."""

    def __init__(self, path: str | os.PathLike):
        # absolute(), not resolve(): relative audio paths are relative to the folder of the manifest's path as
        # given, so a manifest symlinked into a folder of clips reads them there.
        self.path = Path(path).expanduser().absolute()
        if not self.path.is_file():
            raise ManifestError(f"{self.path}: manifest not found")
        self.root = self.path.parent
        offsets, lengths = [], []
        with open(self.path, "rb") as file:
            offset = 0
            for line_number, line in enumerate(file, start=1):
                if line.strip():
                    where = f"{self.path}:{line_number}"
                    try:
                        entry = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError) as err:
                        raise ManifestError(f"{where}: not valid JSON ({err})") from err
                    _check_entry(entry, where)
                    offsets.append(offset)
                    lengths.append(len(line))
                offset += len(line)
        if not offsets:
            raise ManifestError(f"{self.path}: the manifest has no entries")
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._lengths = np.asarray(lengths, dtype=np.int64)
        self._fd = os.open(self.path, os.O_RDONLY)  # reopened by every process that unpickles the source

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> Record:
        if not 0 <= index < len(self._offsets):
            raise IndexError(f"{self.path}: index {index} out of range for {len(self)} entries")
        entry = json.loads(os.pread(self._fd, int(self._lengths[index]), int(self._offsets[index])))
        audio = entry["audio"]
        return Record(
            id=entry.get("id", audio),
            audio=str(self.root / Path(audio).expanduser()),  # an absolute `audio` stays as it is
            sample_rate=0,
            captions=list(entry.get("captions", [])),
            # " dog" is "dog"'s class, and a blank label is none (it was a class of its own in zero-shot scoring)
            label=entry.get("label", "").strip(),
            fold=entry.get("fold", 0),
        )

    def clips(self) -> list[Record]:
        """The records, those that share an id merged into one clip (see the module docstring)."""
        return merge_by_id(
            (self[index] for index in range(len(self))),
            f"manifest {self.path}",
            field=operator.getitem,
            with_captions=lambda record, captions: {**record, "captions": captions},
        )

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "_fd"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fd = os.open(self.path, os.O_RDONLY)

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"ManifestSource({str(self.path)!r}, {len(self)} clips)"


def write_manifest(path: str | os.PathLike, entries: Sequence[Mapping[str, Any]]) -> Path:
    """Write `entries` (dicts with "audio", "captions", optional "label"/"fold"/"id") as a JSONL manifest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        for line_number, entry in enumerate(entries, start=1):
            _check_entry(dict(entry), f"{path}: entry {line_number}")
            file.write(json.dumps(entry, ensure_ascii=False) + "\n")
    return path


# The keys each kind of source spec takes besides "kind" and the training mixture's "weight".
SOURCE_KEYS = {"manifest": ("path",), "tfds": ("name", "split", "data_dir"), "source": ("source",)}


def open_source(spec: Mapping[str, Any] | str | os.PathLike) -> Source:
    """The source a config entry describes.

    `spec` is a manifest path, or a dict with `kind`: `{"kind": "manifest", "path": ...}` or
    `{"kind": "tfds", "name": ..., "data_dir": ..., "split": ...}` (array_record data prepared by
    `wavlink_jax.data.tfds_builders`), or `{"kind": "source", "source": obj}` for any `Source` object built
    in Python. Each may hold a mixture `weight` (read by the training pipeline); any other key is refused (a
    misspelt `wieght` would otherwise be dropped silently).
    """
    if isinstance(spec, (str, os.PathLike)):
        return ManifestSource(spec)
    kind = spec.get("kind", "manifest")
    if kind not in SOURCE_KEYS:
        raise ValueError(f"unknown source kind {kind!r} in {dict(spec)!r}; expected one of {list(SOURCE_KEYS)}")
    allowed = ("kind", *SOURCE_KEYS[kind], "weight")
    unknown = sorted(set(spec.keys()) - set(allowed))
    if unknown:
        raise ValueError(f"{kind} source {dict(spec)!r} has unknown keys {unknown}; it takes {list(allowed)}")
    if kind == "source":
        if not isinstance(spec.get("source"), Source):
            raise ValueError(f'a "source" spec needs a "source" object with __len__ and __getitem__, got {spec!r}')
        return spec["source"]
    if kind == "manifest":
        if "path" not in spec:
            raise ValueError(f'manifest source {dict(spec)!r} needs a "path"')
        return ManifestSource(spec["path"])
    missing = [key for key in ("name", "split") if key not in spec]
    if missing:
        raise ValueError(f"tfds source {dict(spec)!r} needs {', '.join(map(repr, missing))}")
    from wavlink_jax.data import tfds_builders  # lazy: pulls in tensorflow_datasets

    return tfds_builders.load_source(spec["name"], spec.get("data_dir"), spec["split"])
