"""Clotho-format caption datasets: one CSV (``file_name,caption_1..caption_N``) plus an audio root.

Policies (each bad input becomes a readable entry in ``CaptionDataset.problems`` or a ``DataError``):

* Encoding: UTF-8 (a BOM is tolerated). A file that is not valid UTF-8 is re-read as ISO-8859-1 (which
  decodes any byte) and a warning is recorded; a file holding NUL bytes is not a text CSV -> DataError.
* Columns: names are stripped and matched case-insensitively; ``file_name`` and at least one
  ``caption_N`` are required (any number, in N order). Otherwise DataError naming found/expected columns.
* Audio: ``audio_dir / file_name``; if absent, the Clotho quirks are tried: ``:`` written as ``_`` on
  disk, then HTML entities unescaped (``&#39;`` -> ``'``). A row whose audio is missing is skipped and
  recorded; if no listed file exists at all -> DataError (the audio folder is probably wrong).
* An empty caption is skipped and recorded; a repeated file row is skipped (the first one is kept).
"""

from __future__ import annotations

import csv
import html
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from atae.errors import DataError
from atae.io import atomic_open

_CAPTION_COL = re.compile(r"^caption_(\d+)$")


@dataclass
class Clip:
    key: str  # the file name exactly as written in the CSV
    path: Path | None  # the audio file on disk, None when unknown (text-only use)
    captions: list[str]


@dataclass
class CaptionDataset:
    name: str
    clips: list[Clip]
    audio_dir: Path | None = None
    problems: list[str] = field(default_factory=list)

    def captions(self) -> list[tuple[str, str]]:
        """(caption, clip key) pairs in CSV order."""
        return [(c, clip.key) for clip in self.clips for c in clip.captions]

    def keys(self) -> list[str]:
        return [c.key for c in self.clips]

    def clip(self, key: str) -> Clip:
        for c in self.clips:
            if c.key == key:
                return c
        raise KeyError(key)

    def __len__(self) -> int:
        return len(self.clips)


def read_text(path: Path, *, fallback_problem: list[str] | None = None) -> str:
    """Decode a text file: UTF-8 (BOM allowed), else ISO-8859-1 with a note in ``fallback_problem``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", path=path, fix="check the path") from None
    except IsADirectoryError:
        raise DataError("is a folder, expected a CSV file", path=path) from None
    if b"\x00" in raw:
        raise DataError("not a text CSV (binary content)", path=path, fix="pass the captions CSV file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if fallback_problem is not None:
            fallback_problem.append(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                                    "read as ISO-8859-1 - check accented characters")
        return raw.decode("iso-8859-1")


def csv_rows(text: str) -> list[list[str]]:
    """Parse CSV text (quoted fields may hold commas and newlines); blank lines are dropped."""
    # StringIO(newline="") splits on \n, \r, \r\n only (str.splitlines would also split on U+0085, \x0c...)
    return [r for r in csv.reader(io.StringIO(text, newline="")) if any(f.strip() for f in r)]


def header_columns(path: Path, header: list[str], required: list[str], pattern: re.Pattern | None = None,
                   expected: str = "") -> tuple[dict[str, int], list[tuple[int, int]]]:
    """Column name -> index (names stripped, lower-cased) and sorted (N, index) of ``pattern`` columns."""
    names = [h.strip().lower() for h in header]
    found = {n: i for i, n in enumerate(names) if n}
    numbered = sorted((int(m.group(1)), i) for i, n in enumerate(names)
                      if pattern and (m := pattern.match(n)))
    missing = [r for r in required if r not in found]
    if missing or (pattern is not None and not numbered):
        raise DataError(f"missing columns {missing or ['caption_1']}; found {header}; expected {expected}",
                        path=path, fix="rename the CSV header to the expected columns")
    return found, numbered


def resolve_audio(audio_dir: Path, key: str) -> Path | None:
    """The file on disk for a CSV file name, trying the Clotho quirks (``:``->``_``, HTML entities)."""
    cands = [key, key.replace(":", "_"), html.unescape(key), html.unescape(key).replace(":", "_")]
    seen = set()
    for c in cands:
        if c in seen:
            continue
        seen.add(c)
        p = audio_dir / c
        if p.is_file():
            return p
    return None


def read_caption_csv(csv_path, audio_dir=None, *, require_audio: bool = True, name: str | None = None
                     ) -> CaptionDataset:
    """Read a Clotho-format captions CSV; see the module docstring for every bad-input policy.

    ``require_audio=False`` keeps every row (``Clip.path`` is None where the audio is not found), for
    text-only use such as the real Clotho caption files without their audio.
    """
    csv_path = Path(csv_path)
    audio_dir = Path(audio_dir) if audio_dir is not None else None
    if require_audio and audio_dir is None:
        raise DataError("an audio folder is needed to read this dataset", path=csv_path,
                        fix="pass --audio-dir")
    if audio_dir is not None and require_audio and not audio_dir.is_dir():
        raise DataError("audio folder not found", path=audio_dir, fix="check --audio-dir")
    problems: list[str] = []
    rows = csv_rows(read_text(csv_path, fallback_problem=problems))
    if not rows:
        raise DataError("the CSV is empty", path=csv_path, fix="expected a header file_name,caption_1..")
    cols, cap_cols = header_columns(csv_path, rows[0], ["file_name"], _CAPTION_COL,
                              "file_name,caption_1,...,caption_5")
    fcol = cols["file_name"]
    clips: list[Clip] = []
    seen: set[str] = set()
    n_missing_audio = 0
    for line, row in enumerate(rows[1:], start=2):
        key = row[fcol] if fcol < len(row) else ""
        if not key.strip():
            problems.append(f"{csv_path} line {line}: empty file_name, row skipped")
            continue
        if key in seen:
            problems.append(f"{csv_path} line {line}: {key!r} is listed again, row skipped (first kept)")
            continue
        seen.add(key)
        caps = []
        for n, ci in cap_cols:
            cap = row[ci] if ci < len(row) else ""
            if cap.strip():
                caps.append(cap)  # kept exactly as written: submissions are matched on the raw text
            else:
                problems.append(f"{csv_path} line {line} ({key}): caption_{n} is empty, skipped")
        path = resolve_audio(audio_dir, key) if audio_dir is not None else None
        if path is None and require_audio:
            n_missing_audio += 1
            problems.append(f"{csv_path} line {line}: audio {key!r} not found in {audio_dir}, row skipped")
            continue
        clips.append(Clip(key, path, caps))
    if require_audio and n_missing_audio and not clips:
        raise DataError(f"none of the {n_missing_audio} audio files listed in {csv_path} is in this folder",
                        path=audio_dir, fix="wrong --audio-dir? it must hold the files named in file_name")
    return CaptionDataset(name or csv_path.stem, clips, audio_dir, problems)


def write_caption_csv_rows(path: Path, rows: Iterable[Sequence[str]], n_captions: int) -> Path:
    """Write a Clotho-format CSV (``file_name,caption_1..caption_N``) atomically: a reader never sees a
    half-written file, and an interrupted write leaves the old one in place."""
    path = Path(path)
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["file_name"] + [f"caption_{i}" for i in range(1, n_captions + 1)])
        w.writerows(rows)
    return path


@dataclass
class ClipMetadata:
    file_name: str
    keywords: list[str]
    sound_id: str = ""
    sound_link: str = ""
    start_end_samples: str = ""
    manufacturer: str = ""
    license: str = ""


_META_COLUMNS = ["file_name", "keywords", "sound_id", "sound_link", "start_end_samples", "manufacturer",
                 "license"]


def read_clotho_metadata(csv_path) -> dict[str, ClipMetadata]:
    """Clotho ``clotho_metadata_{split}.csv`` (ISO-8859-1) -> {file_name: ClipMetadata}.

    The file is decoded as UTF-8 when it is valid UTF-8 (a re-saved copy), else as ISO-8859-1 (the
    published encoding). ``file_name`` and ``keywords`` are required; keywords are split on ``;``.
    """
    csv_path = Path(csv_path)
    rows = csv_rows(read_text(csv_path, fallback_problem=[]))
    if not rows:
        raise DataError("the CSV is empty", path=csv_path)
    cols, _ = header_columns(csv_path, rows[0], ["file_name", "keywords"], None, ",".join(_META_COLUMNS))
    out: dict[str, ClipMetadata] = {}
    for row in rows[1:]:
        vals = {c: (row[cols[c]].strip() if c in cols and cols[c] < len(row) else "") for c in _META_COLUMNS}
        vals["file_name"] = row[cols["file_name"]] if cols["file_name"] < len(row) else ""
        if not vals["file_name"]:
            continue
        kws = [k.strip() for k in vals.pop("keywords").split(";") if k.strip()]
        out[vals["file_name"]] = ClipMetadata(keywords=kws, **vals)
    return out
