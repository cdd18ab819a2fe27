"""The dense scorers of ``atae.scoring``: z-scores, the hybrid and the adapter cosine, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from atae import scoring
from atae.errors import AtaeError, ModelError
from atae.towers.base import TowerInfo


def zscore_by_hand(row: list[float], mu: float | None = None, sd: float | None = None) -> list[float]:
    n = len(row)
    mu = sum(row) / n if mu is None else mu
    sd = math.sqrt(sum((x - mu) ** 2 for x in row) / n) if sd is None else sd
    return [0.0 if sd == 0 else (x - mu) / sd for x in row]


def test_hybrid_by_hand():
    a = np.array([[0.9, 0.1, 0.5, 0.3], [1.0, 2.0, 3.0, 4.0]])
    b = np.array([[0.01, 0.02, 0.40, 0.0], [5.0, 5.0, 5.0, 5.0]])  # second row constant
    w = 0.3
    got = scoring.hybrid_scores(a, b, w)
    for q in range(2):
        za, zb = zscore_by_hand(list(a[q])), zscore_by_hand(list(b[q]))
        for c in range(4):
            assert got[q, c] == pytest.approx(w * za[c] + (1 - w) * zb[c], abs=1e-6)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(scoring.hybrid_scores(a, b, 1.0),
                               np.array([zscore_by_hand(list(r)) for r in a]), atol=1e-6)
    with pytest.raises(ValueError):
        scoring.hybrid_scores(a, b[:, :3], 0.5)
    with pytest.raises(AtaeError):
        scoring.hybrid_scores(a, b, 1.5)
    with pytest.raises(AtaeError):
        scoring.hybrid_scores(a, b, [0.5, 0.5, 0.5])  # one weight per query, or one for all


def test_hybrid_with_a_weight_per_query_and_corpus_stats():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 6)), rng.random((3, 6))
    w = [0.0, 0.4, 1.0]
    got = scoring.hybrid_scores(a, b, w)
    for q in range(3):
        want = [w[q] * x + (1 - w[q]) * y for x, y in zip(zscore_by_hand(list(a[q])),
                                                           zscore_by_hand(list(b[q])), strict=True)]
        np.testing.assert_allclose(got[q], want, atol=1e-6)
    # columns that are a subset of the corpus: statistics of the whole corpus given explicitly
    stats_a = (np.array([0.1, 0.2, 0.3]), np.array([2.0, 1.0, 0.5]))
    stats_b = (np.array([0.5, 0.5, 0.5]), np.array([0.25, 0.0, 1.0]))
    got = scoring.hybrid_scores(a, b, 0.5, adapter_stats=stats_a, bridge_stats=stats_b)
    for q in range(3):
        za = zscore_by_hand(list(a[q]), stats_a[0][q], stats_a[1][q])
        zb = zscore_by_hand(list(b[q]), stats_b[0][q], stats_b[1][q])
        want = [0.5 * x + 0.5 * y for x, y in zip(za, zb, strict=True)]
        np.testing.assert_allclose(got[q], want, atol=1e-6)


class _Model:
    """encode_* = unit rows of the sequence means (a stand-in whose cosine is easy to write out)."""

    @staticmethod
    def _unit(seqs):
        m = np.stack([np.asarray(s, np.float64).mean(0) for s in seqs])
        return m / np.linalg.norm(m, axis=1, keepdims=True)

    encode_audio = encode_text = _unit


def test_adapter_scores_are_cosines_in_any_chunking():
    rng = np.random.default_rng(1)
    audio = [rng.standard_normal((int(rng.integers(1, 4)), 5)) for _ in range(7)]
    text = [rng.standard_normal((int(rng.integers(1, 6)), 5)) for _ in range(9)]
    want = [[sum(x * y for x, y in zip(t.mean(0), a.mean(0), strict=True))
             / (np.linalg.norm(t.mean(0)) * np.linalg.norm(a.mean(0))) for a in audio] for t in text]
    for chunk in (1, 4, 100):
        got = scoring.adapter_scores(_Model(), audio, text, chunk=chunk)
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_fusion_weight_and_tower_check():
    a = TowerInfo(name="efficientat-mn04", kind="audio", dim=384, weights_sha256="x", sample_rate=32000)
    b = TowerInfo(name="cnn14", kind="audio", dim=2048, weights_sha256="y", sample_rate=32000)

    class M:
        audio_info = a
        extras = {scoring.EXTRA_HYBRID_WEIGHT: 0.35}

    scoring.check_hybrid_tower(M(), a)
    with pytest.raises(ModelError, match="cnn14"):
        scoring.check_hybrid_tower(M(), b)
    assert list(scoring.Fusion.of(M()).weights(np.zeros((2, 4)))) == [0.35, 0.35]
    M.extras = {}
    assert scoring.Fusion.of(M()).weight == scoring.DEFAULT_HYBRID_WEIGHT
    with pytest.raises(AtaeError):
        scoring.Fusion(1.2)


def test_closeness_and_the_novelty_gate_by_hand():
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((9, 6))
    ref = (ref / np.linalg.norm(ref, axis=1, keepdims=True)).astype(np.float16)  # as a model holds it
    q = rng.standard_normal((4, 6))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact = ref.astype(np.float64)
    by_hand = [sum(sorted((float(x @ r) for r in exact), reverse=True)[:5]) / 5 for x in q]
    # computed in float16: within the documented bound of the float64 value
    np.testing.assert_allclose(scoring.closeness(q, ref), by_hand, atol=scoring.CLOSENESS_ERROR)
    np.testing.assert_allclose(scoring.closeness(q, ref[:2]), [float(np.mean(x @ exact[:2].T)) for x in q],
                               atol=scoring.CLOSENESS_ERROR)  # fewer than 5 references: all of them
    s = scoring.closeness(q, ref)  # the ramp, given the closeness
    threshold = float(np.median(s))
    f = scoring.Fusion(0.8, threshold, ref)
    assert f.gated
    width = scoring.GATE_WIDTH

    def ramp(s):  # full weight at the threshold and above, none at threshold - width and below
        if s >= threshold:
            return 0.8
        return 0.0 if s <= threshold - width else 0.8 * (s - threshold + width) / width

    np.testing.assert_allclose(f.weights(q), [ramp(x) for x in s], atol=1e-6)
    near = scoring.Fusion(0.8, float(s[0]) + width / 2, ref).weights(q[:1])
    np.testing.assert_allclose(near, [0.4], atol=1e-4)  # halfway up the ramp
    # without a reference or a threshold (an older model): the weight for every query
    assert list(scoring.Fusion(0.8, threshold, None).weights(q)) == [0.8] * 4
    assert list(scoring.Fusion(0.8, None, ref).weights(q)) == [0.8] * 4

    class M:
        extras = {scoring.EXTRA_HYBRID_WEIGHT: 0.8, scoring.EXTRA_HYBRID_GATE: threshold}
        caption_reference = ref

    assert list(scoring.Fusion.of(M()).weights(q)) == list(f.weights(q))
    # the dense hybrid with a gated weight: an out-of-domain query ranks by the bridge alone
    a, b = rng.standard_normal((4, 7)), rng.random((4, 7))
    got = scoring.hybrid_scores(a, b, f.weights(q))
    for i, s in enumerate(by_hand):
        if s <= threshold - width:
            np.testing.assert_allclose(got[i], zscore_by_hand(list(b[i])), atol=1e-6)
