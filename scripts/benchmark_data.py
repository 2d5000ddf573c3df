"""Data-loading throughput: clips per second per core for decode + resample + crop, and through the pipeline.

    python scripts/benchmark_data.py [--clips 64] [--seconds 10] [--workers N] [--out results.json]

Writes `--clips` clips of `--seconds` at 44.1 kHz as 16-bit FLAC (a pink-noise bed with tones and sweeps;
it compresses about 1.4:1, like busy real recordings) and, through `wavlink_jax.data.tfds_builders`, the same
clips as 16 kHz int16 array_record. Then, each the best of `--repeats` passes over all clips:

  stage rows (one thread, plain function calls):
    flac: decode only · resample only (44.1 → 16 kHz, soxr HQ) · decode + resample + random crop
    array_record: read a record · read + random crop · raw record bytes written zstd:3 (TFDS's default)
    and uncompressed (what `tfds_builders` writes), without TFDS parsing: what decompression costs
  pipeline rows (grain `build_train_dataset`, no tokenizer, one read thread, batches of 8, the clips cycled
    into a 1M-record source so the shuffle costs what it costs on a real data set):
    in-process (num_workers=0), and with `--workers` worker processes

"Clips per CPU-second" is clips / CPU time of this process: the per-core rate, and robust when other jobs
share the machine. "Clips per wall-second" is what a user sees; for the worker rows it is total / workers,
which understates per-worker speed unless that many cores are idle (the CPU column is blank there: the
workers' CPU time is not this process's). The window equals the clip length (10 s), as for 10 s
AudioSet-style clips. Targets (issue 5): ≥ 100 clips/s per core from FLAC, ≥ 1000 from array_record; the
ratio column is measured / target. Prints a Markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core means one core, also inside native libraries

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wavlink_jax.data import pipeline  # noqa: E402
from wavlink_jax.data.audio_io import SAMPLE_RATE, load_audio, resample  # noqa: E402
from wavlink_jax.data.sources import open_source, write_manifest  # noqa: E402

TARGETS = {"flac": 100.0, "array_record": 1000.0}


def _clip(rng: np.random.Generator, seconds: float, rate: int) -> np.ndarray:
    """Pink noise at about -30 dBFS with a tone or sweep every half second or so."""
    n = int(seconds * rate)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum[1:] /= np.sqrt(np.arange(1, len(spectrum)))
    x = np.fft.irfft(spectrum, n)
    x *= 0.03 / x.std()
    t = np.arange(n) / rate
    for start in np.arange(0.0, seconds - 0.5, 0.6):
        mask = (t >= start) & (t < start + 0.4)
        f0, f1 = rng.uniform(100, 4000, 2)
        local = t[mask] - start
        x[mask] += rng.uniform(0.1, 0.4) * np.sin(2 * np.pi * (f0 * local + (f1 - f0) * local**2 / 0.8)) * np.hanning(mask.sum())
    return np.clip(x, -1, 1)


def _best_rate(fn, items, repeats: int) -> tuple[float, float]:
    """(items per CPU second, items per wall second) of the fastest of `repeats` passes."""
    best_cpu = best_wall = float("inf")
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        for item in items:
            fn(item)
        best_cpu, best_wall = min(best_cpu, time.process_time() - cpu), min(best_wall, time.perf_counter() - wall)
    return len(items) / best_cpu, len(items) / best_wall


class _Cycled:
    """The clips of `source` repeated up to `length` records: a data set of realistic size for the shuffle
    (grain's index shuffle costs milliseconds per index below ~1000 records, microseconds at 100k+)."""

    def __init__(self, source, length: int):
        self.source, self.length = source, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.source[index % len(self.source)]


def _pipeline_rate(source, seconds: float, workers: int, batches: int, repeats: int) -> tuple[float, float]:
    """(clips per CPU second of this process, clips per wall second) through the training pipeline.

    The CPU figure covers this process only: with workers, their CPU time is not in it (use the wall figure).
    """
    spec = {"kind": "source", "source": _Cycled(source, 1_000_000)}
    config = pipeline.DataConfig(sources=[spec], window_seconds=seconds, min_seconds=0.0, num_workers=workers, read_threads=1, prefetch_buffer=8)
    best_cpu = best_wall = float("inf")
    for _ in range(repeats):
        iterator = iter(pipeline.build_train_dataset(config, tokenizer=None, batch_size=8, seed=0))
        next(iterator)  # worker start-up is not throughput
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(batches):
            next(iterator)
        best_cpu = min(best_cpu, (time.process_time() - cpu) / (8 * batches))
        best_wall = min(best_wall, (time.perf_counter() - wall) / (8 * batches))
        iterator.close()
    return 1.0 / best_cpu, 1.0 / best_wall


def _raw_record_rows(tfds_dir: Path, indices: list[int], repeats: int) -> list:
    """Raw record reads (no TFDS parsing) of the same records written with TFDS's default zstd:3 and
    uncompressed: what decompression costs per record."""
    from array_record.python import array_record_data_source, array_record_module

    (built,) = tfds_dir.glob("bench_data_16k/*/*.array_record-*")
    records = array_record_module.ArrayRecordReader(str(built)).read_all()
    rows = []
    for compression in ("zstd:3", "uncompressed"):
        path = built.with_name(f"raw-{compression.replace(':', '')}.array_record")
        writer = array_record_module.ArrayRecordWriter(str(path), f"group_size:1,{compression}")
        for record in records:
            writer.write(record)
        writer.close()
        data = array_record_data_source.ArrayRecordDataSource([str(path)])
        rows.append(("array_record", f"raw read, {compression} (no TFDS parsing)", _best_rate(lambda i: data[i], indices, repeats)))
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes for the multi-process row")
    parser.add_argument("--workdir", help="where the clips go (default: a temporary folder)")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    root = Path(args.workdir or tempfile.mkdtemp(prefix="wavlink-bench-data-"))
    rate = 44100
    rng = np.random.default_rng(0)
    entries = []
    for i in range(args.clips):
        path = root / "flac" / f"{i:04d}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, _clip(rng, args.seconds, rate), rate, subtype="PCM_16")
        entries.append({"audio": str(path), "captions": [f"clip {i}"]})
    manifest = write_manifest(root / "flac.jsonl", entries)
    flac_bytes = sum((root / "flac" / f"{i:04d}.flac").stat().st_size for i in range(args.clips))
    compression = args.clips * args.seconds * rate * 2 / flac_bytes
    window = int(args.seconds * SAMPLE_RATE)
    paths = [e["audio"] for e in np.random.default_rng(2).permutation(entries)]  # shuffled reading order
    decoded = [sf.read(p, dtype="float32")[0] for p in paths[:8]]
    batches = max(1, 2 * args.clips // 8)
    flac_source = open_source(manifest)

    crop_rng = np.random.default_rng(1)
    rows = [
        ("flac", "decode only (libsndfile)", _best_rate(lambda p: sf.read(p, dtype="float32"), paths, args.repeats)),
        ("flac", "resample only (soxr HQ 44.1→16 kHz)", _best_rate(lambda x: resample(x, rate, SAMPLE_RATE), decoded, args.repeats)),
        ("flac", "decode + resample + crop (load_audio)", _best_rate(lambda p: load_audio(p, window_samples=window, rng=crop_rng), paths, args.repeats)),
        ("flac", "pipeline, in-process (1 read thread)", _pipeline_rate(flac_source, args.seconds, 0, batches, args.repeats)),
    ]
    per_worker_sources = [("flac", flac_source)]

    try:
        from wavlink_jax.data import tfds_builders
    except ImportError as err:  # the array_record rows need the TFDS builders module
        print(f"array_record rows skipped: {err}", file=sys.stderr)
    else:
        tfds_builders.build_manifest("bench_data_16k", {"train": manifest}, root / "tfds", num_workers=0)
        source = tfds_builders.load_source("bench_data_16k", root / "tfds", "train")
        indices = [int(i) for i in np.random.default_rng(3).permutation(len(source))]
        rows += [
            ("array_record", "read a record (random order)", _best_rate(lambda i: source[i], indices, args.repeats)),
            (
                "array_record",
                "read + crop (load_audio)",
                _best_rate(lambda i: load_audio(source[i]["audio"], SAMPLE_RATE, window_samples=window, rng=crop_rng), indices, args.repeats),
            ),
        ]
        rows += _raw_record_rows(root / "tfds", indices, args.repeats)
        rows.append(("array_record", "pipeline, in-process (1 read thread)", _pipeline_rate(source, args.seconds, 0, 4 * batches, args.repeats)))
        per_worker_sources.append(("array_record", source))

    for kind, source in per_worker_sources:
        total = _pipeline_rate(source, args.seconds, args.workers, 4 * batches * args.workers, 1)[1]
        stage = f"pipeline, {args.workers} worker processes (wall: total / workers)"
        rows.append((kind, stage, (None, total / args.workers)))  # no CPU-time rate across processes

    machine = {
        "cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
        if os.path.exists("/proc/cpuinfo")
        else platform.processor(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
    print(f"\n{args.clips} clips × {args.seconds:g} s, 44.1 kHz FLAC (compression {compression:.1f}:1) → 16 kHz, window {args.seconds:g} s")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, load average {machine['load_average']}, {machine['date']}\n")
    print("| source | stage | clips per CPU-second | vs target | clips per wall-second |")
    print("|---|---|---:|---:|---:|")
    for kind, stage, (cpu, wall) in rows:
        per_cpu, vs_target = ("–", "–") if cpu is None else (f"{cpu:.0f}", f"{cpu / TARGETS[kind]:.2f}×")
        print(f"| {kind} | {stage} | {per_cpu} | {vs_target} | {wall:.0f} |")
    result = {
        "machine": machine,
        "clips": args.clips,
        "seconds": args.seconds,
        "flac_compression": round(compression, 2),
        "rows": [{"source": k, "stage": s, "clips_per_cpu_s": None if c is None else round(c, 1), "clips_per_wall_s": round(w, 1)} for k, s, (c, w) in rows],
    }
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
