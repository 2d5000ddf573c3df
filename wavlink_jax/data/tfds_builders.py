"""TFDS builders for the paper's data sets: official downloads → array_record files of 16 kHz int16 audio.

Each builder reads a data set exactly as its official release lays it out in a *manual directory* (the
layouts are below, and in each builder's `MANUAL_DOWNLOAD_INSTRUCTIONS`), decodes every clip (any format
libsndfile reads: wav, flac, ogg/opus, mp3), mixes it down to mono and resamples it to 16 kHz with soxr —
all by `audio_io.load_audio`, the pipeline's own decoder — and stores it as an int16 tensor (full scale
32768) in TFDS array_record files, so training reads raw samples instead of decoding compressed audio.
`ManifestBuilder` does the same for any JSONL manifest (the format of `sources.py`).

No TensorFlow is needed: builders are `tfds.core.GeneratorBasedBuilder`s written with
`file_format="array_record"` and read back with `builder.as_data_source(split)`. Audio is a
`tfds.features.Tensor(shape=(None,), dtype=int16, encoding=BYTES)` (`tfds.features.Audio` needs
TensorFlow; BYTES encoding reads ~7x faster than the default int64 list). After TFDS has written the shards,
they are rewritten without zstd compression (`rewrite_uncompressed`; `--compress` keeps it): PCM audio barely
compresses, and decompression is most of the cost of a random read.

Stored features: `id` (str, unique per split), `audio` (int16, 16 kHz mono), `captions` (list of str; empty
for the classification sets), `label` (class name, "" if none; underscores of ESC-50/US8K class names are
replaced by spaces so they read as text prompts), `fold` (ESC-50 1-5, US8K 1-10, otherwise 0).
CSV rows (and manifest lines) that share a clip id are merged into one clip with all their captions
(AudioCaps has one row per caption). Rows that share an id but differ in audio, label or fold leave that clip
out of a published data set's build, counted as "conflicting_id" like the other skips below (which label is
right cannot be told); in a manifest (your own data) they are an error naming the id and both values
(`sources.merge_by_id`).

Bad input is skipped and counted, never silent: a clip whose file is absent ("missing"), has no samples
("empty"), is cut short ("truncated") or is not audio libsndfile can read ("not_audio") is logged (the first
20 of each reason with their paths, then a per-split summary) and counted in the prepared data set's
`metadata.json` (`{"skipped": {split: {reason: n}}, "skipped_examples": {split: {reason: ["id: path"]}}}`);
the build command prints the counts, and `load_source(...).build_skipped` returns them. Blank captions (an empty
Clotho caption column, a blank AudioCaps row) are dropped from the stored clips and counted the same way
(`"blank_captions": {split: n}` in the metadata and the build report).

A split none of whose clips has an audio file (VGGSound's and AudioCaps' metadata list every split, while an
evaluation download often holds the test audio only) is left out of the build with a warning, and recorded as
`"splits_left_out": {split: {"clips": n, "example": "id looked for as path"}}` in the metadata and the build
report; asking `load_source` for it says so. No audio for any split (e.g. files named or placed otherwise than
the layout below), or a split none of whose clips can be decoded, stops the build with one error naming the
counts and the expected layout.

Commands (see the README section "Building the paper's data sets"):

    python -m wavlink_jax.data.tfds_builders build NAME --manual-dir M --data-dir D [--num-workers N]
    python -m wavlink_jax.data.tfds_builders manifest --manifest [SPLIT=]F ... --name N --data-dir D

and from Python `build(name, manual_dir, data_dir)`, `build_manifest(name, manifests, data_dir)`,
`load_source(name, data_dir, split)` (a grain random-access source of the records of `sources.py`, plus
`fold`). Prepared data lives in `D/NAME/1.0.0/` and is reused as it is; delete that folder to rebuild. A
`manifest` build is reused only for the manifest paths it was made from (recorded in its metadata), and another
set of manifests under the same name is refused.

Manual directory layouts (appended below from each builder's instructions):
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import json
import logging
import multiprocessing
import os
import re
import sys
import unicodedata
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from wavlink_jax.data import audio_io
from wavlink_jax.data.sources import ManifestSource, merge_by_id
from wavlink_jax.files import replaced

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3")

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Decoding


def decode_to_16k_int16(path: str) -> np.ndarray | str:
    """The clip at `path` as 16 kHz mono int16 samples (full scale 32768), or why it is skipped.

    Decoding, mono mix-down and resampling are `audio_io.load_audio`'s (the pipeline's own); the reason is
    one of its `SKIP_REASONS` (missing, empty, truncated, not_audio, not_finite: without that check a NaN sample
    would be stored as an arbitrary int16).
    """
    try:
        samples = audio_io.load_audio(path)
    except audio_io.BadAudio as bad:
        return bad.reason
    return np.clip(np.rint(samples * 32768.0), -32768, 32767).astype(np.int16)


# ----------------------------------------------------------------------------------------------------------
# Reading the official metadata


@dataclasses.dataclass(slots=True)  # millions of these are held while a large set is built
class Clip:
    """One clip to store: where its audio is (`audio`, "" if no file matched) and its annotations."""

    id: str
    audio: str
    captions: list[str]
    label: str = ""
    fold: int = 0
    expected: str = ""  # when `audio` is "": the file names looked for, for the skip log


def merge_clips(clips: Iterable[Clip], where: str, conflicts: dict[str, str] | None = None) -> list[Clip]:
    """Clips with the same id merged into one, keeping first-seen order and all captions in order.

    `sources.merge_by_id`, as for evaluation manifests: clips that share an id but differ in audio, label or
    fold are a `ManifestError` naming `where`, the id and the two values, or with `conflicts` left out and
    recorded there.
    """
    return merge_by_id(
        clips,
        where,
        field=getattr,
        with_captions=lambda clip, captions: dataclasses.replace(clip, captions=captions),
        conflicts=conflicts,
    )


def read_csv(
    path: Path, columns: Sequence[str], *, header: bool = True
) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, row) of a CSV with the given columns; errors name the file, line and column.

    With `header=False` the file has no header row and `columns` names its fields in order.
    """
    with open(path, newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file, fieldnames=None if header else list(columns), skipinitialspace=True)
        try:
            if header:  # reading it decodes the file's first block of text, where a bad byte may be
                found = [name.strip() for name in reader.fieldnames or []]
                missing = [name for name in columns if name not in found]
                if missing:
                    raise ValueError(f"{path}: missing column(s) {missing}; the header has {found}")
                reader.fieldnames = found
            for row in reader:
                line = reader.line_num
                empty = [name for name in columns if row.get(name) is None]
                if empty:
                    raise ValueError(f"{path}:{line}: no value for column(s) {empty} (too few fields)")
                if row.get(None):  # csv.DictReader's key for the fields past the last column
                    raise ValueError(
                        f"{path}:{line}: {len(row[None])} field(s) more than the {len(reader.fieldnames)} columns "
                        "(a comma in a value that is not quoted?)"
                    )
                yield line, {name: row[name].strip() for name in columns}
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err})") from err


def find_path(root: Path, candidates: Sequence[str], what: str) -> Path:
    """The first of `root / candidate` that exists; otherwise an error listing every place looked at."""
    for candidate in candidates:
        if (root / candidate).exists():
            return root / candidate
    tried = ", ".join(str(root / c) for c in candidates)
    raise FileNotFoundError(f"{what} not found; looked for: {tried}")


class AudioIndex:
    """Every file under a folder (recursively), looked up by file stem or file name.

    Names are compared in Unicode NFC, so files extracted on a file system that stores NFD (macOS) match
    the names in the CSVs. When two files share a stem, one with an `AUDIO_SUFFIXES` suffix wins, then the
    first in sorted path order. Files of any suffix are indexed: one libsndfile reads (`.aiff`, `.caf`) is
    used, and one it cannot (a downloader's `.m4a`, `.webm`) is skipped as `not_audio`, not as `missing`.
    """

    def __init__(self, folder: Path):
        if not folder.is_dir():
            raise FileNotFoundError(f"audio folder {folder} not found")
        self.folder = folder
        files = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            files += [(os.path.join(dirpath, name), unicodedata.normalize("NFC", name)) for name in sorted(filenames)]
        files.sort(key=lambda file: not file[1].lower().endswith(AUDIO_SUFFIXES))  # stable: path order kept
        self._paths: dict[str, str] = {}
        for path, name in files:
            self._paths.setdefault(name, path)
            self._paths.setdefault(os.path.splitext(name)[0], path)

    def find(self, names: Sequence[str]) -> str:
        """The path of the first of `names` (stems or file names) present, "" if none is."""
        for name in names:
            path = self._paths.get(unicodedata.normalize("NFC", name))
            if path:
                return path
        return ""

    def clip(self, clip_id: str, names: Sequence[str], captions: list[str], **annotations) -> Clip:
        """A `Clip` whose audio is the first of `names` found here."""
        path = self.find(names)
        expected = "" if path else f"{self.folder}/**/{{{','.join(names)}}}.*"
        return Clip(clip_id, path, captions, expected=expected, **annotations)

    def youtube_clip(self, clip_id: str, caption: str) -> Clip:
        """A captioned YouTube-derived clip, its file named by `youtube_names(clip_id)`."""
        return self.clip(clip_id, youtube_names(clip_id), [caption])


def youtube_names(clip_id: str) -> list[str]:
    """File stems a YouTube-derived clip may have: as given, and with/without AudioSet's "Y" prefix."""
    names = [clip_id, "Y" + clip_id]
    if clip_id.startswith("Y") and len(clip_id) > 1:
        names.insert(1, clip_id[1:])
    return names


def file_clip(path: Path, clip_id: str, captions: list[str], **annotations) -> Clip:
    """A `Clip` with a known file path (also tried in the other Unicode normal form)."""
    audio = str(path)
    if not path.is_file():
        for form in ("NFC", "NFD"):
            alternative = Path(unicodedata.normalize(form, audio))
            if alternative.is_file():
                audio = str(alternative)
    return Clip(clip_id, audio, captions, **annotations)


def _data_error(message: str) -> ValueError:
    """`wavlink_jax.data.pipeline.DataError(message)`, imported only when raised: grain stays out of this
    module's import."""
    from wavlink_jax.data.pipeline import DataError

    return DataError(message)


def _readable_label(name: str) -> str:
    return name.replace("_", " ")


# ----------------------------------------------------------------------------------------------------------
# Builders


class AudioTextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared machinery: features, decoding (optionally in worker processes), skip counting.

    A subclass sets `name`, `MANUAL_DOWNLOAD_INSTRUCTIONS`, `HOMEPAGE`, and implements
    `read_clips(manual_dir) -> {split: clips}` (a split whose metadata file is absent may be left out).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "16 kHz mono int16 audio, captions, label, fold."}
    HOMEPAGE = ""

    def __init__(self, *, num_workers: int = 0, **kwargs):
        self.num_workers = num_workers
        self._pool = None
        super().__init__(**kwargs)

    def prepare(self, manual_dir: str | None = None, *, compress: bool = False) -> None:
        """`download_and_prepare` from `manual_dir`, decoding in `num_workers` processes (0: in this one).

        Unless `compress`, the shards are then rewritten uncompressed (see `rewrite_uncompressed`).
        """
        config = tfds.download.DownloadConfig(manual_dir=manual_dir)
        if self.num_workers <= 0:
            self.download_and_prepare(download_config=config)
        else:  # one pool for all splits; spawn is safe even when the caller runs threads (jax, grain)
            context = multiprocessing.get_context("spawn")
            try:
                with ProcessPoolExecutor(self.num_workers, mp_context=context) as self._pool:
                    self.download_and_prepare(download_config=config)
            except BrokenProcessPool as err:
                raise RuntimeError(
                    f"{self.name}: a decoding worker process died (out of memory, or spawn could not re-import "
                    "the main program, e.g. code piped to `python -`); retry with num_workers=0 or from a script"
                ) from err
            finally:
                self._pool = None
        if not compress:
            rewrite_uncompressed(Path(self.data_dir))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").strip(),
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "audio": tfds.features.Tensor(
                        shape=(None,), dtype=np.int16, encoding=tfds.features.Encoding.BYTES
                    ),
                    "captions": tfds.features.Sequence(tfds.features.Text()),
                    "label": tfds.features.Text(),
                    "fold": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            homepage=self.HOMEPAGE or None,
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # grain shuffles at read time; keeps the files in metadata order
        )

    def read_clips(self, manual_dir: Path) -> dict[str, list[Clip]]:
        raise NotImplementedError

    def _start_report(self) -> None:
        """Empty per-split counts in the metadata, filled by `_generate_examples`."""
        self.info.metadata.update(
            {
                "sample_rate": audio_io.SAMPLE_RATE,
                "skipped": {},
                "skipped_examples": {},
                "blank_captions": {},
                "splits_left_out": {},
            }
        )

    def _split_generators(self, dl_manager):
        manual_dir = Path(dl_manager.manual_dir)
        clips = self.read_clips(manual_dir)
        if not clips:
            raise FileNotFoundError(
                f"{self.name}: no metadata found in {manual_dir}.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
        self._start_report()
        splits = {}
        for split, rows in clips.items():
            conflicts: dict[str, str] = {}  # published metadata: a clip with two labels is left out and counted
            splits[split] = (merge_clips(rows, f"{self.name} {split} metadata in {manual_dir}", conflicts), conflicts)
        return self._generators_with_audio(splits, str(manual_dir))

    def _generators_with_audio(
        self, splits: Mapping[str, tuple[list[Clip], Mapping[str, str]]], where: str
    ) -> dict[str, Iterator]:
        """`_generate_examples` of each split (`{split: (clips, conflicts)}`) that has at least one audio file.

        A split none of whose clips' files exist (e.g. VGGSound's train rows when only the test audio was
        downloaded) is left out with a warning and recorded in the metadata (`"splits_left_out"`); TFDS would
        otherwise abort the whole build on it. No audio for any split is a `DataError` naming the counts, where
        each split's first clip was looked for, and the expected layout (files named or placed otherwise).
        """
        absent = {}
        for split, (clips, _) in splits.items():
            if not any(clip.audio and os.path.isfile(clip.audio) for clip in clips):
                example = f"{clips[0].id} looked for as {clips[0].audio or clips[0].expected}" if clips else "no clips"
                absent[split] = {"clips": len(clips), "example": example}
        if len(absent) == len(splits):
            found = "; ".join(f"{split}: 0 of {a['clips']} clips ({a['example']})" for split, a in absent.items())
            raise _data_error(
                f"{self.name}: no audio file found in {where} for any split ({found}); expected layout:\n"
                f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
        for split, record in absent.items():
            log.warning(
                "%s: split %r left out: none of its %d clips has an audio file in %s (e.g. %s)",
                self.name, split, record["clips"], where, record["example"],
            )
            self.info.metadata["splits_left_out"][split] = record
        return {
            split: self._generate_examples(split, clips, conflicts)
            for split, (clips, conflicts) in splits.items()
            if split not in absent
        }

    def _generate_examples(self, split: str, clips: list[Clip], conflicts: Mapping[str, str] | None = None):
        """`conflicts`: ids left out while merging (see `merge_clips`), counted as "conflicting_id"."""
        conflicts = conflicts or {}
        counts: collections.Counter[str] = collections.Counter()
        if conflicts:
            counts["conflicting_id"] = len(conflicts)
        examples: dict[str, list[str]] = collections.defaultdict(list)
        for clip_id, problem in list(conflicts.items())[: audio_io.LOGGED_PER_REASON]:
            examples["conflicting_id"].append(problem)
            log.warning("%s/%s: skipping %s (conflicting_id): %s", self.name, split, clip_id, problem)
        blank = 0
        for clip, audio in zip(clips, self._decode([clip.audio for clip in clips])):
            if isinstance(audio, str):
                counts[audio] += 1
                if len(examples[audio]) < audio_io.LOGGED_PER_REASON:  # also kept in the metadata
                    where = clip.audio or clip.expected
                    examples[audio].append(f"{clip.id}: {where}")
                    log.warning("%s/%s: skipping %s (%s): %s", self.name, split, clip.id, audio, where)
                continue
            captions = [caption for caption in clip.captions if caption.strip()]  # a blank one describes nothing
            blank += len(clip.captions) - len(captions)
            yield clip.id, {
                "id": clip.id,
                "audio": audio,
                "captions": captions,
                "label": clip.label,
                "fold": clip.fold,
            }
        total = sum(counts.values())
        if total == len(clips) + len(conflicts):  # TFDS would abort with "No examples were yielded"
            example = next(iter(examples.values()))[0]
            raise _data_error(
                f"{self.name}/{split}: none of its {total} clips could be stored ({dict(counts)}; e.g. {example}); "
                f"check that these are the audio files the metadata names; expected layout:\n"
                f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
        if counts:
            log.warning(
                "%s/%s: skipped %d of %d clips: %s", self.name, split, total, len(clips) + len(conflicts), dict(counts)
            )
        if blank:
            log.warning("%s/%s: dropped %d blank captions of the stored clips", self.name, split, blank)
        self.info.metadata["skipped"][split] = dict(counts)
        self.info.metadata["skipped_examples"][split] = dict(examples)
        self.info.metadata["blank_captions"][split] = blank

    def _decode(self, paths: list[str]) -> Iterator[np.ndarray | str]:
        """`decode_to_16k_int16` of each path, in order; in the worker pool with a bounded queue if any."""
        if self._pool is None:
            yield from map(decode_to_16k_int16, paths)
            return
        pending: collections.deque[Future] = collections.deque()
        for path in paths:
            pending.append(self._pool.submit(decode_to_16k_int16, path))
            if len(pending) >= 32 * self.num_workers:
                yield pending.popleft().result()  # a crashed worker raises BrokenProcessPool here
        while pending:
            yield pending.popleft().result()


class AudioCaps(AudioTextBuilder, skip_registration=True):
    """AudioCaps (v1 or v2): captioned 10 s AudioSet clips; train has 1 caption per clip, val/test 5."""

    name = "audiocaps"
    HOMEPAGE = "https://audiocaps.github.io/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
audiocaps — the CSVs of https://github.com/cdjkim/audiocaps (dataset/ or dataset/v2/) and your audio:
    M/train.csv  M/val.csv  M/test.csv      audiocap_id,youtube_id,start_time,caption
    M/audio/**/{youtube_id}.{wav,flac,ogg,opus,mp3}   or  Y{youtube_id}.*  (any sub-folders)
  splits: train (train.csv), validation (val.csv), test (test.csv); clip id = youtube_id."""
    SPLIT_FILES = {"train": "train.csv", "validation": "val.csv", "test": "test.csv"}

    def read_clips(self, manual_dir):
        index = AudioIndex(manual_dir / "audio")
        clips = {}
        for split, filename in self.SPLIT_FILES.items():
            path = manual_dir / filename
            if not path.is_file():
                log.warning("audiocaps: %s not found, split %r left out", path, split)
                continue
            rows = read_csv(path, ("audiocap_id", "youtube_id", "start_time", "caption"))
            clips[split] = [index.youtube_clip(row["youtube_id"], row["caption"]) for _, row in rows]
        return clips


class Clotho(AudioTextBuilder, skip_registration=True):
    """Clotho v2.1: 15-30 s Freesound clips with 5 captions each."""

    name = "clotho"
    HOMEPAGE = "https://zenodo.org/records/4783391"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
clotho — Clotho v2.1 from Zenodo, the CSVs and the extracted 7z archives:
    M/clotho_captions_{development,validation,evaluation}.csv   file_name,caption_1,...,caption_5
        (also accepted under M/clotho_csv_files/)
    M/clotho_audio_{development,validation,evaluation}/{file_name}
        (also accepted: M/{development,...}/ as the archives extract, or M/clotho_audio_files/{development,...}/)
  splits: train (development), validation, test (evaluation); clip id = file_name."""
    SPLIT_FILES = {"train": "development", "validation": "validation", "test": "evaluation"}

    def read_clips(self, manual_dir):
        clips = {}
        columns = ("file_name",) + tuple(f"caption_{i}" for i in range(1, 6))
        for split, part in self.SPLIT_FILES.items():
            names = [f"clotho_captions_{part}.csv", f"clotho_csv_files/clotho_captions_{part}.csv"]
            if not any((manual_dir / name).is_file() for name in names):
                log.warning("clotho: clotho_captions_%s.csv not in %s, split %r left out", part, manual_dir, split)
                continue
            csv_path = find_path(manual_dir, names, f"Clotho {part} captions")
            folders = [manual_dir / name for name in (f"clotho_audio_{part}", part, f"clotho_audio_files/{part}")]
            # Without its folder every clip of the split is missing, and the split is left out with the others'
            # build going on (as a split of only the evaluation audio downloaded).
            audio_dir = next((folder for folder in folders if folder.is_dir()), folders[0])
            clips[split] = [  # empty caption columns are dropped and counted by _generate_examples
                file_clip(audio_dir / row["file_name"], row["file_name"], [row[c] for c in columns[1:]])
                for _, row in read_csv(csv_path, columns)
            ]
        return clips


class ESC50(AudioTextBuilder, skip_registration=True):
    """ESC-50: 2000 5 s environmental clips, 50 classes, 5 folds (zero-shot: average over folds)."""

    name = "esc50"
    HOMEPAGE = "https://github.com/karolpiczak/ESC-50"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
esc50 — the ESC-50 repository (master.zip of https://github.com/karolpiczak/ESC-50), extracted:
    M/meta/esc50.csv    filename,fold,target,category,esc10,src_file,take
    M/audio/{filename}
  split: train (all 2000 clips, with fold 1-5); label = category with "_" → " "; clip id = filename."""

    def read_clips(self, manual_dir):
        csv_path = find_path(manual_dir, ["meta/esc50.csv"], "ESC-50 metadata")
        columns = ("filename", "fold", "category")
        return {
            "train": [
                file_clip(
                    manual_dir / "audio" / row["filename"],
                    row["filename"],
                    [],
                    label=_readable_label(row["category"]),
                    fold=_int_field(row, "fold", csv_path, line),
                )
                for line, row in read_csv(csv_path, columns)
            ]
        }


class UrbanSound8K(AudioTextBuilder, skip_registration=True):
    """UrbanSound8K: 8732 ≤4 s urban clips, 10 classes, 10 folds (zero-shot: average over folds)."""

    name = "us8k"
    HOMEPAGE = "https://urbansounddataset.weebly.com/urbansound8k.html"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
us8k — UrbanSound8K.tar.gz, extracted (the UrbanSound8K/ folder):
    M/metadata/UrbanSound8K.csv   slice_file_name,fsID,start,end,salience,fold,classID,class
    M/audio/fold{1..10}/{slice_file_name}
  split: train (all 8732 clips, with fold 1-10); label = class with "_" → " "; clip id = slice_file_name."""

    def read_clips(self, manual_dir):
        csv_path = find_path(manual_dir, ["metadata/UrbanSound8K.csv"], "UrbanSound8K metadata")
        clips = []
        for line, row in read_csv(csv_path, ("slice_file_name", "fold", "class")):
            fold = _int_field(row, "fold", csv_path, line)
            clips.append(
                file_clip(
                    manual_dir / "audio" / f"fold{fold}" / row["slice_file_name"],
                    row["slice_file_name"],
                    [],
                    label=_readable_label(row["class"]),
                    fold=fold,
                )
            )
        return {"train": clips}


class VGGSound(AudioTextBuilder, skip_registration=True):
    """VGGSound: ~200k 10 s YouTube clips, 309 classes; zero-shot on the test split."""

    name = "vggsound"
    HOMEPAGE = "https://www.robots.ox.ac.uk/~vgg/data/vggsound/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
vggsound — vggsound.csv of https://www.robots.ox.ac.uk/~vgg/data/vggsound/ and your audio:
    M/vggsound.csv      youtube_id,start_seconds,label,split   (no header; split is train or test)
    M/audio/**/{youtube_id}_{start_seconds:06d}.{wav,flac,ogg,opus,mp3}
        (also accepted: {youtube_id}_{start_seconds}.*, {youtube_id}.*, Y{youtube_id}.*)
        Videos (.mp4) must be converted to audio first, e.g. ffmpeg -i X.mp4 -vn X.flac.
  splits: train, test; clip id = {youtube_id}_{start_seconds:06d}."""

    def read_clips(self, manual_dir):
        csv_path = find_path(manual_dir, ["vggsound.csv"], "VGGSound metadata")
        index = AudioIndex(manual_dir / "audio")
        clips: dict[str, list[Clip]] = {"train": [], "test": []}
        for line, row in read_csv(csv_path, ("youtube_id", "start_seconds", "label", "split"), header=False):
            if line == 1 and not row["start_seconds"].isdigit():
                continue  # a header row someone added
            start = _int_field(row, "start_seconds", csv_path, line)
            if row["split"] not in clips:
                raise ValueError(f"{csv_path}:{line}: split {row['split']!r} is neither 'train' nor 'test'")
            youtube_id = row["youtube_id"]
            clip_id = f"{youtube_id}_{start:06d}"
            names = [clip_id, f"{youtube_id}_{start}", *youtube_names(youtube_id)]
            clips[row["split"]].append(index.clip(clip_id, names, [], label=row["label"]))
        return clips


class AudioSetCaps(AudioTextBuilder, skip_registration=True):
    """AudioSetCaps: ~6M LLM-generated captions for AudioSet, VGGSound and YouTube-8M clips."""

    name = "audiosetcaps"
    HOMEPAGE = "https://huggingface.co/datasets/baijs/AudioSetCaps"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
audiosetcaps — the caption CSVs of huggingface.co/datasets/baijs/AudioSetCaps (folder Dataset/) and your audio:
    M/AudioSetCaps_caption.csv  M/VGGSound_AudioSetCaps_caption.csv  M/YouTube-8M_AudioSetCaps_caption.csv
        columns id,caption (at least one file; also accepted under M/Dataset/). Assumed id forms, as
        released: Y{youtube_id} (AudioSet), {youtube_id}_{start:06d} (VGGSound), {youtube_id}_{start}_{dur}
        (YouTube-8M).
    M/audio/**/{id}.{wav,flac,ogg,opus,mp3}   (also accepted: the id without/with a leading "Y")
  split: train (all files); clip id = id."""
    CSV_FILES = ("AudioSetCaps_caption.csv", "VGGSound_AudioSetCaps_caption.csv", "YouTube-8M_AudioSetCaps_caption.csv")

    def read_clips(self, manual_dir):
        index = AudioIndex(manual_dir / "audio")
        clips = []
        for filename in self.CSV_FILES:
            candidates = [manual_dir / filename, manual_dir / "Dataset" / filename]
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                log.warning("audiosetcaps: %s not found in %s or %s/Dataset", filename, manual_dir, manual_dir)
                continue
            clips += [index.youtube_clip(row["id"], row["caption"]) for _, row in read_csv(path, ("id", "caption"))]
        return {"train": clips} if clips else {}


class AutoACD(AudioTextBuilder, skip_registration=True):
    """Auto-ACD: ~1.9M generated captions for AudioSet and VGGSound clips."""

    name = "autoacd"
    HOMEPAGE = "https://auto-acd.github.io/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
autoacd — train.csv (and test.csv) of huggingface.co/datasets/Loie/Auto-ACD and your audio:
    M/train.csv  M/test.csv (optional)    youtube_id,caption
        Assumed id forms, as released: {youtube_id}_{start:06d} (VGGSound) and Y{youtube_id} (AudioSet).
    M/audio/**/{youtube_id}.{wav,flac,ogg,opus,mp3}   (also accepted: the id without/with a leading "Y")
  splits: train, test (when test.csv is present); clip id = the youtube_id column."""

    def read_clips(self, manual_dir):
        index = AudioIndex(manual_dir / "audio")
        clips = {}
        for split in ("train", "test"):
            path = manual_dir / f"{split}.csv"
            if path.is_file():
                rows = read_csv(path, ("youtube_id", "caption"))
                clips[split] = [index.youtube_clip(row["youtube_id"], row["caption"]) for _, row in rows]
        return clips


class ManifestBuilder(AudioTextBuilder, skip_registration=True):
    """Any JSONL manifest (see `sources.py`), one manifest per split, stored as 16 kHz int16 array_record."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
manifest mode — no manual directory; each split is a JSONL manifest (one clip a line):
    {"audio": "path relative to the manifest or absolute", "captions": ["..."], "label": "optional",
     "fold": 0, "id": "optional"}
  clip id = "id", else the audio path as written; lines with the same id are merged (captions joined;
  they must agree on audio, label and fold)."""

    def __init__(self, *, name: str, manifests: Mapping[str, str | os.PathLike], **kwargs):
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"data set name {name!r}: use lower-case letters, digits and '_' (e.g. my_clips)")
        if not manifests:
            raise ValueError("give at least one manifest")
        self.name = name
        self.manifests = {split: ManifestSource(path) for split, path in manifests.items()}  # validates now
        super().__init__(**kwargs)

    def prepare(self, manual_dir: str | None = None, *, compress: bool = False) -> None:
        """Build, or reuse a build of this name made from the same manifests (TFDS reuses any build of the
        name: one from other manifests would silently stand in for the requested ones, so it is refused)."""
        from wavlink_jax.convert.common import CheckpointError, read_json

        folder = Path(self.data_dir)
        if folder.exists():
            metadata = folder / "metadata.json"
            try:
                recorded = read_json(metadata).get("manifests") if metadata.exists() else None
            except CheckpointError as err:
                raise ValueError(f"{err}, or delete {folder} to build the data set again") from err
            if not _same_files(recorded, self._manifest_paths()):
                raise ValueError(
                    f"{folder} holds data set {self.name!r} built from manifests {recorded}, not the requested "
                    f"{self._manifest_paths()}; choose another name (--name), or delete {folder} to rebuild it "
                    "from these"
                )
        super().prepare(manual_dir, compress=compress)

    def _manifest_paths(self) -> dict[str, str]:
        return {split: str(source.path) for split, source in self.manifests.items()}

    def _split_generators(self, dl_manager):
        self._start_report()
        self.info.metadata["manifests"] = self._manifest_paths()
        splits = {
            split: (merge_clips(self._clips(source), f"manifest {source.path}"), {})
            for split, source in self.manifests.items()
        }
        return self._generators_with_audio(splits, ", ".join(str(source.path) for source in self.manifests.values()))

    @staticmethod
    def _clips(source: ManifestSource) -> Iterator[Clip]:
        for index in range(len(source)):
            record = source[index]
            yield Clip(record["id"], record["audio"], record["captions"], label=record["label"], fold=record["fold"])


def _same_files(recorded: Mapping[str, str] | None, requested: Mapping[str, str]) -> bool:
    """Whether a build's recorded manifests (`{split: path}`; None: none recorded) are the requested files, also
    when one of them is named through a symbolic link."""
    def resolve(paths: Mapping[str, str]) -> dict[str, str]:
        return {split: os.path.realpath(path) for split, path in paths.items()}

    return recorded is not None and resolve(recorded) == resolve(requested)


def _int_field(row: Mapping[str, str], column: str, path: Path, line: int) -> int:
    try:
        return int(row[column])
    except ValueError:
        raise ValueError(f"{path}:{line}: column {column!r} should be an integer, got {row[column]!r}") from None


BUILDERS: dict[str, type[AudioTextBuilder]] = {
    cls.name: cls for cls in (AudioCaps, Clotho, ESC50, UrbanSound8K, VGGSound, AudioSetCaps, AutoACD)
}
__doc__ += "\n" + "\n\n".join(cls.MANUAL_DOWNLOAD_INSTRUCTIONS for cls in (*BUILDERS.values(), ManifestBuilder))


# ----------------------------------------------------------------------------------------------------------
# Building and reading


def rewrite_uncompressed(folder: Path) -> None:
    """Rewrite the array_record shards in `folder` without compression (same records, same order).

    TFDS writes zstd-compressed records; PCM audio shrinks little under zstd (~10% on noisy clips) while
    decompression is most of the cost of a random read (3.3x slower than reading uncompressed records: BENCHMARKS.md).
    Shards already uncompressed are left alone, so this is safe to repeat. Each shard is written through a
    temporary file (`replaced`), so a stopped rewrite keeps the compressed shard; the temporary file a killed
    rewrite leaves (a dot file) is deleted here.
    """
    for path in sorted(folder.glob("*.array_record-*")):
        if path.name.startswith("."):  # `replaced`'s temporary file, left by a rewrite that was killed
            path.unlink()
            continue
        if not re.fullmatch(r".*\.array_record-\d+-of-\d+", path.name):
            continue  # no shard: e.g. the "<shard>.uncompressed-partial" of an earlier version's stopped rewrite
        reader = array_record_module.ArrayRecordReader(str(path))
        try:
            options = reader.writer_options_string()
            if options is None:  # a shard cut short or damaged: array_record finds no writer options in it
                raise OSError(f"{path}: not a readable ArrayRecord shard (cut short?); delete {folder} and build again")
            if "uncompressed" in options.split(","):
                continue
            with replaced(path) as partial:
                writer = array_record_module.ArrayRecordWriter(str(partial), "group_size:1,uncompressed")
                total = reader.num_records()
                for start in range(0, total, 256):
                    for record in reader.read(start, min(start + 256, total)):
                        writer.write(record)
                writer.close()
        except RuntimeError as err:  # array_record's errors: a full disk, a file-size limit, an unreadable shard
            raise OSError(
                f"{path}: rewriting this shard without compression failed ({err}); the shard is kept as TFDS wrote "
                "it. Free disk space (or raise the file-size limit) and run the same build again, which resumes "
                "the rewrite, or build with --compress (compress=True) to keep the compressed shards"
            ) from err
        finally:
            with contextlib.suppress(RuntimeError):  # a damaged shard's reader fails to close as well
                reader.close()


def build(
    name: str,
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    num_workers: int = 0,
    compress: bool = False,
) -> dict:
    """Prepare data set `name` from its official files in `manual_dir` into `data_dir`; return `summary`.

    `num_workers` > 0 decodes in that many processes; `compress` keeps TFDS's zstd-compressed records
    (smaller, slower to read). A data set already prepared in `data_dir` is reused.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(BUILDERS)} (or use build_manifest)")
    data_dir = os.path.expanduser(os.fspath(data_dir))
    manual_dir = Path(os.path.expanduser(os.fspath(manual_dir)))
    if not (manual_dir.is_dir() and any(manual_dir.iterdir())):  # TFDS: an AssertionError, and empty folders made
        state = "is empty" if manual_dir.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"{name}: the manual directory {manual_dir} {state}; expected layout:\n"
            f"{BUILDERS[name].MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )
    builder = BUILDERS[name](data_dir=data_dir, file_format="array_record", num_workers=num_workers)
    builder.prepare(os.fspath(manual_dir), compress=compress)
    return summary(name, data_dir)


def build_manifest(
    name: str,
    manifests: Mapping[str, str | os.PathLike] | str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    num_workers: int = 0,
    compress: bool = False,
) -> dict:
    """Prepare JSONL manifest(s) as data set `name` in `data_dir`: `{split: path}`, or one path (split "train").

    `num_workers` and `compress` as in `build`. A build of `name` already in `data_dir` is reused if it was made
    from the same manifest paths, and refused (ValueError naming both) if it was made from others.
    """
    if isinstance(manifests, (str, os.PathLike)):
        manifests = {"train": manifests}
    data_dir = os.path.expanduser(os.fspath(data_dir))
    builder = ManifestBuilder(
        name=name, manifests=manifests, data_dir=data_dir, file_format="array_record", num_workers=num_workers
    )
    builder.prepare(compress=compress)
    return summary(name, data_dir)


def prepared_path(name: str, data_dir: str | os.PathLike | None) -> Path:
    """The folder of the newest prepared version of `name` in `data_dir` (default: TFDS's data dir)."""
    root = Path(data_dir or tfds.core.constants.DATA_DIR).expanduser() / name
    versions = []
    for path in root.glob("*/dataset_info.json"):
        try:
            versions.append((tfds.core.Version(path.parent.name), path.parent))
        except ValueError:
            continue
    if not versions:
        raise FileNotFoundError(
            f"no prepared data set {name!r} in {root.parent}: build it first with "
            f"`python -m wavlink_jax.data.tfds_builders build {name} --manual-dir DIR --data-dir {root.parent}`"
            " (or the `manifest` command)"
        )
    return max(versions)[1]


def open_prepared(path: Path) -> tfds.core.DatasetBuilder:
    """TFDS's builder of the prepared data set in `path`; a damaged one (e.g. a metadata.json cut short) is a
    ValueError naming the folder, where TFDS's own error names no file."""
    try:
        builder = tfds.builder_from_directory(path)
        builder.info.metadata  # read lazily otherwise: at the first use, outside this check
        return builder
    except Exception as err:  # JSON, protobuf and TFDS errors alike: all mean the folder cannot be read
        raise ValueError(
            f"{path}: not a readable prepared data set ({type(err).__name__}: {err}); a file of it (dataset_info.json, "
            f"features.json or metadata.json) is damaged or cut short: delete {path} and build it again"
        ) from err


class PreparedSource:
    """One split of a prepared data set as a grain random-access source of `sources.Record`s (+ `fold`).

    `audio` is the stored 16 kHz int16 array (`sample_rate` 16000). Picklable: worker processes reopen the
    files. `build_skipped` holds what was left out when the split was built: clips by reason ({reason: count})
    and blank captions (`blank_captions`, when there were any), as an evaluation set's `skip_counts` counts them.
    """

    def __init__(self, path: str | os.PathLike, split: str):
        self.path = Path(path)
        self.split = split
        builder = open_prepared(self.path)
        base_split = split.split("[")[0]
        if base_split not in builder.info.splits:
            prepared = ", ".join(builder.info.splits)
            left_out = builder.info.metadata.get("splits_left_out", {}).get(base_split)
            if left_out:
                raise ValueError(
                    f"{self.path}: split {base_split!r} was left out when this data set was built: none of its "
                    f"{left_out['clips']} clips had an audio file (e.g. {left_out['example']}); prepared splits: "
                    f"{prepared}. Add its audio, delete {self.path} and build again"
                )
            raise ValueError(f"{self.path}: no split {split!r}; prepared splits: {prepared}")
        metadata = builder.info.metadata
        self.build_skipped = dict(metadata.get("skipped", {}).get(base_split, {}))
        if metadata.get("blank_captions", {}).get(base_split):
            self.build_skipped["blank_captions"] = metadata["blank_captions"][base_split]
        self._records = builder.as_data_source(split)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self._records):
            raise IndexError(f"{self!r}: index {index} out of range")
        record = self._records[index]
        return {
            "id": record["id"].decode("utf-8"),
            "audio": record["audio"],
            "sample_rate": audio_io.SAMPLE_RATE,
            "captions": [caption.decode("utf-8") for caption in record["captions"]],
            "label": record["label"].decode("utf-8"),
            "fold": int(record["fold"]),
        }

    def __getstate__(self) -> dict:
        return {"path": self.path, "split": self.split}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["split"])

    def __repr__(self) -> str:
        return f"PreparedSource({str(self.path)!r}, split={self.split!r}, {len(self)} clips)"


def load_source(name: str, data_dir: str | os.PathLike | None, split: str) -> PreparedSource:
    """Split `split` (TFDS slicing such as "train[:10%]" allowed) of the prepared data set `name`."""
    return PreparedSource(prepared_path(name, data_dir), split)


def summary(name: str, data_dir: str | os.PathLike | None) -> dict:
    """Path, clips per split, skipped clips per split and reason, blank captions dropped per split, and the
    splits left out because none of their clips had an audio file ({split: {"clips": n, "example": ...}})."""
    path = prepared_path(name, data_dir)
    info = open_prepared(path).info
    return {
        "name": name,
        "path": str(path),
        "splits": {split: info.splits[split].num_examples for split in info.splits},
        "skipped": info.metadata.get("skipped", {}),
        "blank_captions": info.metadata.get("blank_captions", {}),
        "splits_left_out": info.metadata.get("splits_left_out", {}),
    }


# ----------------------------------------------------------------------------------------------------------
# Command line


def _parse_manifest_argument(value: str) -> tuple[str, str]:
    split, sep, path = value.partition("=")
    return (split, path) if sep and re.fullmatch(r"\w+", split) else ("train", value)


def _manifests_by_split(arguments: Sequence[str]) -> dict[str, str]:
    """`--manifest [SPLIT=]PATH` arguments → {split: path}; a split given twice is refused (the last one silently
    replaced the first)."""
    manifests: dict[str, str] = {}
    for split, path in map(_parse_manifest_argument, arguments):
        if split in manifests:
            raise ValueError(
                f"--manifest: split {split!r} is given twice ({manifests[split]} and {path}); one manifest per split "
                "(merge the two files into one, or give one another split name with SPLIT=PATH)"
            )
        manifests[split] = path
    return manifests


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m wavlink_jax.data.tfds_builders",
        description="Prepare audio–text data sets as 16 kHz int16 array_record files (TFDS, no TensorFlow).",
        epilog="Manual directory layouts: python -c 'import wavlink_jax.data.tfds_builders as m; help(m)'",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    official = commands.add_parser("build", help="an official data set from its manual directory")
    official.add_argument("name", choices=sorted(BUILDERS))
    official.add_argument("--manual-dir", required=True, help="the official files, laid out as documented")
    manifest = commands.add_parser("manifest", help="JSONL manifest(s) as one data set")
    manifest.add_argument("--manifest", action="append", required=True, metavar="[SPLIT=]PATH",
                          help="a manifest; repeat with SPLIT=PATH for several splits (default split: train)")
    manifest.add_argument("--name", required=True, help="data set name (lower case, digits, _)")
    for command in (official, manifest):
        command.add_argument("--data-dir", required=True, help="where the array_record files go")
        command.add_argument("--num-workers", type=int, default=os.cpu_count() or 1, help="decoding processes")
        command.add_argument("--compress", action="store_true",
                             help="keep zstd-compressed records (smaller on disk, ~3x slower reads)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from wavlink_jax import cli  # here: importing the module stays light (grain workers do)

    with cli.user_errors():
        if args.command == "build":
            result = build(
                args.name, args.manual_dir, args.data_dir, num_workers=args.num_workers, compress=args.compress
            )
        else:
            manifests = _manifests_by_split(args.manifest)
            result = build_manifest(
                args.name, manifests, args.data_dir, num_workers=args.num_workers, compress=args.compress
            )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
