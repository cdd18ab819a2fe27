"""A folder of audio files as a caption-less dataset (query-by-folder evaluation, self-tagged pairs)."""

from __future__ import annotations

from pathlib import Path

from atae.data.clotho import CaptionDataset, Clip
from atae.errors import DataError


def audio_files(audio_dir: str | Path) -> list[Path]:
    """Every audio file under ``audio_dir`` (recursive), sorted so keys and candidate order are stable."""
    from atae.audio import AUDIO_EXTENSIONS

    return sorted(p for p in Path(audio_dir).rglob("*")
                  if p.is_file() and p.suffix.lower().lstrip(".") in AUDIO_EXTENSIONS)


def folder_dataset(audio_dir: str | Path) -> CaptionDataset:
    """A caption-less dataset of every audio file under ``audio_dir`` (keys: relative POSIX paths)."""
    audio_dir = Path(audio_dir)
    if not audio_dir.is_dir():
        raise DataError("audio folder not found", path=audio_dir, fix="check --audio-dir")
    files = audio_files(audio_dir)
    if not files:
        raise DataError("no audio files found", path=audio_dir, fix="check --audio-dir")
    return CaptionDataset(audio_dir.name, [Clip(p.relative_to(audio_dir).as_posix(), p, []) for p in files],
                          audio_dir, [])
