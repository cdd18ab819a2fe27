"""FSD50K clip-info JSON -> noisy text-audio pairs, as the seed system builds them.

For each selected clip two texts: the Freesound description with HTML removed (tags stripped, entities
unescaped), whitespace normalised (CR/LF, tabs and runs of spaces -> one space) and cut to 500
characters; and the tags joined by one space in the uploader's order (kept as given, repeats included).

"Half of dev" selection rule (documented and seeded): a clip is kept iff
``int(sha256(f"{seed}:{clip_id}").hexdigest()[:16], 16) / 2**64 < fraction``. Each clip's fate depends
only on its own id and the seed, so the selection is stable when other clips are added or removed.
Clips are returned sorted by numeric id (non-numeric ids after, sorted as text).
"""

from __future__ import annotations

import hashlib
import json
from html.parser import HTMLParser
from pathlib import Path

from atae.data.clotho import CaptionDataset, Clip
from atae.errors import DataError

MAX_DESCRIPTION_CHARS = 500


_BREAKING_TAGS = {"br", "p", "div", "li", "ul", "ol", "tr", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6",
                  "blockquote", "pre", "hr", "table"}


class _TextOnly(HTMLParser):
    """Collects text content; entities are unescaped by the parser (convert_charrefs)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data):
        self.parts.append(data)

    def _tag(self, tag):
        if tag in _BREAKING_TAGS:  # "line<br>next" must not glue the two words
            self.parts.append(" ")

    def handle_starttag(self, tag, attrs):
        self._tag(tag)

    def handle_endtag(self, tag):
        self._tag(tag)

    def handle_startendtag(self, tag, attrs):
        self._tag(tag)


def strip_html(text: str) -> str:
    """Text content of an HTML fragment: tags removed, entities (``&amp;``, ``&#39;``) unescaped once."""
    p = _TextOnly()
    p.feed(text)
    p.close()
    return "".join(p.parts)


def clean_description(text: str, max_chars: int = MAX_DESCRIPTION_CHARS) -> str:
    """HTML removed, whitespace runs (CRLF, tabs, spaces) collapsed to one space, cut to max_chars."""
    return " ".join(strip_html(text or "").split())[:max_chars].rstrip()


def tags_text(tags) -> str:
    """Tags joined by one space in the uploader's order."""
    return " ".join(t.strip() for t in (tags or []) if isinstance(t, str) and t.strip())


def keep_clip(clip_id: str, fraction: float = 0.5, seed: int = 0) -> bool:
    """The seeded, order-independent "half of dev" rule (see the module docstring)."""
    h = hashlib.sha256(f"{seed}:{clip_id}".encode()).hexdigest()
    return int(h[:16], 16) / 2.0**64 < fraction


def _id_order(cid: str):
    return (0, int(cid), "") if cid.isdigit() else (1, 0, cid)


def read_fsd50k_noisy(json_path, audio_dir=None, *, fraction: float = 0.5, seed: int = 0,
                      require_audio: bool | None = None) -> CaptionDataset:
    """Noisy pairs from an FSD50K ``*_clips_info_*.json``; audio is ``<clip_id>.wav`` in ``audio_dir``.

    ``require_audio`` defaults to True when ``audio_dir`` is given: selected clips whose WAV is missing
    are then skipped and recorded (DataError if none exists). Empty texts are skipped and recorded.
    """
    json_path = Path(json_path)
    audio_dir = Path(audio_dir) if audio_dir is not None else None
    if require_audio is None:
        require_audio = audio_dir is not None
    if require_audio and audio_dir is None:
        raise DataError("an audio folder is needed", path=json_path, fix="pass --noisy-audio")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError("fraction must be in [0, 1]")
    try:
        info = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError("file not found", path=json_path, fix="check the path") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"not a valid UTF-8 JSON file ({e})", path=json_path,
                        fix="pass FSD50K's clips_info JSON") from None
    if not isinstance(info, dict):
        raise DataError("expected a JSON object {clip_id: {description, tags, ...}}", path=json_path)
    problems: list[str] = []
    clips: list[Clip] = []
    n_missing = 0
    for cid in sorted((str(k) for k in info), key=_id_order):
        if not keep_clip(cid, fraction, seed):
            continue
        rec = info[cid]
        if not isinstance(rec, dict):
            problems.append(f"{json_path}: clip {cid}: record is not an object, skipped")
            continue
        texts = []
        desc = clean_description(rec.get("description") or "")
        if desc:
            texts.append(desc)
        else:
            problems.append(f"{json_path}: clip {cid}: empty description, text skipped")
        tags = tags_text(rec.get("tags"))
        if tags:
            texts.append(tags)
        else:
            problems.append(f"{json_path}: clip {cid}: no tags, text skipped")
        if not texts:
            continue
        path = None
        if audio_dir is not None:
            p = audio_dir / f"{cid}.wav"
            path = p if p.is_file() else None
        if path is None and require_audio:
            n_missing += 1
            problems.append(f"{json_path}: clip {cid}: audio {cid}.wav not found in {audio_dir}, skipped")
            continue
        clips.append(Clip(cid, path, texts))
    if require_audio and n_missing and not clips:
        raise DataError(f"none of the {n_missing} selected clips has its <clip_id>.wav here", path=audio_dir,
                        fix="wrong --noisy-audio? it must hold FSD50K.dev_audio")
    return CaptionDataset(f"fsd50k-noisy-{json_path.stem}", clips, audio_dir, problems)
