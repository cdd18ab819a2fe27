"""Making untrusted text safe to print: file names, captions and error reasons reach terminals and logs.

A file name may hold a newline (one result would print as two lines), terminal control sequences
(``ESC ] 2 ; title BEL`` retitles the window, ``ESC [ 2 J`` clears it), C1 controls, bidi overrides
that reorder what is shown, or bytes that are not UTF-8 (surrogate escapes). ``escape`` shows every
such character as a visible escape, so what is printed is one line of plain glyphs; ``dumps_json``
does the same for the characters JSON leaves raw. Every CLI output path goes through these two.
"""

from __future__ import annotations

import json

__all__ = ["escape", "is_clean", "dumps_json"]

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _one(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    o = ord(ch)
    if 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8 (os.fsdecode's surrogateescape): show the byte
        return f"\\x{o - 0xDC00:02x}"
    if o < 0x100:
        return f"\\x{o:02x}"
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def escape(text: object) -> str:
    """``text`` with every non-printable character (``str.isprintable``: controls, format characters
    such as bidi overrides, separators other than the space, surrogates) shown as ``\\n``, ``\\x1b``,
    ``\\u202e``, ..."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else _one(c) for c in s)


def is_clean(text: str) -> bool:
    """True when ``text`` prints as itself on one line (nothing ``escape`` would change)."""
    return text.isprintable()


def dumps_json(obj, **kwargs) -> str:
    """``json.dumps`` (non-ASCII kept readable) with the characters a terminal would act on escaped as
    ``\\uXXXX``: the same JSON value, safe to print. (JSON escapes C0 controls itself, but leaves DEL,
    C1, bidi and other format characters and lone surrogates raw; a raw newline in its output is
    structure, never inside a string.)"""
    text = json.dumps(obj, ensure_ascii=False, **kwargs)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == "\n" else _json_escape(ord(c)) for c in text)


def _json_escape(o: int) -> str:
    if o < 0x10000:
        return f"\\u{o:04x}"
    o -= 0x10000
    return f"\\u{0xD800 + (o >> 10):04x}\\u{0xDC00 + (o & 0x3FF):04x}"
