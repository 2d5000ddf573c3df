"""Waveform → Whisper log-mel spectrogram, in `jax.numpy` so it runs on the accelerator inside the input step.

The maths is Whisper's (and `transformers.WhisperFeatureExtractor`'s): a centred STFT (reflect padding of
`N_FFT // 2`, periodic Hann window of 400 samples, hop 160) whose last frame is dropped, power spectrum,
Slaney-normalised mel filter bank (0–8 kHz, Slaney mel scale, as librosa), then

    log10(max(mel, 1e-10)) → max(x, x.max() - 8) → (x + 4) / 4

where the max is taken per example over the whole window (all mel bins and frames). A waveform of `samples`
samples gives `samples // HOP_LENGTH` frames: 30 s → 3000 frames, 10 s → 1000.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16000
HOP_LENGTH = 160
N_FFT = 400
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000 samples in Whisper's 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in a 30 s window


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above (librosa's `htk=False`)."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = 3.0 * hz / 200.0
    log = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(hz >= 1000.0, log, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = 200.0 * mel / 3.0
    log = 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0))
    return np.where(mel >= 15.0, log, linear)


@functools.lru_cache(maxsize=None)
def mel_filters(n_mels: int) -> np.ndarray:
    """The `(n_mels, N_FFT // 2 + 1)` float32 Slaney mel filter bank over 0–8 kHz (librosa / Whisper's)."""
    if n_mels < 1:
        raise ValueError(f"n_mels must be positive, got {n_mels}")
    fft_hz = np.linspace(0.0, SAMPLE_RATE // 2, N_FFT // 2 + 1)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), n_mels + 2))
    # Triangles: rising from edge i to i+1, falling from i+1 to i+2 (in Hz, centres equally spaced in mel).
    offsets = edges_hz[None, :] - fft_hz[:, None]  # (bins, n_mels + 2)
    widths = np.diff(edges_hz)
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    bank = np.maximum(0.0, np.minimum(rising, falling))  # (bins, n_mels)
    bank *= 2.0 / (edges_hz[2:] - edges_hz[:-2])  # Slaney normalisation: equal area per filter
    filters = np.ascontiguousarray(bank.T.astype(np.float32))
    filters.setflags(write=False)
    return filters


@functools.lru_cache(maxsize=None)
def _hann_window() -> np.ndarray:
    """Periodic Hann window of N_FFT samples (torch.hann_window's default)."""
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)


def _frames(padded: jax.Array, frames: int) -> jax.Array:
    """The first `frames` STFT frames of `padded` `(..., samples)`: `(..., frames, N_FFT)`, frame t starting at
    sample t·HOP_LENGTH. (The centred STFT has frames + 1 frames; Whisper drops the last one.)

    Built from slices, not a gather: `padded` cut into rows of HOP_LENGTH samples, frame t is row t, row t+1
    and the head of row t+2, side by side. Same values as indexing with a (frames, N_FFT) table, without baking
    that table (4.8 MB of int32 for 30 s) into the program or gathering through it on the device.
    """
    rows_per_frame = -(-N_FFT // HOP_LENGTH)
    rows = frames + rows_per_frame - 1
    grid = padded[..., : rows * HOP_LENGTH].reshape(*padded.shape[:-1], rows, HOP_LENGTH)
    pieces = [grid[..., i : i + frames, : min(HOP_LENGTH, N_FFT - i * HOP_LENGTH)] for i in range(rows_per_frame)]
    return jnp.concatenate(pieces, axis=-1)


def log_mel_spectrogram(waveform: jax.Array | np.ndarray, n_mels: int = 80) -> jax.Array:
    """16 kHz float waveform `(..., samples)` → normalised log-mel `(..., n_mels, samples // HOP_LENGTH)` float32.

    Jit-able (all shapes are static). Needs `samples > N_FFT // 2` (the reflect padding), i.e. > 12.5 ms.
    """
    waveform = jnp.asarray(waveform, dtype=jnp.float32)
    samples = waveform.shape[-1]
    if samples <= N_FFT // 2:
        raise ValueError(
            f"waveform of {samples} samples is too short for the STFT: need more than {N_FFT // 2} "
            f"samples ({N_FFT // 2 / SAMPLE_RATE * 1000:.1f} ms at {SAMPLE_RATE} Hz)"
        )
    frames = samples // HOP_LENGTH
    padding = [(0, 0)] * (waveform.ndim - 1) + [(N_FFT // 2, N_FFT // 2)]
    padded = jnp.pad(waveform, padding, mode="reflect")
    windowed = _frames(padded, frames) * _hann_window()  # (..., frames, N_FFT)
    spectrum = jnp.fft.rfft(windowed, axis=-1)  # (..., frames, bins)
    power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
    mel = jnp.einsum("mf,...tf->...mt", mel_filters(n_mels), power, precision=jax.lax.Precision.HIGHEST)
    log_mel = jnp.log10(jnp.maximum(mel, 1e-10))
    peak = jnp.max(log_mel, axis=(-2, -1), keepdims=True)
    return (jnp.maximum(log_mel, peak - 8.0) + 4.0) / 4.0


def pad_or_trim(waveform: jax.Array | np.ndarray, length_samples: int = N_SAMPLES):
    """Zero-pad or cut the last axis to `length_samples` (Whisper's window is 30 s = 480000 samples).

    NumPy in, NumPy out (for input pipelines on the host); jax arrays in, jax arrays out.
    """
    xp = np if isinstance(waveform, np.ndarray) else jnp
    samples = waveform.shape[-1]
    if samples >= length_samples:
        return waveform[..., :length_samples]
    padding = [(0, 0)] * (waveform.ndim - 1) + [(0, length_samples - samples)]
    return xp.pad(waveform, padding)
