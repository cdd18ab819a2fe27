"""Atomic file writes, shared by every module that persists something a user relies on.

A writer gets a temp file in the target's own folder (same filesystem, so the rename is atomic), the
data is fsynced, then ``os.replace`` puts it in place: a reader sees the old file or the new one, never
half of one, and a crash leaves at most a ``.NAME.tmp-*`` file that a later run may delete.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

TEMP_MARK = ".tmp-"  # every temp file is named ".<target name>.tmp-<random><suffix>"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path, suffix: str = "", *, fsync: bool = True):
    """Yield a temp file name next to ``path`` (for writers that want a name: torch.save, savefig,
    faiss.write_index, soundfile); it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result is as readable as any file
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", **kwargs):
    """``open()`` for writing, atomically: the file appears only when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def atomic_write_text(path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)
