"""Shared test fixtures: where ../shared is, and small generated audio."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]


def shared_root() -> Path | None:
    env = os.environ.get("ATAE_SHARED")
    cand = Path(env) if env else REPO.parent / "shared"
    return cand if cand.is_dir() else None


@pytest.fixture(scope="session")
def shared() -> Path:
    root = shared_root()
    if root is None:
        pytest.skip("../shared (or $ATAE_SHARED) is absent: real-data and golden tests need it")
    return root


@pytest.fixture
def write_wav(tmp_path):
    """write_wav(name, seconds=1.0, sr=16000, channels=1, kind='noise'|'sine'|'silence') -> Path"""

    def _write(name: str, seconds: float = 1.0, sr: int = 16000, channels: int = 1,
               kind: str = "noise", seed: int = 0, subtype: str | None = None) -> Path:
        n = int(round(seconds * sr))
        rng = np.random.default_rng(seed)
        if kind == "noise":
            x = 0.1 * rng.standard_normal((n, channels))
        elif kind == "sine":
            t = np.arange(n) / sr
            x = np.repeat((0.3 * np.sin(2 * np.pi * 440 * t))[:, None], channels, axis=1)
        elif kind == "silence":
            x = np.zeros((n, channels))
        else:
            raise ValueError(kind)
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        sf.write(p, x.astype(np.float32), sr, subtype=subtype)
        return p

    return _write
