"""The generated captioned-audio data set of the quickstart (pure numpy, deterministic per seed, FLAC).

Each clip holds 1–3 sound events in sequence, drawn from ten kinds (the class names in `CLASSES`):
low hums, mid tones, high beeps, rising and falling sweeps, white and pink noise bursts, click trains, buzzes
and warbles, with random pitch, length, loudness, gaps and a faint noise floor. Captions come from templates
with synonyms that describe kind, pitch, order and count ("a low hum, then two sharp clicks", "three
high-pitched beeps after a falling sweep"); every clip gets several captions (5 by default, as AudioCaps'
and Clotho's evaluation sets). The class label of a clip, for zero-shot evaluation, is the kind of its first
event. Most clips are 16 kHz mono; some are 22.05 or 44.1 kHz and some stereo, so the pipeline's resampling
and down-mixing run too.

Layout written by `generate` / `python -m wavlink_jax.data.synthetic --out DIR --num-train N --num-eval M`:

    DIR/train.jsonl  DIR/eval.jsonl   manifests (see sources.py), with an extra "events" key for inspection
    DIR/audio/{train,eval}/NNNNNN.flac
    DIR/classes.json                  the ten class names, in a fixed order
    DIR/tokenizer/                    a CLIP-style BPE tokenizer trained on the training captions
    DIR/generated.json                the settings (`MARKER`): written last, it marks a complete data set

With `--num-eval 0` there is no eval.jsonl. The data set is written into `.DIR.partial-PID` beside DIR and moved
into place when complete, so DIR never holds a partial data set nor files of an earlier run: a data set generated
earlier in DIR is replaced whole (saying so), a DIR that holds anything else is refused, and what a killed run
left beside DIR is deleted by the next run.

Clip i of a split depends only on (seed, split, i): the eval set is the same whatever `num_train` is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf

# kind → (class name, caption phrases as (singular, plural)). Class names reuse caption words, so zero-shot
# prompts ("the sound of a low hum") share vocabulary with the captions.
_PHRASES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "low": ("low hum", [("low hum", "low hums"), ("deep drone", "deep drones"), ("low-pitched tone", "low-pitched tones"), ("low rumbling hum", "low rumbling hums")]),
    "mid": ("mid tone", [("steady tone", "steady tones"), ("mid-pitched tone", "mid-pitched tones"), ("plain mid tone", "plain mid tones"), ("medium note", "medium notes")]),
    "high": ("high beep", [("high beep", "high beeps"), ("high-pitched beep", "high-pitched beeps"), ("shrill bleep", "shrill bleeps"), ("high ping", "high pings")]),
    "rise": ("rising sweep", [("rising sweep", "rising sweeps"), ("upward chirp", "upward chirps"), ("ascending glide", "ascending glides"), ("sweep going up", "sweeps going up")]),
    "fall": ("falling sweep", [("falling sweep", "falling sweeps"), ("downward chirp", "downward chirps"), ("descending glide", "descending glides"), ("sweep going down", "sweeps going down")]),
    "white": ("white noise", [("burst of white noise", "bursts of white noise"), ("sharp hiss", "sharp hisses"), ("static hiss", "static hisses"), ("white noise burst", "white noise bursts")]),
    "pink": ("pink noise", [("burst of pink noise", "bursts of pink noise"), ("soft whoosh", "soft whooshes"), ("dull rush of noise", "dull rushes of noise"), ("pink noise burst", "pink noise bursts")]),
    "click": ("clicks", [("sharp click", "sharp clicks"), ("click", "clicks"), ("tick", "ticks"), ("snap", "snaps")]),
    "buzz": ("buzz", [("buzz", "buzzes"), ("harsh buzz", "harsh buzzes"), ("buzzer", "buzzers"), ("raspy buzzing", "raspy buzzings")]),
    "warble": ("warble", [("warble", "warbles"), ("warbling tone", "warbling tones"), ("wobbling whistle", "wobbling whistles"), ("vibrato tone", "vibrato tones")]),
}
KINDS = tuple(_PHRASES)
CLASSES = tuple(name for name, _ in _PHRASES.values())
# How many repetitions an event of each kind may have (clicks always come as a train).
_COUNTS = {"high": (1, 3), "mid": (1, 2), "white": (1, 2), "click": (2, 5), "buzz": (1, 2)}
_NUMBERS = {2: ["two", "a pair of"], 3: ["three"], 4: ["four"], 5: ["five"]}
_SEQUENCES = {
    1: ["{0}"],
    2: ["{0}, then {1}", "{0} followed by {1}", "{1} after {0}", "first {0}, then {1}", "{0} and then {1}"],
    3: ["{0}, then {1}, then {2}", "{0}, followed by {1} and then {2}", "first {0}, then {1}, and finally {2}", "{0}, {1} and then {2}"],
}
_FRAMES = ["{}", "the sound of {}", "{} can be heard", "you hear {}", "a recording of {}", "{} in a quiet room"]
_SAMPLE_RATES = (16000, 16000, 16000, 22050, 44100)  # drawn uniformly: 60% need no resampling
MARKER = "generated.json"  # written last into a data set `generate` made
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Event:
    kind: str
    count: int
    start: float  # seconds
    duration: float  # seconds


@dataclasses.dataclass(frozen=True)
class SyntheticPaths:
    """Where `generate` wrote the data set."""

    root: Path
    train: Path
    eval: Path | None  # None when there are no evaluation clips
    tokenizer: Path
    classes: Path


def _ramp(n: int, rate: int, seconds: float = 0.01) -> np.ndarray:
    """A window with raised-cosine fade-in/out, so events start and end without clicks."""
    env = np.ones(n)
    k = min(int(seconds * rate), n // 2)
    if k:
        fade = 0.5 - 0.5 * np.cos(np.pi * np.arange(k) / k)
        env[:k], env[n - k :] = fade, fade[::-1]
    return env


def _pink(n: int, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum[1:] /= np.sqrt(np.arange(1, len(spectrum)))
    spectrum[0] = 0
    noise = np.fft.irfft(spectrum, n)
    return noise / (np.abs(noise).max() + 1e-9)


def _pulses(count: int, duration: float, rate: int, make: Callable[[int], np.ndarray]) -> np.ndarray:
    """`count` equal pulses with equal gaps filling `duration` (pulse:gap = 3:2)."""
    n = int(duration * rate)
    pulse = int(n / (count + (count - 1) * 2 / 3))
    gap = int(pulse * 2 / 3)
    out = np.zeros(n)
    for i in range(count):
        start = i * (pulse + gap)
        out[start : start + pulse] = make(pulse) * _ramp(pulse, rate, 0.005)
    return out


def _event_signal(event: Event, rate: int, rng: np.random.Generator) -> np.ndarray:
    """One event's samples (peak 1) at `rate`."""
    n = int(event.duration * rate)
    t = np.arange(n) / rate
    kind = event.kind

    def tone(freq: float, harmonics: tuple[float, ...] = (1.0,)) -> Callable[[int], np.ndarray]:
        phase = rng.uniform(0, 2 * np.pi)
        return lambda m: sum(a * np.sin(2 * np.pi * freq * (k + 1) * np.arange(m) / rate + phase) for k, a in enumerate(harmonics))

    if kind == "low":
        x = tone(rng.uniform(70, 180), (1.0, 0.5, 0.25))(n)
    elif kind == "mid":
        x = _pulses(event.count, event.duration, rate, tone(rng.uniform(350, 900), (1.0, 0.2)))
    elif kind == "high":
        x = _pulses(event.count, event.duration, rate, tone(rng.uniform(1800, min(4500, 0.4 * rate))))
    elif kind in ("rise", "fall"):
        low, high = rng.uniform(200, 500), rng.uniform(1500, min(4000, 0.4 * rate))
        f0, f1 = (low, high) if kind == "rise" else (high, low)
        k = np.log(f1 / f0)
        x = np.sin(2 * np.pi * f0 * event.duration / k * (np.exp(k * t / event.duration) - 1))
    elif kind == "white":
        x = _pulses(event.count, event.duration, rate, lambda m: np.clip(rng.standard_normal(m) / 3, -1, 1))
    elif kind == "pink":
        x = _pink(n, rng)
    elif kind == "click":
        x = np.zeros(n)
        spacing = n // event.count
        click = np.exp(-np.arange(int(0.004 * rate)) / (0.0008 * rate)) * rng.choice([-1.0, 1.0], int(0.004 * rate))
        for i in range(event.count):
            start = i * spacing + spacing // 4
            x[start : start + len(click)] = click[: n - start]
        return x
    elif kind == "buzz":
        hum = tone(rng.uniform(90, 300))
        x = _pulses(event.count, event.duration, rate, lambda m: np.sign(hum(m)))
    elif kind == "warble":
        carrier, fm_rate, depth = rng.uniform(600, 1500), rng.uniform(5, 12), rng.uniform(0.05, 0.15)
        x = np.sin(2 * np.pi * carrier * t + depth * carrier / fm_rate * np.sin(2 * np.pi * fm_rate * t))
    else:
        raise ValueError(f"unknown event kind {kind!r}")
    x = x / (np.abs(x).max() + 1e-9)
    return x * _ramp(n, rate)


def _plan_events(rng: np.random.Generator, max_seconds: float) -> tuple[list[Event], float]:
    """1–3 events in sequence with gaps, and the clip length (seconds, at most `max_seconds`)."""
    num_events = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    lead = rng.uniform(0.0, 0.3)
    budget = (max_seconds - lead - 0.15 * (num_events + 1)) / num_events
    events, cursor = [], lead
    for _ in range(num_events):
        kind = str(rng.choice([k for k in KINDS if not events or k != events[-1].kind]))  # no "X, then X"
        low, high = _COUNTS.get(kind, (1, 1))
        count = int(rng.integers(low, high + 1))
        duration = rng.uniform(0.25 + 0.12 * count, 0.6 + 0.2 * count)
        duration = float(min(duration, budget))
        events.append(Event(kind, count, float(cursor), duration))
        cursor += duration + rng.uniform(0.05, 0.3)
    length = float(min(max_seconds, max(1.0, cursor + rng.uniform(0.0, 1.0))))
    return events, length


def _phrase(event: Event, rng: np.random.Generator) -> str:
    singular, plural = _PHRASES[event.kind][1][rng.integers(len(_PHRASES[event.kind][1]))]
    if event.count == 1:
        article = "an" if singular[0] in "aeiou" else "a"
        return f"{rng.choice([article, article, 'one'])} {singular}"
    return f"{rng.choice(_NUMBERS[event.count])} {plural}"


def caption(events: list[Event], rng: np.random.Generator) -> str:
    """One caption for a sequence of events: a random choice of synonyms, sequence phrasing and frame."""
    body = str(rng.choice(_SEQUENCES[len(events)])).format(*(_phrase(e, rng) for e in events))
    return str(rng.choice(_FRAMES)).format(body)


def make_clip(rng: np.random.Generator, max_seconds: float) -> tuple[np.ndarray, int, list[Event]]:
    """A clip's samples (frames, channels) float in [-1, 1], its sample rate and its events."""
    rate = int(rng.choice(_SAMPLE_RATES))
    events, length = _plan_events(rng, max_seconds)
    audio = rng.standard_normal(int(length * rate)) * rng.uniform(0.0005, 0.004)  # noise floor
    for event in events:
        x = _event_signal(event, rate, rng) * rng.uniform(0.2, 0.7)
        start = int(event.start * rate)
        audio[start : start + len(x)] += x[: len(audio) - start]
    audio = np.clip(audio, -1, 1)
    if rng.uniform() < 0.15:  # a few stereo clips, with slightly different channel gains
        audio = np.stack([audio, audio * rng.uniform(0.7, 1.0)], axis=1)
    else:
        audio = audio[:, None]
    return audio, rate, events


def _write_split(root: Path, split: str, num: int, seed: int, max_seconds: float, captions_per_clip: int) -> list[dict]:
    folder = root / "audio" / split
    folder.mkdir(parents=True, exist_ok=True)
    split_code = {"train": 0, "eval": 1}[split]
    entries = []
    for index in range(num):
        rng = np.random.default_rng([seed, split_code, index])
        audio, rate, events = make_clip(rng, max_seconds)
        relative = f"audio/{split}/{index:06d}.flac"
        sf.write(root / relative, audio, rate, format="FLAC", subtype="PCM_16")
        captions: list[str] = []
        for attempt in range(20 * captions_per_clip):  # distinct captions where the templates allow it
            text = caption(events, rng)
            if text not in captions or attempt >= 10 * captions_per_clip:
                captions.append(text)
            if len(captions) == captions_per_clip:
                break
        entries.append(
            {
                "id": f"{split}-{index:06d}",
                "audio": relative,
                "captions": captions,
                "label": _PHRASES[events[0].kind][0],
                "events": [f"{_PHRASES[e.kind][0]} x{e.count}" for e in events],
            }
        )
    return entries


def _replaces_generated(target: Path) -> bool:
    """Whether `target` holds a data set generated earlier (to be replaced whole) rather than nothing; a file or a
    folder holding anything else is refused (FileExistsError naming it), never deleted."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return False
    if (target / MARKER).is_file():
        return True
    try:  # made before the marker existed: its classes.json is the generator's
        if json.loads((target / "classes.json").read_text()) == list(CLASSES):
            return True
    except (OSError, ValueError):
        pass
    raise FileExistsError(
        f"{target} exists and is no data set made by this generator (no {MARKER} in it); the generator replaces "
        "its output folder whole, so choose a new or empty folder, or delete this one yourself"
    )


def check_settings(num_train: int, num_eval: int, max_seconds: float, captions_per_clip: int) -> None:
    """`generate`'s settings, a ValueError naming each refused one as the function and the command line call it."""
    if num_train < 1 or num_eval < 0 or captions_per_clip < 1:
        raise ValueError(
            f"need num_train (--num-train) >= 1, num_eval (--num-eval) >= 0 and captions_per_clip "
            f"(--captions-per-clip) >= 1, got {num_train}, {num_eval} and {captions_per_clip}"
        )
    if not 1.5 <= max_seconds < math.inf:  # NaN fails this too
        raise ValueError(
            f"max_seconds (--seconds) must be at least 1.5 (three events need room) and finite, got {max_seconds}"
        )


def generate(
    out_dir: str | os.PathLike,
    num_train: int,
    num_eval: int,
    seed: int = 0,
    *,
    max_seconds: float = 4.0,
    captions_per_clip: int = 5,
    vocab_size: int = 1024,
) -> SyntheticPaths:
    """Write the generated data set into `out_dir` (layout and replacement rules in the module docstring) and
    return its paths."""
    from wavlink_jax.cli import file_in_the_way
    from wavlink_jax.data.sources import write_manifest
    from wavlink_jax.tokenizer import train_tokenizer

    check_settings(num_train, num_eval, max_seconds, captions_per_clip)
    root = Path(out_dir)
    target = Path(os.path.realpath(root))  # a symlink's target is replaced, not the link; "." has a name
    if _replaces_generated(target):
        log.warning("%s holds a data set generated earlier: it is replaced when the new one is complete", root)
    in_the_way = file_in_the_way(target)
    if in_the_way is not None:
        raise NotADirectoryError(f"{root}: {in_the_way} is a file, not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.partial-"
    for leftover in target.parent.iterdir():  # of a killed run
        if leftover.name.startswith(prefix):
            shutil.rmtree(leftover)
    staging = target.with_name(f"{prefix}{os.getpid()}")
    try:
        staging.mkdir()
        train = _write_split(staging, "train", num_train, seed, max_seconds, captions_per_clip)
        evaluation = _write_split(staging, "eval", num_eval, seed, max_seconds, captions_per_clip)
        write_manifest(staging / "train.jsonl", train)
        if evaluation:
            write_manifest(staging / "eval.jsonl", evaluation)
        (staging / "classes.json").write_text(json.dumps(list(CLASSES), indent=1) + "\n")
        captions = (text for entry in train for text in entry["captions"])
        train_tokenizer(captions, staging / "tokenizer", vocab_size=vocab_size)
        settings = {"num_train": num_train, "num_eval": num_eval, "seed": seed, "max_seconds": max_seconds,
                    "captions_per_clip": captions_per_clip, "vocab_size": vocab_size}
        (staging / MARKER).write_text(json.dumps(settings, indent=1) + "\n")
        if _replaces_generated(target):  # checked again: nothing else may have been written there meanwhile
            old = target.with_name(f"{staging.name}-old")
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old)
        else:
            staging.rename(target)  # replaces an empty folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return SyntheticPaths(
        root=root,
        train=root / "train.jsonl",
        eval=root / "eval.jsonl" if num_eval else None,
        tokenizer=root / "tokenizer",
        classes=root / "classes.json",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m wavlink_jax.data.synthetic")
    parser.add_argument("--out", required=True, type=os.path.expanduser, help="output directory")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=4.0, help="longest clip, in seconds (clips last 1 s to this)")
    parser.add_argument("--captions-per-clip", type=int, default=5)
    args = parser.parse_args(argv)
    try:  # an option given wrongly: the usage, then the error, as argparse's own refusals
        check_settings(args.num_train, args.num_eval, args.seconds, args.captions_per_clip)
    except ValueError as err:
        parser.error(str(err))
    from wavlink_jax import cli  # here: importing the module stays light (grain workers do)

    with cli.user_errors():
        paths = generate(
            args.out,
            args.num_train,
            args.num_eval,
            args.seed,
            max_seconds=args.seconds,
            captions_per_clip=args.captions_per_clip,
        )
    print(json.dumps({k: None if v is None else str(v) for k, v in dataclasses.asdict(paths).items()}))


if __name__ == "__main__":
    main()
