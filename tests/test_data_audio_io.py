"""Clip loading: resampling keeps frequencies, crops read the right samples, every bad-input reason is raised."""

import numpy as np
import pytest
import soundfile as sf

from wavlink_jax.data import audio_io
from wavlink_jax.data.audio_io import BadAudio, load_audio


def _tone(freq, seconds, rate, amplitude=0.5):
    return amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)


def test_resampled_tone_keeps_its_frequency(tmp_path):
    path = tmp_path / "tone.flac"
    sf.write(path, _tone(1000.0, 1.0, 44100), 44100, subtype="PCM_24")
    y = load_audio(path)
    assert y.dtype == np.float32 and len(y) == 16000
    expected = _tone(1000.0, 1.0, 16000)
    assert np.abs(y - expected)[200:-200].max() < 2e-3  # soxr HQ: tiny passband error away from the edges
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    assert np.argmax(spectrum) == 1000  # 1 Hz bins


@pytest.mark.parametrize("rate", [8000, 22050, 48000])  # 8 kHz: the resampler's filter is longest in time
def test_random_crop_matches_the_full_decode(tmp_path, rate):
    x = _tone(440.0, 3.0, rate) + 0.2 * _tone(3100.0, 3.0, rate) * np.linspace(0, 1, 3 * rate)
    path = tmp_path / "clip.wav"
    sf.write(path, np.stack([x, 0.5 * x], axis=1), rate, subtype="FLOAT")  # stereo → mean = 0.75 x
    full = load_audio(path)
    assert len(full) == 3 * 16000
    for seed in range(6):
        crop = load_audio(path, window_samples=16000, rng=np.random.default_rng(seed))
        start = int(np.random.default_rng(seed).integers(0, len(full) - 16000 + 1))
        assert len(crop) == 16000
        np.testing.assert_allclose(crop, full[start : start + 16000], atol=1e-6)  # sample-aligned
    head = load_audio(path, window_samples=8000)
    np.testing.assert_allclose(head, full[:8000], atol=1e-6)
    np.testing.assert_allclose(full[300:-300], 0.75 * _tone(440.0, 3.0, 16000)[300:-300] + 0.15 * (_tone(3100.0, 3.0, 16000) * np.linspace(0, 1, 48000))[300:-300], atol=2e-3)


@pytest.mark.parametrize(
    "rate, kind, options",
    [(44100, "MP3", {}), (22050, "MP3", {"compression_level": 0.9, "bitrate_mode": "VARIABLE"}), (48000, "VORBIS", {})],
)
def test_compressed_random_crops_match_the_full_decode(tmp_path, rate, kind, options):
    """The MP3 decoder starts a seek with zeros and a fade-in (~1000-10000 samples); a Vorbis seek past ~119k frames
    lands ~300 frames late (half of these crops were shifted). The crop must do neither."""
    t = np.arange(4 * rate) / rate
    path = tmp_path / "chirp.audio"  # the low-rate VBR MP3 needs the longest pre-roll measured (18 frames of 576)
    audio_format, subtype = ("MP3", "MPEG_LAYER_III") if kind == "MP3" else ("OGG", "VORBIS")
    sf.write(path, 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t), rate, format=audio_format, subtype=subtype, **options)
    full = load_audio(path)
    for seed in range(12):
        crop = load_audio(path, window_samples=8000, rng=np.random.default_rng(seed))
        start = int(np.random.default_rng(seed).integers(0, len(full) - 8000 + 1))
        np.testing.assert_allclose(crop, full[start : start + 8000], atol=1e-6, err_msg=f"crop at {start}")


def test_an_mp3_a_little_shorter_than_its_header_is_read_and_a_cut_one_is_truncated(tmp_path):
    """A CBR MP3 without an Info header (libsndfile's at 11.025 kHz, lowest bit rate) decodes 0.47% fewer frames
    than mpg123 estimates from its size: kept (the missing end is silence), not skipped as truncated; an MP3 whose
    header states its length and that was cut at 70% still is."""
    rate = 11025
    t = np.arange(4 * rate) / rate
    path = tmp_path / "cbr.mp3"
    sf.write(path, 0.3 * np.sin(2 * np.pi * 440 * t), rate, format="MP3", subtype="MPEG_LAYER_III",
             bitrate_mode="CONSTANT", compression_level=0.9)
    with sf.SoundFile(path) as file:
        header_frames, decoded = file.frames, file.read(dtype="float32")
    assert 0 < header_frames - len(decoded) <= 0.01 * header_frames  # the quirk this test is about
    full = load_audio(path)
    assert len(full) == header_frames * 16000 // rate
    real_end = len(decoded) * 16000 // rate
    assert np.abs(full[real_end - 4000 : real_end - 100]).max() > 0.2 and np.abs(full[real_end + 50 :]).max() < 1e-4
    for seed in range(4):  # crops still match the whole-file decode, the last ones included
        crop = load_audio(path, window_samples=16000, rng=np.random.default_rng(seed))
        start = int(np.random.default_rng(seed).integers(0, len(full) - 16000 + 1))
        np.testing.assert_allclose(crop, full[start : start + 16000], atol=1e-6)
    whole = tmp_path / "info.mp3"  # this one has an Info header: its length is exact, not estimated from the size
    sf.write(whole, 0.3 * np.sin(2 * np.pi * 440 * t), rate, format="MP3", subtype="MPEG_LAYER_III",
             bitrate_mode="CONSTANT", compression_level=0.5)
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.7)])
    with pytest.raises(BadAudio, match="header says") as err:
        load_audio(cut)
    assert err.value.reason == "truncated"


def test_short_clips_are_zero_padded_and_arrays_accepted():
    samples = (np.arange(8000) % 100 * 300).astype(np.int16)
    y = load_audio(samples, 16000, window_samples=16000, rng=np.random.default_rng(0))
    assert len(y) == 16000 and not y[8000:].any()
    np.testing.assert_array_equal(y[:8000], samples / 32768.0)
    with pytest.raises(ValueError, match="sample_rate"):
        load_audio(samples, 0)


def test_integer_arrays_are_read_at_their_full_scale():
    """An int16 array is scaled by 2**15, an int32 one by 2**31, to the float samples they stand for."""
    x = _tone(500.0, 0.5, 16000)
    for dtype, full_scale in ((np.int16, 2**15), (np.int32, 2**31)):
        y = load_audio(np.round(x * full_scale).astype(dtype), 16000)
        np.testing.assert_allclose(y, x, atol=1e-6 + 1 / full_scale, err_msg=str(dtype))


def test_seconds_are_rounded_to_samples():
    """2.01 * 16000 is 32159.999… in floating point: truncated, a 2.01 s window was one sample short."""
    assert audio_io.samples(2.01) == 32160 and audio_io.samples(8.12) == 129920
    assert audio_io.samples(0.7, 44100) == 30870


def test_every_bad_input_reason(tmp_path):
    good = _tone(500.0, 2.0, 44100)
    sf.write(tmp_path / "good.flac", good, 44100)
    sf.write(tmp_path / "good.wav", good, 44100, subtype="PCM_16")
    cases = {
        "missing": tmp_path / "nope.flac",
        "empty": tmp_path / "empty.wav",
        "not_audio": tmp_path / "page.mp3",
        "truncated": tmp_path / "cut.flac",
        "too_short": tmp_path / "short.flac",
    }
    cases["empty"].write_bytes(b"")
    cases["not_audio"].write_text("<html>404 Not Found</html>" * 20)
    cases["headerless"] = tmp_path / "clip.raw"  # libsndfile wants a rate for `.raw` (soundfile's TypeError)
    cases["headerless"].write_bytes((tmp_path / "good.wav").read_bytes())
    flac = (tmp_path / "good.flac").read_bytes()
    cases["truncated"].write_bytes(flac[: len(flac) // 2])
    sf.write(cases["too_short"], good[:4410], 44100)  # 0.1 s
    for reason, path in cases.items():
        with pytest.raises(BadAudio) as err:
            load_audio(path, min_samples=8000)
        assert err.value.reason == {"headerless": "not_audio"}.get(reason, reason) and str(path) in str(err.value)

    wav = (tmp_path / "good.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(wav[: len(wav) // 2])
    sf.write(tmp_path / "zero.wav", np.zeros(0), 16000)
    for path, reason in ((tmp_path / "cut.wav", "truncated"), (tmp_path / "zero.wav", "empty")):
        with pytest.raises(BadAudio) as err:
            load_audio(path)
        assert err.value.reason == reason
    with pytest.raises(BadAudio, match="no samples"):
        load_audio(np.zeros(0, np.int16), 16000)
    sf.write(tmp_path / "two.wav", good[:2], 44100)  # less than one sample at 16 kHz
    for source, rate in ((tmp_path / "two.wav", 0), (good[:2], 48000)):
        for window in (None, 16000):
            with pytest.raises(BadAudio, match="less than one at 16000 Hz") as err:
                load_audio(source, rate, window_samples=window)
            assert err.value.reason == "empty"
    assert len(load_audio(tmp_path / "good.flac", min_samples=8000)) == 32000


def test_files_whose_header_gives_no_length_are_read_whole(tmp_path):
    """What ffmpeg writes to a pipe: a FLAC stream with a total of 0 samples ("unknown", libsndfile says 2**63 - 1
    frames) and a WAV with 0xFFFFFFFF for its sizes. Both read as the file they were made from, whole and cropped
    (the FLAC crashed numpy with "array is too big", or counted as truncated; the WAV was truncated)."""
    import struct

    tone = _tone(440.0, 2.0, 48000)
    sf.write(tmp_path / "known.flac", tone, 48000)
    flac = bytearray((tmp_path / "known.flac").read_bytes())
    packed = int.from_bytes(flac[18:26], "big") & ~((1 << 36) - 1)  # STREAMINFO: rate, channels, bits; total = 0
    flac[18:26], flac[26:42] = packed.to_bytes(8, "big"), bytes(16)  # and no MD5
    (tmp_path / "piped.flac").write_bytes(flac)
    sf.write(tmp_path / "known.wav", _tone(440.0, 2.0, 16000), 16000)
    wav = bytearray((tmp_path / "known.wav").read_bytes())
    data = wav.find(b"data")
    wav[4:8] = wav[data + 4 : data + 8] = struct.pack("<I", 0xFFFFFFFF)
    (tmp_path / "piped.wav").write_bytes(wav)
    for known, piped in (("known.flac", "piped.flac"), ("known.wav", "piped.wav")):
        np.testing.assert_array_equal(load_audio(tmp_path / piped), load_audio(tmp_path / known))
        crops = [
            load_audio(tmp_path / name, window_samples=8000, rng=np.random.default_rng(1)) for name in (known, piped)
        ]
        np.testing.assert_array_equal(*crops)
    assert sf.info(str(tmp_path / "piped.flac")).frames > 2**62  # what the fix is for
    (tmp_path / "piped_cut.flac").write_bytes(bytes(flac[: len(flac) // 2]))  # the decoder loses sync: truncated
    with pytest.raises(BadAudio, match=r"piped_cut\.flac: decoding failed after frame \d+ \(.*lost sync") as err:
        load_audio(tmp_path / "piped_cut.flac")
    assert err.value.reason == "truncated"
    for name, trailer in (("id3", b"TAG" + bytes(125)), ("padded", bytes(64))):  # not audio, but no damage either
        (tmp_path / f"piped_{name}.flac").write_bytes(bytes(flac) + trailer)
        np.testing.assert_array_equal(load_audio(tmp_path / f"piped_{name}.flac"), load_audio(tmp_path / "known.flac"))


def test_too_short_counts_samples_at_the_target_rate(tmp_path):
    """0.3 s at 44.1 kHz is 13230 frames but 4800 samples at 16 kHz: shorter than a 0.5 s minimum (8000)."""
    sf.write(tmp_path / "short.wav", _tone(500.0, 0.3, 44100), 44100)
    sf.write(tmp_path / "long.wav", _tone(500.0, 0.6, 44100), 44100)
    with pytest.raises(BadAudio, match=r"short\.wav: 0\.300 s, shorter than 0\.500 s") as err:
        load_audio(tmp_path / "short.wav", min_samples=8000)
    assert err.value.reason == "too_short"
    assert len(load_audio(tmp_path / "long.wav", min_samples=8000)) == 9600


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_samples_are_a_bad_clip(tmp_path, bad_value):
    """A damaged float file or array (a NaN or infinity would make the loss NaN, or a built data set's int16
    arbitrary) is refused; integer PCM cannot hold one; only the read window is looked at."""
    from wavlink_jax.data.tfds_builders import decode_to_16k_int16

    samples = _tone(500.0, 2.0, 16000).astype(np.float32)
    samples[20000] = bad_value  # in the second half
    sf.write(tmp_path / "float.wav", samples, 16000, subtype="FLOAT")
    sf.write(tmp_path / "double.wav", samples.astype(np.float64), 16000, subtype="DOUBLE")
    for source in (tmp_path / "float.wav", tmp_path / "double.wav"):
        with pytest.raises(BadAudio, match=r"float\.wav|double\.wav") as err:
            load_audio(source)
        assert err.value.reason == "not_finite" and "1 NaN or infinite samples" in str(err.value)
        assert np.isfinite(load_audio(source, window_samples=16000)).all()  # the head window is clean
    assert decode_to_16k_int16(str(tmp_path / "float.wav")) == "not_finite"
    with pytest.raises(BadAudio) as err:
        load_audio(samples, 16000)
    assert err.value.reason == "not_finite" and "<array>" in str(err.value)


def test_samples_that_overflow_when_mixed_or_resampled_are_not_finite(tmp_path):
    """Finite float samples near float32's limit become infinite in the stereo mean or the resampler: refused
    like a NaN, not handed to a batch (they passed the check on the file's samples)."""
    loud = (0.1 * np.random.default_rng(0).standard_normal((32000, 2))).astype(np.float32)
    loud[5000:5004] = 3e38
    sf.write(tmp_path / "stereo.wav", loud, 16000, subtype="FLOAT")
    sf.write(tmp_path / "at_44k.wav", loud[:, 0], 44100, subtype="FLOAT")
    for name in ("stereo.wav", "at_44k.wav"):
        with pytest.raises(BadAudio, match=rf"{name}: samples up to 3e\+38 overflow when mixed") as err:
            load_audio(tmp_path / name, window_samples=16000)
        assert err.value.reason == "not_finite"
