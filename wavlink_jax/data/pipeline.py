"""The grain input pipeline: training batches (checkpointable iterator) and evaluation sets.

Training (`make_train_iterator`), built on grain's `MapDataset`/`IterDataset` API, whose iterators have
`get_state()` / `set_state()` (JSON-serialisable dicts). `TrainIterator` is a `grain.DatasetIterator`, so
orbax saves it with `grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)`:

    per source: records → shuffle (a fresh permutation every epoch) → repeat (num_epochs, None = forever)
    → mixture of the sources by weight (grain mix: deterministic interleaving in proportion to the weights)
    → per example, seeded by its position in that global stream: decode → mono → resample to 16 kHz (soxr)
      → random crop to `window_seconds` → zero-pad short clips → one random caption
    → this host's share (b = `global_batch_size // process_count`): from every run of `global_batch_size`
      examples, the `process_index`-th block of b
    → [worker processes: each takes every `num_workers`-th example of the host's share]
    → fill batches of b good examples → tokenize
    → `TrainIterator` (sums the skip counts, drops a last partial batch)

A source's weight defaults to `"size"`, its number of records: every source is then drawn in proportion to its
size (grain interleaves the sources' own shuffles in these proportions, so every stretch of the stream, a batch
too, holds them in about this ratio), and an epoch of the stream (the records of all sources) is an epoch of
every source (the trainer's `epochs` counts that way). An explicit number is a relative
weight on the same scale (a source of weight w is drawn as often as one of w records at "size"), which over- or
under-samples it. grain rounds the weights to integers with the smallest at 100, so the shares are exact to
within 1%. With a finite `num_epochs`, a mixture ends when its first source runs out (grain mix).

Bad input: a record whose audio is missing/empty/truncated/not audio/non-finite/too short, or that has no
captions (blank captions are dropped first), becomes a "skipped" marker instead of an example. Batches are
filled with the next good examples, and
every batch carries the number of records skipped, by reason, while it was filled. Those per-batch counts
are exact whichever process filled the batch (each record is seen by exactly one worker), so the main
process only has to add them up: `TrainIterator.skip_counts` is the running total (part of the iterator
state, so it survives a resume) and `TrainIterator.last_skip_counts` the counts of the latest batch; the
trainer logs them as `data/skipped/<reason>`. Each skip is also logged (the first 20 per process and
reason at WARNING, with the file name and the problem; the rest at DEBUG). A source that yields only bad
records (say a manifest whose audio paths are wrong) would make an endless stream fill forever: after
`max_consecutive_skips` skips in a row of one source, the process that fills batches raises `DataError`
naming that source (a worker process's error is re-raised in the training process). Runs are counted per
source, so a broken source in a mixture is caught although the other sources' good records come between its
bad ones. A run counts the records of its source that one filling process reads (the host's share; with
workers, every `num_workers`-th record of it), so it is deterministic; runs can span batches and are part of
the iterator state.

A resumed iterator (`set_state`) yields exactly the batches the original would have; the same holds for a
fresh iterator with the same config, seed and process layout. The random crop and caption of an example
depend only on (seed, its position in the global stream), never on `process_count`; with `num_workers=0`,
the hosts' batches n, concatenated in process order, are the single-host batch n row for row (so a run
computes the same global batches on any number of hosts), unless a skip shifted the filling.
Changing `num_workers` changes which examples share a batch (deterministically), so resume with the same
`num_workers` (`set_state` refuses a position saved with another count: `WorkersMismatch`).

Batches are dicts of numpy arrays: `waveform` float32 (b, window_samples), `input_ids` int32 (b, L),
`attention_mask` int32 (b, L). `to_global_batch` turns a host's batch into global `jax.Array`s sharded over
the mesh's batch axes.

Evaluation (`make_eval_set`): every clip of one source in order, head-cropped to the window (or whole), all
captions kept, labels, and `text_to_audio` (caption i → its clip), with the skips counted; a source without one usable
clip is a `DataError`. A manifest's lines that share an id are one clip (`ManifestSource.clips()`).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import math
import numbers
import os
import zlib
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import grain
import numpy as np

from wavlink_jax.data.audio_io import LOGGED_PER_REASON, SAMPLE_RATE, SKIP_REASONS, BadAudio, load_audio, samples
from wavlink_jax.data.sources import ManifestSource, Source, open_source

if TYPE_CHECKING:
    import jax
    import ml_collections

# Captions → (input_ids, attention_mask), each (N, L) int32: `wavlink_jax.tokenizer.Tokenizer` or any such callable.
CaptionTokenizer = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]

logger = logging.getLogger(__name__)
_logged = collections.Counter()
SIZE_WEIGHT = "size"  # a source's default mixture weight: its number of records


@dataclasses.dataclass
class DataConfig:
    """The `config.data` schema (see `default_data_config`).

    sources          list of source specs, each a dict with "kind" and an optional mixture "weight":
                     {"kind": "manifest", "path": "train.jsonl"} or
                     {"kind": "tfds", "name": "clotho", "data_dir": "...", "split": "train", "weight": 2000}.
                     weight: "size" (the default: its number of records, so every source is drawn in
                     proportion to its size and an epoch is an epoch of every source) or a positive number
                     (relative to the others' weights, a "size" counting as that source's number of records)
    window_seconds   training crop (random) / evaluation crop (head) length; shorter clips are zero-padded
    min_seconds      clips shorter than this are skipped as "too_short"
    sample_rate      the rate everything is resampled to: Whisper's 16000, the only one the audio tower's log-mel
                     takes (any other is refused)
    tokenizer        directory of the tokenizer (see wavlink_jax.tokenizer.load_tokenizer)
    max_text_length  token sequence length L (captions are cut / padded to it)
    num_workers      grain worker processes per host (0 = decode in the training process)
    read_threads     threads per process that read and decode examples ahead
    prefetch_buffer  examples each process decodes ahead (memory: prefetch_buffer × window × 4 bytes)
    worker_buffer    batches each worker process keeps ready
    max_consecutive_skips
                     stop with a DataError after this many bad records in a row of one source while filling
                     batches (counted per source, and per worker share with workers; 0 = no limit). A shuffled
                     source trips the default only when nearly all of it is bad (a run of 1000 needs about 98%
                     bad records).

    There is no shuffle buffer: grain shuffles a random-access source with a full permutation per epoch.
    """

    sources: list = dataclasses.field(default_factory=list)
    window_seconds: float = 10.0
    min_seconds: float = 0.5
    sample_rate: int = SAMPLE_RATE
    tokenizer: str = ""
    max_text_length: int = 77
    num_workers: int = 0
    read_threads: int = 4
    prefetch_buffer: int = 64
    worker_buffer: int = 2
    max_consecutive_skips: int = 1000

    # The counts' smallest values: below them grain or the tokenizer failed in their own words, or -1 workers
    # silently meant none.
    COUNT_MINIMUMS = {
        "max_text_length": 2, "num_workers": 0, "read_threads": 1, "prefetch_buffer": 0, "worker_buffer": 1,
        "max_consecutive_skips": 0,
    }

    def __post_init__(self):
        check_crop(self.window_seconds, self.min_seconds, where="data.")
        for name, least in self.COUNT_MINIMUMS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"data.{name} = {value!r}: give a whole number ≥ {least}")
        if self.sample_rate != SAMPLE_RATE:
            raise ValueError(
                f"data.sample_rate = {self.sample_rate}: the audio tower's log-mel takes {SAMPLE_RATE} Hz audio (audio "
                "at another rate is resampled to it when decoded); leave it at its default"
            )

    @classmethod
    def coerce(cls, config: Any) -> "DataConfig":
        """A DataConfig from a DataConfig, an ml_collections.ConfigDict or a plain mapping; unknown keys are errors."""
        if isinstance(config, cls):
            return config
        values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown data config keys {unknown}; known: {[f.name for f in dataclasses.fields(cls)]}")
        values["sources"] = [source_spec(s) for s in values.get("sources", [])]
        return cls(**values)

    @property
    def window_samples(self) -> int:
        return samples(self.window_seconds, self.sample_rate)

    @property
    def min_samples(self) -> int:
        return samples(self.min_seconds, self.sample_rate)


def source_spec(spec: Any) -> Any:
    """A source spec as a plain dict: an `ml_collections.ConfigDict` (not a Mapping; a config file may put one in
    `config.data.sources`) or another mapping is copied into one, so its keys (e.g. `weight`) are read like a
    dict's; a manifest path is returned as it is."""
    if hasattr(spec, "to_dict"):
        return spec.to_dict()
    return dict(spec) if isinstance(spec, Mapping) else spec


def default_data_config() -> ml_collections.ConfigDict:
    """`DataConfig`'s defaults as an `ml_collections.ConfigDict`, for `configs/*.py` (`config.data = ...`).
    `sources` is a tuple: `--config.data.sources=...` can override a tuple, not a list."""
    import ml_collections

    return ml_collections.ConfigDict({**dataclasses.asdict(DataConfig()), "sources": ()})


def _derive_seed(seed: int, *names: object) -> int:
    """A 32-bit seed for one random stage, from the run seed and the stage's name."""
    return zlib.crc32(repr((seed,) + names).encode())


class DataError(ValueError):
    """A source that cannot feed training or evaluation: the message names it, an example and what to do."""


def _describe_source(spec: Mapping[str, Any] | str | os.PathLike) -> tuple[str, str | None]:
    """A source spec's short name for error messages (never the repr of in-memory records) and its
    `python -m wavlink_jax.data check ...` line (None for an in-memory source)."""
    if isinstance(spec, (str, os.PathLike)):
        spec = {"kind": "manifest", "path": spec}
    kind = spec.get("kind", "manifest")
    if kind == "manifest":
        return f"manifest {spec.get('path')}", f"python -m wavlink_jax.data check {spec.get('path')}"
    if kind == "tfds":
        data_dir = f" --data-dir {spec['data_dir']}" if spec.get("data_dir") else ""
        return (
            f"tfds data set {spec.get('name')} (split {spec.get('split')}, data_dir {spec.get('data_dir')})",
            f"python -m wavlink_jax.data check {spec.get('name')}{data_dir} --split {spec.get('split')}",
        )
    return "in-memory source", None


def _source_advice(spec: Mapping[str, Any] | str | os.PathLike) -> str:
    """Names a source and how to find its bad records (its `check` command line), for error messages."""
    name, command = _describe_source(spec)
    if command is None:
        return f"Check the audio of the records of the {name}."
    return f"Check the {name} with `{command}`."


def _skip(reason: str, message: str, source: int | None) -> dict:
    _logged[reason] += 1
    level = logging.WARNING if _logged[reason] <= LOGGED_PER_REASON else logging.DEBUG
    logger.log(level, "skipped (%s): %s", reason, message)
    return {"skip": reason, "message": f"{reason}: {message}", "source": source}


@dataclasses.dataclass(frozen=True)
class _TagSource:
    """Marks a training record with its source's index in the mixture (for per-source skip runs). Picklable."""

    index: int

    def __call__(self, record: Mapping[str, Any]) -> dict:
        return {**record, "source": self.index}


@dataclasses.dataclass(frozen=True)
class _PrepareExample:
    """record → {"waveform", "caption", "source"} (training) / {"id", "waveform", "captions", "label", "fold"}
    (evaluation), or {"skip": reason, "message", "source"}. Picklable, for grain workers."""

    window_samples: int | None  # None: the whole clip (see `load_audio`)
    min_samples: int
    sample_rate: int
    train: bool
    require_captions: bool = True

    def __call__(self, record: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
        captions = [caption for caption in record["captions"] if caption.strip()]  # a blank one describes nothing
        if self.require_captions and not captions:
            blank = f" ({len(record['captions'])} blank)" if len(record["captions"]) else ""
            return _skip("no_captions", f"{record['id']}: no captions{blank}", record.get("source"))
        try:
            waveform = load_audio(
                record["audio"],
                record["sample_rate"],
                window_samples=self.window_samples,
                min_samples=self.min_samples,
                rng=rng if self.train else None,
                target_rate=self.sample_rate,
                array_name=record["id"],  # a prepared (TFDS) record's audio is an array
            )
        except BadAudio as err:
            return _skip(err.reason, str(err), record.get("source"))
        if self.train:
            return {"waveform": waveform, "caption": captions[int(rng.integers(len(captions)))], "source": record["source"]}
        return {
            "id": record["id"],
            "waveform": waveform,
            "captions": captions,
            "blank_captions": len(record["captions"]) - len(captions),
            "label": record["label"],
            "fold": int(record.get("fold", 0)),
        }


def _skip_vector(elements: Sequence[dict]) -> np.ndarray:
    counts = collections.Counter(e["skip"] for e in elements)
    return np.array([counts[reason] for reason in SKIP_REASONS], dtype=np.int64)


def _skip_summary(counts: Mapping[str, int]) -> str:
    """`reason: count, ...` of skip counts by reason (in SKIP_REASONS order), for error messages."""
    return ", ".join(f"{reason}: {counts[reason]}" for reason in SKIP_REASONS if counts.get(reason))


class _FillBatchesIterator(grain.DatasetIterator):
    def __init__(
        self,
        parent: grain.DatasetIterator,
        batch_size: int,
        window_samples: int,
        tokenizer: CaptionTokenizer | None,
        max_consecutive_skips: int,
        sources: Sequence[tuple[str, str]],
    ):
        super().__init__(parent)
        self._batch_size = batch_size
        self._window_samples = window_samples
        self._tokenizer = tokenizer
        self._max_consecutive_skips = max_consecutive_skips
        self._sources = sources
        # Per source: None, or the run of skips since its last good record ({"reasons": {reason: n}, "last": message}).
        self._runs: list[dict | None] = [None] * len(sources)

    def __next__(self) -> dict:
        good, skipped = [], []
        while len(good) < self._batch_size:
            try:
                element = next(self._parent)
            except StopIteration:
                if not good and not skipped:
                    raise
                break  # the end of a finite stream: a partial (possibly empty) batch that carries the counts
            source = element["source"]
            if "skip" not in element:
                good.append(element)
                self._runs[source] = None
                continue
            skipped.append(element)
            run = self._runs[source] = self._runs[source] or {"reasons": {}, "last": ""}
            run["reasons"][element["skip"]] = run["reasons"].get(element["skip"], 0) + 1
            run["last"] = element["message"]
            # At or past the limit: a resumed run with a lower limit than the saved run's would never equal it.
            if self._max_consecutive_skips and sum(run["reasons"].values()) >= self._max_consecutive_skips:
                self._too_many_skips(source)
        batch = {
            "waveform": np.stack([e["waveform"] for e in good]) if good else np.zeros((0, self._window_samples), np.float32),
            "skipped": _skip_vector(skipped),
        }
        if self._tokenizer is not None:
            batch["input_ids"], batch["attention_mask"] = self._tokenizer([e["caption"] for e in good])
        return batch

    def _too_many_skips(self, source: int) -> None:
        run = self._runs[source]
        name, advice = self._sources[source]
        raise DataError(
            f"{self._max_consecutive_skips} records in a row of the {name} were skipped while filling training "
            f"batches ({_skip_summary(run['reasons'])}); the last: {run['last']}. The source is likely unusable "
            f"(e.g. a manifest whose audio paths are wrong). {advice} If the data really has such runs of bad "
            f"records, raise the limit with --config.data.max_consecutive_skips=N (0 = no limit)."
        )

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "skip_runs": copy.deepcopy(self._runs)}

    def set_state(self, state: dict) -> None:
        if "skip_runs" not in state:  # written before runs were counted per source: its parent's state alone
            state = {"parent": state, "skip_runs": [None] * len(self._sources)}
        self._parent.set_state(state["parent"])
        self._runs = copy.deepcopy(state["skip_runs"])


class _FillBatches(grain.IterDataset):
    """Batches of `batch_size` good examples (skips do not take a slot), tokenized, with per-batch skip counts;
    `max_consecutive_skips` (> 0) skips in a row of one source raise DataError naming it. `sources`: per
    source, its name and advice (see `_describe_source`, `_source_advice`)."""

    def __init__(
        self,
        parent: grain.IterDataset,
        batch_size: int,
        window_samples: int,
        tokenizer: CaptionTokenizer | None,
        max_consecutive_skips: int,
        sources: Sequence[tuple[str, str]],
    ):
        super().__init__(parent)
        self._args = (batch_size, window_samples, tokenizer, max_consecutive_skips, sources)

    def __iter__(self) -> _FillBatchesIterator:
        return _FillBatchesIterator(self._parent.__iter__(), *self._args)


class WorkersMismatch(DataError):
    """A data position restored into an iterator with another number of worker processes than the one that saved
    it: grain keeps one position per worker, so it cannot be carried over (grain failed with a bare KeyError or
    IndexError). `saved` and `current` are the two counts."""

    def __init__(self, saved: int, current: int):
        self.saved, self.current = saved, current
        super().__init__(
            f"the data position was saved with num_workers={saved}, this iterator has num_workers={current}; a "
            f"position belongs to its number of worker processes: restore it with data.num_workers={saved}"
        )


class PositionUnreadable(DataError):
    """A saved data position whose layout is not one `TrainIterator.get_state` writes (a damaged or hand-edited
    file): a key or entry missing, or of another type."""


def saved_num_workers(state: Mapping[str, Any]) -> int:
    """The number of worker processes that saved a `TrainIterator` state; a state written before it was recorded
    tells by its shape: grain's multiprocessing prefetch keeps one iterator state per worker."""
    if "num_workers" in state:
        return int(state["num_workers"])
    workers = state["pipeline"].get("iterators_in_use_states")
    return 0 if workers is None else len(workers)


class TrainIterator(grain.DatasetIterator):
    """Training batches; `skip_counts` / `last_skip_counts` report bad input; `get_state`/`set_state` resume."""

    def __init__(self, parent: grain.DatasetIterator, batch_size: int, drop_remainder: bool, num_workers: int):
        super().__init__(parent)
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder
        self._num_workers = num_workers
        self._total = np.zeros(len(SKIP_REASONS), np.int64)
        self._last = np.zeros(len(SKIP_REASONS), np.int64)

    def __next__(self) -> dict[str, np.ndarray]:
        self._last = np.zeros(len(SKIP_REASONS), np.int64)
        while True:
            batch = next(self._parent)  # StopIteration ends a finite stream; counts so far are kept
            counts = batch.pop("skipped")
            self._last += counts
            self._total += counts
            if len(batch["waveform"]) == self._batch_size or (batch["waveform"].size and not self._drop_remainder):
                return batch

    @property
    def skip_counts(self) -> dict[str, int]:
        """Records skipped so far (since the start of the run, across resumes), by reason."""
        return dict(zip(SKIP_REASONS, map(int, self._total)))

    @property
    def last_skip_counts(self) -> dict[str, int]:
        """Records skipped while filling the latest batch, by reason."""
        return dict(zip(SKIP_REASONS, map(int, self._last)))

    def get_state(self) -> dict:
        return {"pipeline": self._parent.get_state(), "skip_counts": self.skip_counts, "num_workers": self._num_workers}

    def set_state(self, state: dict) -> None:
        """Move to a position `get_state` returned; one saved with another `num_workers` is a `WorkersMismatch`, one
        of another layout `PositionUnreadable`."""
        try:  # this iterator's own keys (what grain's iterators below make of theirs is theirs to say)
            saved = saved_num_workers(state)
            parent_state = state["pipeline"]
            total = np.array([state["skip_counts"].get(r, 0) for r in SKIP_REASONS], np.int64)
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise PositionUnreadable(f"not a data position this pipeline saves ({type(err).__name__}: {err})") from err
        if saved != self._num_workers:
            raise WorkersMismatch(saved, self._num_workers)
        self._parent.set_state(parent_state)
        self._total, self._last = total, np.zeros(len(SKIP_REASONS), np.int64)


class _HostShare(grain.MapDataset):
    """Host `index` of `count`: from every `count × block` consecutive examples, the `index`-th run of `block`
    (with `block` = the host's batch: host batch n holds rows `[index·block, (index+1)·block)` of global batch n)."""

    def __init__(self, parent: grain.MapDataset, block: int, index: int, count: int):
        super().__init__(parent)
        self._block, self._index, self._count = block, index, count
        rounds, rest = divmod(len(parent), block * count)
        self._length = rounds * block + min(max(rest - index * block, 0), block)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        round_, offset = divmod(index, self._block)
        return self._parent[(round_ * self._count + self._index) * self._block + offset]


class _Train(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, batch_size: int, drop_remainder: bool, num_workers: int):
        super().__init__(parent)
        self._args = (batch_size, drop_remainder, num_workers)

    def __iter__(self) -> TrainIterator:
        return TrainIterator(self._parent.__iter__(), *self._args)


def _mark_absl_flags_parsed() -> None:
    """grain worker processes read absl flags; outside `absl.app.run` they must be marked parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return process_index, process_count


def _open_sources(specs: Sequence[Any]) -> list[tuple[Source, float]]:
    """Each spec's source and its mixture weight, `"size"` (the default) resolved to the source's number of records."""
    if not specs:
        raise ValueError("data config has no sources; set config.data.sources = [{'kind': 'manifest', 'path': ...}]")
    opened = []
    for spec in map(source_spec, specs):
        source = open_source(spec)
        weight = spec.get("weight", SIZE_WEIGHT) if isinstance(spec, Mapping) else SIZE_WEIGHT
        name = _describe_source(spec)[0]
        if not len(source):
            raise DataError(f"{name} holds no records; remove it from config.data.sources or fill it")
        if weight == SIZE_WEIGHT:
            weight = len(source)
        elif isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 < weight < math.inf:
            raise ValueError(
                f'{name}: weight must be "{SIZE_WEIGHT}" (its number of records, the default) or a positive number, '
                f"got {weight!r}"
            )
        opened.append((source, float(weight)))
    return opened


def build_train_dataset(
    config: DataConfig | Any,
    *,
    tokenizer: CaptionTokenizer | None,
    batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = True,
) -> grain.IterDataset:
    """The training pipeline of one host as a grain IterDataset (see the module docstring).

    `batch_size` is this host's batch. `tokenizer=None` leaves out `input_ids`/`attention_mask` (audio only, as in `scripts/benchmark_data.py`).
    """
    config = DataConfig.coerce(config)
    parts = []
    for index, (source, weight) in enumerate(_open_sources(config.sources)):
        ds = grain.MapDataset.source(source).shuffle(seed=_derive_seed(seed, "shuffle", index)).map(_TagSource(index))
        parts.append((ds.repeat(num_epochs), weight))
    ds = parts[0][0] if len(parts) == 1 else grain.MapDataset.mix([p for p, _ in parts], [w for _, w in parts])
    prepare = _PrepareExample(config.window_samples, config.min_samples, config.sample_rate, train=True)
    ds = ds.random_map(prepare, seed=_derive_seed(seed, "examples"))
    ds = _HostShare(ds, batch_size, process_index, process_count)
    read = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.prefetch_buffer)
    sources = [(_describe_source(spec)[0], _source_advice(spec)) for spec in config.sources]
    batches = _FillBatches(
        ds.to_iter_dataset(read), batch_size, config.window_samples, tokenizer, config.max_consecutive_skips, sources
    )
    if config.num_workers > 0:
        _mark_absl_flags_parsed()
        options = grain.MultiprocessingOptions(num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer)
        batches = batches.mp_prefetch(options)
    return _Train(batches, batch_size, drop_remainder, max(config.num_workers, 0))


def make_train_iterator(
    data_config: DataConfig | Any,
    *,
    global_batch_size: int,
    seed: int,
    tokenizer: CaptionTokenizer | None = None,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainIterator:
    """This host's training batches (`global_batch_size // process_count` rows each), as a TrainIterator.

    `tokenizer` defaults to `load_tokenizer(data_config.tokenizer, max_text_length)`. `process_index` /
    `process_count` default to jax's (the trainer passes `wavlink_jax.sharding.process_batch_share(mesh)`,
    which is jax's on a mesh whose batch axes span the processes). `num_epochs=None` repeats forever. Close it
    (`it.close()`) when done if it uses worker processes.
    """
    config = DataConfig.coerce(data_config)
    process_index, process_count = _process_layout(process_index, process_count)
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by the {process_count} processes")
    if tokenizer is None:
        if not config.tokenizer:
            raise ValueError("no tokenizer: pass tokenizer=... or set config.data.tokenizer to a tokenizer directory")
        from wavlink_jax.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config.tokenizer, max_length=config.max_text_length)
    dataset = build_train_dataset(
        config,
        tokenizer=tokenizer,
        batch_size=global_batch_size // process_count,
        seed=seed,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
    )
    return iter(dataset)


def to_global_batch(
    local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh, batch_axes: str | Sequence[str] | None = None
) -> dict:
    """This host's batch → global `jax.Array`s, dimension 0 sharded over the mesh's `batch_axes` (default: the
    train step's, `wavlink_jax.sharding.BATCH_AXES`).

    Every host passes the rows of its share (`wavlink_jax.sharding.process_batch_share`, the share the trainer
    reads): in share order, they form the global batch.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from wavlink_jax.sharding import BATCH_AXES, process_batch_share

    batch_axes = BATCH_AXES if batch_axes is None else batch_axes
    axes = batch_axes if isinstance(batch_axes, str) else tuple(batch_axes)
    sharding = NamedSharding(mesh, PartitionSpec(axes))
    _, shares = process_batch_share(mesh, axes)
    return {
        key: jax.make_array_from_process_local_data(sharding, value, (len(value) * shares, *value.shape[1:]))
        for key, value in local_batch.items()
    }


@dataclasses.dataclass
class EvalSet:
    """A retrieval / zero-shot evaluation set, in source order (skipped clips left out).

    waveforms (num_clips, window_samples) float32 head crops, or a list of whole float32 clips (made with
    `window_seconds=None`); captions flat over the clips, with
    text_to_audio[i] = index of caption i's clip; labels per clip ("" if none); folds per clip when the
    source has them (ESC-50, US8K: records with a non-zero "fold"), else None. skip_counts: the clips skipped, by
    reason (SKIP_REASONS), and "blank_captions": the blank captions dropped from the kept clips.
    """

    ids: list[str]
    waveforms: np.ndarray | list[np.ndarray]
    captions: list[str]
    text_to_audio: np.ndarray
    labels: list[str]
    folds: np.ndarray | None
    skip_counts: dict[str, int]

    def __len__(self) -> int:
        return len(self.ids)


@dataclasses.dataclass(frozen=True)
class _CheckRecord:
    """record → {"seconds": the whole clip's length, "captions"} or a skip marker, the audio left behind (only
    the verdict crosses from a worker process). Picklable, for grain workers."""

    prepare: _PrepareExample  # with window_samples=None: the whole clip

    def __call__(self, record: Mapping[str, Any]) -> dict:
        prepared = self.prepare(record)
        if "skip" in prepared:
            return prepared
        return {"seconds": len(prepared["waveform"]) / self.prepare.sample_rate, "captions": prepared["captions"]}


def check_records(
    source: Source,
    *,
    min_seconds: float,
    sample_rate: int = SAMPLE_RATE,
    num_workers: int = 0,
    read_threads: int = 4,
) -> grain.DatasetIterator:
    """Every record of an opened `source` (`open_source(spec)`) in order, its whole clip decoded (a training crop
    can miss a damaged part, so this finds what any epoch could skip): {"seconds", "captions"} or
    {"skip": reason, "message"}. A clip without captions is decoded too (classification sets have none; training
    skips them): its "captions" are empty. For `python -m wavlink_jax.data check`; close the iterator when done
    if `num_workers` > 0."""
    whole_clips = _PrepareExample(
        None, samples(min_seconds, sample_rate), sample_rate, train=False, require_captions=False
    )
    records = grain.MapDataset.source(source).map(_CheckRecord(whole_clips))
    checked = records.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads))
    if num_workers > 0:
        _mark_absl_flags_parsed()
        checked = checked.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(checked)


def check_crop(window_seconds: float, min_seconds: float, where: str = "") -> None:
    """A crop window > 0 s and a minimum clip length ≥ 0 s (`where` prefixes the names in the error): a negative
    window failed deep in numpy and a zero one gave empty waveforms."""
    if not window_seconds > 0 or not min_seconds >= 0:
        raise ValueError(
            f"{where}window_seconds = {window_seconds}, {where}min_seconds = {min_seconds}: the window must be "
            "more than 0 s and the minimum length at least 0 s"
        )


def check_count_limit(name: str, limit: int | None) -> None:
    """A "keep the first N" limit (`max_clips`, `max_questions`) is None (keep all) or ≥ 1: a slice by 0 would keep
    nothing and one by -1 silently drop the last item."""
    if limit is not None and limit < 1:
        raise ValueError(f"{name}={limit}: give a number ≥ 1 of items to keep, or None to keep every one")


def make_eval_set(
    source: Mapping[str, Any] | str | os.PathLike,
    *,
    window_seconds: float | None,
    min_seconds: float = 0.0,
    sample_rate: int = SAMPLE_RATE,
    require_captions: bool = True,
    max_clips: int | None = None,
    read_threads: int = 4,
) -> EvalSet:
    """Decode every clip of `source` (a spec as in DataConfig.sources, or a manifest path) for evaluation.

    `require_captions=False` keeps clips without captions (zero-shot classification sets such as ESC-50).
    A manifest's lines that share an id are one clip with all their captions (AudioCaps-style manifests have a
    line per caption); `max_clips` counts merged clips. `window_seconds=None` keeps every clip whole (a list of
    arrays). Memory: num_clips × window_seconds (or the clips' mean length) × sample_rate × 4 bytes.
    """
    check_count_limit("max_clips", max_clips)
    check_crop(math.inf if window_seconds is None else window_seconds, min_seconds)  # None: no crop
    records = open_source(source)
    if isinstance(records, ManifestSource):
        records = records.clips()
    data = grain.MapDataset.source(records)
    if max_clips is not None:
        data = data[:max_clips]
    window = None if window_seconds is None else samples(window_seconds, sample_rate)
    prepare = _PrepareExample(window, samples(min_seconds, sample_rate), sample_rate, train=False, require_captions=require_captions)
    elements = list(data.map(prepare).to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64)))
    good = [e for e in elements if "skip" not in e]
    skipped = [e for e in elements if "skip" in e]
    skip_counts = dict(zip(SKIP_REASONS, map(int, _skip_vector(skipped))))
    skip_counts["blank_captions"] = sum(e["blank_captions"] for e in good)
    for reason, count in getattr(records, "build_skipped", {}).items():  # a prepared set: left out by its build
        skip_counts[reason] = skip_counts.get(reason, 0) + count
    if not good:
        last = f"; the last: {skipped[-1]['message']}" if skipped else ""
        raise DataError(
            f"evaluation {_describe_source(source)[0]}: no usable clip among {len(elements)} "
            f"({_skip_summary(skip_counts)}){last}. "
            f"Are its audio paths right? {_source_advice(source)}"
        )
    return EvalSet(
        ids=[e["id"] for e in good],
        waveforms=[e["waveform"] for e in good] if window is None else np.stack([e["waveform"] for e in good]),
        captions=[c for e in good for c in e["captions"]],
        text_to_audio=np.array([i for i, e in enumerate(good) for _ in e["captions"]], dtype=np.int32),
        labels=[e["label"] for e in good],
        folds=np.array([e["fold"] for e in good], dtype=np.int32) if any(e["fold"] for e in good) else None,
        skip_counts=skip_counts,
    )
