"""The hostile-input suite's machinery: what a case is, how a command is run, and what counts as handled
(see ``hostile_cases.py``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hostile_files import printable_output
from library_fakes import FREQS, write_tone

HERE = Path(__file__).resolve().parent


@dataclass
class Outcome:
    handled: bool
    message: str  # what the user saw (first line of the reason), with the test's folder shown as DIR
    detail: str = ""  # everything printed, for a failing test


@dataclass
class Case:
    id: str
    category: str
    what: str
    run: Callable[[Path], Outcome]


# --- running commands -----------------------------------------------------------------------------------


def cli(*args) -> tuple[int, str, str]:
    """(exit code, stdout+stderr, traceback or '') of `atae ARGS` run in this process."""
    from click.testing import CliRunner

    from atae.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    tb = ""
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(r.exception))
    return r.exit_code, r.output, tb


def short(text: str, tmp: Path) -> str:
    line = next((x for x in text.splitlines() if x.strip()), "")
    return line.replace(str(tmp), "DIR").strip()[:150]


def refused(code: int, out: str, tb: str, tmp: Path, *, names: str | None = None) -> Outcome:
    """Exit 2 with one clean line `error: ... (fix: ...)` or `error: disk full ...`, naming ``names``."""
    lines = [x for x in out.splitlines() if x.startswith("error:")]
    usage = [x for x in out.splitlines() if x.startswith("Error: Invalid value")]  # click's own check
    if usage and not lines:
        ok = code == 2 and not tb and printable_output(out) and (names is None or names in usage[0])
        return Outcome(ok, short(usage[0], tmp), out + tb)
    ok = (
        code == 2
        and not tb
        and printable_output(out)
        and len(lines) == 1
        and ("(fix:" in lines[0] or "run the same command again" in lines[0])
        and (names is None or names in lines[0])
    )
    return Outcome(ok, short(lines[0] if lines else out, tmp), out + tb)


def no_crash(code: int, out: str, tb: str) -> bool:
    return not tb and "Traceback" not in out and printable_output(out)


def escaped(s: str) -> str:
    """How a name must look when printed, computed here by Unicode category (not by atae's helper):
    controls, format characters, surrogates, unassigned and separators other than the space escaped."""
    import unicodedata

    out = []
    for c in s:
        o = ord(c)
        if c == " " or unicodedata.category(c) not in {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"}:
            out.append(c)
        elif c in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[c])
        elif 0xDC80 <= o <= 0xDCFF:
            out.append(f"\\x{o - 0xDC00:02x}")
        else:
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
    return "".join(out)


def indexed_library(tmp: Path) -> Path:
    d = tmp / "sounds"
    for name, f in FREQS.items():
        write_tone(d / f"{name}.wav", f, seconds=1.0)
    code, out, tb = cli("index", d, "--db", tmp / "lib", "--audio-encoder", "bands")
    assert code == 0, out + tb
    return tmp / "lib"


