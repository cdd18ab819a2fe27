"""Dataset readers: Clotho-format caption CSVs, Clotho metadata, FSD50K noisy pairs, DCASE 2025 queries,
ESC-50 captions, the synthetic demo corpus and plain audio folders. Every reader returns plain
dataclasses and records (or raises, with the file named) every bad-input problem."""

from atae.data.clotho import (
    CaptionDataset,
    Clip,
    ClipMetadata,
    read_caption_csv,
    read_clotho_metadata,
    resolve_audio,
)
from atae.data.folders import audio_files, folder_dataset
from atae.data.fsd50k import read_fsd50k_noisy
from atae.data.queries import Query, read_queries_csv

__all__ = ["CaptionDataset", "Clip", "ClipMetadata", "Query", "audio_files", "folder_dataset",
           "read_caption_csv", "read_clotho_metadata", "read_fsd50k_noisy", "read_queries_csv",
           "resolve_audio"]
