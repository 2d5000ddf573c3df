"""The rules on waveforms given to the embedders, with their messages: a `(samples, channels)` array is not a
`(clips, samples)` batch, and samples are floats. One definition for JAX inference (`wavlink_jax.inference`) and
the PyTorch model (`wavlink_jax.torch_model`).

Standard library only (no jax, no torch): the exporter copies this file beside `modeling_wavlink.py`, which
imports it relatively, and `transformers`' remote code loads and `save_pretrained` copies such files with it.
"""

from collections.abc import Sequence

MAX_CHANNELS = 8  # a 2-D input this narrow (and longer than wide) is (samples, channels), not (clips, samples)


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
