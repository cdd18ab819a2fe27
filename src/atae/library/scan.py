"""Finding the audio files to index.

Policy:
* recursive walk; only files whose extension (case-insensitive) is in the allow-list
  (default ``atae.audio.AUDIO_EXTENSIONS``); hidden files and folders (``.name``) are skipped;
* symlinks are followed, to files and to folders, also outside the root (a sample library often links
  in packs kept elsewhere), but every folder is visited once (by device + inode), so link loops end;
  a file reachable by two paths is indexed once (the first path found, by its real file's identity);
* paths are stored absolute but not resolved, so results show the path the user knows;
* nothing is skipped without a word: a folder that cannot be read, a name that is not valid UTF-8 (it
  cannot be stored or shown faithfully), a broken link or a pipe/device with an audio extension is
  listed in ``ScanResult.problems`` with the fix. Folders whose content could not be listed are in
  ``ScanResult.blind``: the files indexed under them before are kept, not removed as deleted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from atae.errors import LibraryError

_FIX_PERMS = "fix its permissions (the files indexed from it before are kept)"


@dataclass
class Found:
    path: str  # absolute, unresolved
    size: int
    mtime_ns: int


@dataclass
class ScanResult:
    found: list[Found] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)  # the roots as absolute paths
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason with its fix)
    blind: list[str] = field(default_factory=list)  # folders whose content is unknown this run


def normalize_exts(exts) -> frozenset[str]:
    if exts is None:
        from atae.audio import AUDIO_EXTENSIONS

        return frozenset(AUDIO_EXTENSIONS)
    if isinstance(exts, str):
        exts = exts.split(",")
    return frozenset(e.strip().lower().lstrip(".") for e in exts if e.strip())


def storable(path: str) -> bool:
    """A path that SQLite, JSON and the terminal can carry: valid UTF-8 (no surrogate escapes)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower().lstrip(".")


def scan(roots, exts=None) -> ScanResult:
    """All audio files under ``roots`` (folders or files), and what could not be looked at."""
    allow = normalize_exts(exts)
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    res = ScanResult()
    for root in roots:
        root = os.path.abspath(os.path.expanduser(os.fsdecode(root)))
        if not storable(root):
            raise LibraryError("the path is not valid UTF-8", path=root,
                               fix="rename it (e.g. with `convmv -f latin1 -t utf8`)")
        if not os.path.exists(root):
            raise LibraryError("no such file or folder", path=root, fix="check the path to index")
        res.roots.append(root)
        if os.path.isfile(root):
            _consider(root, seen_files, res)
            continue
        if not os.path.isdir(root):
            raise LibraryError("not a regular file or folder (a device or a pipe)", path=root,
                               fix="give folders or audio files to index")
        stack = [root]
        while stack:
            d = stack.pop()
            try:
                st = os.stat(d)
                if (st.st_dev, st.st_ino) in seen_dirs:
                    continue
                seen_dirs.add((st.st_dev, st.st_ino))
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError as exc:
                res.problems.append((d, f"cannot read this folder ({exc.strerror or exc}): its files are "
                                        f"not indexed; {_FIX_PERMS}"))
                res.blind.append(d)
                continue
            subdirs = []
            for e in entries:
                if e.name.startswith("."):
                    continue
                try:
                    is_dir = e.is_dir(follow_symlinks=True)
                    is_file = not is_dir and e.is_file(follow_symlinks=True)
                except OSError as exc:
                    res.problems.append((e.path, f"cannot be checked ({exc.strerror or exc}); {_FIX_PERMS}"))
                    res.blind.append(e.path)
                    continue
                if not is_dir and _ext(e.path) not in allow:
                    continue
                if not storable(e.path):
                    res.problems.append((e.path, "the name is not valid UTF-8, so it cannot be indexed; "
                                                 "rename it (e.g. with `convmv -f latin1 -t utf8`)"))
                    continue
                if is_dir:
                    subdirs.append(e.path)
                elif is_file:
                    _consider(e.path, seen_files, res)
                elif e.is_symlink() and not os.path.exists(e.path):
                    res.problems.append((e.path, "broken link (its target is missing); fix or remove it"))
                else:
                    res.problems.append((e.path, "not a regular file (a pipe or a device); remove it"))
            stack.extend(reversed(subdirs))
    return res


def _consider(path: str, seen_files, res: ScanResult) -> None:
    """Record a file (the caller has checked its extension, or the user named it)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # vanished since it was listed
        return
    except OSError as exc:  # listed but not reachable: a folder that can be read but not entered
        res.problems.append((path, f"cannot be checked ({exc.strerror or exc}); {_FIX_PERMS}"))
        res.blind.append(path)
        return
    key = (st.st_dev, st.st_ino)
    if key in seen_files:
        return
    seen_files.add(key)
    res.found.append(Found(path, st.st_size, st.st_mtime_ns))


def under(path: str, root: str) -> bool:
    root = root.rstrip(os.sep)
    return path == root or path.startswith(root + os.sep)


__all__ = ["Found", "ScanResult", "scan", "normalize_exts", "storable", "under", "Path"]
