"""The frozen-encoder interface every tower implements.

A tower turns one input into the seed's Z: a *sequence* of T embeddings of F features (T x F).
Audio towers also say where in the file each element comes from (so a search can report a time span)
and, when they have an AudioSet head, the 527 tag probabilities per element (zero-shot search and
self-tagging use them). Towers never know about training, adapters or the feature store.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field

import numpy as np

from atae.errors import AudioError


@dataclass
class AudioEncoding:
    """One clip through an audio tower."""

    seq: np.ndarray  # (T, F) float32, the seed's Z_a
    times: np.ndarray  # (T, 2) float64 [start, end) seconds of each element in the source clip
    tags: np.ndarray | None = None  # (T, 527) float32 AudioSet probabilities, head towers only

    def __post_init__(self) -> None:
        if self.seq.ndim != 2 or self.times.shape != (self.seq.shape[0], 2):
            raise ValueError(f"bad AudioEncoding shapes seq={self.seq.shape} times={self.times.shape}")


@dataclass
class TowerInfo:
    """What identifies a tower's output: the feature-store manifest and a model's config store it."""

    name: str  # registry name, e.g. "aisfx", "cnn14", "efficientat-mn04", "minilm"
    kind: str  # "audio" | "text"
    dim: int  # F
    weights_sha256: str | None  # of the weights file actually loaded (None: random/test weights)
    sample_rate: int | None = None  # audio towers
    options: dict = field(default_factory=dict)  # everything else that changes the output (layer, window)

    def key(self) -> str:
        """Short stable id for cache folder names: same key <=> same numbers."""
        import hashlib
        import json

        blob = json.dumps(
            [self.name, self.kind, self.dim, self.weights_sha256, self.sample_rate, self.options],
            sort_keys=True,
        )
        return f"{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "dim": self.dim,
            "weights_sha256": self.weights_sha256,
            "sample_rate": self.sample_rate,
            "options": dict(self.options),
        }

    @classmethod
    def from_dict(cls, d: dict) -> TowerInfo:
        return cls(**d)


class AudioTower(abc.ABC):
    """Frozen audio encoder. Input: mono float32 at ``self.sample_rate``."""

    name: str
    sample_rate: int
    dim: int
    min_samples: int = 1  # shorter input is zero-padded to this (documented policy)
    has_tags: bool = False
    window_s: float | None = None  # sequence policy, see ``window_spans`` (None: whole clip)
    hop_s: float | None = None

    @property
    @abc.abstractmethod
    def info(self) -> TowerInfo: ...

    @abc.abstractmethod
    def encode(self, wave: np.ndarray) -> AudioEncoding:
        """Encode one clip (already at ``sample_rate``, mono)."""

    def encode_many(self, waves: list[np.ndarray]) -> list[AudioEncoding]:
        """Batch entry point; towers override it when equal-length batching is faster."""
        return [self.encode(w) for w in waves]

    def pad_to_min(self, wave: np.ndarray) -> np.ndarray:
        """Short-clip policy shared by all towers: zero-pad at the end up to ``min_samples``."""
        wave = np.asarray(wave, dtype=np.float32)
        if wave.shape[0] < self.min_samples:
            wave = np.pad(wave, (0, self.min_samples - wave.shape[0]))
        return wave

    def segments(self, wave: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Check one clip and cut it by ``window_spans``: (padded segments, their (T, 2) times in s).

        Checked here so a stereo or NaN clip fails with a fix instead of deep inside the network."""
        w = np.asarray(wave)
        if w.ndim != 1:
            raise AudioError(f"{self.name} expects mono audio as a 1-D array, got shape {w.shape}",
                             fix=f"downmix to mono and resample to {self.sample_rate} Hz "
                                 "(atae.audio.load_audio does both)")
        w = w.astype(np.float32, copy=False)
        if not np.all(np.isfinite(w)):
            raise AudioError("audio contains NaN or infinite samples", fix="check the decoder/input file")
        spans = window_spans(len(w), self.sample_rate, self.window_s, self.hop_s)
        times = np.asarray(spans, dtype=np.float64) / self.sample_rate
        return [self.pad_to_min(w[a:b]) for a, b in spans], times


class TextTower(abc.ABC):
    """Frozen text encoder: each text becomes a (T_i, F) token sequence (padding removed)."""

    name: str
    dim: int

    @property
    @abc.abstractmethod
    def info(self) -> TowerInfo: ...

    @abc.abstractmethod
    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Encode texts; element i is (T_i, F) float32 with only the real (unmasked) tokens."""


def window_spans(n_samples: int, sr: int, window_s: float | None, hop_s: float | None,
                 chunk_s: float = 30.0) -> list[tuple[int, int]]:
    """Sequence policy for long input, shared by all audio towers.

    * ``window_s is None`` (the seed's whole-clip mode): one element for the whole clip, except that a
      clip longer than ``chunk_s`` is cut into consecutive ``chunk_s`` chunks (the last one keeps its
      remainder if it is at least a third of a chunk, otherwise it joins the previous chunk) so memory
      stays bounded and a 20-minute file still yields a sequence whose masked mean is the clip.
    * ``window_s`` set: fixed windows of ``window_s`` every ``hop_s`` (default = window), so a search
      can tell where in a long file the match is; the last window is aligned to the end of the clip.
    """
    if n_samples <= 0:
        return [(0, 0)]
    if window_s is None:
        chunk = int(round(chunk_s * sr))
        if n_samples <= chunk:
            return [(0, n_samples)]
        starts = list(range(0, n_samples, chunk))
        spans = [(s, min(s + chunk, n_samples)) for s in starts]
        if len(spans) > 1 and spans[-1][1] - spans[-1][0] < chunk / 3:
            last = spans.pop()
            spans[-1] = (spans[-1][0], last[1])
        return spans
    win = int(round(window_s * sr))
    hop = int(round((hop_s or window_s) * sr))
    if n_samples <= win:
        return [(0, n_samples)]
    n = 1 + math.ceil((n_samples - win) / hop)
    spans = []
    for i in range(n):
        s = min(i * hop, n_samples - win)
        spans.append((s, s + win))
    # drop a duplicate final window produced by end alignment
    out = [spans[0]]
    for sp in spans[1:]:
        if sp != out[-1]:
            out.append(sp)
    return out


def encode_by_length(prepared: list[tuple[list[np.ndarray], np.ndarray]], run_batch, dim: int, n_tags: int,
                     max_batch_samples: int) -> list[AudioEncoding]:
    """Run every clip's segments through ``run_batch``, batching only segments of equal length.

    ``prepared`` holds, per clip, its (already padded) segments and their (T, 2) times;
    ``run_batch((B, N) array) -> (embeddings (B, dim), tags (B, n_tags))``. Equal length only:
    zero-padding to a common length would change the network's pooling over time, i.e. the numbers.
    """
    by_len: dict[int, list[tuple[int, int]]] = {}
    for i, (segs, _) in enumerate(prepared):
        for j, s in enumerate(segs):
            by_len.setdefault(len(s), []).append((i, j))
    emb = [np.zeros((len(s), dim), np.float32) for s, _ in prepared]
    tags = [np.zeros((len(s), n_tags), np.float32) for s, _ in prepared]
    for n, members in by_len.items():
        step = max(1, max_batch_samples // max(n, 1))
        for s in range(0, len(members), step):
            chunk = members[s:s + step]
            e, t = run_batch(np.stack([prepared[i][0][j] for i, j in chunk]))
            for row, (i, j) in enumerate(chunk):
                emb[i][j], tags[i][j] = e[row], t[row]
    return [AudioEncoding(emb[i], prepared[i][1], tags[i]) for i in range(len(prepared))]
