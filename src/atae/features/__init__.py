"""The feature store (``store``: memory-mapped shards, manifest) and extraction into it (``extract``)."""

from atae.features.extract import (
    ExtractReport,
    audio_ident,
    dataset_queries,
    ensure_dataset_features,
    extract_audio,
    extract_text,
    text_ident,
)
from atae.features.store import FORMAT_VERSION, FeatureStore, SequenceTable, caption_key

__all__ = [
    "FORMAT_VERSION",
    "ExtractReport",
    "FeatureStore",
    "SequenceTable",
    "audio_ident",
    "caption_key",
    "dataset_queries",
    "ensure_dataset_features",
    "extract_audio",
    "extract_text",
    "text_ident",
]
