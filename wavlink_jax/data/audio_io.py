"""Clip loading: decode (libsndfile) → mono → resample to 16 kHz (soxr) → crop → zero-pad, and bad-input reasons.

`load_audio` reads only the part of a file it needs (the crop window plus a 20 ms margin for the resampler,
and for MP3 a decoder pre-roll), so the cost of a training example does not grow with the length of the file;
Ogg Vorbis is the exception, decoded from its start (`_preroll` says why). A crop equals the same samples of a
whole-file decode. Anything wrong with a clip raises `BadAudio` with one of `SKIP_REASONS`; the pipeline skips
and counts it:

    missing      the file does not exist
    empty        a zero-byte file, or an audio file / array with no samples (or too few for one sample at the
                 target rate: 1-2 frames at 44.1/48 kHz)
    truncated    the file ends before its header says it should (libsndfile fails or returns fewer frames
                 while reading, or a WAV's data chunk is shorter than declared); an MP3 may fall short of its
                 header's length estimate by up to 1% (`_MP3_LENGTH_SLACK`), which is read as silence
    not_audio    libsndfile cannot open it (text, HTML error pages, unknown formats)
    not_finite   NaN or infinite samples (a damaged floating-point file or array), or samples so large that
                 mixing to mono or resampling overflows: one would make the loss NaN
    too_short    shorter than the configured minimum length
    no_captions  a training record without captions (checked by the pipeline, not here)

A file whose header gives no length (a FLAC stream ffmpeg wrote to a pipe; a WAV's declared size of 0xFFFFFFFF
is read to its end as libsndfile reads it) is decoded whole at each load, its length being known only at its end.

Limits: a truncated Ogg/Vorbis file ends where its data ends (its header states no length), so it is read as a
shorter, valid clip, and so is a FLAC without a length cut between two of its frames, or one whose decoding stops
on a tag or padding at its end (a damage there is not told apart); a truncated file, or a non-finite sample, is
only noticed inside the read window. Only floating-point sources are checked for non-finite samples: integer PCM
(FLAC, 16/24-bit WAV, the array_record sets) cannot hold them, and the check would cost the fast int16 path a
quarter of its time.
"""

from __future__ import annotations

import math
import os
import re
from typing import Callable

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000
SKIP_REASONS = ("missing", "empty", "truncated", "not_audio", "not_finite", "too_short", "no_captions")
LOGGED_PER_REASON = 20  # skipped clips logged with their file per reason (per process; per split in a TFDS build)
_FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")  # libsndfile's floating-point sample formats (WAV, AIFF, CAF, ...)
# soxr HQ's filter spans ~10 ms at 11-48 kHz but ~20 ms upsampling from 8 kHz (a 10 ms margin left 3e-5 errors there)
_RESAMPLER_MARGIN_SECONDS = 0.02
# An MP3 without a Xing/Info header has its length estimated from its size (libsndfile's own lowest-rate CBR files
# at 11.025-44.1 kHz decode 0.47% fewer frames than that). A shortfall up to this fraction is read as silence;
# more is `truncated`.
_MP3_LENGTH_SLACK = 0.01
# libsndfile's WAV header log says "data : 264600 (should be 132278)" when the data chunk was cut short.
_WAV_SHORT_DATA = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_WAV_UNKNOWN_SIZE = 0xFFFFFFFF
# libsndfile's frame count for a file whose header gives no length (a FLAC stream's total of 0): 2**63 - 1.
_UNKNOWN_FRAMES = 2**62
_DECODE_BLOCK_FRAMES = 1 << 16


class BadAudio(Exception):
    """A clip that cannot be used; `reason` is one of SKIP_REASONS, the message names the file."""

    def __init__(self, reason: str, message: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(message)
        self.reason = reason


def samples(seconds: float, rate: int = SAMPLE_RATE) -> int:
    """The number of samples `seconds` last at `rate` (windows and minimum lengths given in seconds)."""
    return int(round(seconds * rate))


def resample(x: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample float32 samples (time on axis 0) with soxr's high-quality filter."""
    if from_rate == to_rate:
        return x.astype(np.float32, copy=False)
    return soxr.resample(x.astype(np.float32, copy=False), from_rate, to_rate, quality="HQ")


def _as_float(samples: np.ndarray) -> np.ndarray:
    """int16/int32 full scale or float samples → float32 in [-1, 1]."""
    if samples.dtype == np.int16:
        return samples.astype(np.float32) / 32768.0
    if samples.dtype == np.int32:
        return samples.astype(np.float32) / 2147483648.0
    if np.issubdtype(samples.dtype, np.floating):
        return samples.astype(np.float32, copy=False)
    raise TypeError(f"audio arrays must be int16, int32 or float, got {samples.dtype}")


def _preroll(file: sf.SoundFile) -> int:
    """Source frames to decode, and drop, before a read window: where a seek does not land on the same samples as
    a whole-file decode.

    MP3: libsndfile's decoder (mpg123) restarts at a seek without the bit reservoir and the overlap of the frames
    before, so the first samples after a seek come out as zeros and a fade-in. Measured with libsndfile 1.2.2 on
    LAME-encoded CBR/VBR files (tones, noise, bursts, clicks; 8-48 kHz, down to ~10 kb/s), the samples after a seek
    match a whole-file decode once at most 4 MPEG-1 frames of 1152 samples (32-48 kHz) or 18 MPEG-2/2.5 frames
    of 576 samples (8-24 kHz) were decoded before them; this is twice that.

    Ogg Vorbis: libsndfile 1.2.2's seek past ~119k frames of a 44.1/48 kHz file lands ~300 frames late (a crop
    shifted by 7 ms), so the file is decoded from its start (all its frames as pre-roll).
    """
    if file.format == "MP3":  # any MPEG layer
        return 8 * 1152 if file.samplerate >= 32000 else 36 * 576
    if file.subtype == "VORBIS":
        return file.frames
    return 0


def _decode_to_end(file: sf.SoundFile, name: str) -> np.ndarray:
    """All of `file`'s frames from its position, float32 `(frames, channels)`, for a file whose header gives no
    length. Read through libsndfile's `sf_readf_float`: soundfile's `read` seeks to where each read stopped, and
    on such a FLAC stream the seek to its end fails ("Internal psf_fseek() failed"). Raises BadAudio("truncated")
    where the decoder stops on an error (a cut or damaged stream: "flac decoder lost sync") before the end."""
    blocks = []
    while True:
        block = np.empty((_DECODE_BLOCK_FRAMES, file.channels), np.float32)
        pointer = sf._ffi.cast("float *", block.ctypes.data)
        read = max(0, sf._snd.sf_readf_float(file._file, pointer, _DECODE_BLOCK_FRAMES))
        blocks.append(block[:read])
        if read < _DECODE_BLOCK_FRAMES:
            break
    if sf._snd.sf_error(file._file) and not _has_trailer(name):
        decoded = sum(map(len, blocks))
        error = sf._ffi.string(sf._snd.sf_strerror(file._file)).decode(errors="replace")
        raise BadAudio("truncated", f"{name}: decoding failed after frame {decoded} ({error})")
    return np.concatenate(blocks)


def _has_trailer(path: str) -> bool:
    """Whether the file ends in bytes that are no audio but belong there: an ID3v1 or APEv2 tag, or zero padding.
    The decoder of a stream without a length loses sync on them as on a cut or damaged stream."""
    with open(path, "rb") as file:
        file.seek(0, os.SEEK_END)
        file.seek(max(0, file.tell() - 128))
        tail = file.read()
    return tail.startswith(b"TAG") or b"APETAGEX" in tail[-32:] or tail[-16:] == bytes(16)


def _window_reader(file: sf.SoundFile, name: str, frames: int) -> Callable[[int, int], np.ndarray]:
    """`read(start, stop)`: frames [start, stop) of `file` (`frames` long by its header) as float32 `(frames,
    channels)`, decoded after the decoder's pre-roll (`_preroll`). Raises BadAudio("truncated") where the file
    ends before its header says, beyond an MP3's slack (`_MP3_LENGTH_SLACK`)."""
    preroll = _preroll(file)
    slack = math.ceil(_MP3_LENGTH_SLACK * frames) if file.format == "MP3" else 0  # any MPEG layer

    def read(start: int, stop: int) -> np.ndarray:
        lead = min(start, preroll)  # decoded and dropped: the decoder's state at `start`
        try:
            file.seek(start - lead)
            data = file.read(stop - start + lead, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as err:
            raise BadAudio("truncated", f"{name}: decoding failed after frame {start - lead} ({err})") from err
        missing = stop - start + lead - len(data)
        if missing > slack:
            raise BadAudio("truncated", f"{name}: ends at frame {start - lead + len(data)}, header says {frames}")
        return data[lead:]  # an MP3 a little shorter than its header: the end is zero-padded below

    return read


def _open_file(path: str) -> tuple[sf.SoundFile, int, int]:
    """Open `path` for reading; (file, frames, sample rate). Raises BadAudio."""
    if not os.path.exists(path):
        raise BadAudio("missing", f"{path}: file not found")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise BadAudio("empty", f"{path}: zero-byte file")
    try:
        file = sf.SoundFile(path)
    except (sf.LibsndfileError, RuntimeError, OSError, TypeError) as err:  # TypeError: a `.raw` name (headerless)
        raise BadAudio("not_audio", f"{path}: libsndfile cannot read it as audio ({err})") from err
    if file.format in ("WAV", "WAVEX", "RF64"):
        match = _WAV_SHORT_DATA.search(file.extra_info)
        # A declared size of 0xFFFFFFFF means "unknown" (ffmpeg writing to a pipe): libsndfile reads to the end.
        if match and int(match.group(2)) < int(match.group(1)) != _WAV_UNKNOWN_SIZE:
            file.close()
            raise BadAudio("truncated", f"{path}: WAV data chunk holds {match.group(2)} of {match.group(1)} bytes")
    return file, file.frames, file.samplerate


def load_audio(
    audio: str | os.PathLike | np.ndarray,
    sample_rate: int = 0,
    *,
    window_samples: int | None = None,
    min_samples: int = 0,
    rng: np.random.Generator | None = None,
    target_rate: int = SAMPLE_RATE,
    array_name: str = "<array>",
) -> np.ndarray:
    """A clip as float32 mono samples at `target_rate`.

    `audio` is a file path (`sample_rate` ignored: the header says) or a 1-D (or (samples, channels)) int16 /
    float array at `sample_rate`, which error messages call `array_name` (e.g. its record's id). With
    `window_samples`, the result has exactly that length: a random window
    when `rng` is given (training), else the head (evaluation); a shorter clip is zero-padded at the end.
    Without it, the whole clip. Raises BadAudio (missing/empty/truncated/not_audio/not_finite/too_short).
    """
    if isinstance(audio, np.ndarray):
        if sample_rate <= 0:
            raise ValueError(f"an audio array needs its sample_rate, got {sample_rate}")
        samples = audio if audio.ndim == 2 else audio.reshape(len(audio), 1)
        name, frames, rate, file = array_name, len(samples), sample_rate, None
        floating = np.issubdtype(samples.dtype, np.floating)
        read: Callable[[int, int], np.ndarray] = lambda start, stop: _as_float(samples[start:stop])
    else:
        name = os.fspath(audio)
        file, frames, rate = _open_file(name)
        floating = file.subtype in _FLOAT_SUBTYPES
        if frames >= _UNKNOWN_FRAMES:  # no length in the header (a FLAC stream ffmpeg wrote to a pipe): decode all
            try:
                decoded = _decode_to_end(file, name)
            finally:
                file.close()
            file, frames = None, len(decoded)
            read = lambda start, stop: decoded[start:stop]  # noqa: E731 - as for an array
        else:
            read = _window_reader(file, name, frames)

    try:
        if frames <= 0:
            raise BadAudio("empty", f"{name}: no samples")
        total = frames * target_rate // rate  # length at the target rate
        if total < min_samples:
            raise BadAudio("too_short", f"{name}: {frames / rate:.3f} s, shorter than {min_samples / target_rate:.3f} s")
        if total == 0:
            raise BadAudio("empty", f"{name}: {frames} samples at {rate} Hz, less than one at {target_rate} Hz")
        length = total if window_samples is None else min(window_samples, total)
        start = int(rng.integers(0, total - length + 1)) if rng is not None else 0
        # The source frames covering [start, start + length) at the target rate, plus a margin for the filter.
        # The read starts on a frame that falls exactly on a target-rate sample (a multiple of
        # rate / gcd), so the crop is sample-aligned with a decode of the whole file.
        step_in, step_out = rate // math.gcd(rate, target_rate), target_rate // math.gcd(rate, target_rate)
        margin = 0 if rate == target_rate else math.ceil(_RESAMPLER_MARGIN_SECONDS * target_rate)
        block = max(0, start - margin) // step_out
        read_from = block * step_in
        read_to = min(frames, math.ceil((start + length + margin) * rate / target_rate))
        data = read(read_from, read_to)
        if floating and not np.isfinite(data).all():
            bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
            raise BadAudio("not_finite", f"{name}: {bad} NaN or infinite samples in frames {read_from}-{read_to}")
    finally:
        if file is not None:
            file.close()
    offset = start - block * step_out
    with np.errstate(over="ignore", invalid="ignore"):  # such overflow is a skipped clip (below), not a warning
        mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
        clip = resample(mono, rate, target_rate)[offset : offset + length]
    if floating and not np.isfinite(clip).all():  # finite samples near float32's limit overflow in the mean or filter
        peak = float(np.abs(data).max())
        raise BadAudio("not_finite", f"{name}: samples up to {peak:.3g} overflow when mixed to mono or resampled")
    size = length if window_samples is None else window_samples
    if len(clip) < size:  # a short clip, a sample lost to rounding at the end, or an MP3 shorter than its header
        clip = np.pad(clip, (0, size - len(clip)))
    return clip
