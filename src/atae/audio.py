"""Audio decoding for every tower: soundfile in, float32 mono at the tower's rate out.

Policies (each bad case raises ``AudioError`` naming the file and the fix, so a batch job can skip the
file, list it and go on):

* **missing file, not audio, unsupported or corrupt data** (text renamed ``.ogg``, random bytes,
  a decoder error mid-stream): ``AudioError``; fix: re-encode to WAV/FLAC (e.g. with ffmpeg).
* **truncated file** (the header promises more frames than the file holds, e.g. an interrupted
  download): ``AudioError`` rather than silently encoding a fragment; fix: re-download or re-encode.
* **empty** (0 frames): ``AudioError``.
* **non-finite samples** (NaN/inf in a float file): ``AudioError``.
* **silent**: returned as is; digital silence is valid audio (``is_silent`` lets callers flag it).
* **longer than ``max_seconds``** (default 3 h): ``AudioError``; fix: raise ``max_seconds`` or split the
  file. Below that, decoding and resampling run in blocks so memory stays about the size of the output.
* **very short**: returned as is; each tower zero-pads to its own minimum (``AudioTower.pad_to_min``).
* **channels**: downmixed to mono by the mean of the channels.
* **sample rate**: any rate libsndfile reads (8 kHz, 96 kHz, ...) is resampled with soxr ('HQ') to the
  rate asked for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from atae.errors import AudioError

__all__ = ["AUDIO_EXTENSIONS", "AudioInfo", "probe", "load_audio", "is_silent"]

# File extensions that libsndfile decodes here (mp3 only where libsndfile was built with it).
_EXT_BY_FORMAT = {
    "WAV": ("wav",), "WAVEX": ("wav",), "FLAC": ("flac",), "OGG": ("ogg", "oga", "opus"),
    "AIFF": ("aif", "aiff", "aifc"), "W64": ("w64",), "CAF": ("caf",), "RF64": ("rf64",),
    "AU": ("au", "snd"), "MP3": ("mp3",),
}
AUDIO_EXTENSIONS: frozenset[str] = frozenset(
    ext for fmt in sf.available_formats() for ext in _EXT_BY_FORMAT.get(fmt, ())
)

_FIX_DECODE = ("re-encode it to WAV or FLAC (e.g. `ffmpeg -i IN -ar 44100 OUT.flac`) "
               "or remove it from the list")
_BLOCK_FRAMES = 1 << 18  # frames decoded per block (~6 s at 44.1 kHz): bounds the temporary memory


@dataclass(frozen=True)
class AudioInfo:
    path: Path
    sample_rate: int
    channels: int
    frames: int
    duration: float  # seconds


def _open(path: Path) -> sf.SoundFile:
    if not path.is_file():
        raise AudioError("audio file not found", path=path, fix="check the path (or the CSV row naming it)")
    if path.stat().st_size == 0:
        raise AudioError("empty file (0 bytes)", path=path, fix=_FIX_DECODE)
    try:
        return sf.SoundFile(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(f"not a readable audio file ({exc})", path=path, fix=_FIX_DECODE) from exc


def _declared_beyond_file(f: sf.SoundFile) -> bool:
    """WAV-like headers: libsndfile logs 'data : DECLARED (should be AVAILABLE)' when the file is cut."""
    try:
        log = f.extra_info
    except Exception:  # noqa: BLE001 - the log is a diagnostic, never fatal
        return False
    m = re.search(r"\bdata\s*:\s*(\d+)\s*\(should be (\d+)\)", log)
    if not m:
        return False
    declared, available = int(m.group(1)), int(m.group(2))
    # 0 and 0xFFFFFFFF-ish sizes are placeholders of streaming writers, not truncation
    return 0 < declared < 0xFFFFFF00 and declared > available + f.channels * 4


def probe(path: str | Path) -> AudioInfo:
    """Header facts of an audio file without decoding it (raises ``AudioError`` if unreadable)."""
    path = Path(path)
    with _open(path) as f:
        return AudioInfo(path, int(f.samplerate), int(f.channels), int(f.frames),
                         float(f.frames) / f.samplerate if f.samplerate else 0.0)


def is_silent(wave: np.ndarray, threshold_db: float = -90.0) -> bool:
    """True if the peak is below ``threshold_db`` dBFS (digital silence or near it)."""
    wave = np.asarray(wave)
    return wave.size == 0 or float(np.max(np.abs(wave))) <= 10.0 ** (threshold_db / 20.0)


def load_audio(path: str | Path, sample_rate: int, *, max_seconds: float = 3 * 3600,
               start_s: float = 0.0, duration_s: float | None = None) -> np.ndarray:
    """Decode ``path`` (or the segment ``start_s`` .. ``start_s + duration_s``) to float32 mono at
    ``sample_rate``. See the module docstring for the policy on bad input."""
    path = Path(path)
    with _open(path) as f:
        sr, ch, total = int(f.samplerate), int(f.channels), int(f.frames)
        if total <= 0:
            raise AudioError("no audio frames in the file (empty or cut before the first frame)",
                             path=path, fix=_FIX_DECODE)
        if _declared_beyond_file(f):
            raise AudioError("truncated: the header declares more audio than the file holds", path=path,
                             fix="re-download the file or re-encode what is left of it")
        first = min(max(int(round(start_s * sr)), 0), total)
        count = total - first if duration_s is None else min(int(round(duration_s * sr)), total - first)
        if count <= 0:
            raise AudioError(f"no audio in the requested segment (start {start_s} s, "
                             f"file {total / sr:.2f} s)", path=path,
                             fix="choose a start time inside the file")
        if count / sr > max_seconds:
            raise AudioError(f"{count / sr:.0f} s of audio is longer than the limit of {max_seconds:.0f} s",
                             path=path, fix="raise max_seconds or split the file into shorter files")
        if first:
            f.seek(first)
        stream = (soxr.ResampleStream(sr, sample_rate, 1, dtype="float32", quality="HQ")
                  if sr != sample_rate else None)
        # preallocate the output (soxr returns ceil(n * ratio) samples) so memory is about one output
        out = np.empty(int(np.ceil(count * sample_rate / sr)) + 64, dtype=np.float32)
        pos = done = 0
        try:
            while done < count:
                n = min(_BLOCK_FRAMES, count - done)
                block = f.read(n, dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    break
                done += block.shape[0]
                mono = block[:, 0].copy() if ch == 1 else block.mean(axis=1, dtype=np.float32)
                if not np.all(np.isfinite(mono)):
                    raise AudioError("the audio holds NaN or infinite samples", path=path, fix=_FIX_DECODE)
                last = done >= count or block.shape[0] < n
                chunk = stream.resample_chunk(mono, last=last) if stream is not None else mono
                if pos + chunk.shape[0] > out.shape[0]:
                    out = np.concatenate([out, np.empty(chunk.shape[0] + 1024, dtype=np.float32)])
                out[pos:pos + chunk.shape[0]] = chunk
                pos += chunk.shape[0]
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise AudioError(f"decoding failed after {done} frames ({exc})", path=path,
                             fix=_FIX_DECODE) from exc
        if done < count:
            raise AudioError(f"truncated: decoded {done} of {count} frames the header declares",
                             path=path, fix="re-download the file or re-encode what is left of it")
    return out[:pos].copy() if out.shape[0] - pos > 4096 else out[:pos]
