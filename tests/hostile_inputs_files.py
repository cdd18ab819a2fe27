"""Hostile files, links, names and permissions for the suite (``hostile_cases.py``)."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf

import cli_child
from hostile_files import CONTROL_NAMES, lying_wav, printable_output, wav_header, without_root_overrides
from hostile_run import HERE, Outcome, cli, escaped, no_crash, refused, short
from library_fakes import FREQS, SR, write_tone


def _library_paths(lib: Path) -> dict[str, str]:
    con = sqlite3.connect(f"file:{lib / 'library.sqlite'}?mode=ro", uri=True)
    try:
        return dict(con.execute("SELECT path, status FROM files"))
    finally:
        con.close()


def index_case(make: Callable[[Path], Path], expect: str) -> Callable[[Path], Outcome]:
    """``make(folder)`` puts one hostile file (or link, or folder) in a folder that also holds a good
    file; `atae index` must go on with the good file and ``expect``: 'indexed' (valid input), 'failed'
    (listed as unreadable with its reason) or 'reported' (listed as not looked at)."""

    def run(tmp: Path) -> Outcome:
        d = tmp / "sounds"
        good = write_tone(d / "good.wav", FREQS["mid"], seconds=1.0)
        target = make(d)
        code, out, tb = cli("index", d, "--db", tmp / "lib", "--audio-encoder", "bands")
        if code != 0 or not no_crash(code, out, tb):
            return Outcome(False, short(out, tmp), out + tb)
        rows = _library_paths(tmp / "lib")
        shown = escaped(str(target))
        line = next((x for x in out.splitlines() if shown in x), "")
        ok = rows.get(str(good)) == "ok"
        if expect == "indexed":
            ok = ok and rows.get(str(target)) == "ok"
            msg = "indexed"
        else:
            ok = ok and rows.get(str(target)) != "ok" and bool(line)
            msg = line.split(": ", 1)[-1] if ": " in line else line
            if expect == "reported":
                ok = ok and "not looked at" in out
        return Outcome(ok, short(msg, tmp), out + tb)

    return run


def search_audio_case(make: Callable[[Path], Path], expect: str) -> Callable[[Path], Outcome]:
    """Query by example with a hostile file: answered ('answered') or refused with one line naming it."""

    def run(tmp: Path) -> Outcome:
        d = tmp / "sounds"
        write_tone(d / "good.wav", FREQS["mid"], seconds=1.0)
        code, out, tb = cli("index", d, "--db", tmp / "lib", "--audio-encoder", "bands")
        assert code == 0, out + tb
        target = make(tmp / "queries")
        code, out, tb = cli("search", "--db", tmp / "lib", "--audio", target)
        if expect == "answered":
            return Outcome(code == 0 and no_crash(code, out, tb) and "good.wav" in out, "answered", out + tb)
        return refused(code, out, tb, tmp, names=escaped(str(target)))

    return run


def _wav_bytes(path: Path, header: bytes, payload: bytes = b"\0" * 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + payload)
    return path


def _float_wav(path: Path, values) -> Path:
    x = np.full(8000, 0.1, np.float32)
    x[100 : 100 + len(values)] = values
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x, SR, subtype="FLOAT")
    return path


def _truncated(path: Path, fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = (0.3 * np.sin(np.arange(SR * 2) * 0.3)).astype(np.float32)
    sf.write(path, x, SR, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


AUDIO: list[tuple[str, str, Callable[[Path], Path], str]] = [
    # (id, what, make(folder) -> path, expected outcome: refused | accepted)
    (
        "rate-1hz",
        "WAV header claims 1 Hz (160 KB would last 22 h)",
        lambda d: lying_wav(d / "one_hz.wav", rate=1, seconds=80_000),
        "refused",
    ),
    (
        "rate-0hz",
        "WAV header claims 0 Hz",
        lambda d: _wav_bytes(d / "zero_hz.wav", wav_header(0, 1, 16, 16000)),
        "refused",
    ),
    (
        "rate-4ghz",
        "WAV header claims 4.29 GHz",
        lambda d: _wav_bytes(d / "huge_rate.wav", wav_header(0xFFFFFFF0, 1, 16, 16000)),
        "refused",
    ),
    (
        "rate-999hz",
        "WAV at 999 Hz (below the 1 kHz floor)",
        lambda d: lying_wav(d / "r999.wav", rate=999, seconds=2),
        "refused",
    ),
    (
        "length-3h1s",
        "3 h + 1 s at 1 kHz (sparse file, nothing to decode)",
        lambda d: lying_wav(d / "three_hours.wav", rate=1000, seconds=3 * 3600 + 1),
        "refused",
    ),
    (
        "length-lies",
        "header declares 4x more data than the file holds (cut download)",
        lambda d: _wav_bytes(d / "cut.wav", wav_header(SR, 1, 16, 64000)),
        "refused",
    ),
    (
        "channels-0",
        "WAV header with 0 channels",
        lambda d: _wav_bytes(d / "ch0.wav", wav_header(SR, 0, 16, 0)),
        "refused",
    ),
    (
        "bits-0",
        "WAV header with 0 bits per sample",
        lambda d: _wav_bytes(d / "bits0.wav", wav_header(SR, 1, 0, 16000)),
        "refused",
    ),
    (
        "format-unknown",
        "WAV format tag 0x1234",
        lambda d: _wav_bytes(
            d / "fmt.wav", wav_header(SR, 1, 16, 16000).replace(b"\x01\x00\x01\x00", b"\x34\x12\x01\x00", 1)
        ),
        "refused",
    ),
    ("empty", "0-byte file", lambda d: _wav_bytes(d / "empty.wav", b"", b""), "refused"),
    (
        "header-only",
        "44-byte header, no frames",
        lambda d: _wav_bytes(d / "hdr.wav", wav_header(SR, 1, 16, 0), b""),
        "refused",
    ),
    (
        "random-bytes",
        "random bytes named .wav",
        lambda d: _wav_bytes(d / "noise.wav", np.random.default_rng(0).bytes(5000), b""),
        "refused",
    ),
    (
        "text-as-flac",
        "a text file named .flac",
        lambda d: _wav_bytes(d / "notes.flac", b"not audio\n" * 100, b""),
        "refused",
    ),
    ("nan-samples", "float WAV holding NaN", lambda d: _float_wav(d / "nan.wav", [np.nan]), "refused"),
    ("inf-samples", "float WAV holding +inf", lambda d: _float_wav(d / "inf.wav", [np.inf]), "refused"),
    ("flac-truncated", "FLAC cut to a third", lambda d: _truncated(d / "cut.flac", "FLAC"), "refused"),
    (
        "silent",
        "digital silence (valid audio)",
        lambda d: lying_wav(d / "silence.wav", rate=SR, seconds=2),
        "accepted",
    ),
    (
        "one-sample",
        "a WAV of one sample",
        lambda d: _write(d / "tiny.wav", np.zeros(1, np.float32), SR),
        "accepted",
    ),
    (
        "multichannel-96k",
        "96 kHz, 6 channels",
        lambda d: _write(
            d / "surround.wav",
            0.1 * np.random.default_rng(1).standard_normal((96000, 6)).astype(np.float32),
            96000,
        ),
        "accepted",
    ),
    (
        "streaming-size",
        "data size 0xFFFFFFFF (a streaming writer's placeholder)",
        lambda d: _wav_bytes(
            d / "stream.wav",
            wav_header(SR, 1, 16, 0xFFFFFFFF),
            (3000 * np.sin(np.arange(16000) * 0.2)).astype("<i2").tobytes(),
        ),
        "accepted",
    ),
]


def _write(path: Path, x, rate) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x, rate)
    return path


def _fifo(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    os.mkfifo(d / "pipe.wav")
    return d / "pipe.wav"


def _link(d: Path, name: str, target) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    os.symlink(target, d / name)
    return d / name


LINKS: list[tuple[str, str, Callable[[Path], Path], str]] = [
    ("fifo", "a named pipe called pipe.wav (reading it would block)", _fifo, "reported"),
    (
        "dev-zero",
        "a link named zero.wav to /dev/zero",
        lambda d: _link(d, "zero.wav", "/dev/zero"),
        "reported",
    ),
    (
        "dangling",
        "a link to a file that is gone",
        lambda d: _link(d, "gone.wav", d / "nowhere.wav"),
        "reported",
    ),
    (
        "loop",
        "a folder link to its own parent (a loop)",
        lambda d: _link(d / "sub", "loop", d),
        "indexed-once",
    ),
    ("twice", "two links to one file", lambda d: _link(d, "again.wav", d / "good.wav"), "indexed-once"),
    (
        "folder-named-wav",
        "a folder named x.wav holding a sound",
        lambda d: write_tone(d / "x.wav" / "inner.wav", FREQS["low"], seconds=1.0),
        "indexed",
    ),
]


def links_case(make, expect) -> Callable[[Path], Outcome]:
    if expect in ("reported", "indexed"):
        return index_case(make, expect)

    def run(tmp: Path) -> Outcome:
        d = tmp / "sounds"
        write_tone(d / "good.wav", FREQS["mid"], seconds=1.0)
        make(d)
        code, out, tb = cli("index", d, "--db", tmp / "lib", "--audio-encoder", "bands", "--json")
        if code != 0 or tb:
            return Outcome(False, short(out, tmp), out + tb)
        rep = json.loads(out)
        ok = rep["library"]["files"] == 1 and rep["report"]["new"] == 1
        return Outcome(ok, "indexed once", out)

    return run


def name_case(name: str) -> Callable[[Path], Outcome]:
    """A valid sound with a hostile name: indexed; the table, JSON and warnings print it escaped;
    --paths-only refuses names it cannot carry on one line, --print0 gives the exact bytes."""

    def run(tmp: Path) -> Outcome:
        d = tmp / "sounds"
        write_tone(d / "plain.wav", FREQS["mid"], seconds=1.0)
        target = d / name if isinstance(name, str) else Path(os.fsdecode(os.path.join(os.fsencode(d), name)))
        if isinstance(name, bytes):
            d.mkdir(parents=True, exist_ok=True)
            sf.write(os.path.join(os.fsencode(d), name), np.zeros(800, np.float32), SR, format="WAV")
        else:
            write_tone(target, FREQS["low"], seconds=1.0)
        outs = []
        code, out, tb = cli("index", d, "--db", tmp / "lib", "--audio-encoder", "bands")
        outs.append(out + tb)
        ok = code == 0 and no_crash(code, out, tb)
        if isinstance(name, bytes):  # not UTF-8: cannot be stored; reported with the fix
            line = next((x for x in out.splitlines() if "not valid UTF-8" in x), "")
            return Outcome(ok and bool(line), short(line.split(": ", 1)[-1], tmp), "\n".join(outs))
        for mode in ((), ("--json",), ("--paths-only",), ("--print0",)):
            code, out, tb = cli("search", "--db", tmp / "lib", "--audio", d / "plain.wav", "-k", "5", *mode)
            outs.append(out + tb)
            if mode == ("--print0",):
                ok = ok and code == 0 and not tb
                continue
            if mode == ("--paths-only",) and not target.name.isprintable():
                ok = ok and refused(code, out, tb, tmp).handled
                continue
            ok = ok and code == 0 and no_crash(code, out, tb)
            if mode == ("--json",):
                ok = ok and str(target) in [r["path"] for r in json.loads(out)]
            elif mode == ():
                ok = ok and len(out.strip().splitlines()) == 2 and escaped(str(target)) in out
        shown = escaped(target.name)
        return Outcome(ok, f"indexed; printed as {shown}"[:150], "\n".join(outs))

    return run


NAMES: list[tuple[str, str, object]] = [
    *[(f"name-{k}", f"file name with {k.replace('_', ' ')}: {v!r}", v) for k, v in CONTROL_NAMES.items()],
    ("name-not-utf8", "file name with bytes that are not UTF-8 (b'\\xff\\xfe.wav')", b"\xff\xfe.wav"),
    ("name-dash", "file name starting with a dash (-rf.wav)", "-rf.wav"),
    ("name-shell", "file name with shell syntax ($(reboot);.wav)", "$(reboot);`id`.wav"),
    ("name-glob", "file name with glob characters ([*?].wav)", "[*?].wav"),
    ("name-percent", "file name with format specifiers (%s%n%x.wav)", "%s%n%x.wav"),
    ("name-long", "a 250-byte file name", "a" * 246 + ".wav"),
    ("name-unicode", "file name in NFD Unicode and emoji (café 🔔.wav)", "cafe\u0301 \U0001f514.wav"),
]


# --- permissions (real denials: as root, the process gives up its read-anything rights) ---------


def _perm_process(args) -> tuple[int, str]:
    import subprocess

    pre = without_root_overrides if os.geteuid() == 0 else None
    try:
        r = subprocess.run(
            [sys.executable, str(HERE / "cli_child.py"), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=pre,
            env=cli_child.child_env(),
        )
    except subprocess.SubprocessError as exc:
        import pytest

        pytest.skip(f"cannot start a process without root's read-anything capabilities here ({exc})")
    return r.returncode, r.stdout.replace("ready\n", "", 1) + r.stderr


def perm_case(setup, args_of, expect) -> Callable[[Path], Outcome]:
    def run(tmp: Path) -> Outcome:
        d = tmp / "sounds"
        for name, f in FREQS.items():
            write_tone(d / f"{name}.wav", f, seconds=1.0)
        code, out, _ = cli("index", d, "--db", tmp / "lib", "--audio-encoder", "bands")
        assert code == 0, out
        undo = setup(tmp, d)
        try:
            code, out = _perm_process(args_of(tmp, d))
        finally:
            undo()
        if "Traceback" in out or not printable_output(out):
            return Outcome(False, short(out, tmp), out)
        if expect == "refused":
            return refused(code, out, "", tmp)
        if expect == "works":
            return Outcome(code == 0 and "low.wav" in out, "works", out)
        line = next((x for x in out.splitlines() if "Permission denied" in x), "")
        return Outcome(code == 0 and bool(line), short(line.strip(), tmp), out)

    return run


def _chmod(path: Path, mode: int):
    old = path.stat().st_mode & 0o7777
    os.chmod(path, mode)
    return lambda: os.chmod(path, old)


def _read_only_library(tmp: Path, d: Path):
    lib = tmp / "lib"
    undo = [_chmod(p, 0o444) for p in lib.iterdir() if p.is_file()] + [_chmod(lib, 0o555)]
    return lambda: [u() for u in reversed(undo)]


PERMS = [
    (
        "unreadable-file",
        "an audio file with mode 000 (index)",
        lambda tmp, d: (write_tone(d / "secret.wav", 900.0), _chmod(d / "secret.wav", 0))[1],
        lambda tmp, d: ["index", d, "--db", tmp / "lib"],
        "reported",
    ),
    (
        "unreadable-folder",
        "a folder with mode 000 (index): reported, its indexed files kept",
        lambda tmp, d: (write_tone(d / "locked" / "x.wav", 900.0), _chmod(d / "locked", 0))[1],
        lambda tmp, d: ["index", d, "--db", tmp / "lib"],
        "reported",
    ),
    (
        "unsearchable-folder",
        "a folder readable but not enterable (mode 644)",
        lambda tmp, d: (write_tone(d / "noexec" / "x.wav", 900.0), _chmod(d / "noexec", 0o644))[1],
        lambda tmp, d: ["index", d, "--db", tmp / "lib"],
        "reported",
    ),
    (
        "readonly-library-search",
        "search a library on read-only storage (folder and files without write permission)",
        _read_only_library,
        lambda tmp, d: ["search", "--db", tmp / "lib", "--audio", d / "low.wav", "--paths-only"],
        "works",
    ),
    (
        "readonly-library-index",
        "index into a library folder without write permission",
        lambda tmp, d: _chmod(tmp / "lib", 0o555),
        lambda tmp, d: ["index", d, "--db", tmp / "lib"],
        "refused",
    ),
    (
        "unreadable-example",
        "query by example with a file of mode 000",
        lambda tmp, d: _chmod(d / "low.wav", 0),
        lambda tmp, d: ["search", "--db", tmp / "lib", "--audio", d / "low.wav"],
        "refused",
    ),
]

