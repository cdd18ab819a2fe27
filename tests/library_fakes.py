"""Small deterministic towers and model for the library/server tests (no weights, no torch training).

BandTower: 16 bands of 250 Hz over 0-4 kHz at 8 kHz; the embedding is the sqrt band-energy profile, so
a pure tone of f Hz puts (almost) all its weight in band round(f / 250) - 0.5 .. i.e. floor(f / 250).
WordTower: "low"/"mid"/"high" -> one-hot on the band of LOW/MID/HIGH Hz. IdentityModel: masked mean.
A text query "high" therefore ranks the file with the HIGH tone first, for reasons independent of the
library code.
"""

from __future__ import annotations

import time

import numpy as np
import soundfile as sf

from atae.towers.base import AudioEncoding, AudioTower, TextTower, TowerInfo

SR = 8000
BANDS = 16
FREQS = {"low": 400.0, "mid": 1800.0, "high": 3300.0}


def band_of(freq: float) -> int:
    return int(freq // 250)


class BandTower(AudioTower):
    name = "bands"
    sample_rate = SR
    dim = BANDS
    has_tags = True

    def __init__(self, delay: float = 0.0, hook=None):
        self.delay = delay
        self.hook = hook  # called with the wave before encoding (tests mutate files from here)
        self.calls = 0

    @property
    def info(self) -> TowerInfo:
        return TowerInfo("bands", "audio", BANDS, "fake-sha", SR, {})

    def encode(self, wave: np.ndarray) -> AudioEncoding:
        self.calls += 1
        if self.hook is not None:
            self.hook(wave)
        if self.delay:
            time.sleep(self.delay)
        wave = self.pad_to_min(wave)
        spec = np.abs(np.fft.rfft(wave.astype(np.float64))) ** 2
        freqs = np.fft.rfftfreq(len(wave), 1 / SR)
        e = np.array([spec[(freqs >= 250 * b) & (freqs < 250 * (b + 1))].sum() for b in range(BANDS)])
        v = np.sqrt(e) + 1e-6
        v = (v / np.linalg.norm(v)).astype(np.float32)
        tags = np.zeros((1, 527), np.float32)
        tags[0, :BANDS] = v
        return AudioEncoding(v[None], np.array([[0.0, len(wave) / SR]]), tags)


class WordTower(TextTower):
    name = "words"
    dim = BANDS

    @property
    def info(self) -> TowerInfo:
        return TowerInfo("words", "text", BANDS, "fake-sha-t", None, {})

    def encode(self, texts):
        out = []
        for t in texts:
            rows = []
            for w in t.lower().split():
                v = np.zeros(BANDS, np.float32)
                if w in FREQS:
                    v[band_of(FREQS[w])] = 1.0
                rows.append(v)
            out.append(np.stack(rows))
        return out


class IdentityModel:
    """AlignedModel stand-in: both 'adapters' are the masked mean (so text one-hot meets band profile)."""

    version = "identity-v1"

    def __init__(self, text_tower=None):  # the text tower it was "trained" with (default WordTower)
        self.audio_info = BandTower().info
        self.text_info = (text_tower or WordTower()).info

    @staticmethod
    def _unit_means(seqs) -> np.ndarray:
        m = np.stack([np.asarray(s, dtype=np.float32).mean(axis=0) for s in seqs])
        return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)

    def encode_audio(self, seqs) -> np.ndarray:
        return self._unit_means(seqs)

    def encode_text(self, seqs) -> np.ndarray:
        return self._unit_means(seqs)


def write_tone(path, freq: float | None, seconds: float = 2.0, sr: int = SR, event=None, seed: int = 0):
    """A tone (or silence+faint noise if freq is None); ``event=(start, dur, freq)`` adds a tone burst."""
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    rng = np.random.default_rng(seed)
    x = 0.001 * rng.standard_normal(n)
    if freq is not None:
        x += 0.3 * np.sin(2 * np.pi * freq * t)
    if event is not None:
        s, d, f = event
        a, b = int(s * sr), int((s + d) * sr)
        x[a:b] += 0.5 * np.sin(2 * np.pi * f * t[a:b])
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.astype(np.float32), sr)
    return path


def write_tone_mix(path, seconds: float, seed: int):
    """Every 0.5 s two random bands with random amplitudes: segment tags vary continuously."""
    rng = np.random.default_rng(seed)
    sr, n = 8000, int(seconds * 8000)
    t = np.arange(n) / sr
    x = 0.001 * rng.standard_normal(n)
    for a in range(0, n, sr // 2):
        for _ in range(2):
            f = 125 + 250 * int(rng.integers(0, 16))
            x[a:a + sr // 2] += rng.random() * 0.3 * np.sin(2 * np.pi * f * t[a:a + sr // 2])
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.astype(np.float32), sr)


class LabelWordTower(WordTower):
    """WordTower that also reads the names of the first 16 AudioSet labels (alone, in the bridge's
    prompt "the sound of X", or joined by " and "): label b -> one-hot b. BandTower's tags put band b on
    label b, so "children shouting" (label 13) and "high" (band 13) mean the same sound. Its own identity:
    the bridge caches label embeddings per tower identity, and WordTower's must not be these."""

    name = "labelwords"

    @property
    def info(self) -> TowerInfo:
        return TowerInfo("labelwords", "text", BANDS, "fake-sha-lw", None, {})

    def encode(self, texts):
        from atae.bridge import audioset_labels

        names = {n.lower(): i for i, n in enumerate(audioset_labels()[:BANDS])}
        out = []
        for t in texts:
            rows = []
            for part in t.lower().removeprefix("the sound of ").split(" and "):
                if part in names:
                    v = np.zeros(BANDS, np.float32)
                    v[names[part]] = 1.0
                    rows.append(v)
                else:
                    rows += list(super().encode([part])[0])
            out.append(np.stack(rows))
        return out


def label_freq(label_index: int) -> float:
    """The tone whose BandTower tags peak on AudioSet label ``label_index`` (< 16): its band's centre."""
    return 250.0 * label_index + 125.0
