"""The three text scorers, as dense (queries x clips) matrices: what evaluation computes and what the
library's fast search must reproduce.

* ``adapter``: cosine of the trained adapters' text and audio embeddings (``AlignedModel.encode_*``).
* ``bridge``: the zero-shot AudioSet tag bridge (``atae.bridge.TagBridge``), no training needed.
* ``hybrid``: per query, each side is standardised over the clips of the corpus (z-score) and the two are
  mixed, ``w * z(adapter) + (1 - w) * z(bridge)``, with the query's weight from the model (``Fusion``:
  the tuned weight, or 0 for a query unlike the training captions). The corpus statistics are passed
  in when the columns are only some of the clips (the library rescoring its candidates); by default
  they are those of the given columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from atae.errors import AtaeError, ModelError

SCORERS = ("adapter", "bridge", "hybrid")
EXTRA_HYBRID_WEIGHT = "hybrid_weight"  # keys in AlignedModel.extras, written by atae.tuning
EXTRA_HYBRID_GATE = "hybrid_gate"
# the gate opens over this much closeness below its threshold (linearly): on the fusion study's DEV
# protocols 0.005 is as good as a hard step, and it absorbs the float16 rounding of a stored reference
GATE_WIDTH = 0.005
DEFAULT_HYBRID_WEIGHT = 0.5
CLOSENESS_ERROR = 1e-3  # the bound on float16 closeness (``closeness``): a fifth of GATE_WIDTH


def adapter_scores(model, audio_seqs: Sequence[np.ndarray], text_seqs: Sequence[np.ndarray] | None = None,
                   *, text_vectors: np.ndarray | None = None, chunk: int = 4096) -> np.ndarray:
    """(Q, C) float32 cosine of every text with every clip, from tower sequences (text chunked), or from
    the texts' unit adapter vectors (``text_vectors``) when the caller needs them too (the hybrid's gate)."""
    a = model.encode_audio(audio_seqs)
    if text_vectors is not None:
        return np.asarray(text_vectors, np.float32) @ a.T
    out = np.empty((len(text_seqs), len(audio_seqs)), dtype=np.float32)
    for s in range(0, len(text_seqs), chunk):
        out[s:s + chunk] = model.encode_text(text_seqs[s:s + chunk]) @ a.T
    return out


def zscore_stats(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (mean (Q,), population std (Q,)) of a (Q, C) score matrix."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be (Q, C), got {s.shape}")
    return s.mean(axis=1), s.std(axis=1)


def zscore(scores: np.ndarray, stats: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """(s - mean) / std per row, with ``stats`` = (mean, std) over the corpus (default: over ``scores``).

    A constant row (std 0, e.g. a tagless corpus or a single candidate) becomes all zeros, so it adds
    nothing to a hybrid instead of dividing by zero."""
    s = np.asarray(scores, dtype=np.float64)
    mu, sd = zscore_stats(s) if stats is None else (np.asarray(stats[0], np.float64),
                                                     np.asarray(stats[1], np.float64))
    mu, sd = mu.reshape(-1, 1), sd.reshape(-1, 1)
    ok = sd > 1e-12
    return np.where(ok, (s - mu) / np.where(ok, sd, 1.0), 0.0)


def hybrid_scores(adapter: np.ndarray, bridge: np.ndarray, weight, *,
                  adapter_stats=None, bridge_stats=None) -> np.ndarray:
    """(Q, C) = w * zscore(adapter) + (1 - w) * zscore(bridge); ``weight`` a number or one per query."""
    a, b = np.asarray(adapter), np.asarray(bridge)
    if a.shape != b.shape:
        raise ValueError(f"adapter scores {a.shape} and bridge scores {b.shape} differ in shape")
    w = np.asarray(weight, dtype=np.float64).reshape(-1, 1)
    if w.size not in (1, a.shape[0]) or not np.all((w >= 0.0) & (w <= 1.0)):
        raise AtaeError(f"hybrid weight must lie in [0, 1] (one, or one per query), got {weight}")
    return (w * zscore(a, adapter_stats) + (1.0 - w) * zscore(b, bridge_stats)).astype(np.float32)


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


def closeness(vectors: np.ndarray, reference: np.ndarray, top: int = 5, chunk: int = 1024) -> np.ndarray:
    """(Q,) how close each unit vector is to a reference set: the mean of its ``top`` largest cosines.

    In float16, the reference's saved precision: a query reads half the bytes of float32 (float32 sums).
    A cosine is then off by at most 4.9e-4 (the query rounded to float16, by Cauchy-Schwarz) plus 2.4e-4
    (the cosine rounded to float16), and so is the closeness: under ``CLOSENESS_ERROR``."""
    ref = torch.from_numpy(np.ascontiguousarray(reference, np.float16))  # no copy when already float16
    v = torch.from_numpy(np.ascontiguousarray(vectors, np.float32)).half()
    n = min(top, len(ref))
    out = np.zeros(len(v))
    for a in range(0, len(v), chunk):
        c = (v[a:a + chunk] @ ref.T).float()
        out[a:a + chunk] = c.topk(n, dim=1).values.mean(dim=1).numpy()
    return out


class Fusion:
    """How a model mixes its adapter with the bridge, per query.

    ``weight``: the adapter's weight, tuned on validation data after training (``EXTRA_HYBRID_WEIGHT``).
    A *novelty gate* keeps it for queries like those the adapters learned from and drops it to 0 (the
    bridge alone) for the others: a query's closeness is the mean of its 5 highest cosines with the
    training captions in the text adapter's output space (``AlignedModel.caption_reference``), and a query
    less close than every validation query was (``threshold``, ``EXTRA_HYBRID_GATE``) is out of domain
    (over the last ``GATE_WIDTH`` below the threshold the weight falls linearly).
    Why: a weight tuned on in-domain validation trusts the adapter, which fails on unlike queries; chosen
    on dev data over shrinkage, log-space fusion, rank fusion and soft ramps (``bench/fusion_study.py``).
    A model without a reference or threshold (older, or trained elsewhere) uses the weight for every query.
    """

    def __init__(self, weight: float = DEFAULT_HYBRID_WEIGHT, threshold: float | None = None,
                 reference: np.ndarray | None = None):
        if not 0.0 <= float(weight) <= 1.0:
            raise AtaeError(f"hybrid weight must lie in [0, 1], got {weight}")
        self.weight = float(weight)
        self.threshold = None if threshold is None else float(threshold)
        self.reference = reference

    @classmethod
    def of(cls, model) -> Fusion:
        extras = getattr(model, "extras", None) or {}
        return cls(float(extras.get(EXTRA_HYBRID_WEIGHT, DEFAULT_HYBRID_WEIGHT)),
                   extras.get(EXTRA_HYBRID_GATE), getattr(model, "caption_reference", None))

    @property
    def gated(self) -> bool:
        return self.threshold is not None and self.reference is not None and len(self.reference) > 0

    def weights(self, text_vectors: np.ndarray) -> np.ndarray:
        """(Q,) adapter weight of each query from its unit text-adapter embedding (Q, D)."""
        if not self.gated or self.weight == 0.0:
            return np.full(len(text_vectors), self.weight)
        s = closeness(text_vectors, self.reference)
        return self.weight * np.clip((s - (self.threshold - GATE_WIDTH)) / GATE_WIDTH, 0.0, 1.0)
