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
* **longer than ``max_seconds``** (default ``MAX_SECONDS`` = 3 h) **by its header**: ``AudioError``
  before anything is decoded, also when only a segment is asked for (a long job decodes long files in
  pages, and each page must not slip under the limit); fix: split the file. Below that, decoding and
  resampling run in blocks so memory stays about the size of the output.
* **implausible sample rate** in the header (below ``MIN_SAMPLE_RATE`` = 1 kHz or above
  ``MAX_SAMPLE_RATE`` = 768 kHz, e.g. a WAV claiming 1 Hz, which makes 160 KB last 22 hours):
  ``AudioError`` before decoding; fix: re-encode.
* **not a regular file** (a folder, a device such as ``/dev/zero``, a pipe): ``AudioError``.
* **very short**: returned as is; each tower zero-pads to its own minimum (``AudioTower.pad_to_min``).
* **channels**: downmixed to mono by the mean of the channels.
* **sample rate**: any rate libsndfile reads (8 kHz, 96 kHz, ...) is resampled with soxr ('HQ') to the
  rate asked for.
"""

from __future__ import annotations

import contextlib
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from atae.errors import AudioError

__all__ = ["AUDIO_EXTENSIONS", "MAX_SECONDS", "MIN_SAMPLE_RATE", "MAX_SAMPLE_RATE", "AudioInfo", "probe",
           "check_header", "open_audio", "load_audio", "is_silent"]

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
MAX_SECONDS = 3 * 3600.0
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 768_000


@dataclass(frozen=True)
class AudioInfo:
    path: Path
    sample_rate: int
    channels: int
    frames: int
    duration: float  # seconds


def _open(path: Path) -> sf.SoundFile:
    try:
        st = path.stat()
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
            raise AudioError("audio file not found", path=path,
                             fix="check the path (or the CSV row naming it)") from None
        raise AudioError(f"cannot be read ({exc.strerror or exc})", path=path,
                         fix="fix its permissions") from None
    if not stat.S_ISREG(st.st_mode):
        raise AudioError("not a regular file (a folder, a device or a pipe)", path=path,
                         fix="give the path of an audio file")
    if st.st_size == 0:
        raise AudioError("empty file (0 bytes)", path=path, fix=_FIX_DECODE)
    try:
        return sf.SoundFile(str(path))
    except PermissionError as exc:
        raise AudioError(f"cannot be read ({exc.strerror})", path=path, fix="fix its permissions") from None
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as exc:
        raise AudioError(f"not a readable audio file ({exc})", path=path, fix=_FIX_DECODE) from exc


def check_header(info: AudioInfo, *, max_seconds: float = MAX_SECONDS) -> AudioInfo:
    """The one rule on what a header declares, applied before anything is decoded by every path that
    reads audio (indexing, extraction, query by example, uploads, waveforms): a plausible sample rate,
    at least one frame, at most ``max_seconds``. Returns ``info`` or raises ``AudioError``."""
    if not MIN_SAMPLE_RATE <= info.sample_rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"the header claims a sample rate of {info.sample_rate} Hz (atae reads "
                         f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz)", path=info.path, fix=_FIX_DECODE)
    if info.frames <= 0:
        raise AudioError("no audio frames in the file (empty or cut before the first frame)",
                         path=info.path, fix=_FIX_DECODE)
    if info.duration > max_seconds:
        raise AudioError(f"the header declares {info.duration:.0f} s of audio, longer than the limit of "
                         f"{max_seconds:.0f} s", path=info.path,
                         fix="split the file into shorter files (Python API: raise max_seconds)")
    return info


def _info(path: Path, f: sf.SoundFile) -> AudioInfo:
    sr = int(f.samplerate)
    return AudioInfo(path, sr, int(f.channels), int(f.frames), float(f.frames) / sr if sr > 0 else 0.0)


@contextlib.contextmanager
def open_audio(path: str | Path, *, max_seconds: float = MAX_SECONDS):
    """The open ``soundfile.SoundFile`` of ``path`` after ``check_header`` (for readers that stream the
    samples themselves, such as the waveform thumbnails)."""
    path = Path(path)
    with _open(path) as f:
        check_header(_info(path, f), max_seconds=max_seconds)
        yield f


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


def probe(path: str | Path, *, max_seconds: float = MAX_SECONDS) -> AudioInfo:
    """Header facts of an audio file without decoding it; raises ``AudioError`` if it is unreadable or
    its header fails ``check_header`` (so a caller that plans work from the header plans only sane work)."""
    path = Path(path)
    with _open(path) as f:
        return check_header(_info(path, f), max_seconds=max_seconds)


def is_silent(wave: np.ndarray, threshold_db: float = -90.0) -> bool:
    """True if the peak is below ``threshold_db`` dBFS (digital silence or near it)."""
    wave = np.asarray(wave)
    return wave.size == 0 or float(np.max(np.abs(wave))) <= 10.0 ** (threshold_db / 20.0)


def load_audio(path: str | Path, sample_rate: int, *, max_seconds: float = MAX_SECONDS,
               start_s: float = 0.0, duration_s: float | None = None) -> np.ndarray:
    """Decode ``path`` (or the segment ``start_s`` .. ``start_s + duration_s``) to float32 mono at
    ``sample_rate``. See the module docstring for the policy on bad input; ``max_seconds`` bounds the
    whole file as its header declares it, whatever segment is asked for."""
    path = Path(path)
    with open_audio(path, max_seconds=max_seconds) as f:
        sr, ch, total = int(f.samplerate), int(f.channels), int(f.frames)
        if _declared_beyond_file(f):
            raise AudioError("truncated: the header declares more audio than the file holds", path=path,
                             fix="re-download the file or re-encode what is left of it")
        first = min(max(int(round(start_s * sr)), 0), total)
        count = total - first if duration_s is None else min(int(round(duration_s * sr)), total - first)
        if count <= 0:
            raise AudioError(f"no audio in the requested segment (start {start_s} s, "
                             f"file {total / sr:.2f} s)", path=path,
                             fix="choose a start time inside the file")
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
