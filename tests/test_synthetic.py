"""The embedded demo corpus: determinism, layout, caption and audio sanity, and learnability."""

from __future__ import annotations

import csv
import hashlib

import numpy as np
import pytest
import soundfile as sf

from atae.data import read_caption_csv
from atae.data.synthetic import CONCEPTS, concept_of, make_demo_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_demo_corpus(tmp_path_factory.mktemp("demo_a"), seed=0)


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in (".wav", ".csv"):
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_gives_identical_files(corpus, tmp_path):
    other = make_demo_corpus(tmp_path / "b", seed=0)
    assert _digest(corpus["audio_dir"].parent) == _digest(other["audio_dir"].parent)
    small = make_demo_corpus(tmp_path / "c", seed=1, clips_per_concept=3)
    first = "siren_000.wav"
    assert (small["audio_dir"] / first).read_bytes() != (corpus["audio_dir"] / first).read_bytes()


def test_layout_counts_and_captions(corpus):
    assert len(CONCEPTS) >= 20
    sets = {s: read_caption_csv(corpus[s], corpus["audio_dir"]) for s in ("train", "val", "test")}
    assert [len(sets[s]) for s in ("train", "val", "test")] == [8 * len(CONCEPTS), 2 * len(CONCEPTS),
                                                               2 * len(CONCEPTS)]
    assert sum(len(d) for d in sets.values()) >= 200
    for d in sets.values():
        assert d.problems == []
        assert {concept_of(k) for k in d.keys()} == set(CONCEPTS)
        for c in d.clips:
            assert len(c.captions) == 5 == len(set(c.captions)) and all(x.strip() for x in c.captions)
    keys = [k for d in sets.values() for k in d.keys()]
    assert len(keys) == len(set(keys))


def test_audio_is_16k_mono_not_silent_not_clipped(corpus):
    for p in sorted(corpus["audio_dir"].glob("*.wav"))[::7]:
        x, sr = sf.read(p)
        assert sr == 16000 and x.ndim == 1 and 2.0 <= len(x) / sr <= 6.0
        peak = np.abs(x).max()
        assert 0.1 < peak < 0.99, p.name
        assert np.sqrt(np.mean(x ** 2)) > 0.01, p.name


def _features(path):
    x, _ = sf.read(path)
    frames = x[: len(x) // 512 * 512].reshape(-1, 512) * np.hanning(512)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    edges = np.unique(np.geomspace(1, 257, 25).astype(int))
    bands = np.log(np.stack([power[:, a:b].mean(1) for a, b in zip(edges[:-1], edges[1:], strict=True)], 1)
                   + 1e-10)
    energy = np.log(power.sum(1) + 1e-10)
    return np.concatenate([bands.mean(0), bands.std(0), [energy.std(), np.abs(np.diff(energy)).mean()]])


def test_concepts_are_learnable_by_a_nearest_centroid(corpus):
    def load(split):
        with open(corpus[split], newline="") as fh:
            names = [r[0] for r in list(csv.reader(fh))[1:]]
        return np.array([_features(corpus["audio_dir"] / n) for n in names]), [concept_of(n) for n in names]

    xtr, ytr = load("train")
    xte, yte = load("test")
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-9
    labels = sorted(set(ytr))
    cent = np.stack([((xtr - mu) / sd)[[y == c for y in ytr]].mean(0) for c in labels])
    pred = [labels[i] for i in ((((xte - mu) / sd)[:, None] - cent[None]) ** 2).sum(2).argmin(1)]
    acc = np.mean([a == b for a, b in zip(pred, yte, strict=True)])
    assert acc > 10 / len(labels)  # ten times chance


def test_regenerating_with_other_settings_replaces_the_corpus(tmp_path):
    a = make_demo_corpus(tmp_path, seed=0, clips_per_concept=5)
    assert len(list(a["audio_dir"].glob("*.wav"))) == 5 * len(CONCEPTS)
    b = make_demo_corpus(tmp_path, seed=0, clips_per_concept=3)
    assert len(list(b["audio_dir"].glob("*.wav"))) == 3 * len(CONCEPTS)
    assert len(read_caption_csv(b["test"], b["audio_dir"])) == len(CONCEPTS)
