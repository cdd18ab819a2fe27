"""Small in-memory stand-ins for the feature store and datasets (tests of training and evaluation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from atae.towers.base import TowerInfo


@dataclass
class FakeClip:
    key: str
    path: Path | None
    captions: list[str]


@dataclass
class FakeDataset:
    name: str
    clips: list[FakeClip]
    audio_dir: Path | None = None
    problems: list[str] = field(default_factory=list)


class FakeTable:
    """SequenceTable protocol: keys, in, get, batch, info."""

    def __init__(self, info: TowerInfo, rows: dict[str, np.ndarray]):
        self.info, self._rows = info, rows

    @property
    def keys(self) -> list[str]:
        return list(self._rows)

    def __contains__(self, key) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: str) -> np.ndarray:
        return self._rows[key]

    def tags(self, key):
        return None

    def times(self, key):
        return None

    def batch(self, keys):
        arrs = [self._rows[k] for k in keys]
        tmax = max(a.shape[0] for a in arrs)
        z = np.zeros((len(arrs), tmax, self.info.dim), np.float32)
        m = np.zeros((len(arrs), tmax), bool)
        for i, a in enumerate(arrs):
            z[i, :len(a)] = a
            m[i, :len(a)] = True
        return torch.from_numpy(z), torch.from_numpy(m)


AUDIO_INFO = TowerInfo("fake-audio", "audio", 10, None, 16000, {})
TEXT_INFO = TowerInfo("fake-text", "text", 6, None, None, {})


def make_world(seed: int = 0, n_concepts: int = 8, splits=(("train", 32), ("val", 16), ("test", 16)),
               n_captions: int = 3, noise: float = 0.6):
    """Clips of ``n_concepts`` hidden concepts: audio rows and caption tokens are noisy projections of
    the concept vector, so adapters can learn the alignment. Returns (datasets by split, audio table,
    text table, concept of each clip key)."""
    rng = np.random.default_rng(seed)
    concepts = rng.standard_normal((n_concepts, 4))
    pa = rng.standard_normal((4, AUDIO_INFO.dim))
    pt = rng.standard_normal((4, TEXT_INFO.dim))
    arows, trows, concept_of, out = {}, {}, {}, {}
    for split, n in splits:
        clips = []
        for j in range(n):
            key = f"{split}_{j:03d}.wav"
            c = int(rng.integers(n_concepts))
            concept_of[key] = c
            t = int(rng.integers(1, 4))
            arows[key] = (concepts[c] @ pa
                          + noise * rng.standard_normal((t, AUDIO_INFO.dim))).astype(np.float32)
            caps = []
            for i in range(n_captions):
                tt = int(rng.integers(2, 6))
                trows[f"{key}#{i}"] = (concepts[c] @ pt + noise * rng.standard_normal((tt, TEXT_INFO.dim))
                                       ).astype(np.float32)
                caps.append(f"concept {c} caption {i} of {key}")
            clips.append(FakeClip(key, None, caps))
        out[split] = FakeDataset(split, clips)
    return out, FakeTable(AUDIO_INFO, arows), FakeTable(TEXT_INFO, trows), concept_of
