"""Self-tagged pseudo-captions: the documented rule, checked against a hand-written selection."""

from __future__ import annotations

import numpy as np
import pytest

from atae.bridge import audioset_labels
from atae.errors import AtaeError, DataError
from atae.selftag import self_tag_texts, self_tagged_dataset
from atae.towers.base import AudioEncoding, AudioTower, TowerInfo

LABELS = audioset_labels()


def by_hand(tags, top_k, min_prob):
    pairs = sorted(((float(p), i) for i, p in enumerate(tags)), key=lambda pi: (-pi[0], pi[1]))
    chosen = [i for p, i in pairs[:top_k] if p >= min_prob]
    if not chosen:
        chosen = [pairs[0][1]]
    return " ".join(LABELS[i] for i in chosen)


def test_rule_on_a_known_vector():
    t = np.zeros(527, np.float32)
    t[0], t[137], t[74], t[300] = 0.9, 0.5, 0.3, 0.05  # Speech, Music, Dog, (below min_prob)
    assert self_tag_texts(t, LABELS) == f"{LABELS[0]} {LABELS[137]} {LABELS[74]}"
    assert self_tag_texts(t, LABELS, top_k=2) == f"{LABELS[0]} {LABELS[137]}"
    assert self_tag_texts(t, LABELS, min_prob=0.6) == LABELS[0]


def test_at_least_one_tag_even_when_all_are_small():
    t = np.full(527, 0.001, np.float32)
    t[42] = 0.02
    assert self_tag_texts(t, LABELS) == LABELS[42]


def test_ties_follow_head_order():
    t = np.zeros(527, np.float32)
    t[[400, 5, 99]] = 0.5
    assert self_tag_texts(t, LABELS) == f"{LABELS[5]} {LABELS[99]} {LABELS[400]}"


@pytest.mark.parametrize("seed", range(5))
def test_random_vectors_match_hand_rule(seed):
    rng = np.random.default_rng(seed)
    t = rng.random(527).astype(np.float32) ** 8
    for top_k, min_prob in ((5, 0.1), (3, 0.5), (10, 0.0), (1, 0.99)):
        assert self_tag_texts(t, LABELS, top_k=top_k, min_prob=min_prob) == by_hand(t, top_k, min_prob)


def test_bad_arguments():
    with pytest.raises(AtaeError):
        self_tag_texts(np.zeros(10), LABELS)
    with pytest.raises(AtaeError):
        self_tag_texts(np.zeros(527), LABELS, top_k=0)


class FakeTagTower(AudioTower):
    """Tags depend on the clip's RMS so different files get different pseudo-captions."""

    name = "fake-tagger"
    sample_rate = 16000
    dim = 4
    has_tags = True

    @property
    def info(self):
        return TowerInfo(name=self.name, kind="audio", dim=4, weights_sha256=None, sample_rate=16000)

    def encode(self, wave):
        rms = float(np.sqrt(np.mean(wave ** 2)))
        tags = np.zeros((2, 527), np.float32)
        tags[:, 0] = 0.8 if rms > 0.05 else 0.02  # Speech for loud noise
        tags[0, 500] = 0.6  # only in the first element: mean 0.3
        tags[:, 10] = 0.2
        return AudioEncoding(seq=np.zeros((2, 4), np.float32), times=np.array([[0, 1], [1, 2]], float),
                             tags=tags)


class FakeNoHead(FakeTagTower):
    name = "no-head"
    has_tags = False


def _need_data():
    data = pytest.importorskip("atae.data")
    if not hasattr(data, "CaptionDataset"):
        pytest.skip("atae.data.CaptionDataset is not available yet")


def test_self_tagged_dataset_from_a_folder(write_wav, tmp_path):
    _need_data()
    write_wav("lib/loud.wav", kind="noise")  # rms ~0.1
    write_wav("lib/sub/quiet.flac", kind="silence")
    (tmp_path / "lib" / "notes.txt").write_text("not audio")
    (tmp_path / "lib" / "broken.wav").write_bytes(b"RIFF....garbage")
    ds = self_tagged_dataset(tmp_path / "lib", FakeTagTower(), progress=False)
    by_key = {c.key: c for c in ds.clips}
    assert set(by_key) == {"loud.wav", "sub/quiet.flac"}
    # mean pooling: Speech 0.8 / 0.02, label 500 -> 0.3, label 10 -> 0.2
    assert by_key["loud.wav"].captions == [f"{LABELS[0]} {LABELS[500]} {LABELS[10]}"]
    assert by_key["sub/quiet.flac"].captions == [f"{LABELS[500]} {LABELS[10]}"]
    assert len(ds.problems) == 1 and str(tmp_path / "lib" / "broken.wav") in ds.problems[0]
    assert ds.audio_dir == tmp_path / "lib"
    ds_max = self_tagged_dataset(tmp_path / "lib", FakeTagTower(), progress=False, pool="max", top_k=1)
    assert {c.key: c.captions for c in ds_max.clips}["sub/quiet.flac"] == [LABELS[500]]


def test_self_tagged_dataset_errors(write_wav, tmp_path):
    _need_data()
    write_wav("lib/a.wav")
    with pytest.raises(AtaeError, match="no AudioSet head"):
        self_tagged_dataset(tmp_path / "lib", FakeNoHead(), progress=False)
    with pytest.raises(DataError, match="does not exist"):
        self_tagged_dataset(tmp_path / "missing", FakeTagTower(), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no audio files"):
        self_tagged_dataset(tmp_path / "empty", FakeTagTower(), progress=False)
