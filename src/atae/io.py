"""Atomic file writes, shared by every module that persists something a user relies on.

A writer gets a temp file in the target's own folder (same filesystem, so the rename is atomic), the
data is fsynced, then ``os.replace`` puts it in place: a reader sees the old file or the new one, never
half of one, and a crash leaves at most a ``.NAME.tmp-*`` file that a later run may delete.

A write that fails for want of space raises ``DiskFullError`` naming the folder (``disk_full``), also
when the writer is a C++ library that reports it as a generic error: the old file is untouched and the
same command, run again after freeing space, finishes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from atae.errors import AtaeError, DiskFullError

TEMP_MARK = ".tmp-"  # every temp file is named ".<target name>.tmp-<random><suffix>"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NEARLY_FULL_BYTES = 1 << 20


def _no_space_left(folder) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return min(st.f_bavail, st.f_bfree) * st.f_frsize < _NEARLY_FULL_BYTES or st.f_favail == 0


def disk_full(exc: BaseException, folder) -> DiskFullError | None:
    """A ``DiskFullError`` for ``folder`` if ``exc`` means the disk is full: ENOSPC/EDQUOT anywhere in
    its chain, or any writer failure while the folder's filesystem has (almost) no space left (torch,
    FAISS and safetensors report a short write as a RuntimeError)."""
    if isinstance(exc, AtaeError):
        return exc if isinstance(exc, DiskFullError) else None
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return DiskFullError(folder)
        if "disk is full" in str(e) or "No space left" in str(e):
            return DiskFullError(folder)
        e = e.__cause__ or e.__context__
    if isinstance(exc, OSError) and exc.errno is not None:  # the OS said what went wrong, and not that
        return None
    if isinstance(exc, (OSError, RuntimeError, ValueError)) and _no_space_left(folder):
        return DiskFullError(folder)
    return None


@contextlib.contextmanager
def atomic_path(path, suffix: str = "", *, fsync: bool = True):
    """Yield a temp file name next to ``path`` (for writers that want a name: torch.save, savefig,
    faiss.write_index, soundfile); it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", suffix=suffix, dir=path.parent)
        os.close(fd)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result is as readable as any file
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        full = disk_full(exc, path.parent)  # before the partial file is removed and frees its space
        if full is not None and full is not exc:
            raise full from exc
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
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
