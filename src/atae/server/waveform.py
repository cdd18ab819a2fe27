"""Small waveform thumbnails as PNG, drawn with numpy and encoded with zlib (no plotting library).

Each column shows the min..max of the samples it covers (decoded at 8 kHz mono, enough for a picture).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

WIDTH, HEIGHT = 480, 64
FG = (37, 99, 235, 255)  # blue
MID = (148, 163, 184, 255)  # centre line


def envelope(wave: np.ndarray, width: int = WIDTH) -> tuple[np.ndarray, np.ndarray]:
    """Per-column (min, max) of ``wave``, each in [-1, 1]."""
    wave = np.asarray(wave, dtype=np.float32)
    if wave.size == 0:
        return np.zeros(width, np.float32), np.zeros(width, np.float32)
    edges = np.linspace(0, wave.size, width + 1).astype(np.int64)
    lo = np.zeros(width, np.float32)
    hi = np.zeros(width, np.float32)
    for i in range(width):
        a, b = edges[i], max(edges[i + 1], edges[i] + 1)
        seg = wave[a:min(b, wave.size)]
        if seg.size:
            lo[i], hi[i] = seg.min(), seg.max()
    peak = max(float(np.max(np.abs(wave))), 1e-6)
    return np.clip(lo / peak, -1, 1), np.clip(hi / peak, -1, 1)


def render(wave: np.ndarray, width: int = WIDTH, height: int = HEIGHT) -> bytes:
    """RGBA PNG bytes of the waveform (transparent background)."""
    lo, hi = envelope(wave, width)
    img = np.zeros((height, width, 4), np.uint8)
    mid = (height - 1) / 2
    img[int(round(mid)), :] = MID
    y_top = np.floor(mid - hi * mid).astype(int)
    y_bot = np.ceil(mid - lo * mid).astype(int)
    rows = np.arange(height)[:, None]
    img[(rows >= y_top[None]) & (rows <= y_bot[None])] = FG
    return encode_png(img)


def encode_png(rgba: np.ndarray) -> bytes:
    h, w, _ = rgba.shape
    raw = b"".join(b"\x00" + rgba[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
