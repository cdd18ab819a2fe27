"""The ../shared dev data the benchmarks read, and tower outputs cached outside the repo.

* ``shared_root()``: ``$ATAE_SHARED`` or ``../shared`` beside the checkout; None when absent (callers
  skip or fall back to synthetic data, saying so).
* ``esc50(shared)``: ESC-50 folds 1-4 (files, class names, folds); ``audiocaps(shared)``: the 43 captioned
  AudioCaps clips and their 5 captions each.
* ``whole_clip_tags(files, shared, cache)``: EfficientAT mn04 AudioSet tags of each file (whole-clip
  mode, mean over elements), computed once and cached under ``cache`` (a temp folder by default).
"""

from __future__ import annotations

import csv
import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MN04_WEIGHTS = "data/weights/efficientat_mn04/mn04_as_mAP_432.pt"


def shared_root() -> Path | None:
    env = os.environ.get("ATAE_SHARED")
    cand = Path(env) if env else REPO.parent / "shared"
    return cand if cand.is_dir() else None


def default_cache() -> Path:
    path = Path(tempfile.gettempdir()) / "atae-bench-cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def esc50(shared: Path) -> tuple[list[Path], list[str], list[int]]:
    """(files, categories as in the metadata, folds) of ESC-50 folds 1-4 (16 kHz Ogg)."""
    files, cats, folds = [], [], []
    with open(shared / "data/esc50/meta/esc50.csv", newline="") as f:
        for row in csv.DictReader(f):
            p = shared / "data/esc50/audio_16k" / (Path(row["filename"]).stem + ".ogg")
            if p.exists():
                files.append(p)
                cats.append(row["category"])
                folds.append(int(row["fold"]))
    return files, cats, folds


def humanise(category: str) -> str:
    """An ESC-50 category as a query: "chirping_birds" -> "chirping birds"."""
    return category.replace("_", " ")


def fold_problem(cats: list[str], folds: list[int], fold: int):
    """One fold's class-query problem: (file indices, sorted classes, relevant positions per class)."""
    idx = [i for i, f in enumerate(folds) if f == fold]
    classes = sorted({cats[i] for i in idx})
    rel = [[j for j, i in enumerate(idx) if cats[i] == c] for c in classes]
    return idx, classes, rel


def make_text_tower(layer: int = -1):
    from atae.towers.registry import get_text_tower

    return get_text_tower("minilm", layer=layer)


def audiocaps(shared: Path) -> tuple[list[Path], list[list[str]]]:
    """(files, 5 captions per file) of the 43 captioned AudioCaps validation clips."""
    root = shared / "data/audiocaps/captioned_val"
    files, caps = [], []
    with open(root / "captions.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            files.append(root / "audio" / row["file_name"])
            caps.append([row[f"caption_{i}"] for i in range(1, 6)])
    return files, caps


def whole_clip_tags(files: list[Path], shared: Path, cache: Path | None = None) -> np.ndarray:
    """(len(files), 527) float32 mn04 tags (whole clip, element mean), cached by the file list."""
    cache = cache or default_cache()
    key = hashlib.sha1("\n".join(str(p.relative_to(shared)) for p in files).encode()).hexdigest()[:16]
    path = cache / f"mn04-tags-{key}.npy"
    if path.exists():
        return np.load(path)
    from atae.audio import load_audio
    from atae.towers.registry import get_audio_tower

    weights = next((shared / "data/weights/efficientat_mn04").glob("*.pt"), shared / MN04_WEIGHTS)
    tower = get_audio_tower("efficientat-mn04", weights=weights)
    out, t0 = [], time.perf_counter()
    for i, f in enumerate(files):
        out.append(tower.encode(load_audio(f, tower.sample_rate)).tags.mean(axis=0))
        if i % 200 == 199:
            print(f"  mn04 tags: {i + 1}/{len(files)} clips, {time.perf_counter() - t0:.0f} s", flush=True)
    tags = np.stack(out).astype(np.float32)
    np.save(path, tags)
    return tags
