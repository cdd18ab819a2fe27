"""Files a hostile (or unlucky) user feeds atae: WAV headers that lie, names that attack terminals."""

from __future__ import annotations

import struct
from pathlib import Path


def wav_header(rate: int, channels: int = 1, bits: int = 16, data_bytes: int = 0) -> bytes:
    """A canonical 44-byte PCM WAV header that declares ``data_bytes`` of samples at ``rate`` Hz."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, rate, (rate * block) & 0xFFFFFFFF, block, bits)
    return (b"RIFF" + struct.pack("<I", (36 + data_bytes) & 0xFFFFFFFF) + b"WAVE" + b"fmt "
            + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", data_bytes))


def lying_wav(path: Path, *, rate: int, seconds: float, channels: int = 1, bits: int = 16) -> Path:
    """A WAV whose header says ``rate`` Hz and holds ``seconds`` of (sparse, silent) samples: what the
    file really is (its size) agrees with the header, only the rate or the length is absurd."""
    frames = int(round(rate * seconds))
    n = frames * channels * bits // 8
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(wav_header(rate, channels, bits, n))
        f.truncate(44 + n)  # a hole reads as zeros: silence, and no disk used
    return path


# file names that must come out of every printer as one harmless line
CONTROL_NAMES = {
    "newline": "two\nlines.wav",
    "osc_title_clear": "\x1b]2;pwned\x07\x1b[2Jtitle.wav",
    "csi_colour": "\x1b[31mred\x1b[0m.wav",
    "carriage_return": "over\rwrite.wav",
    "c1_csi": "c1\x9b2Jcsi.wav",
    "bidi_override": "evil\u202egnp.wav",
    "backspace_bell": "bs\x08\x08bell\x07.wav",
    "tab": "tab\tname.wav",
}


def printable_output(text: str) -> bool:
    """True when ``text`` holds nothing a terminal would act on: only printable characters and line ends."""
    return all(c == "\n" or c.isprintable() for c in text)


def without_root_overrides():
    """preexec_fn for a child that keeps uid 0 but loses what lets root read any folder
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, dropped from the bounding set so exec cannot restore them)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # 24: PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
