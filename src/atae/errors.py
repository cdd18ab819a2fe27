"""One exception family so every entry point can print a clean message instead of a traceback."""

from __future__ import annotations

from pathlib import Path


class AtaeError(Exception):
    """A user-facing error: says what went wrong, with which file, and how to fix it."""

    def __init__(self, message: str, *, path: str | Path | None = None, fix: str | None = None):
        self.path = str(path) if path is not None else None
        self.message = message
        self.fix = fix
        parts = []
        if self.path:
            parts.append(f"{self.path}: ")
        parts.append(message)
        if fix:
            parts.append(f" (fix: {fix})")
        super().__init__("".join(parts))


class AudioError(AtaeError):
    """An audio file could not be read or is unusable (corrupt, empty, not audio)."""


class DataError(AtaeError):
    """A dataset file (CSV, JSON) is malformed: missing columns, bad encoding, missing audio."""


class WeightsError(AtaeError):
    """Pretrained weights are missing, corrupt, or belong to another model."""


class ModelError(AtaeError):
    """A trained model directory is missing, corrupt, or incompatible with the request."""


class LibraryError(AtaeError):
    """A sound library (SQLite + vector index) cannot be opened, is locked, or is inconsistent."""


class QueryError(AtaeError):
    """A search query is empty, too long, or otherwise unusable."""


DISK_FULL_FIX = "free space and run the same command again"


class DiskFullError(AtaeError):
    """No space left where a result was being written. Every write is atomic or transactional, so what
    was finished is intact and the same command resumes."""

    def __init__(self, path: str | Path | None):
        super().__init__("disk full", path=path, fix=DISK_FULL_FIX)
        where = f" at {self.path}" if self.path else ""
        Exception.__init__(self, f"disk full{where}: {DISK_FULL_FIX}")
