"""Small waveform thumbnails as PNG, drawn with numpy and encoded with zlib (no plotting library).

Each column shows the min..max of the samples it covers, computed from the file's own samples while
streaming it in blocks (no resampling: a low-rate decode would filter out high tones and draw them flat;
memory stays one block even for a 3-hour file).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

WIDTH, HEIGHT = 480, 64
FG = (37, 99, 235, 255)  # blue
MID = (148, 163, 184, 255)  # centre line


def file_envelope(path, width: int = WIDTH, block: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
    """Per-column (min, max) of a file's mono mix, normalised to its peak; raises AudioError (also for a
    header that ``atae.audio.check_header`` refuses: nothing is decoded then)."""
    import soundfile as sf

    from atae.audio import open_audio
    from atae.errors import AudioError

    lo = np.full(width, np.inf, np.float32)
    hi = np.full(width, -np.inf, np.float32)
    try:
        with open_audio(path) as f:
            total = int(f.frames)
            pos = 0
            while pos < total:
                x = f.read(min(block, total - pos), dtype="float32", always_2d=True)
                if x.shape[0] == 0:
                    break
                x = x.mean(axis=1)
                col = (np.arange(pos, pos + x.shape[0], dtype=np.int64) * width) // total
                starts = np.flatnonzero(np.r_[True, col[1:] != col[:-1]])
                cols = col[starts]
                lo[cols] = np.minimum(lo[cols], np.minimum.reduceat(x, starts))
                hi[cols] = np.maximum(hi[cols], np.maximum.reduceat(x, starts))
                pos += x.shape[0]
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioError(f"cannot read audio ({exc})", path=path) from exc
    lo[~np.isfinite(lo)] = 0.0
    hi[~np.isfinite(hi)] = 0.0
    peak = max(float(np.max(np.abs(np.r_[lo, hi]))), 1e-6)
    return np.clip(lo / peak, -1, 1), np.clip(hi / peak, -1, 1)


def render(env: tuple[np.ndarray, np.ndarray], height: int = HEIGHT) -> bytes:
    """RGBA PNG bytes (transparent background) of an envelope ``(lo, hi)`` from ``file_envelope``."""
    lo, hi = env
    width = len(lo)
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
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )
