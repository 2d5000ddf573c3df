"""`make quickstart`: generate the synthetic data set (if missing, incomplete or of other sizes), train
configs/quickstart.py on the CPU, evaluate on the held-out split and print text→audio / audio→text recall beside
chance.

    python scripts/quickstart.py [--data-dir data/synthetic] [--workdir workdirs/quickstart] [--steps N]

The run starts fresh in --workdir: its previous contents are deleted, so a --workdir that exists and is not
empty must be the default folder or one an earlier quickstart made (it leaves a `.quickstart-workdir` file);
any other folder is refused, never emptied. Exit status 1 if R@1 is below 10× chance in either direction.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `configs` and `wavlink_jax` without installing

NUM_TRAIN, NUM_EVAL, SECONDS = 2000, 200, 3.0
DEFAULT_WORKDIR = REPO / "workdirs" / "quickstart"
MARKER = ".quickstart-workdir"  # left in each quickstart workdir: the run may delete that folder again


def chance_recall(num_clips: int, captions_per_clip: int, k: int) -> tuple[float, float]:
    """Expected R@k (percent) of a random ranking: text→audio (1 right clip of N), audio→text (any of the
    clip's c captions among the top k of N·c)."""
    total = num_clips * captions_per_clip
    t2a = k / num_clips
    a2t = 1.0 - math.comb(total - captions_per_clip, k) / math.comb(total, k)
    return 100.0 * t2a, 100.0 * a2t


def _split_sizes(data_dir: Path) -> tuple[int, int] | None:
    """Clips in train.jsonl / eval.jsonl, or None when the data set is missing."""
    files = [data_dir / "train.jsonl", data_dir / "eval.jsonl"]
    if not all(f.exists() for f in files):
        return None
    return tuple(sum(1 for line in f.read_text().splitlines() if line.strip()) for f in files)


def needs_data(data_dir: Path) -> bool:
    """Whether the synthetic data set must be generated into `data_dir`: it is missing, incomplete (the generator
    writes its marker last; a data set without one may be cut short) or of other sizes."""
    from wavlink_jax.data import synthetic

    return not (data_dir / synthetic.MARKER).is_file() or _split_sizes(data_dir) != (NUM_TRAIN, NUM_EVAL)


def replaceable(workdir: Path) -> bool:
    """Whether the quickstart may delete `workdir` to start fresh: it is missing or empty, the default folder,
    or one an earlier quickstart marked as its own. Anything else may hold someone's work."""
    if not workdir.exists():
        return True
    return workdir.is_dir() and (
        not any(workdir.iterdir()) or workdir.resolve() == DEFAULT_WORKDIR.resolve() or (workdir / MARKER).is_file()
    )


def main() -> int:
    from wavlink_jax import cli  # light (no jax): the flags are checked before anything heavy is imported

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(REPO / "data" / "synthetic"))
    parser.add_argument("--workdir", default=str(DEFAULT_WORKDIR), help="deleted first (see above)")
    parser.add_argument(
        "--steps", type=cli.positive_int, default=None, help="training steps (default: the config's; 0 is refused)"
    )
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if not replaceable(workdir):
        parser.error(
            f"--workdir {workdir} exists, is not empty and is no quickstart workdir (no {MARKER} in it); the "
            "quickstart deletes its workdir before training, so choose a new or empty folder, or delete this one "
            "yourself"
        )

    from absl import flags, logging as absl_logging

    flags.FLAGS.mark_as_parsed()
    absl_logging.set_verbosity(absl_logging.WARNING)
    from configs import quickstart
    from wavlink_jax import train
    from wavlink_jax.data import synthetic

    data_dir = Path(args.data_dir)
    if needs_data(data_dir):
        print(f"generating the synthetic data set in {data_dir} ({NUM_TRAIN} training clips, {NUM_EVAL} held out)")
        start = time.perf_counter()
        with cli.user_errors():  # e.g. a --data-dir holding other files: refused
            synthetic.generate(data_dir, NUM_TRAIN, NUM_EVAL, max_seconds=SECONDS)
        print(f"  done in {time.perf_counter() - start:.0f} s")

    config = quickstart.get_config(f"data_dir={data_dir}" + (f",steps={args.steps}" if args.steps is not None else ""))
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("made by scripts/quickstart.py, which deletes this folder when it runs again\n")
    print(f"training configs/quickstart.py for {config.total_steps} steps of {config.batch_size} into {workdir}")
    start = time.perf_counter()
    with cli.user_errors(train.NonFiniteLoss, out_of_memory=train.OUT_OF_MEMORY_ADVICE):  # as the trainer's command
        metrics = train.train(config, str(workdir))
    minutes = (time.perf_counter() - start) / 60

    name = config.eval.sets[0]["name"]
    clips = [json.loads(line) for line in (data_dir / "eval.jsonl").read_text().splitlines() if line.strip()]
    num_clips, captions = len(clips), len(clips[0]["captions"])
    print(f"\nheld-out split: {num_clips} clips × {captions} captions; trained in {minutes:.1f} min")
    print(f"{'':10}{'R@1':>8}{'chance':>8}{'R@10':>8}{'chance':>8}")
    ok = True
    for direction in ("t2a", "a2t"):
        chance1 = chance_recall(num_clips, captions, 1)[direction == "a2t"]
        chance10 = chance_recall(num_clips, captions, 10)[direction == "a2t"]
        r1, r10 = metrics[f"eval/{name}/{direction}_R@1"], metrics[f"eval/{name}/{direction}_R@10"]
        label = {"t2a": "text→audio", "a2t": "audio→text"}[direction]
        print(f"{label:10}{r1:8.1f}{chance1:8.1f}{r10:8.1f}{chance10:8.1f}")
        ok &= r1 >= 10 * chance1
    print("OK: R@1 ≥ 10× chance in both directions" if ok else "FAILED: R@1 < 10× chance in at least one direction")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
