"""Finding the audio files to index.

Policy:
* recursive walk; only files whose extension (case-insensitive) is in the allow-list
  (default ``atae.audio.AUDIO_EXTENSIONS``); hidden files and folders (``.name``) are skipped;
* symlinks are followed, to files and to folders, also outside the root (a sample library often links
  in packs kept elsewhere), but every folder is visited once (by device + inode), so link loops end;
  a file reachable by two paths is indexed once (the first path found, by its real file's identity);
  dangling links are skipped;
* paths are stored absolute but not resolved, so results show the path the user knows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from atae.errors import LibraryError


@dataclass
class Found:
    path: str  # absolute, unresolved
    size: int
    mtime_ns: int


def normalize_exts(exts) -> frozenset[str]:
    if exts is None:
        from atae.audio import AUDIO_EXTENSIONS

        return frozenset(AUDIO_EXTENSIONS)
    if isinstance(exts, str):
        exts = exts.split(",")
    return frozenset(e.strip().lower().lstrip(".") for e in exts if e.strip())


def scan(roots, exts=None) -> tuple[list[Found], list[str]]:
    """All audio files under ``roots`` (folders or files): (found, root strings as absolute paths)."""
    allow = normalize_exts(exts)
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    found: list[Found] = []
    abs_roots: list[str] = []
    for root in roots:
        root = os.path.abspath(os.path.expanduser(str(root)))
        if not os.path.exists(root):
            raise LibraryError("no such file or folder", path=root, fix="check the path to index")
        abs_roots.append(root)
        if os.path.isfile(root):
            _consider(root, allow, seen_files, found, explicit=True)
            continue
        stack = [root]
        while stack:
            d = stack.pop()
            try:
                st = os.stat(d)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen_dirs:
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError:
                continue
            subdirs = []
            for e in entries:
                if e.name.startswith("."):
                    continue
                try:
                    if e.is_dir(follow_symlinks=True):
                        subdirs.append(e.path)
                    elif e.is_file(follow_symlinks=True):
                        _consider(e.path, allow, seen_files, found)
                except OSError:
                    continue
            stack.extend(reversed(subdirs))
    return found, abs_roots


def _consider(path: str, allow, seen_files, found, explicit: bool = False) -> None:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in allow and not explicit:
        return
    try:
        st = os.stat(path)
    except OSError:  # dangling link, vanished
        return
    key = (st.st_dev, st.st_ino)
    if key in seen_files:
        return
    seen_files.add(key)
    found.append(Found(path, st.st_size, st.st_mtime_ns))


def under(path: str, root: str) -> bool:
    root = root.rstrip(os.sep)
    return path == root or path.startswith(root + os.sep)


__all__ = ["Found", "scan", "normalize_exts", "under", "Path"]
