"""Zero-shot search through AudioSet tags (the "tag bridge") and hybrid fusion with a trained adapter.

Why: a user who indexes an uncaptioned library has no training data, yet a tower with an AudioSet head
already says which of 527 sound classes each clip contains. The bridge maps a text query onto those 527
classes through the text tower and scores every clip by how much of the query's class mass the clip has:

    cos[q, l]   = cosine(sentence(query_q), sentence(label_l))          (Q, 527)
    p[q, :]     = softmax(cos[q, :] / temperature)                      (Q, 527), rows sum to 1
    score[q, c] = sum_l p[q, l] * tags[c, l]                            (Q, C)

A sentence embedding is the mean of the text tower's token sequence (for all-MiniLM-L6-v2 with
``layer=-1`` this is exactly the sentence-transformers embedding). Clip tags are the mean (default) or
max of the tower's per-element tag probabilities.

Hybrid ranking z-scores each score row across the candidate clips (so the cosine of an adapter and a
probability-like bridge score become comparable per query) and mixes them with one weight chosen on
validation data and stored in the model directory's ``extras``.
"""

from __future__ import annotations

import csv
import functools
import importlib.resources
import re
import unicodedata
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from atae.errors import AtaeError, ModelError, QueryError

N_LABELS = 527
# Defaults chosen on ESC-50 folds 1-3 (class-name queries, mn04 whole-clip tags, MiniLM; mAP@10 of each
# fold, averaged; bench/bench_bridge.py, results in bench/results/bridge.json): the last layer's
# mean-pooled tokens (the sentence-transformers embedding) beat the penultimate layer (0.771 vs 0.733),
# label prompts beat bare names (0.74-0.76 vs 0.74 for "{label}"), whole-clip tags beat pooled 1 s
# windows (mean 0.66 > max 0.64), and mAP@10 is flat for temperatures 0.005-0.02, falling beyond 0.05.
DEFAULT_TEMPERATURE = 0.01
DEFAULT_TEMPLATE = "the noise of {label}"
BRIDGE_TEXT_LAYER = -1
TEMPERATURE_GRID = (0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3)
WEIGHT_GRID = tuple(round(w, 2) for w in np.linspace(0.0, 1.0, 21))
# keys in AlignedModel.extras (the model directory's config) written by the caller after tuning
EXTRA_HYBRID_WEIGHT = "hybrid_weight"
EXTRA_BRIDGE_TEMPERATURE = "bridge_temperature"
DEFAULT_HYBRID_WEIGHT = 0.5
# TagSearchIndex keeps each label's best LIST_DEPTH clips sorted (527 x depth x 12 bytes: 52 MB at 8192)
LIST_DEPTH = 8192


# --------------------------------------------------------------------------------------------- labels
@functools.lru_cache(maxsize=1)
def _labels() -> tuple[str, ...]:
    ref = importlib.resources.files("atae.resources") / "audioset_labels.csv"
    with ref.open("r", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != N_LABELS or [int(r["index"]) for r in rows] != list(range(N_LABELS)):
        raise AtaeError("packaged AudioSet label list is damaged", path=str(ref),
                        fix="reinstall atae")
    return tuple(r["display_name"] for r in rows)


def audioset_labels() -> list[str]:
    """The 527 AudioSet display names in head order (packaged copy of the CC BY 4.0 ontology)."""
    return list(_labels())


def label_texts(template: str = DEFAULT_TEMPLATE) -> list[str]:
    """Label names put into a prompt template such as ``"the sound of {label}"``."""
    if "{label}" not in template:
        raise AtaeError(f"label template {template!r} has no '{{label}}' placeholder",
                        fix='use e.g. "the sound of {label}"')
    return [template.format(label=label) for label in _labels()]


label_texts_for = label_texts  # TagBridge's parameter shadows the function name inside __init__


# --------------------------------------------------------------------------------------------- text
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalise_query(text: str) -> str:
    """Collapse whitespace; refuse a query with no letters or digits (nothing a tower could match)."""
    if not isinstance(text, str):
        raise QueryError(f"a query must be text, got {type(text).__name__}")
    cleaned = " ".join(unicodedata.normalize("NFKC", text).split())
    if not _NON_WORD.sub(" ", cleaned).strip():
        raise QueryError(f"query {text!r} has no words after normalisation",
                         fix="type a few words that describe the sound")
    return cleaned


def sentence_embeddings(text_tower, texts: Sequence[str]) -> np.ndarray:
    """(N, F) unit-length float32: mean over each text's token sequence, then L2 normalisation."""
    seqs = text_tower.encode(list(texts))
    out = np.stack([np.asarray(s, dtype=np.float64).mean(axis=0) for s in seqs]) if seqs else \
        np.zeros((0, int(text_tower.dim)))
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.maximum(norms, 1e-12)).astype(np.float32)


_TOWER_CACHE: dict[tuple[str, int], object] = {}


def bridge_text_tower(text_tower, layer: int | None = BRIDGE_TEXT_LAYER):
    """The same Hugging Face model read at ``layer`` (a sibling tower, built once and cached).

    Adapters train on the penultimate layer (the seed), but the bridge compares whole sentences, where
    the last layer's mean (all-MiniLM's own sentence embedding) matches label names far better.
    Towers without a ``layer``/``model_dir`` (other kinds, test fakes) are used as they are."""
    have = getattr(text_tower, "layer", None)
    model_dir = getattr(text_tower, "model_dir", None)
    if layer is None or have is None or model_dir is None or have == layer:
        return text_tower
    key = (str(model_dir), int(layer))
    if key not in _TOWER_CACHE:
        _TOWER_CACHE[key] = type(text_tower)(
            model=text_tower.name, weights=model_dir, layer=layer,
            max_length=getattr(text_tower, "max_length", 128),
            batch_size=getattr(text_tower, "batch_size", 64),
            device=str(getattr(text_tower, "device", "cpu")))
    sibling = _TOWER_CACHE[key]
    if hasattr(sibling, "feed"):  # one text pass serves both layers (a hybrid query's two embeddings)
        sibling.feed(text_tower)
    return sibling


def softmax_rows(x: np.ndarray, temperature: float) -> np.ndarray:
    """Row softmax of ``x / temperature`` in float64 (stable), returned as float32."""
    z = np.asarray(x, dtype=np.float64) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


# --------------------------------------------------------------------------------------------- tags
def require_tag_head(audio_tower) -> None:
    """The bridge and hybrid scorers need per-clip AudioSet probabilities: refuse other towers early."""
    if not getattr(audio_tower, "has_tags", False):
        name = getattr(audio_tower, "name", type(audio_tower).__name__)
        raise AtaeError(
            f"audio tower {name!r} has no AudioSet head, so the 'bridge' and 'hybrid' scorers cannot be used",
            fix="use --audio-encoder efficientat-mn04 (or cnn14), or --scorer adapter")


def pool_tags(tags: np.ndarray | None, pool: str = "mean", *, path=None) -> np.ndarray:
    """One clip's (527,) tag vector from its per-element (T, 527) probabilities."""
    if tags is None:
        raise AtaeError("no AudioSet tags stored for this clip (its tower has no AudioSet head)", path=path,
                        fix="extract with a tagging tower (efficientat-mn04, cnn14) or use --scorer adapter")
    t = np.asarray(tags, dtype=np.float32)
    if t.ndim == 1:
        t = t[None, :]
    if t.ndim != 2 or t.shape[1] != N_LABELS or t.shape[0] == 0:
        raise AtaeError(f"tags must be (T, {N_LABELS}), got {t.shape}", path=path)
    if pool == "mean":
        return t.mean(axis=0)
    if pool == "max":
        return t.max(axis=0)
    raise AtaeError(f"unknown tag pooling {pool!r}", fix="use 'mean' or 'max'")


def _check_clip_tags(clip_tags) -> np.ndarray:
    if clip_tags is None:
        raise AtaeError("no AudioSet tags for these clips: the bridge needs a tower with an AudioSet head",
                        fix="use --audio-encoder efficientat-mn04 (or cnn14), or --scorer adapter")
    t = np.asarray(clip_tags, dtype=np.float32)
    if t.ndim != 2 or t.shape[1] != N_LABELS:
        raise AtaeError(f"clip tags must be (C, {N_LABELS}), got {t.shape}")
    return t


# --------------------------------------------------------------------------------------------- bridge
_LABEL_CACHE: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}


def _tower_key(text_tower) -> str:
    info = getattr(text_tower, "info", None)
    return info.key() if info is not None else f"{type(text_tower).__name__}@{id(text_tower)}"


class TagBridge:
    """Zero-shot text-to-audio scorer over AudioSet tags (see the module docstring for the formula)."""

    def __init__(self, text_tower, *, temperature: float = DEFAULT_TEMPERATURE,
                 label_texts: Sequence[str] | None = None, pool: str = "mean",
                 text_layer: int | None = BRIDGE_TEXT_LAYER):
        if not temperature > 0:
            raise AtaeError(f"bridge temperature must be > 0, got {temperature}")
        if pool not in ("mean", "max"):
            raise AtaeError(f"unknown tag pooling {pool!r}", fix="use 'mean' or 'max'")
        texts = tuple(label_texts) if label_texts is not None else tuple(label_texts_for(DEFAULT_TEMPLATE))
        if len(texts) != N_LABELS:
            raise AtaeError(f"label_texts must hold {N_LABELS} texts in head order, got {len(texts)}")
        self.text_tower = bridge_text_tower(text_tower, text_layer)
        self.temperature = float(temperature)
        self.label_texts = texts
        self.pool = pool

    @property
    def label_matrix(self) -> np.ndarray:
        """(527, F) unit-length label embeddings, computed once per (text tower, label texts)."""
        key = (_tower_key(self.text_tower), self.label_texts)
        m = _LABEL_CACHE.get(key)
        if m is None:
            m = sentence_embeddings(self.text_tower, self.label_texts)
            _LABEL_CACHE[key] = m
        return m

    def cosines(self, texts: Sequence[str]) -> np.ndarray:
        """(Q, 527) cosine of each query with each label name."""
        if isinstance(texts, str):
            texts = [texts]
        queries = [normalise_query(t) for t in texts]
        return sentence_embeddings(self.text_tower, queries) @ self.label_matrix.T

    def query_distribution(self, texts: Sequence[str]) -> np.ndarray:
        """(Q, 527) softmax(cosine / temperature): which AudioSet classes each query asks for."""
        return softmax_rows(self.cosines(texts), self.temperature)

    def clip_tags(self, per_clip_tags: Sequence[np.ndarray | None]) -> np.ndarray:
        """(C, 527) clip tag matrix from each clip's per-element (T, 527) tags, pooled by ``self.pool``."""
        return np.stack([pool_tags(t, self.pool) for t in per_clip_tags]) if len(per_clip_tags) else \
            np.zeros((0, N_LABELS), np.float32)

    def scores(self, texts: Sequence[str], clip_tags) -> np.ndarray:
        """(Q, C) = query_distribution(texts) @ clip_tags.T for a (C, 527) clip tag matrix."""
        return self.query_distribution(texts) @ _check_clip_tags(clip_tags).T

    def search(self, text: str, index: TagSearchIndex, k: int = 10, *,
               adapter_scores: np.ndarray | None = None, weight: float = DEFAULT_HYBRID_WEIGHT):
        """Top-k (clip indices, scores) of one query over an index: bridge, or hybrid with adapter scores."""
        return index.top_k(self.query_distribution([text])[0], k, adapter_scores=adapter_scores,
                           weight=weight)


# --------------------------------------------------------------------------------------------- hybrid
def zscore_rows(scores: np.ndarray) -> np.ndarray:
    """Per-query standardisation across clips: (s - mean) / std (population std).

    A constant row (std 0, e.g. a tagless corpus or a single candidate) becomes all zeros, so it adds
    nothing to a hybrid instead of dividing by zero."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be (Q, C), got {s.shape}")
    mu = s.mean(axis=1, keepdims=True)
    sd = s.std(axis=1, keepdims=True)
    safe = np.where(sd > 1e-12, sd, 1.0)
    return np.where(sd > 1e-12, (s - mu) / safe, 0.0)


def hybrid_scores(adapter_scores: np.ndarray, bridge_scores: np.ndarray, weight: float) -> np.ndarray:
    """(Q, C) = weight * zscore(adapter) + (1 - weight) * zscore(bridge), rows z-scored across clips."""
    a = np.asarray(adapter_scores)
    b = np.asarray(bridge_scores)
    if a.shape != b.shape:
        raise ValueError(f"adapter scores {a.shape} and bridge scores {b.shape} differ in shape")
    if not 0.0 <= weight <= 1.0:
        raise AtaeError(f"hybrid weight must lie in [0, 1], got {weight}")
    return _mix(zscore_rows(a), zscore_rows(b), weight)


def _mix(za: np.ndarray, zb: np.ndarray, weight: float) -> np.ndarray:
    return (weight * za + (1.0 - weight) * zb).astype(np.float32)


def check_hybrid_tower(model, audio_tower_info) -> None:
    """A hybrid needs the adapter's clips and the tags from the same audio tower: refuse a mix-up."""
    model_info = getattr(model, "audio_info", None)
    if model_info is None or audio_tower_info is None:
        return
    if model_info.key() != audio_tower_info.key():
        raise ModelError(
            f"the model was trained on audio tower {model_info.name!r} ({model_info.key()}) but the tags and "
            f"clips come from {audio_tower_info.name!r} ({audio_tower_info.key()})",
            fix=f"use --audio-encoder {model_info.name} with the weights the model was trained on")


def hybrid_weight(model, default: float = DEFAULT_HYBRID_WEIGHT) -> float:
    """The tuned weight stored in a model's extras, or ``default`` for a model never tuned."""
    extras = getattr(model, "extras", None) or {}
    return float(extras.get(EXTRA_HYBRID_WEIGHT, default))


def bridge_temperature(model, default: float = DEFAULT_TEMPERATURE) -> float:
    """The tuned temperature stored in a model's extras, or ``default`` (also when ``model`` is None)."""
    extras = getattr(model, "extras", None) or {}
    return float(extras.get(EXTRA_BRIDGE_TEMPERATURE, default))


# --------------------------------------------------------------------------------------------- search
def _f32_margin(x: float) -> float:
    """Room for float32 rounding in sums of at most 527 products in [0, 1]."""
    return 1e-6 * (1.0 + abs(x))


class _Lists:
    """One query's view of a TagSearchIndex's sorted label lists: the kept labels K (``_kept``), and for a
    depth m the clips in the first m entries of some kept list (``union``) and the most any other clip
    can score (``bound``): sum_K d_l list_val[l, m-1] + what the dropped labels can add."""

    def __init__(self, index: TagSearchIndex, d: np.ndarray):
        self.keep, self.rest = index._kept(d)
        self.dk = d[self.keep]
        self.index = index
        self.depth = index.list_pos.shape[1]

    def bound(self, m: int) -> float:
        return float(self.dk @ self.index.list_val[self.keep, m - 1]) + self.rest

    def union(self, m: int) -> np.ndarray:
        """Sorted distinct positions (sort + neighbour test: ~5x faster than np.unique on these sizes)."""
        x = np.sort(self.index.list_pos[self.keep, :m], axis=None)
        return x if len(self.keep) == 1 else x[np.r_[True, x[1:] != x[:-1]]]

    def first_below(self, x: float) -> int:
        """The smallest depth m with bound(m) < x (bound is non-increasing in m); depth + 1 if none."""
        if len(self.keep) <= 16:  # the whole curve at once: K rows of the lists
            curve = self.dk @ self.index.list_val[self.keep] + self.rest
            return int(np.searchsorted(-curve, -x, side="right")) + 1
        lo, hi = 1, self.depth + 1
        while lo < hi:
            mid = (lo + hi) // 2
            if self.bound(mid) < x:
                hi = mid
            else:
                lo = mid + 1
        return lo


class BridgeCandidates(NamedTuple):
    """Clips gathered before a bridge threshold is known (``TagSearchIndex.prefetch``): the first
    ``depth`` entries of a query's kept label lists, with exact scores; any other clip scores at most
    ``bound`` (before float32 rounding)."""

    pos: np.ndarray
    scores: np.ndarray
    bound: float
    depth: int


class TagSearchIndex:
    """Exact top-k bridge / hybrid search over many clips that reads only the labels a query needs.

    Why: a dense bridge pass reads 527 floats per clip, as many bytes as the adapter's own 512-d pass,
    so a hybrid would take about twice the adapter's time. Tags are stored label-major (527, C). For a
    query distribution d, ``top_k`` reads only the rows of the labels K with the largest possible
    contribution d_l * max_c(t_cl), until what is left cannot add more than ``slack``:

        b_c = sum_{l in K} d_l t_cl + r_c,   0 <= r_c <= min(sum_{l not in K} d_l max_c t_cl,
                                                             ||d_{not K}|| * ||t_c||)     (tags >= 0)

    Every clip whose upper bound reaches the k-th best lower bound is rescored with all 527 tags, so
    the clips and scores returned are those of the dense computation (``scores``/``hybrid_scores``).
    The hybrid's per-query mean and std over all clips are exact from the stored tag mean and
    covariance (mean_c b_c = d.mean, var_c b_c = d'Sd). A flat distribution (high temperature) or
    loose bounds fall back to one dense pass, which is never slower than the plain computation.

    Before any of that, ``top_k`` and ``above`` try each label's best clips kept sorted (``list_pos``,
    ``list_val``; ``_from_lists``): for the sharp distributions of the default temperature the answer
    then comes from a few hundred list entries instead of a pass over every clip.
    """

    def __init__(self, clip_tags, *, chunk: int = 65536, max_labels: int = 96, slack: float = 1e-3,
                 list_depth: int = LIST_DEPTH):
        t = _check_clip_tags(clip_tags)
        if t.shape[0] == 0:
            raise AtaeError("no clips to index")
        n = t.shape[0]
        self.by_label = np.ascontiguousarray(t.T)  # (527, C)
        # clip-major rows for rescoring a few clips: a column gather from by_label misses the cache on
        # every element (6 ms for 1280 clips of 100k, 0.6 ms from rows). float32, not the library's
        # float16: numpy's float16 -> float32 cast costs more than the gather itself.
        self.by_clip = t
        self.label_max = t.max(axis=0).astype(np.float64)
        self.clip_norm = np.sqrt(np.einsum("cl,cl->c", t, t, dtype=np.float64))
        self.clip_sum = t.sum(axis=1, dtype=np.float64)
        self.mean = t.mean(axis=0, dtype=np.float64)
        cov = np.zeros((N_LABELS, N_LABELS))
        for a in range(0, n, chunk):
            x = t[a:a + chunk].astype(np.float64) - self.mean
            cov += x.T @ x
        self.cov = cov / n  # population covariance, matching zscore_rows' population std
        self.max_labels = int(max_labels)
        self.slack = float(slack)
        self.last_labels = 0  # diagnostics of the last top_k: label rows read, clips rescored
        self.last_rescored = 0
        # each label's best clips, best first: (527, depth) positions and values (see ``_from_lists``)
        depth = max(1, min(n, int(list_depth)))
        self.list_pos = np.empty((N_LABELS, depth), np.int64)
        self.list_val = np.empty((N_LABELS, depth), np.float32)
        for lab in range(N_LABELS):
            row = self.by_label[lab]
            part = np.argpartition(-row, depth - 1)[:depth] if depth < n else np.arange(n)
            best = part[np.lexsort((part, -row[part]))]
            self.list_pos[lab], self.list_val[lab] = best, row[best]

    @property
    def n_clips(self) -> int:
        return int(self.by_label.shape[1])

    def moments(self, dist: np.ndarray) -> tuple[float, float]:
        """Exact mean and population std over all clips of the bridge scores of one distribution."""
        d = np.asarray(dist, dtype=np.float64).reshape(-1)
        # a sharp distribution puts ~1e-20 on most labels: their terms cannot move the variance, and
        # skipping them makes d'Sd read a few covariance entries instead of all 527 x 527
        top = float(d.max()) if d.size else 0.0
        nz = np.flatnonzero(np.abs(d) > 1e-13 * top)
        if 0 < nz.size < N_LABELS // 2:
            dn = d[nz]
            var = dn @ self.cov[np.ix_(nz, nz)] @ dn
        else:
            var = d @ self.cov @ d
        return float(d @ self.mean), float(np.sqrt(max(var, 0.0)))

    def _kept(self, d: np.ndarray) -> tuple[np.ndarray, float]:
        """(labels a query needs, largest first; the most the other labels can add to any clip)."""
        gain = d * self.label_max
        order = np.argsort(-gain, kind="stable")
        rest = np.cumsum(gain[order][::-1])[::-1]  # rest[i] = sum of gain[order[i:]]
        n_keep = int(np.searchsorted(-rest, -self.slack, side="left"))  # first i with rest[i] <= slack
        n_keep = max(1, min(n_keep, self.max_labels))
        self.last_labels = n_keep
        return order[:n_keep], float(rest[n_keep]) if n_keep < N_LABELS else 0.0

    def _from_lists(self, d: np.ndarray, threshold: float | None = None, k: int | None = None):
        """Candidates from the kept labels' sorted lists (Fagin's threshold algorithm, one common depth).

        A clip outside the first m entries of every kept label's list has t_cl <= list_val[l, m-1] there,
        so b_c <= sum_K d_l list_val[l, m-1] + rest =: bound(m). For ``threshold``: the smallest m with
        bound(m) < threshold, all clips that can reach it. For ``k``: m doubles until the k-th best
        rescored candidate beats bound(m). Returns (sorted positions, exact scores), or None when the
        lists are too short (the caller falls back to ``partial``)."""
        lists = _Lists(self, d)
        bound, union, depth = lists.bound, lists.union, lists.depth
        margin = _f32_margin

        if threshold is not None:
            if bound(depth) >= threshold - margin(threshold):
                return None
            lo = lists.first_below(threshold - margin(threshold))
            cand = union(lo)
            return cand, self.exact(d, cand)
        m = min(depth, max(2 * int(k), 16))
        while True:
            cand = union(m)
            if len(cand) > max(self.n_clips // 8, 4 * k):  # lists this deep prove little: use ``partial``
                return None
            ex = self.exact(d, cand)
            if len(cand) >= k:
                s_k = float(np.partition(ex, len(ex) - k)[len(ex) - k])
                if s_k > bound(m) + margin(s_k) or (m == depth == self.n_clips):
                    return cand, ex
            if m >= depth:
                return None
            m = min(depth, 4 * m)

    def prefetch(self, dist: np.ndarray, max_clips: int = 512) -> BridgeCandidates:
        """The clips of the kept labels' lists down to the depth that holds at most ``max_clips`` of them,
        scored exactly: the bridge side of a hybrid query, gathered while the adapter search runs."""
        d = np.asarray(dist, dtype=np.float64).reshape(-1)
        lists = _Lists(self, d)
        m = max(1, min(lists.depth, int(max_clips) // len(lists.keep)))
        pos = lists.union(m)
        return BridgeCandidates(pos, self.exact(d, pos), lists.bound(m), m)

    def partial(self, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lower bound (C,), width (C,)): b_c lies in [lower_c, lower_c + width_c]."""
        d = np.asarray(dist, dtype=np.float64).reshape(-1)
        gain = d * self.label_max
        keep = np.sort(self._kept(d)[0])
        # row by row: a fancy-indexed d[keep] @ by_label[keep] would first copy len(keep) x C floats
        lower = np.zeros(self.n_clips, np.float32)
        tmp = np.empty(self.n_clips, np.float32)
        for lab in keep:
            np.multiply(self.by_label[lab], np.float32(d[lab]), out=tmp)
            lower += tmp
        dropped = np.ones(N_LABELS, bool)
        dropped[keep] = False
        # three bounds on what the dropped labels add: each label at its corpus maximum; Cauchy-Schwarz;
        # every dropped weight at the largest one (tight for a flat distribution)
        width = np.minimum(gain[dropped].sum(), np.minimum(np.linalg.norm(d[dropped]) * self.clip_norm,
                                                           d[dropped].max(initial=0.0) * self.clip_sum))
        # float32 sums: a margin that covers their rounding
        return lower.astype(np.float64), width + 1e-6 * (1.0 + np.abs(lower))

    def exact(self, dist: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Bridge scores of every clip, or of the clips ``rows`` (float32 sums, as float64)."""
        d = np.asarray(dist, dtype=np.float32).reshape(-1)
        if rows is None:
            return (d @ self.by_label).astype(np.float64)
        rows = np.asarray(rows, dtype=np.int64)
        # A sharp distribution (the default temperature) leaves ~1e-20 on most labels. Labels under 1e-12
        # of the largest weight add at most 5.3e-10 of it to any score (tags <= 1): the size of float32
        # rounding in a 527-term sum for a clip scoring >= 1e-3 of it, i.e. anything near a top-k. Only
        # the others are read then -- a few label rows gathered at ``rows``, not 527 floats a clip.
        live = np.flatnonzero(d > np.float32(1e-12) * d.max()) if d.size else np.zeros(0, np.int64)
        if len(rows) > 8 and len(live) <= 32:
            out = np.zeros(len(rows), np.float32)
            for lab in live:
                out += d[lab] * self.by_label[lab, rows]
            return out.astype(np.float64)
        return (self.by_clip[rows] @ d).astype(np.float64)

    def above(self, dist: np.ndarray, threshold: float, limit: int | None = None):
        """(clip indices (sorted), exact scores) of every clip whose bridge score is >= threshold, from the
        label lists (``_from_lists``) or else the bounds of ``partial`` (only clips whose upper bound
        reaches it are rescored); None when more than ``limit`` clips might reach it (the caller then asks
        differently)."""
        d = np.asarray(dist, dtype=np.float64).reshape(-1)
        got = self._from_lists(d, threshold=float(threshold))
        if got is not None:
            cand, exact = got
            self.last_rescored = int(cand.size)
            if limit is not None and cand.size > limit:
                return None
            keep = exact >= threshold
            return cand[keep], exact[keep]
        lower, width = self.partial(dist)
        cand = np.nonzero(lower + width >= threshold)[0]
        self.last_rescored = int(cand.size)
        if limit is not None and cand.size > limit:
            return None
        exact = self.exact(dist, cand)
        keep = exact >= threshold
        return cand[keep], exact[keep]

    def top_k(self, dist: np.ndarray, k: int = 10, *, adapter_scores: np.ndarray | None = None,
              weight: float = DEFAULT_HYBRID_WEIGHT) -> tuple[np.ndarray, np.ndarray]:
        """(clip indices, scores) of the k best clips, best first (ties: lower index first).

        Without ``adapter_scores``: bridge scores. With them (C,): the hybrid of ``hybrid_scores``."""
        k = int(min(k, self.n_clips))
        if adapter_scores is None and k > 0:
            got = self._from_lists(np.asarray(dist, dtype=np.float64).reshape(-1), k=k)
            if got is not None:
                cand, exact = got
                self.last_rescored = int(cand.size)
                order = np.lexsort((cand, -exact))[:k]
                return cand[order], exact[order].astype(np.float32)
        lower, width = self.partial(dist)
        if adapter_scores is None:
            base, scale, shift = 0.0, 1.0, 0.0
        else:
            if not 0.0 <= weight <= 1.0:
                raise AtaeError(f"hybrid weight must lie in [0, 1], got {weight}")
            a = np.asarray(adapter_scores, dtype=np.float64).reshape(-1)
            if a.shape[0] != self.n_clips:
                raise ValueError(f"{a.shape[0]} adapter scores for {self.n_clips} indexed clips")
            mu, sd = self.moments(dist)
            base = weight * zscore_rows(a[None, :])[0]
            scale, shift = ((1.0 - weight) / sd, mu) if sd > 1e-12 else (0.0, 0.0)
        lo = base + scale * (lower - shift)
        hi = lo + scale * width
        theta = np.partition(lo, self.n_clips - k)[self.n_clips - k]
        cand = np.nonzero(hi >= theta)[0]
        if cand.size > self.n_clips // 8:  # bounds too loose for this query: one dense pass
            cand = np.arange(self.n_clips)
            exact = self.exact(dist)
        else:
            exact = self.exact(dist, cand)
        self.last_rescored = int(cand.size)
        s = (base[cand] if adapter_scores is not None else 0.0) + scale * (exact - shift)
        order = np.lexsort((cand, -s))[:k]
        return cand[order], s[order].astype(np.float32)


# --------------------------------------------------------------------------------------------- tuning
def mean_ap_at_k(scores: np.ndarray, relevant: Sequence, k: int = 10) -> float:
    """Mean AP@k (``atae.metrics.per_query_multi``): with one relevant clip per query (an int) this is the
    DCASE 2022 mAP@10 (1/rank within the top k); with several, DCASE 2025's multi-positive AP."""
    from atae.metrics import per_query_multi

    sets = [np.atleast_1d(np.asarray(r, dtype=np.int64)) for r in relevant]
    return float(per_query_multi(scores, sets, k=k, k_list=())[f"mAP@{k}"].mean())


def temperature_curve(bridge: TagBridge, queries: Sequence[str], relevant: Sequence, clip_tags,
                      grid: Sequence[float] = TEMPERATURE_GRID, k: int = 10) -> list[tuple[float, float]]:
    """[(temperature, mAP@k)] over ``grid``; the text tower runs once."""
    return temperature_curve_from_cosines(bridge.cosines(queries), relevant, clip_tags, grid, k)


def temperature_curve_from_cosines(cos: np.ndarray, relevant: Sequence, clip_tags,
                                   grid: Sequence[float] = TEMPERATURE_GRID,
                                   k: int = 10) -> list[tuple[float, float]]:
    """:func:`temperature_curve` from (Q, 527) query-label cosines a caller already holds (and reuses)."""
    tags = _check_clip_tags(clip_tags)
    return [(float(t), mean_ap_at_k(softmax_rows(cos, t) @ tags.T, relevant, k)) for t in grid]


def tune_temperature(bridge: TagBridge, queries: Sequence[str], relevant: Sequence, clip_tags,
                     grid: Sequence[float] = TEMPERATURE_GRID, k: int = 10) -> float:
    """The grid temperature with the best validation mAP@k (ties: the first in grid order)."""
    curve = temperature_curve(bridge, queries, relevant, clip_tags, grid, k)
    return max(curve, key=lambda tm: tm[1])[0] if curve else bridge.temperature


def hybrid_weight_curve(adapter_scores: np.ndarray, bridge_scores: np.ndarray, relevant: Sequence,
                        grid: Sequence[float] = WEIGHT_GRID, k: int = 10) -> list[tuple[float, float]]:
    """[(weight, mAP@k)] of the hybrid over ``grid``."""
    za, zb = zscore_rows(adapter_scores), zscore_rows(bridge_scores)
    return [(float(w), mean_ap_at_k(_mix(za, zb, w), relevant, k)) for w in grid]


def tune_hybrid_weight(adapter_scores: np.ndarray, bridge_scores: np.ndarray, relevant: Sequence,
                       grid: Sequence[float] = WEIGHT_GRID, k: int = 10) -> float:
    """The grid weight with the best validation mAP@k (ties: the first in grid order).

    The caller stores it with ``model.extras[EXTRA_HYBRID_WEIGHT] = w`` before saving the model."""
    curve = hybrid_weight_curve(adapter_scores, bridge_scores, relevant, grid, k)
    return max(curve, key=lambda wm: wm[1])[0]


# --------------------------------------------------------------------------------------------- fast hybrid
class RowMoments:
    """Mean and population covariance of row vectors x_i, so that the mean and std over i of x_i . q
    are closed form for any q: mean = q . mu, var = q' C q. One pass over the rows (chunks may come
    from anywhere, e.g. a FAISS index), accumulated around a shift (the first chunk's mean) so that
    the covariance does not cancel catastrophically when the mean is large against the spread."""

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.n = 0
        self._shift: np.ndarray | None = None
        self._s1 = np.zeros(self.dim)
        self._s2 = np.zeros((self.dim, self.dim))
        self._cached: tuple[np.ndarray, np.ndarray] | None = None
        self._factor: np.ndarray | None = None

    @classmethod
    def of(cls, rows: np.ndarray, chunk: int = 8192) -> RowMoments:
        x = np.asarray(rows)
        m = cls(x.shape[1])
        for a in range(0, x.shape[0], chunk):
            m.add(x[a:a + chunk])
        return m

    def add(self, rows: np.ndarray) -> None:
        x = np.asarray(rows, dtype=np.float64).reshape(-1, self.dim)
        if not len(x):
            return
        if self._shift is None:
            self._shift = x.mean(axis=0)
        x = x - self._shift
        self.n += x.shape[0]
        self._s1 += x.sum(axis=0)
        self._s2 += x.T @ x
        self._cached = None

    def _final(self) -> tuple[np.ndarray, np.ndarray]:
        if self._cached is None:  # once per batch of additions, not per query
            if not self.n:
                self._cached = (np.zeros(self.dim), np.zeros((self.dim, self.dim)))
            else:
                m = self._s1 / self.n
                self._cached = (self._shift + m, self._s2 / self.n - np.outer(m, m))
            self._factor = None
        return self._cached

    def _root(self) -> np.ndarray:
        """W (float32) with W'W = cov, so var = |W q|^2: a sum of squares (no cancellation, never < 0)
        from one float32 matrix-vector product, a quarter of the bytes of q'Cq in float64."""
        mean, cov = self._final()
        if self._factor is None:
            lam, vec = np.linalg.eigh(cov)
            self._factor = (np.sqrt(np.clip(lam, 0.0, None))[:, None] * vec.T).astype(np.float32)
        return self._factor

    @property
    def mean(self) -> np.ndarray:
        return self._final()[0]

    @property
    def cov(self) -> np.ndarray:
        """Population covariance (divided by n, matching ``zscore_rows``' population std)."""
        return self._final()[1]

    def moments(self, q: np.ndarray) -> tuple[float, float]:
        """(mean, population std) over the rows of x_i . q."""
        qq = np.asarray(q, dtype=np.float64).reshape(-1)
        mean, _ = self._final()
        wq = (self._root() @ qq.astype(np.float32)).astype(np.float64)
        return float(qq @ mean), float(np.sqrt(wq @ wq))


def hybrid_coefficients(adapter_moments: tuple[float, float], bridge_moments: tuple[float, float],
                        weight: float) -> tuple[float, float, float]:
    """(alpha, beta, const) with hybrid = alpha * a + beta * b + const, the exact linear form of
    ``hybrid_scores`` given each row's mean and std over all clips. A side with std <= 1e-12 (a
    constant row) contributes 0, as in ``zscore_rows``."""
    if not 0.0 <= weight <= 1.0:
        raise AtaeError(f"hybrid weight must lie in [0, 1], got {weight}")
    (mu_a, sd_a), (mu_b, sd_b) = adapter_moments, bridge_moments
    alpha = weight / sd_a if sd_a > 1e-12 else 0.0
    beta = (1.0 - weight) / sd_b if sd_b > 1e-12 else 0.0
    return alpha, beta, -alpha * mu_a - beta * mu_b


HYBRID_LIST_FACTOR, HYBRID_LIST_MIN = 20, 256


def first_list_length(k: int, factor: int = HYBRID_LIST_FACTOR, min_n: int = HYBRID_LIST_MIN) -> int:
    """Length of ``hybrid_top_k``'s first adapter list (a caller may run that search ahead of it)."""
    return max(int(factor) * int(k), int(min_n))


class HybridSeed(NamedTuple):
    """Clips scored on both sides before the adapter list is known (``hybrid_seed``): positions, their
    hybrid scores h, the most any other clip's bridge score can be (float32 margin included), the seed's
    k-th best h (-inf with fewer than k clips), and a mask over all clips of the seed's positions."""

    pos: np.ndarray
    h: np.ndarray
    b_bound: float
    s_lo: float
    member: np.ndarray


def hybrid_seed(coefficients: tuple[float, float, float], k: int, n_clips: int, pos: np.ndarray,
                adapter: np.ndarray, bridge: np.ndarray, b_bound: float) -> HybridSeed:
    """A ``HybridSeed`` for ``hybrid_top_k`` from clips with both exact scores, and a bound on every other
    clip's bridge score (``TagSearchIndex.prefetch``). Built beside the graph search, so the mask (one
    read a listed clip afterwards, not a binary search) costs no latency."""
    alpha, beta, const = (float(c) for c in coefficients)
    pos = np.asarray(pos, np.int64)
    h = const + alpha * np.asarray(adapter, np.float64) + beta * np.asarray(bridge, np.float64)
    k = int(k)
    s_lo = _kth(h, k) if 0 < k <= len(h) else -np.inf
    member = np.zeros(int(n_clips), bool)
    member[pos] = True
    return HybridSeed(pos, h, float(b_bound) + _f32_margin(float(b_bound)), s_lo, member)


def hybrid_top_k(k: int, n_clips: int, coefficients: tuple[float, float, float], *,
                 adapter_top, adapter_at, bridge_top, bridge_above, bridge_at,
                 factor: int = HYBRID_LIST_FACTOR, min_n: int = HYBRID_LIST_MIN, seed=None,
                 stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (clip positions, scores) of h = alpha * a + beta * b + const without scoring every clip.

    Callables (positions are 0..n_clips-1): ``adapter_top(n)`` -> (positions, scores[, floor]) of the
    n best adapter clips, best first, where floor (default: the n-th score) bounds every clip left
    out; ``adapter_at(pos)`` / ``bridge_at(pos)``: one side's exact scores of given clips;
    ``bridge_top(k)`` -> the k best bridge clips (positions, scores); ``bridge_above(t, limit)`` ->
    (positions, scores) of every clip with b >= t, or None when more than ``limit`` might qualify.

    With alpha, beta > 0: take the adapter's top N (N = max(factor * k, min_n)), rescore them exactly,
    and let s_k be their k-th best h. A clip outside the list has a <= a_N, so it can reach s_k only if
    b >= t = (s_k - const - alpha a_N) / beta; ``bridge_above(t)`` returns all such clips (the tag index
    bounds b cheaply and rescores only clips whose bound reaches t); they are rescored and merged.
    Every other clip scores below s_k, so the top-k is that of the dense computation, ties broken by
    lower position (float margins on a_N and t keep clips that tie s_k in the candidates). If too many
    clips pass t (the adapter list was too short to say much), N grows 4x (one more adapter search);
    once N covers every clip all clips are scored. alpha = 0 or beta = 0 (weight 0 or 1, or a constant
    row, which ``zscore_rows`` zeroes) leave one side: its own exact top-k.

    ``seed`` (``hybrid_seed``, for the same k and coefficients): clips already scored on both sides, with
    b <= bound for every other clip (``TagSearchIndex.prefetch``, computed while the graph search runs).
    Their k-th best h, s_lo, is a lower bound of s_k, so a listed clip outside the seed (b <= bound) needs
    its bridge score only if alpha a + beta bound + const reaches s_lo; and when t > bound every clip with
    b >= t is a seed clip, so ``bridge_above`` is not called.

    The guarantee is relative to ``adapter_top``: with an approximate index (HNSW) a clip the graph
    search misses may exceed a_N, so the hybrid is then exact with respect to that index's top N (as
    approximate as the adapter-only search over the same index)."""
    alpha, beta, const = (float(c) for c in coefficients)
    if alpha < 0 or beta < 0:
        raise ValueError("hybrid coefficients alpha and beta must be >= 0")
    k = int(min(k, n_clips))
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    if alpha == 0.0 and beta == 0.0:  # both rows constant: every clip scores 0; lowest positions first
        return np.arange(k, dtype=np.int64), np.zeros(k, np.float32)
    if alpha == 0.0:  # the bridge alone orders the clips (an increasing affine map of b)
        pos, sb = bridge_top(k)
        if stats is not None:
            stats.update(rounds=1, n=k, candidates=int(len(pos)), dense=False)
        return np.asarray(pos, np.int64), (beta * np.asarray(sb, np.float64) + const).astype(np.float32)
    n = first_list_length(k, factor, min_n)
    rounds = 0
    while True:
        rounds += 1
        if n >= n_clips:  # the list would cover every clip: score them all (the dense computation)
            cand = np.arange(n_clips, dtype=np.int64)
            s = const + alpha * np.asarray(adapter_at(cand), np.float64)
            if beta > 0:
                s += beta * np.asarray(bridge_at(cand), np.float64)
            order = _best(cand, s, k)
            if stats is not None:
                stats.update(rounds=rounds, n=n_clips, candidates=n_clips, dense=True)
            return cand[order], s[order].astype(np.float32)
        pos, sa, floor = _top_list(adapter_top, n)
        if len(pos) < k:
            n *= 4
            continue
        if seed is not None and beta > 0:
            cand, s = _seeded(pos, const + alpha * sa, seed, beta, bridge_at)
        else:
            cand, s = pos, const + alpha * sa
            if beta > 0:
                s = s + beta * np.asarray(bridge_at(pos), np.float64)
        s_k = _kth(s, k)
        a_out = floor + 1e-5 * max(1.0, abs(floor))  # every clip left out has a <= a_out
        if beta == 0.0:
            if s_k > const + alpha * a_out:
                order = _best(cand, s, k, s_k)
                if stats is not None:
                    stats.update(rounds=rounds, n=n, candidates=int(len(cand)), dense=False)
                return cand[order], s[order].astype(np.float32)
            n *= 4
            continue
        t = (s_k - const - alpha * a_out) / beta
        t -= 1e-5 * max(1.0, abs(t))
        if seed is None or seed.b_bound >= t:  # else every clip with b >= t is a seed clip, scored already
            # rescoring a clip (~0.3 us) is far cheaper than a 4x longer HNSW list (~2 us a hit)
            found = bridge_above(t, 32 * n)
            if found is None:  # the adapter list bounds too little: lengthen it
                n *= 4
                continue
            pb, sb = np.asarray(found[0], np.int64), np.asarray(found[1], np.float64)
            new = _not_in(pb, cand)
            pb, sb = pb[new], sb[new]
            if len(pb):
                cand = np.concatenate([cand, pb])
                s = np.concatenate([s, const + beta * sb + alpha * np.asarray(adapter_at(pb), np.float64)])
                s_k = _kth(s, k)
        order = _best(cand, s, k, s_k)
        if stats is not None:
            stats.update(rounds=rounds, n=n, candidates=int(len(cand)), dense=False)
        return cand[order], s[order].astype(np.float32)


def _seeded(pos, s_graph, seed: HybridSeed, beta: float, bridge_at):
    """Candidates of one hybrid round with a seed (see ``hybrid_top_k``): every seed clip, and the listed
    clips outside the seed that can reach the seed's k-th best score (their b <= the seed's bound)."""
    sp = seed.pos
    reach = ~seed.member[pos] & (s_graph + beta * seed.b_bound >= seed.s_lo - 1e-9 * (1.0 + abs(seed.s_lo)))
    po, so = pos[reach], s_graph[reach]
    if len(po):
        so = so + beta * np.asarray(bridge_at(po), np.float64)
    return np.concatenate([po, sp]), np.concatenate([so, seed.h])


def _kth(s: np.ndarray, k: int) -> float:
    """The k-th largest value of s (k <= len(s))."""
    return float(np.partition(s, len(s) - k)[len(s) - k])


def _best(cand: np.ndarray, s: np.ndarray, k: int, kth: float | None = None) -> np.ndarray:
    """Indices of the k best of s, best first, ties to the lower clip position ``cand`` -- also across the
    k-th place (only the entries >= the k-th value ``kth``, computed if not given, are sorted)."""
    k = min(k, len(s))
    if k <= 0:
        return np.zeros(0, np.int64)
    if kth is None:
        kth = _kth(s, k)
    top = np.flatnonzero(s >= kth)
    return top[np.lexsort((cand[top], -s[top]))][:k]


def _not_in(x: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Mask of the entries of x that are not in pool (sorted search: np.isin costs ~5x more here)."""
    if not len(pool):
        return np.ones(len(x), bool)
    listed = np.sort(pool)
    j = np.minimum(np.searchsorted(listed, x), len(listed) - 1)
    return listed[j] != x


def hybrid_top_k_dense(k: int, adapter_scores: np.ndarray, coefficients: tuple[float, float, float],
                       index: TagSearchIndex, dist: np.ndarray, *,
                       stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (clip positions, scores) of h = alpha * a + beta * b + const when every clip's adapter
    score a is at hand (an exact index reads every vector anyway, so a costs what the adapter search
    costs), with the bridge side from the tag index's sorted label lists.

    Tags are >= 0, so alpha * a + const is a lower bound of every h. For a list depth m, the clips U in
    the kept labels' first m entries are rescored exactly and s_k is their k-th best h; a clip outside U
    has b <= bound(m), so it can reach s_k only if alpha * a + const + beta * bound(m) >= s_k. Those few
    are rescored too (their bridge score from a few label rows), and the top-k of both sets is that of
    the dense computation (``hybrid_scores``; ties: lower position first). m grows 4x while that second
    set is large; at the lists' end the bridge is scored densely."""
    alpha, beta, const = (float(c) for c in coefficients)
    if alpha < 0 or beta < 0:
        raise ValueError("hybrid coefficients alpha and beta must be >= 0")
    a = np.asarray(adapter_scores, dtype=np.float64).reshape(-1)
    n = a.shape[0]
    if n != index.n_clips:
        raise ValueError(f"{n} adapter scores for {index.n_clips} indexed clips")
    k = int(min(k, n))
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    d = np.asarray(dist, dtype=np.float64).reshape(-1)
    if beta == 0.0:  # the adapter alone (or nothing: a constant 0 row) orders the clips
        if stats is not None:
            stats.update(rounds=1, n=k, candidates=k, dense=False)  # no bridge score needed
        if alpha == 0.0:
            return np.arange(k, dtype=np.int64), np.full(k, const, np.float32)
        s = const + alpha * a
        top = np.lexsort((np.arange(n), -s))[:k] if k > n // 2 else _best(np.arange(n), s, k)
        return top.astype(np.int64), s[top].astype(np.float32)
    if alpha == 0.0:
        pos, sb = index.top_k(d, k)
        if stats is not None:
            stats.update(rounds=1, n=k, candidates=index.last_rescored, dense=False)
        return np.asarray(pos, np.int64), (beta * np.asarray(sb, np.float64) + const).astype(np.float32)
    base = alpha * a + const
    lists = _Lists(index, d)
    m, rounds = min(lists.depth, max(2 * k, 16)), 0
    while True:
        rounds += 1
        cand = lists.union(m)
        h = base[cand] + beta * index.exact(d, cand)
        s_k = float(np.partition(h, len(h) - k)[len(h) - k]) if len(h) >= k else -np.inf
        reach = base >= s_k - beta * lists.bound(m) - 1e-5 * max(1.0, abs(s_k))
        reach[cand] = False
        n_out = int(np.count_nonzero(reach))
        if n_out <= max(4 * len(cand), n // 16) or m >= lists.depth:
            break
        m = min(lists.depth, 4 * m)
    if n_out > n // 4:  # the lists bound too little (a flat distribution): per-clip bounds from the
        lower, width = index.partial(d)  # kept labels' rows, then a dense pass if even those are loose
        lo = base + beta * lower
        cand = np.flatnonzero(lo + beta * width >= np.partition(lo, n - k)[n - k])
        h = base[cand] + beta * index.exact(d, cand) if cand.size <= n // 8 else None
        if h is None:
            cand, h = np.arange(n), base + beta * index.exact(d)
    elif n_out:
        out = np.flatnonzero(reach)
        cand, h = np.concatenate([cand, out]), np.concatenate([h, base[out] + beta * index.exact(d, out)])
    order = np.lexsort((cand, -h))[:k]
    if stats is not None:
        stats.update(rounds=rounds, n=m, candidates=int(len(cand)), dense=bool(len(cand) == n))
    return cand[order].astype(np.int64), h[order].astype(np.float32)


def _top_list(fn, n: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(positions, scores, floor) of one side's top-n; floor bounds every clip left out (the n-th score,
    or a third value the side returns, e.g. the n-th FAISS hit when some hits are not hybrid clips)."""
    out = fn(n)
    pos, sc = np.asarray(out[0], np.int64), np.asarray(out[1], np.float64)
    floor = float(out[2]) if len(out) > 2 else (float(sc[-1]) if len(sc) else np.inf)
    return pos, sc, floor
