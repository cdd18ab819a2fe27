"""Self-tagged pseudo-captions: noisy training text for any unlabeled audio folder.

Why: the seed pretrains on Freesound tag sentences (a clip's tags joined by a space). A folder of audio
with no metadata can yield the same kind of text from a tower with an AudioSet head: the clip's most
probable AudioSet labels joined by a space. The ET / EP-F / NP-F recipes use it as their noisy source
(``--noisy-audio DIR`` without ``--noisy-json``).

Rule (``self_tag_texts``): sort the 527 clip probabilities in descending order (ties: head order), keep
the labels with probability >= ``min_prob``, at most ``top_k`` of them, and always at least the single
most probable label; join their AudioSet display names (unchanged, commas included) with one space.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from atae.bridge import N_LABELS, audioset_labels, pool_tags, require_tag_head
from atae.errors import AtaeError, DataError

DEFAULT_TOP_K = 5
DEFAULT_MIN_PROB = 0.1


def self_tag_texts(tags: np.ndarray, labels: Sequence[str] | None = None, top_k: int = DEFAULT_TOP_K,
                   min_prob: float = DEFAULT_MIN_PROB) -> str:
    """One clip's pseudo-caption from its (527,) tag probabilities (rule in the module docstring)."""
    t = np.asarray(tags, dtype=np.float64).reshape(-1)
    names = list(labels) if labels is not None else audioset_labels()
    if t.shape[0] != len(names) or t.shape[0] == 0:
        raise AtaeError(f"tags have {t.shape[0]} values for {len(names)} labels")
    if top_k < 1:
        raise AtaeError(f"top_k must be >= 1, got {top_k}")
    order = np.argsort(-t, kind="stable")[:top_k]
    kept = [int(i) for i in order if t[i] >= min_prob] or [int(order[0])]
    return " ".join(names[i] for i in kept)


def self_tagged_clips(entries: Iterable[tuple[str, Path, np.ndarray | None]], *, top_k: int = DEFAULT_TOP_K,
                      min_prob: float = DEFAULT_MIN_PROB, pool: str = "mean") -> list:
    """``Clip``s from already computed tags (e.g. a feature store's): entries are (key, path, (T, 527))."""
    from atae.data import Clip

    labels = audioset_labels()
    return [Clip(key, Path(path), [self_tag_texts(pool_tags(tags, pool, path=path), labels, top_k, min_prob)])
            for key, path, tags in entries]


def self_tagged_dataset(audio_dir: str | Path, tower, *, top_k: int = DEFAULT_TOP_K,
                        min_prob: float = DEFAULT_MIN_PROB, pool: str = "mean", name: str | None = None,
                        progress: bool = True,
                        tags_for: Callable[[Path], np.ndarray | None] | None = None):
    """A ``CaptionDataset`` of noisy pairs (one self-tagged text per clip) from every audio file under
    ``audio_dir`` (recursive; keys are POSIX paths relative to it). Unreadable files are skipped and
    listed in ``problems`` (one message per file, naming it). ``tags_for(path)`` may supply cached
    (T, 527) tags instead of running the tower."""
    from atae.audio import load_audio
    from atae.data import CaptionDataset, audio_files

    root = Path(audio_dir)
    if not root.is_dir():
        raise DataError("noisy audio folder does not exist", path=root,
                        fix="pass an existing --noisy-audio DIR")
    require_tag_head(tower)
    files = audio_files(root)
    if not files:
        raise DataError("no audio files found", path=root,
                        fix="put .wav/.flac/.ogg files in the folder or pass another --noisy-audio DIR")
    try:
        from tqdm import tqdm

        it = tqdm(files, desc="self-tagging", unit="clip", disable=not progress)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        it = files
    entries, problems = [], []
    for path in it:
        try:
            tags = tags_for(path) if tags_for is not None else None
            if tags is None:
                tags = tower.encode(tower.pad_to_min(load_audio(path, tower.sample_rate))).tags
            if tags is None or np.asarray(tags).shape[-1] != N_LABELS:
                raise AtaeError("the tower returned no AudioSet tags", path=path)
        except AtaeError as e:
            problems.append(str(e) if str(path) in str(e) else f"{path}: {e}")
            continue
        entries.append((path.relative_to(root).as_posix(), path, tags))
    clips = self_tagged_clips(entries, top_k=top_k, min_prob=min_prob, pool=pool)
    return CaptionDataset(name=name or f"selftag:{root.name}", clips=clips, audio_dir=root, problems=problems)
