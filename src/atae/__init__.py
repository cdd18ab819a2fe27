"""atae: Aligned Text and Audio Embeddings for language-based audio retrieval."""

__version__ = "0.1.0"
