"""Zero-shot search through AudioSet tags (the "tag bridge"): the 527 AudioSet labels and ``TagBridge``.

Why: a user who indexes an uncaptioned library has no training data, yet a tower with an AudioSet head
already says which of 527 sound classes each clip contains. The bridge maps a text query onto those
classes through the text tower and scores every clip by how well its tags cover what the query asks for:

    s[q]       = unit mean of the text tower's last-layer tokens of query q          (Q, F)
    cos[q, l]  = s[q] . s(prompt of label l)                                        (Q, 527)
    p[q, :]    = softmax(cos[q, :] / temperature)                                   (Q, 527), rows sum to 1
    score[q,c] = sum_l p[q, l] * sqrt(t[c, l])                                      (Q, C)

``t[c]`` are the clip's tag probabilities (the mean over its elements). The square root (the power rule
with power 0.5) sits between the plain expectation ``p . t`` and the expected log-likelihood
``p . log(t + eps)``: a clip that weakly contains several asked-for sounds is not drowned by one that
strongly contains a single one, and no epsilon is needed. The score is linear in ``p`` after a fixed map
of the tags (``tag_features``), so it is one inner product per clip and its mean and spread over a
corpus are closed form (``atae.scoring``).

Rule, temperature and prompt were chosen on dev data only (``bench/bridge_study.py``, results in
``bench/results/bridge_study.md``): ESC-50 folds 1-3 class-name queries and half of the 43 captioned
AudioCaps clips; ESC-50 fold 4 and the other half were the test. There the power rule at T = 0.07 with
"the sound of {label}" beat the former dot product at T = 0.01 (test half 0.809 vs 0.725 mAP@10, fold 4
0.761 vs 0.753) and the expected log-likelihood rule (0.758 / 0.761).
"""

from __future__ import annotations

import csv
import functools
import importlib.resources
from collections.abc import Sequence

import numpy as np

from atae.errors import AtaeError
from atae.query import clean_query

N_LABELS = 527
DEFAULT_TEMPERATURE = 0.07
DEFAULT_TEMPLATE = "the sound of {label}"
BRIDGE_TEXT_LAYER = -1
TEMPERATURE_GRID = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2)
EXTRA_BRIDGE_TEMPERATURE = "bridge_temperature"  # key in AlignedModel.extras, written by atae.tuning


# --------------------------------------------------------------------------------------------- labels
@functools.lru_cache(maxsize=1)
def _labels() -> tuple[str, ...]:
    ref = importlib.resources.files("atae.resources") / "audioset_labels.csv"
    with ref.open("r", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != N_LABELS or [int(r["index"]) for r in rows] != list(range(N_LABELS)):
        raise AtaeError("packaged AudioSet label list is damaged", path=str(ref), fix="reinstall atae")
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


# --------------------------------------------------------------------------------------------- text
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
    the last layer's mean (all-MiniLM's own sentence embedding) matches label names far better. The
    sibling's single-query passes also fill the adapter tower's cache (``feed``), so a hybrid query costs
    one text pass. Towers without a ``layer``/``model_dir`` (other kinds, test fakes) are used as they are."""
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
    if hasattr(sibling, "feed"):
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


def check_clip_tags(clip_tags) -> np.ndarray:
    """A (C, 527) float32 tag matrix, or a clear error (None: the tower has no AudioSet head)."""
    if clip_tags is None:
        raise AtaeError("no AudioSet tags for these clips: the bridge needs a tower with an AudioSet head",
                        fix="use --audio-encoder efficientat-mn04 (or cnn14), or --scorer adapter")
    t = np.asarray(clip_tags, dtype=np.float32)
    if t.ndim != 2 or t.shape[1] != N_LABELS:
        raise AtaeError(f"clip tags must be (C, {N_LABELS}), got {t.shape}")
    return t


def tag_features(clip_tags) -> np.ndarray:
    """(C, 527) float32 ``sqrt(t)``: the vectors a query's label distribution is dotted with."""
    return np.sqrt(np.clip(check_clip_tags(clip_tags), 0.0, None))


def bridge_temperature(model, default: float = DEFAULT_TEMPERATURE) -> float:
    """The tuned temperature stored in a model's extras, or ``default`` (also when ``model`` is None)."""
    extras = getattr(model, "extras", None) or {}
    return float(extras.get(EXTRA_BRIDGE_TEMPERATURE, default))


# --------------------------------------------------------------------------------------------- bridge
_LABEL_CACHE: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}


def _tower_key(text_tower) -> str:
    info = getattr(text_tower, "info", None)
    return info.key() if info is not None else f"{type(text_tower).__name__}@{id(text_tower)}"


class TagBridge:
    """Zero-shot text-to-audio scorer over AudioSet tags (see the module docstring for the formula)."""

    def __init__(self, text_tower, *, temperature: float = DEFAULT_TEMPERATURE,
                 label_texts: Sequence[str] | None = None, text_layer: int | None = BRIDGE_TEXT_LAYER):
        if not temperature > 0:
            raise AtaeError(f"bridge temperature must be > 0, got {temperature}")
        texts = tuple(label_texts) if label_texts is not None else tuple(_prompts(DEFAULT_TEMPLATE))
        if len(texts) != N_LABELS:
            raise AtaeError(f"label_texts must hold {N_LABELS} texts in head order, got {len(texts)}")
        self.text_tower = bridge_text_tower(text_tower, text_layer)
        self.temperature = float(temperature)
        self.label_texts = texts

    @property
    def label_matrix(self) -> np.ndarray:
        """(527, F) unit-length label embeddings, computed once per (text tower, label texts)."""
        key = (_tower_key(self.text_tower), self.label_texts)
        m = _LABEL_CACHE.get(key)
        if m is None:
            m = sentence_embeddings(self.text_tower, self.label_texts)
            _LABEL_CACHE[key] = m
        return m

    def sentences(self, texts: Sequence[str]) -> np.ndarray:
        """(Q, F) unit sentence embeddings of the cleaned queries (what the labels are compared with)."""
        if isinstance(texts, str):
            texts = [texts]
        return sentence_embeddings(self.text_tower, [clean_query(t) for t in texts])

    def cosines(self, texts: Sequence[str]) -> np.ndarray:
        """(Q, 527) cosine of each query with each label prompt."""
        return self.sentences(texts) @ self.label_matrix.T

    def distribution(self, sentences: np.ndarray) -> np.ndarray:
        """(Q, 527) label distribution of sentence embeddings (``sentences``)."""
        return softmax_rows(np.asarray(sentences) @ self.label_matrix.T, self.temperature)

    def query_distribution(self, texts: Sequence[str]) -> np.ndarray:
        """(Q, 527) softmax(cosine / temperature): which AudioSet classes each query asks for."""
        return self.distribution(self.sentences(texts))

    @staticmethod
    def clip_tags(per_clip_tags: Sequence[np.ndarray | None]) -> np.ndarray:
        """(C, 527) clip tag matrix from each clip's per-element (T, 527) tags (their mean)."""
        return np.stack([pool_tags(t) for t in per_clip_tags]) if len(per_clip_tags) else \
            np.zeros((0, N_LABELS), np.float32)

    def scores(self, texts: Sequence[str], clip_tags) -> np.ndarray:
        """(Q, C) bridge scores of queries against a (C, 527) clip tag matrix."""
        return self.query_distribution(texts) @ tag_features(clip_tags).T


def _prompts(template: str) -> list[str]:  # TagBridge's ``label_texts`` argument shadows the function
    return label_texts(template)
