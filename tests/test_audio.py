"""`wavlink_jax.audio` against `transformers.WhisperFeatureExtractor` (PyTorch STFT) and a float64 NumPy STFT.

Both fp32 implementations sit ~5e-5 from the float64 truth on the hardest signal (values just above the
max−8 floor carry the fp32 rounding of the loud bins); the tolerance 1e-4 is the issue's parity bound.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from wavlink_jax import audio

TOLERANCE = 1e-4


def _speech_like(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Voiced harmonics (gliding f0, formant envelope, syllable-rate AM) with hard-zero pauses and breath noise."""
    t = np.arange(int(seconds * audio.SAMPLE_RATE)) / audio.SAMPLE_RATE
    f0 = 120 + 60 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / audio.SAMPLE_RATE
    voiced = sum(np.exp(-(((k * 150) - 700) / 900) ** 2) * np.sin(k * phase) / k for k in range(1, 25))
    syllables = np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    pauses = (np.sin(2 * np.pi * 0.3 * t) > -0.6).astype(float)
    return 0.3 * (voiced * syllables + 0.01 * rng.standard_normal(t.size)) * pauses


def _signals(seconds: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * audio.SAMPLE_RATE)) / audio.SAMPLE_RATE
    signals = {
        "speech_like": _speech_like(seconds, rng),
        "tone_440": 0.5 * np.sin(2 * np.pi * 440 * t),
        "tone_7k_quiet": 1e-3 * np.sin(2 * np.pi * 7000 * t),
        "noise": 0.1 * rng.standard_normal(t.size),
        "silence": np.zeros_like(t),
        "chirp_am": 0.3 * np.sin(2 * np.pi * (100 * t + 100 * t**2)) * (1 + np.sin(2 * np.pi * 3 * t)) / 2,
    }
    return {name: signal.astype(np.float32) for name, signal in signals.items()}


def _float64_reference(waveform: np.ndarray, n_mels: int) -> np.ndarray:
    """Whisper's log-mel in float64 NumPy (independent STFT: reflect pad, periodic Hann, drop last frame)."""
    padded = np.pad(waveform.astype(np.float64), audio.N_FFT // 2, mode="reflect")
    frames = waveform.size // audio.HOP_LENGTH
    index = np.arange(frames)[:, None] * audio.HOP_LENGTH + np.arange(audio.N_FFT)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(audio.N_FFT) / audio.N_FFT)
    power = np.abs(np.fft.rfft(padded[index] * window, axis=-1)) ** 2
    log_mel = np.log10(np.maximum(audio.mel_filters(n_mels).astype(np.float64) @ power.T, 1e-10))
    return (np.maximum(log_mel, log_mel.max() - 8.0) + 4.0) / 4.0


@pytest.fixture(scope="module", params=[80, 128])
def n_mels(request):
    return request.param


@pytest.fixture(scope="module")
def extractor(n_mels):
    return WhisperFeatureExtractor(feature_size=n_mels)


@pytest.fixture(scope="module")
def jitted():
    return jax.jit(audio.log_mel_spectrogram, static_argnums=1)


def test_mel_filters_match_transformers(n_mels, extractor):
    ours = audio.mel_filters(n_mels)
    assert ours.shape == (n_mels, audio.N_FFT // 2 + 1) and ours.dtype == np.float32
    diff = np.abs(ours - extractor.mel_filters.T).max()
    assert diff < 1e-7, f"mel filter bank max abs diff {diff:.2e}"


@pytest.mark.parametrize("seconds", [30, 10])
def test_log_mel_matches_transformers(n_mels, extractor, jitted, seconds):
    """30 s: HF's default (no padding needed). 10 s: HF with padding="longest" normalises over the same 10 s
    window as we do (its default pads to 30 s first; that case is test_short_clip_padded_to_30s)."""
    signals = _signals(seconds)
    batch = np.stack(list(signals.values()))
    ours = np.asarray(jitted(batch, n_mels))
    assert ours.shape == (len(signals), n_mels, seconds * 100)
    for row, (name, waveform) in enumerate(signals.items()):
        reference = extractor(
            waveform, sampling_rate=audio.SAMPLE_RATE, padding="longest", return_tensors="np"
        ).input_features[0]
        diff_hf = np.abs(ours[row] - reference).max()
        diff_f64 = np.abs(ours[row] - _float64_reference(waveform, n_mels)).max()
        assert diff_hf <= TOLERANCE, f"{name} {n_mels} mels {seconds}s: max abs diff vs HF {diff_hf:.2e}"
        assert diff_f64 <= TOLERANCE, f"{name} {n_mels} mels {seconds}s: max abs diff vs float64 {diff_f64:.2e}"


def test_short_clip_padded_to_30s(extractor, n_mels):
    """A 10 s clip through pad_or_trim is exactly HF's default call (zero-padded to 30 s before the STFT)."""
    waveform = _signals(10)["speech_like"]
    reference = extractor(waveform, sampling_rate=audio.SAMPLE_RATE, return_tensors="np").input_features[0]
    ours = np.asarray(audio.log_mel_spectrogram(audio.pad_or_trim(waveform), n_mels))
    diff = np.abs(ours - reference).max()
    assert ours.shape == (n_mels, audio.N_FRAMES)
    assert diff <= TOLERANCE, f"padded 10 s clip: max abs diff vs HF {diff:.2e}"


def test_mel_filter_bank_matmul_is_full_precision_whatever_the_default():
    """The filter bank's matmul asks for HIGHEST itself: under jax's default precision (TF32 on GPUs, bf16 passes
    on TPUs) the log-mel would drift from Whisper's. Read in the program lowered under "default" (the context
    manager overrides conftest's global "highest"), as test_inference does for the embedder."""
    with jax.default_matmul_precision("default"):
        program = jax.jit(audio.log_mel_spectrogram).lower(jnp.zeros((2, 1600), jnp.float32)).as_text()
    ops = re.findall(r"stablehlo\.dot_general[^\n]*", program)
    lower = [op for op in ops if op.count("HIGHEST") != 2]  # one precision per operand
    assert ops and not lower, lower[:2]


def test_normalisation_is_per_example():
    """A loud and a quiet clip in one batch are normalised independently (max − 8 per example)."""
    signals = _signals(2)
    loud, quiet = signals["speech_like"], 1e-4 * signals["tone_440"]
    batched = np.asarray(audio.log_mel_spectrogram(np.stack([loud, quiet])))
    assert batched[1].min() < batched[0].max() - 2.0  # a max shared across the batch would have raised these
    for row, waveform in enumerate([loud, quiet]):
        np.testing.assert_allclose(batched[row], np.asarray(audio.log_mel_spectrogram(waveform)), atol=1e-6)
        assert batched[row].min() >= batched[row].max() - 2.0 - 1e-6  # floor at max − 8 in log10 → −2 after /4


def test_frame_count_and_shapes():
    waveform = jnp.zeros((2, 3, 16_160))
    assert audio.log_mel_spectrogram(waveform, n_mels=128).shape == (2, 3, 128, 101)
    with pytest.raises(ValueError, match="too short"):
        audio.log_mel_spectrogram(np.zeros(200, np.float32))


@pytest.mark.parametrize("samples", [201, 401, 16_159, 16_160])
def test_frames_are_the_strided_windows_of_the_padded_signal(samples):
    """The slice-built frames equal indexing with the (frames, N_FFT) start table, also for lengths that are no
    multiple of the hop and the shortest accepted one (where the last frame reaches the padded end)."""
    padded = jnp.asarray(np.random.default_rng(0).standard_normal((2, samples + audio.N_FFT)), jnp.float32)
    frames = samples // audio.HOP_LENGTH
    table = np.arange(frames)[:, None] * audio.HOP_LENGTH + np.arange(audio.N_FFT)
    got = audio._frames(padded, frames)
    assert got.shape == (2, frames, audio.N_FFT)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(padded)[..., table])


def test_pad_or_trim_numpy_and_jax():
    waveform = np.arange(10, dtype=np.float32).reshape(2, 5)
    padded = audio.pad_or_trim(waveform, 8)
    assert isinstance(padded, np.ndarray) and padded.shape == (2, 8)
    np.testing.assert_array_equal(padded[:, 5:], 0)
    np.testing.assert_array_equal(padded[:, :5], waveform)
    trimmed = audio.pad_or_trim(jnp.asarray(waveform), 3)
    assert isinstance(trimmed, jax.Array) and trimmed.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(trimmed), waveform[:, :3])
    assert audio.pad_or_trim(np.zeros(7, np.float32)).shape == (audio.N_SAMPLES,)
