"""The rules on waveforms given to the embedders, with their messages (a `(samples, channels)` array is not a
`(clips, samples)` batch, and samples are floats), and how a clip longer than the model's window is covered. One
definition for JAX inference (`wavlink_jax.inference`) and the PyTorch model (`wavlink_jax.torch_model`).

Standard library only (no jax, no torch): the exporter copies this file beside `modeling_wavlink.py`, which
imports it relatively, and `transformers`' remote code loads and `save_pretrained` copies such files with it.
"""

import numbers
from collections.abc import Sequence

MAX_CHANNELS = 8  # a 2-D input this narrow (and longer than wide) is (samples, channels), not (clips, samples)
# How a clip longer than the window is embedded: "head", its first window (as evaluation during training does);
# "mean", every window of it, their embeddings averaged with `window_plan`'s weights and re-normalised.
LONG_CLIPS = ("head", "mean")


def check_not_channels_last(shape: Sequence[int]) -> None:
    """Refuse a `(samples, channels)` array (e.g. `soundfile.read` of a stereo file) where a `(clips, samples)`
    batch is expected: it would be embedded as `samples` clips of `channels` samples each."""
    if len(shape) == 2 and shape[1] <= MAX_CHANNELS and shape[1] < shape[0]:
        raise ValueError(
            f"audio of shape {tuple(shape)} looks like (samples, channels); mix to mono, e.g. y.mean(axis=1) "
            "(a batch is (clips, samples); several clips of different lengths go in a list)"
        )


def check_float_samples(index: int, dtype: object, floating: bool) -> None:
    """Refuse integer PCM (`scipy.io.wavfile.read`, `soundfile.read(..., dtype="int16")`): taken as floats, its
    samples are 32768 times too loud and every log-mel value shifts (by +2.3 for int16), so the embedding is wrong
    without a sign. `floating`: whether `dtype` (of waveform `index`) is a floating-point type."""
    if not floating:
        raise ValueError(
            f"waveform {index} has {dtype} samples; expected floats in [-1, 1]: divide integer PCM by its full scale "
            "(32768 for int16), or read the file with soundfile.read(path, dtype='float32')"
        )


def check_finite_samples(index: int, finite: bool) -> None:
    """Refuse a waveform with NaN or infinite samples as float32 (`finite`: whether all of waveform `index`'s are
    finite): an embedding of one was NaN, without a word (a file decoded by `wavlink_jax` is skipped as
    `not_finite` instead). Anywhere in the waveform, as for a decoded file: one rule for every `long_clips`."""
    if not finite:
        raise ValueError(
            f"waveform {index} has NaN or infinite samples (as float32); its embedding would be NaN: repair the "
            "audio, or leave the clip out"
        )


def check_long_clips(long_clips: str, setting: str = "long_clips") -> None:
    """Refuse a `long_clips` that is not one of `LONG_CLIPS`; `setting` names where it was set."""
    if long_clips not in LONG_CLIPS:
        raise ValueError(
            f"{setting} = {long_clips!r}: choose 'head' (the first window of a clip, the default) or 'mean' (the "
            "mean of its windows' embeddings)"
        )


def checked_texts(texts: object) -> list:
    """The texts given to `embed_text` as a list of `str` (any iterable of them: a list, tuple, numpy array or
    pandas Series), with one rule for JAX inference and the PyTorch model: one string alone, no texts, or an item
    that is not a string (None, a number, bytes) is refused, naming it (the tokenizers' own words named neither)."""
    if isinstance(texts, (str, bytes)):
        raise TypeError("embed_text expects a list of strings, not one string; wrap it in a list")
    texts = list(texts)
    if not texts:
        raise ValueError("embed_text got no texts")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"embed_text: text {index} is {type(text).__name__} {text!r:.60}, not a string")
    return texts


def check_batch_size(batch_size: object) -> None:
    """Refuse a batch size that is not a whole number >= 1, one rule for JAX inference and the PyTorch model (a
    loop over batches of 0 or fewer never ends or fails in its own words)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")


def window_plan(length: int, window: int) -> list[tuple[int, int]]:
    """`long_clips="mean"`'s windows over a waveform of `length` samples, as `(start, weight)` pairs: consecutive,
    non-overlapping windows of `window` samples from the start, the last one zero-padded as a short clip is. A
    window's weight is the number of the waveform's samples in it, so a 0.5 s tail counts for a twentieth of a
    full 10 s window. A waveform of at most one window is that one window (weight 1 if it is empty), so it embeds
    as with `long_clips="head"`."""
    if length <= window:
        return [(0, max(length, 1))]
    return [(start, min(window, length - start)) for start in range(0, length, window)]


def clips_window_plan(lengths: Sequence[int], window: int) -> list[tuple[int, int, int]]:
    """`window_plan` over several clips of these `lengths`: `(clip index, start, weight)` for every window, clip by
    clip (the rows a batch of `long_clips="mean"` windows is cut in, and whose embeddings are pooled per clip)."""
    return [
        (index, start, weight) for index, length in enumerate(lengths) for start, weight in window_plan(length, window)
    ]
