"""The rule that tells a `(samples, channels)` array from a `(clips, samples)` batch, with its message: one
definition for JAX inference (`wavlink_jax.inference`) and the PyTorch model (`wavlink_jax.torch_model`).

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
