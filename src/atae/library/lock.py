"""One writer per library: an exclusive ``fcntl.flock`` on ``LIB/lock``.

The kernel drops the lock when the holder dies (even by ``kill -9``), so a crash never leaves a stale
lock. A second indexer refuses with a clear message, or waits with ``wait=True``.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from atae.errors import LibraryError

LOCK_NAME = "lock"


class WriterLock:
    def __init__(self, root: Path):
        self.path = Path(root) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, *, wait: bool = False) -> bool:
        """Take the lock; with ``wait=False`` raise ``LibraryError`` if another process holds it."""
        if self._fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LibraryError(f"cannot write to the library ({exc.strerror or exc})", path=self.path.parent,
                               fix="index into a folder you can write to, or fix its permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LibraryError(
                f"the library is being updated by {holder}",
                path=self.path.parent,
                fix="wait for it to finish, or pass --wait to queue behind it",
            ) from None
        try:  # who holds it: informational only, so a full disk must not stop the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        except OSError:
            pass
        self._fd = fd
        return True

    def try_acquire(self) -> bool:
        """Take the lock if it is free and the library is writable; False otherwise (never raises)."""
        try:
            return self.acquire(wait=False)
        except (LibraryError, OSError):
            return False

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False
