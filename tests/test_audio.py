"""Audio decoding: every bad-input policy of atae.audio, and resampling/downmix correctness."""

from __future__ import annotations

import resource

import numpy as np
import pytest
import soundfile as sf

from atae.audio import AUDIO_EXTENSIONS, is_silent, load_audio, probe
from atae.errors import AudioError


def test_extensions_cover_the_basics():
    assert {"wav", "flac", "ogg"} <= AUDIO_EXTENSIONS
    assert ("mp3" in AUDIO_EXTENSIONS) == ("MP3" in sf.available_formats())


def test_probe_and_plain_load(write_wav):
    p = write_wav("a.wav", seconds=0.5, sr=16000)
    info = probe(p)
    assert (info.sample_rate, info.channels, info.frames) == (16000, 1, 8000)
    assert info.duration == pytest.approx(0.5)
    x = load_audio(p, 16000)
    ref, _ = sf.read(p, dtype="float32")
    assert x.dtype == np.float32 and np.array_equal(x, ref)


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="not found") as ei:
        load_audio(tmp_path / "nope.wav", 16000)
    assert "nope.wav" in str(ei.value)


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.wav"
    p.write_bytes(b"")
    with pytest.raises(AudioError, match="empty") as ei:
        load_audio(p, 16000)
    assert str(p) in str(ei.value) and "fix:" in str(ei.value)


def test_zero_frames_file(tmp_path):
    p = tmp_path / "zero.wav"
    sf.write(p, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="no audio frames"):
        load_audio(p, 16000)


def test_corrupt_bytes_with_wav_extension(tmp_path):
    p = tmp_path / "corrupt.wav"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(AudioError, match="not a readable audio file") as ei:
        load_audio(p, 16000)
    assert "corrupt.wav" in str(ei.value) and "re-encode" in str(ei.value)


def test_text_named_ogg(tmp_path):
    p = tmp_path / "notes.ogg"
    p.write_text("this is not audio\n" * 20)
    with pytest.raises(AudioError, match="not a readable audio file"):
        probe(p)
    with pytest.raises(AudioError):
        load_audio(p, 16000)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
def test_truncated_file(tmp_path, fmt):
    x = (0.1 * np.random.default_rng(1).standard_normal(44100)).astype(np.float32)
    full = tmp_path / f"full.{fmt.lower()}"
    sf.write(full, x, 44100, format=fmt)
    data = full.read_bytes()
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(data[: len(data) // 2])  # header intact, half the data gone
    with pytest.raises(AudioError) as ei:
        load_audio(cut, 44100)
    assert "cut." in str(ei.value)
    if fmt == "WAV":  # libsndfile would silently return the first half: we refuse it
        assert "truncated" in str(ei.value)


def test_silent_is_valid(write_wav):
    p = write_wav("quiet.wav", seconds=1.0, sr=16000, kind="silence")
    x = load_audio(p, 16000)
    assert x.shape == (16000,) and not np.any(x)
    assert is_silent(x)
    assert not is_silent(np.full(10, 0.01, dtype=np.float32))


def test_nan_samples_rejected(tmp_path):
    x = np.zeros(1000, dtype=np.float32)
    x[500] = np.nan
    p = tmp_path / "nan.wav"
    sf.write(p, x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        load_audio(p, 16000)


def test_stereo_downmix_is_channel_mean(tmp_path):
    rng = np.random.default_rng(2)
    st = (0.2 * rng.standard_normal((4000, 2))).astype(np.float32)
    p = tmp_path / "st.wav"
    sf.write(p, st, 16000, subtype="FLOAT")
    x = load_audio(p, 16000)
    expected = (st[:, 0].astype(np.float64) + st[:, 1]) / 2.0
    np.testing.assert_allclose(x, expected, atol=1e-7)


def _peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec)) * sr / len(x)


@pytest.mark.parametrize("src_sr,dst_sr", [(8000, 32000), (96000, 32000), (44100, 32000), (16000, 44100)])
def test_resampling_keeps_length_and_frequency(tmp_path, src_sr, dst_sr):
    seconds = 2.0
    t = np.arange(int(seconds * src_sr)) / src_sr
    p = tmp_path / f"sine{src_sr}.wav"
    sf.write(p, (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32), src_sr, subtype="FLOAT")
    x = load_audio(p, dst_sr)
    assert abs(x.shape[0] - seconds * dst_sr) <= 1
    assert abs(_peak_hz(x, dst_sr) - 1000.0) <= dst_sr / x.shape[0]  # within one FFT bin
    # amplitude preserved away from the edges (a sine's RMS is A / sqrt(2))
    mid = x[dst_sr // 4: -dst_sr // 4]
    assert np.sqrt(np.mean(mid.astype(np.float64) ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=1e-3)


def test_segment(tmp_path):
    sr = 8000
    x = np.arange(sr * 3, dtype=np.float32) / (sr * 3)
    p = tmp_path / "ramp.wav"
    sf.write(p, x, sr, subtype="FLOAT")
    seg = load_audio(p, sr, start_s=1.0, duration_s=0.5)
    np.testing.assert_array_equal(seg, x[sr: sr + sr // 2])
    with pytest.raises(AudioError, match="segment"):
        load_audio(p, sr, start_s=5.0)


def test_too_long_needs_max_seconds(write_wav):
    p = write_wav("long.wav", seconds=3.0, sr=8000)
    with pytest.raises(AudioError, match="max_seconds") as ei:
        load_audio(p, 8000, max_seconds=2.0)
    assert "long.wav" in str(ei.value) and "split" in str(ei.value)
    assert load_audio(p, 8000, max_seconds=3.5).shape == (24000,)


def test_twenty_minute_file(tmp_path):
    """A 20-minute file (8 kHz 16-bit, 19 MB) decodes in blocks to 32 kHz without blowing memory."""
    sr, minutes = 8000, 20
    n = sr * 60 * minutes
    p = tmp_path / "twenty.wav"
    with sf.SoundFile(p, "w", sr, 1, subtype="PCM_16") as f:
        rng = np.random.default_rng(3)
        for _ in range(minutes):
            f.write((0.1 * rng.standard_normal(sr * 60)).astype(np.float32))
    assert probe(p).duration == pytest.approx(60.0 * minutes)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    x = load_audio(p, 32000)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert abs(x.shape[0] - n * 4) <= 1
    assert x.dtype == np.float32 and np.all(np.isfinite(x))
    # the output itself is 147 MiB; decoding must not hold several copies of it
    assert grown_mib < 2.5 * x.nbytes / 2**20


@pytest.mark.parametrize("fmt,ext", [("FLAC", "flac"), ("OGG", "ogg"), ("MP3", "mp3"), ("AIFF", "aiff")])
def test_compressed_formats_decode(tmp_path, fmt, ext):
    if fmt not in sf.available_formats():
        pytest.skip(f"libsndfile here has no {fmt}")
    sr = 44100
    t = np.arange(sr) / sr
    p = tmp_path / f"sine.{ext}"
    sf.write(p, (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32), sr, format=fmt)
    assert ext in AUDIO_EXTENSIONS
    x = load_audio(p, 32000)
    assert abs(x.shape[0] - 32000) <= 32000 * 0.06  # lossy codecs add a little padding/delay
    assert abs(_peak_hz(x, 32000) - 1000.0) <= 2 * 32000 / x.shape[0]
