"""`python -m wavlink_jax.data check SOURCE`: decode every clip of a source whole and report the bad ones.

SOURCE is a manifest path, or the name of a data set prepared by `wavlink_jax.data.tfds_builders` (with
`--data-dir` and `--split`). Every clip is decoded whole, mixed to mono and resampled as in training (and with
`--tokenizer` its captions tokenized, counting those cut at `--max-text-length`); training reads only a random
window of each clip, so a damaged part (a truncation, NaN samples) outside one epoch's window would be skipped in
another epoch: `check` finds them all. Bad clips are logged (the first 20 per reason) and counted. A tqdm progress
bar goes to stderr; the last line on stdout is one JSON object:

    {"examples": n, "ok": n_ok, "skipped": {reason: count}, "without_captions": n, "hours": audio hours of the
     good clips, "clips_per_s": x[, "captions_cut": n with --tokenizer][, "left_out_by_build": {reason: count}]}

`ok` counts the clips whose audio decodes; `without_captions` those of them with no (non-blank) caption, which
training skips (`no_captions`) and a classification set (ESC-50, US8K, VGGSound: labels only) has throughout.
`captions_cut` counts the good clips' captions longer than `--max-text-length` tokens (start and end included),
whose end training never sees: many of them call for a longer `data.max_text_length`. `left_out_by_build`, for a
prepared data set, counts what its build left out (unreadable clips, blank captions), which it does not hold: of the
whole split (`train` for `--split 'train[:10%]'`).

The exit status is 1 when no clip is usable, or when the source cannot be opened (a manifest or prepared data set
that is not there, a malformed manifest line: one `error: ...` line on stderr), else 0. Unlike training, `check`
never stops at a run of bad records (`max_consecutive_skips` does not apply): it reports every one.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from wavlink_jax import cli


def check(
    source: str,
    *,
    data_dir: str | None = None,
    split: str = "train",
    min_seconds: float = 0.5,
    num_workers: int = 0,
    tokenizer: str | None = None,
    max_text_length: int = 77,
    progress: bool = True,
) -> dict:
    """Every clip of `source` decoded whole; the report described in the module docstring."""
    from tqdm import tqdm

    from wavlink_jax.data import pipeline
    from wavlink_jax.data.sources import open_source

    if os.path.isfile(source) or source.endswith(".jsonl"):
        spec = {"kind": "manifest", "path": source}
    else:
        spec = {"kind": "tfds", "name": source, "data_dir": data_dir, "split": split}
    try:
        source = open_source(spec)  # read and checked once (a manifest's lines are validated when it is opened)
    except FileNotFoundError as err:
        if not os.path.isdir(source):
            raise
        manifests = sorted(str(path) for path in Path(source).glob("*.jsonl"))
        raise FileNotFoundError(
            f"{err}. {source} is a folder here: to check a manifest, name the file"
            + (f" ({', '.join(manifests)})" if manifests else "")
        ) from err
    text = None
    if tokenizer:
        from wavlink_jax.tokenizer import load_tokenizer

        text = load_tokenizer(tokenizer, max_length=max_text_length)
    ok, without_captions, captions_cut, seconds, skipped = 0, 0, 0, 0.0, collections.Counter()
    start = time.perf_counter()
    records = pipeline.check_records(source, min_seconds=min_seconds, num_workers=num_workers)
    try:
        for record in tqdm(records, total=len(source), unit="clip", file=sys.stderr, disable=not progress):
            if "skip" in record:
                skipped[record["skip"]] += 1
                continue
            ok += 1
            seconds += record["seconds"]
            if not record["captions"]:
                without_captions += 1
            elif text is not None:
                captions_cut += int(text.truncated(record["captions"]).sum())
    finally:
        records.close()  # also stops the worker processes when decoding fails
    elapsed = time.perf_counter() - start
    examples = ok + sum(skipped.values())
    report = {
        "examples": examples,
        "ok": ok,
        "skipped": dict(skipped),
        "without_captions": without_captions,
        "hours": round(seconds / 3600, 3),
        "clips_per_s": round(examples / max(elapsed, 1e-9), 1),
    }
    if text is not None:
        report["captions_cut"] = captions_cut
    left_out = dict(getattr(source, "build_skipped", {}))  # a prepared data set's: counted when it was built
    if left_out:
        report["left_out_by_build"] = left_out
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wavlink_jax.data", description="Data tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("check", help=__doc__.split("\n")[0].split(": ", 1)[1], description=__doc__)
    command.formatter_class = argparse.RawDescriptionHelpFormatter
    command.add_argument("source", help="a manifest (.jsonl) or the name of a prepared TFDS data set")
    command.add_argument("--data-dir", type=os.path.expanduser, help="TFDS data directory (for a prepared data set)")
    command.add_argument("--split", default="train", help="TFDS split (default: train)")
    command.add_argument("--min-seconds", type=float, default=0.5, help="shorter clips count as too_short")
    command.add_argument("--num-workers", type=int, default=0, help="grain worker processes")
    command.add_argument("--tokenizer", type=os.path.expanduser,
                         help="tokenizer directory: also tokenize the captions and count those cut")
    command.add_argument("--max-text-length", type=cli.positive_int, default=77,
                         help="tokens a caption is cut to, start and end included (the run's data.max_text_length)")
    command.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with cli.user_errors():
        report = check(
            args.source,
            data_dir=args.data_dir,
            split=args.split,
            min_seconds=args.min_seconds,
            num_workers=args.num_workers,
            tokenizer=args.tokenizer,
            max_text_length=args.max_text_length,
            progress=not args.no_progress,
        )
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
