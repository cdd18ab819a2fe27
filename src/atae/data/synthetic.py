"""The embedded demo corpus: procedurally synthesised sound concepts with varied captions (numpy only).

No external data: every clip is generated from a seeded ``numpy.random.Generator`` (one per clip, seeded
from (seed, concept index, clip index)), so the same seed gives byte-identical WAV and CSV files.
Each concept has randomised parameters (pitch, rate, duration 2-6 s, level, background noise at 12-35 dB
SNR) so it is learnable but not trivial, and 5 captions per clip drawn from 8 concept-specific sentences.
Each concept is split per clip index into train/val/test (default 12 clips: 8/2/2).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf

from atae.data.clotho import write_caption_csv_rows
from atae.io import atomic_path, atomic_write_text

CORPUS_VERSION = 1  # bump whenever the synthesis changes: a stored corpus is reused only on a match
CAPTIONS_PER_CLIP = 5


# --------------------------------------------------------------------------------------- dsp helpers
def _t(n: int, sr: int) -> np.ndarray:
    return np.arange(n) / sr


def _band(x: np.ndarray, sr: int, lo: float = 0.0, hi: float | None = None) -> np.ndarray:
    """Brick-wall band-pass in the frequency domain (cheap and exact enough for synthesis)."""
    spec = np.fft.rfft(x)
    f = np.fft.rfftfreq(len(x), 1.0 / sr)
    spec[(f < lo) | (f > (hi if hi is not None else sr / 2))] = 0.0
    return np.fft.irfft(spec, len(x))


def _smooth_random(rng, n: int, sr: int, rate_hz: float) -> np.ndarray:
    """A slowly varying random curve in [0, 1] (noise low-passed at rate_hz)."""
    c = _band(rng.standard_normal(n), sr, 0.0, rate_hz)
    c -= c.min()
    return c / (c.max() + 1e-12)


def _tone(freq, sr: int, harmonics=(1.0,)) -> np.ndarray:
    """Sum of harmonics of an (possibly time-varying) frequency array."""
    phase = 2 * np.pi * np.cumsum(freq) / sr
    return sum(a * np.sin((k + 1) * phase) for k, a in enumerate(harmonics))


def _place(n: int, times, kernels) -> np.ndarray:
    """Sum kernels starting at the given sample positions (cropped at the end)."""
    out = np.zeros(n)
    for start, k in zip(times, kernels, strict=True):
        start = int(start)
        if start < 0:  # jitter moved the event before the clip: keep its tail
            k, start = k[-start:], 0
        if start >= n or len(k) == 0:
            continue
        m = min(len(k), n - start)
        out[start:start + m] += k[:m]
    return out


def _regular(rng, n: int, sr: int, rate: float, jitter: float = 0.05) -> np.ndarray:
    """Event times (samples) at about `rate` per second with relative jitter."""
    period = sr / rate
    times = np.arange(rng.uniform(0, period), n, period)
    return times + rng.normal(0, jitter * period, len(times))


def _poisson(rng, n: int, sr: int, rate: float) -> np.ndarray:
    k = rng.poisson(rate * n / sr)
    return np.sort(rng.uniform(0, n, k))


def _decay(sr: int, dur: float, tau: float) -> np.ndarray:
    """Exponential decay whose last 10 ms fade to zero, so truncating it does not click."""
    env = np.exp(-_t(int(dur * sr), sr) / tau)
    m = min(len(env), int(0.01 * sr))
    env[len(env) - m:] *= np.cos(np.linspace(0, np.pi / 2, m)) ** 2
    return env


def _burst(rng, sr: int, dur: float, tau: float, lo: float, hi: float) -> np.ndarray:
    m = int(dur * sr)
    return _band(rng.standard_normal(m), sr, lo, hi) * _decay(sr, dur, tau)[:m]


# ------------------------------------------------------------------------------------- the concepts
def _siren(rng, n, sr):
    t = _t(n, sr)
    f0, depth, period = rng.uniform(500, 900), rng.uniform(0.3, 0.6), rng.uniform(0.8, 3.0)
    f = f0 * (1 + depth * 0.5 * (1 + np.sin(2 * np.pi * t / period + rng.uniform(0, 6.3))))
    return _tone(f, sr, (1.0, 0.35, 0.15))


def _alarm(rng, n, sr):
    t = _t(n, sr)
    f, rate, duty = rng.uniform(2000, 3500), rng.uniform(2, 6), rng.uniform(0.3, 0.6)
    gate = ((t * rate + rng.uniform()) % 1.0) < duty
    return _tone(np.full(n, f), sr, (1.0, 0.0, 0.3)) * gate


def _rain(rng, n, sr):
    bed = _band(rng.standard_normal(n), sr, rng.uniform(800, 2000)) * 0.5
    times = _poisson(rng, n, sr, rng.uniform(30, 90))
    drops = [_burst(rng, sr, 0.01, 0.002, 2000, 7000) * rng.uniform(0.5, 2) for _ in times]
    return bed + _place(n, times, drops)


def _footsteps(rng, n, sr):
    times = _regular(rng, n, sr, rng.uniform(1.4, 2.4), 0.06)
    lp = rng.uniform(800, 1800)
    steps = [_burst(rng, sr, 0.12, rng.uniform(0.01, 0.03), 40, lp) * rng.uniform(0.6, 1.0) for _ in times]
    return _place(n, times, steps)


def _engine(rng, n, sr):
    f0 = rng.uniform(25, 60) * (1 + 0.02 * (_smooth_random(rng, n, sr, 0.5) - 0.5))
    x = _tone(f0, sr, [1.0 / k for k in range(1, 9)])
    am = 1 + 0.5 * np.sin(2 * np.pi * np.cumsum(f0 / 2) / sr)
    return x * am + 0.3 * _band(rng.standard_normal(n), sr, 20, 400)


def _birds(rng, n, sr):
    times = _poisson(rng, n, sr, rng.uniform(3, 8))
    base = rng.uniform(2500, 4500)
    chirps = []
    for _ in times:
        d = rng.uniform(0.04, 0.12)
        m = int(d * sr)
        f1 = base * rng.uniform(0.85, 1.15)
        f = np.linspace(f1, f1 * rng.uniform(0.6, 1.6), m)
        chirps.append(_tone(f, sr) * np.hanning(m))
    return _place(n, times, chirps)


def _clock(rng, n, sr):
    times = _regular(rng, n, sr, rng.choice([1.0, 2.0]) * rng.uniform(0.95, 1.05), 0.005)
    f = rng.uniform(1800, 3500)
    ks = [_tone(np.full(int(0.02 * sr), f * (1.25 if i % 2 else 1.0)), sr) * _decay(sr, 0.02, 0.003)
          for i in range(len(times))]
    return _place(n, times, ks)


def _hum(rng, n, sr):
    f = rng.choice([50.0, 60.0]) * rng.uniform(0.995, 1.005)
    amps = rng.uniform(0.2, 1.0, 6) / np.arange(1, 7) ** rng.uniform(0.3, 1.0)
    return _tone(np.full(n, f), sr, amps)


def _wind(rng, n, sr):
    x = _band(rng.standard_normal(n), sr, 20, rng.uniform(300, 800))
    return x * (0.3 + _smooth_random(rng, n, sr, rng.uniform(0.2, 0.8)))


def _thunder(rng, n, sr):
    brown = _band(np.cumsum(rng.standard_normal(n)), sr, 20, rng.uniform(120, 250))
    start = int(rng.uniform(0, 0.3) * n)
    env = np.zeros(n)
    m = n - start
    env[start:] = (1 - np.exp(-_t(m, sr) / 0.05)) * np.exp(-_t(m, sr) / rng.uniform(0.8, 2.0))
    crack = _place(n, [start], [_burst(rng, sr, 0.3, 0.08, 200, 3000) * 0.3 * np.abs(brown).max()])
    return brown * env + crack


def _drips(rng, n, sr):
    times = _regular(rng, n, sr, rng.uniform(1.5, 4.0), 0.25)
    f0 = rng.uniform(700, 1500)
    ks = []
    for _ in times:
        m = int(0.06 * sr)
        f = np.linspace(f0, f0 * rng.uniform(1.3, 1.8), m) * rng.uniform(0.9, 1.1)
        ks.append(_tone(f, sr) * _decay(sr, 0.06, 0.015)[:m])
    return _place(n, times, ks)


def _doorbell(rng, n, sr):
    f1 = rng.uniform(600, 850)
    period = rng.uniform(1.8, 3.0)
    times, ks = [], []
    for s in np.arange(rng.uniform(0, 0.3), n / sr, period):
        for off, f in ((0.0, f1), (rng.uniform(0.45, 0.7), f1 * 0.8)):
            ks.append(_tone(np.full(int(1.2 * sr), f), sr, (1.0, 0.2, 0.1)) * _decay(sr, 1.2, 0.5))
            times.append((s + off) * sr)
    return _place(n, times, ks)


def _telephone(rng, n, sr):
    t = _t(n, sr)
    f1 = rng.uniform(400, 480)
    x = _tone(np.full(n, f1), sr) + _tone(np.full(n, f1 + rng.uniform(25, 60)), sr)
    warble = (np.sin(2 * np.pi * rng.uniform(15, 25) * t) > 0).astype(float)
    on, off = rng.uniform(0.8, 1.5), rng.uniform(0.6, 1.5)
    ring = ((t + rng.uniform(0, on + off)) % (on + off)) < on
    return x * warble * ring


def _drums(rng, n, sr):
    beat = sr * 60.0 / rng.uniform(90, 150)
    out = np.zeros(n)
    m = int(0.25 * sr)
    kick_f = np.linspace(rng.uniform(120, 170), 45, m)
    kick = _tone(kick_f, sr) * _decay(sr, 0.25, 0.08)[:m]
    snare = _burst(rng, sr, 0.2, 0.05, 1000, 6000) + 0.3 * _tone(np.full(int(0.2 * sr), 200.0), sr) \
        * _decay(sr, 0.2, 0.05)
    hat = _burst(rng, sr, 0.05, 0.01, 6000, 8000) * 0.4
    for i, s in enumerate(np.arange(0, n, beat / 2)):
        out += _place(n, [s], [hat])
        if i % 4 == 0:
            out += _place(n, [s], [kick])
        elif i % 4 == 2:
            out += _place(n, [s], [snare])
    return out


def _whistle(rng, n, sr):
    t = _t(n, sr)
    k = rng.integers(1, 4)
    notes = rng.uniform(1500, 3000, k)[np.minimum((t * k / t[-1]).astype(int), k - 1)]
    f = _band(notes, sr, 0, 20) * (1 + 0.01 * np.sin(2 * np.pi * 5.5 * t))
    breath = _band(rng.standard_normal(n), sr, notes.mean() * 0.8, notes.mean() * 1.2) * 0.15
    return _tone(f, sr) + breath


def _insect(rng, n, sr):
    f0 = rng.uniform(150, 350) * (1 + 0.05 * (_smooth_random(rng, n, sr, 2.0) - 0.5))
    saw = _tone(f0, sr, [1.0 / k for k in range(1, 12)])
    return saw * (0.2 + _smooth_random(rng, n, sr, rng.uniform(0.5, 2.0)))


def _heartbeat(rng, n, sr):
    times = _regular(rng, n, sr, rng.uniform(0.9, 1.5), 0.02)
    f = rng.uniform(45, 70)
    lub = _tone(np.full(int(0.1 * sr), f), sr) * np.hanning(int(0.1 * sr))
    dub = _tone(np.full(int(0.08 * sr), f * 1.3), sr) * np.hanning(int(0.08 * sr)) * 0.7
    gap = rng.uniform(0.13, 0.2) * sr
    return _place(n, np.concatenate([times, times + gap]), [lub] * len(times) + [dub] * len(times))


def _typing(rng, n, sr):
    times = _poisson(rng, n, sr, rng.uniform(5, 11))
    ks = [_burst(rng, sr, 0.012, 0.002, 1000, 6000) * rng.uniform(0.4, 1.0) for _ in times]
    return _place(n, times, ks)


def _waves(rng, n, sr):
    t = _t(n, sr)
    x = _band(rng.standard_normal(n), sr, 30, rng.uniform(1200, 2500))
    swell = 0.5 - 0.5 * np.cos(2 * np.pi * t / rng.uniform(2.0, 5.0) + rng.uniform(0, 6.3))
    return x * (0.08 + swell ** 2)


def _static(rng, n, sr):
    times = _poisson(rng, n, sr, rng.uniform(5, 30))
    crackle = _place(n, times, [_burst(rng, sr, 0.004, 0.001, 0, sr / 2) * 4 for _ in times])
    return rng.standard_normal(n) + crackle


def _bell(rng, n, sr):
    f0 = rng.uniform(300, 900)
    ratios, taus = np.array([1.0, 2.0, 2.76, 5.4, 8.93]), np.array([2.0, 1.2, 0.8, 0.4, 0.2])
    strikes = np.arange(rng.uniform(0, 0.3), n / sr, rng.uniform(1.5, 4.0)) * sr
    dur = 3.0
    ks = []
    for _ in strikes:
        m = int(dur * sr)
        ks.append(sum(_tone(np.full(m, f0 * r), sr) * _decay(sr, dur, tau)[:m] / (1 + i)
                      for i, (r, tau) in enumerate(zip(ratios, taus, strict=True))))
    return _place(n, strikes, ks)


def _revving(rng, n, sr):
    t = _t(n, sr)
    base = rng.uniform(30, 50)
    centre, width = rng.uniform(0.3, 0.7) * t[-1], rng.uniform(0.3, 0.8) * t[-1]
    rev = np.exp(-0.5 * ((t - centre) / (width / 2.5)) ** 2)
    f0 = base * (1 + rng.uniform(1.5, 3.0) * rev)
    return _tone(f0, sr, [1.0 / k ** 0.7 for k in range(1, 11)]) + 0.3 * _band(rng.standard_normal(n), sr,
                                                                                  50, 1500)


def _helicopter(rng, n, sr):
    rate = rng.uniform(12, 22)
    times = _regular(rng, n, sr, rate, 0.01)
    chops = _place(n, times, [_burst(rng, sr, 0.05, 0.015, 40, 900) for _ in times])
    whine = 0.05 * _tone(np.full(n, rng.uniform(2000, 4000)), sr)
    return chops + whine * np.abs(chops).max()


def _horn(rng, n, sr):
    t = _t(n, sr)
    f0 = rng.uniform(350, 500)
    x = _tone(np.full(n, f0), sr, [1.0 / k for k in range(1, 9)]) + _tone(np.full(n, f0 * 1.26), sr,
                                                                          [1.0 / k for k in range(1, 9)])
    gate = np.zeros(n)
    for s in np.sort(rng.uniform(0, t[-1] * 0.8, rng.integers(1, 4))):
        gate[(t >= s) & (t < s + rng.uniform(0.3, 1.0))] = 1.0
    return x * _band(gate, sr, 0, 40)


# concept -> (generator, 8 caption sentences)
Concept = tuple[Callable, tuple[str, ...]]
CONCEPTS: dict[str, Concept] = {
    "siren": (_siren, (
        "A siren wails as an emergency vehicle passes.", "An ambulance siren rises and falls.",
        "A police siren is wailing loudly.", "The siren of a fire engine sweeps up and down.",
        "An emergency siren howls nearby.", "A wailing siren goes up and down in pitch.",
        "Sirens blare from an emergency vehicle.", "A loud siren sweeps back and forth.")),
    "alarm": (_alarm, (
        "An alarm beeps repeatedly.", "A high electronic beeping keeps going.",
        "A piercing alarm is beeping on and off.", "Short high-pitched beeps repeat quickly.",
        "A smoke detector is beeping.", "An electronic alarm sounds with rapid beeps.",
        "A shrill beeping alarm goes off.", "A device emits a series of high beeps.")),
    "rain": (_rain, (
        "Rain is falling steadily.", "Heavy rain pours down.", "Raindrops patter on the ground.",
        "A steady downpour of rain.", "Rain falls and splashes on a surface.",
        "It is raining hard outside.", "The hiss of falling rain.", "Rain drums on the roof.")),
    "footsteps": (_footsteps, (
        "Someone walks with heavy footsteps.", "Footsteps on a hard floor.",
        "A person is walking at a steady pace.", "Slow footsteps thud one after another.",
        "A person walks across a room.", "Steps echo as someone walks by.",
        "Someone is walking on a wooden floor.", "The sound of footsteps walking.")),
    "engine": (_engine, (
        "An engine idles with a low rumble.", "A diesel engine is running.",
        "A motor hums and rumbles steadily.", "The low drone of an idling engine.",
        "A truck engine idles in place.", "A large engine runs at a constant speed.",
        "A generator engine rumbles.", "An idling vehicle engine throbs.")),
    "birds": (_birds, (
        "Birds are chirping.", "A bird chirps and tweets.", "Small birds sing high chirps.",
        "Birds tweet in quick short calls.", "Birdsong with rapid chirps.",
        "A songbird chirps repeatedly.", "High-pitched bird chirps fill the air.",
        "Birds are singing outside.")),
    "clock": (_clock, (
        "A clock is ticking.", "A clock ticks steadily.", "The tick-tock of a clock.",
        "A wall clock ticks away the seconds.", "Regular ticking of a clock.",
        "A mechanical clock ticks.", "Ticking from a clock in a quiet room.",
        "A watch ticks at a steady rhythm.")),
    "hum": (_hum, (
        "An electrical hum.", "A low mains hum buzzes steadily.", "A transformer hums.",
        "Electrical equipment emits a steady low hum.", "A constant low-pitched electric buzz.",
        "The hum of a power line.", "An amplifier hums with mains noise.",
        "A steady electrical droning hum.")),
    "wind": (_wind, (
        "The wind is blowing.", "Strong wind gusts outside.", "Wind howls and rushes by.",
        "Gusts of wind blow through the area.", "A windy day with rushing air.",
        "The wind blows and dies down.", "Blustery wind is blowing.", "Air rushes past in gusts of wind.")),
    "thunder": (_thunder, (
        "Thunder rumbles in the distance.", "A loud clap of thunder rolls.", "Deep thunder rumbles.",
        "A thunderstorm with rolling thunder.", "Thunder cracks and then rumbles away.",
        "A low rumble of thunder.", "Thunder booms during a storm.", "Rolling thunder echoes.")),
    "drips": (_drips, (
        "Water is dripping.", "Drops of water drip into a puddle.", "A tap is dripping slowly.",
        "Water drips one drop at a time.", "Dripping water plops.", "A leaky faucet drips.",
        "Drips of water fall into a sink.", "Water droplets drip steadily.")),
    "doorbell": (_doorbell, (
        "A doorbell rings ding dong.", "Someone rings the doorbell.", "A two-tone doorbell chimes.",
        "The doorbell chimes twice.", "A ding-dong chime of a doorbell.", "A doorbell is ringing.",
        "A visitor presses the doorbell.", "A door chime sounds two notes.")),
    "telephone": (_telephone, (
        "A telephone is ringing.", "An old phone rings.", "A landline telephone rings repeatedly.",
        "The phone rings and nobody answers.", "A ringing telephone.", "A phone rings with a trilling tone.",
        "A telephone rings in an office.", "A classic phone ring repeats.")),
    "drums": (_drums, (
        "A drum beat plays.", "Someone plays a steady drum rhythm.", "A kick and snare drum pattern.",
        "Drums play a simple beat.", "A drummer keeps time with kick, snare and hi-hat.",
        "A rhythmic drum loop.", "Percussion plays a regular beat.", "A drum machine plays a beat.")),
    "whistle": (_whistle, (
        "Someone is whistling.", "A person whistles a few notes.", "A high whistle sounds.",
        "A man whistles a tune.", "A clear high-pitched whistle.", "Someone whistles loudly.",
        "A whistled melody.", "A person whistles a short tune.")),
    "insect": (_insect, (
        "An insect is buzzing.", "A fly buzzes around.", "A bee buzzes nearby.",
        "The buzzing of a flying insect.", "A mosquito whines and buzzes.",
        "A buzzing fly comes and goes.", "An insect hums in the air.", "A bug buzzes close by.")),
    "heartbeat": (_heartbeat, (
        "A heart is beating.", "A steady heartbeat thumps.", "The lub-dub of a heartbeat.",
        "A heartbeat pulses regularly.", "A slow heartbeat.", "The thumping of a heart.",
        "A heartbeat heard through a stethoscope.", "A beating heart thuds.")),
    "typing": (_typing, (
        "Someone is typing on a keyboard.", "Keys click as a person types.",
        "Fast typing on a computer keyboard.", "A person types quickly.", "Keyboard keys clatter.",
        "Clicking of keyboard keys.", "Someone taps away at a keyboard.", "Typing on a laptop.")),
    "waves": (_waves, (
        "Ocean waves crash on the shore.", "Waves roll in and out.", "The sea surges onto a beach.",
        "Waves wash over the sand.", "The ocean swells and crashes.", "Surf rolls onto the beach.",
        "Sea waves break rhythmically.", "Waves lap against the shore.")),
    "static": (_static, (
        "White noise static.", "Radio static hisses.", "A television shows only static.",
        "Loud hissing static noise.", "Static crackles from a speaker.", "A constant hiss of white noise.",
        "An untuned radio hisses.", "Noisy static with crackles.")),
    "bell": (_bell, (
        "A bell rings and fades.", "A large bell is struck.", "A church bell tolls.",
        "A metal bell rings out.", "The chime of a bell resonates.", "A bell is struck and rings on.",
        "A ringing bell slowly decays.", "Someone strikes a bell.")),
    "revving": (_revving, (
        "A motorcycle engine revs.", "An engine revs up and down.", "A motorbike revs loudly.",
        "A car engine is revved.", "The engine roars as it revs.", "Someone revs a motorcycle.",
        "An engine accelerates and slows.", "A revving engine rises in pitch.")),
    "helicopter": (_helicopter, (
        "A helicopter flies overhead.", "Helicopter blades chop the air.", "A helicopter hovers nearby.",
        "The thumping of helicopter rotors.", "A helicopter passes by.", "Rotor blades whir and chop.",
        "A helicopter is flying.", "The rhythmic chop of a helicopter.")),
    "horn": (_horn, (
        "A car horn honks.", "A driver honks the horn.", "A car honks a few times.",
        "A loud car horn blares.", "Someone beeps a car horn.", "A vehicle horn honks.",
        "Honking of a car horn.", "A car horn sounds in traffic.")),
}


#: free-text queries the demo can answer (phrased unlike the training captions)
EXAMPLE_QUERIES = ("an ambulance driving by with its siren on", "small birds singing", "a ticking clock")


def _clip_audio(concept_idx: int, clip_idx: int, seed: int, sr: int
                ) -> tuple[np.ndarray, np.random.Generator]:
    name = list(CONCEPTS)[concept_idx]
    rng = np.random.default_rng([seed, concept_idx, clip_idx, CORPUS_VERSION])
    n = int(round(rng.uniform(2.0, 6.0) * 10)) * (sr // 10)  # whole tenths: FFT-friendly lengths
    x = CONCEPTS[name][0](rng, n, sr)[:n]
    x = x - x.mean()
    x /= np.abs(x).max() + 1e-12
    snr_db = rng.uniform(12, 35)
    bg = _band(rng.standard_normal(n), sr, 20, rng.uniform(2000, sr / 2))
    bg *= np.sqrt(np.mean(x ** 2) / (np.mean(bg ** 2) + 1e-12)) * 10 ** (-snr_db / 20)
    y = x + bg
    fade = np.sin(np.linspace(0, np.pi / 2, int(0.01 * sr))) ** 2  # 10 ms fades: no clicks at the edges
    y[:len(fade)] *= fade
    y[len(y) - len(fade):] *= fade[::-1]
    y *= rng.uniform(0.25, 0.9) / (np.abs(y).max() + 1e-12)
    return y.astype(np.float32), rng


def split_counts(clips_per_concept: int) -> tuple[int, int, int]:
    """(train, val, test) clips per concept: 20% val and 20% test (at least 1 each), the rest train."""
    k = max(1, round(0.2 * clips_per_concept))
    if clips_per_concept < 3:
        raise ValueError("need at least 3 clips per concept (train, val, test)")
    k = min(k, (clips_per_concept - 1) // 2)
    return clips_per_concept - 2 * k, k, k


def make_demo_corpus(out_dir, *, seed: int = 0, clips_per_concept: int = 12, sr: int = 16000) -> dict:
    """Generate (or reuse, if already complete for these settings) the demo corpus under ``out_dir``.

    Returns ``{"train": csv, "val": csv, "test": csv, "audio_dir": folder}`` (Paths). Files are written
    atomically and a ``corpus.json`` manifest is written last, so an interrupted run is redone.
    """
    out = Path(out_dir)
    audio_dir = out / "audio"
    result = {s: out / f"{s}.csv" for s in ("train", "val", "test")} | {"audio_dir": audio_dir}
    settings = {"version": CORPUS_VERSION, "seed": seed, "clips_per_concept": clips_per_concept, "sr": sr,
                "concepts": list(CONCEPTS)}
    manifest = out / "corpus.json"
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text())["settings"] == settings and all(
                    p.exists() for p in result.values()):
                return result
        except (ValueError, KeyError):
            pass
        manifest.unlink()
    audio_dir.mkdir(parents=True, exist_ok=True)
    n_train, n_val, _ = split_counts(clips_per_concept)
    rows: dict[str, list[list[str]]] = {"train": [], "val": [], "test": []}
    for ci, name in enumerate(CONCEPTS):
        sentences = CONCEPTS[name][1]
        for k in range(clips_per_concept):
            y, rng = _clip_audio(ci, k, seed, sr)
            fname = f"{name}_{k:03d}.wav"
            with atomic_path(audio_dir / fname, ".wav", fsync=False) as tmp:  # a corpus is regenerable
                sf.write(tmp, y, sr, subtype="PCM_16", format="WAV")
            caps = [sentences[i] for i in rng.choice(len(sentences), CAPTIONS_PER_CLIP, replace=False)]
            split = "train" if k < n_train else "val" if k < n_train + n_val else "test"
            rows[split].append([fname] + caps)
    for split, r in rows.items():
        write_caption_csv_rows(result[split], r, CAPTIONS_PER_CLIP)
    made = {r[0] for split_rows in rows.values() for r in split_rows}
    for stale in audio_dir.glob("*.wav"):  # clips of an earlier, larger corpus in this folder
        if stale.name not in made and concept_of(stale.name) in CONCEPTS:
            stale.unlink()
    counts = {s: len(r) for s, r in rows.items()}
    atomic_write_text(manifest, json.dumps({"settings": settings, "clips": counts}, indent=1))
    return result


def concept_of(key: str) -> str:
    """The concept name of a demo clip key ('siren_003.wav' -> 'siren')."""
    return key.rsplit("_", 1)[0]
