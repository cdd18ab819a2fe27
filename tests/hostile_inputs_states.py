"""Hostile library states, dataset files and HTTP requests for the suite (``hostile_cases.py``)."""

from __future__ import annotations

import io
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf

from hostile_files import wav_header
from hostile_run import Outcome, cli, indexed_library, no_crash, refused, short
from library_fakes import FREQS, SR, write_tone


def _sql(lib: Path, *statements) -> None:
    con = sqlite3.connect(lib / "library.sqlite")
    for s in statements:
        con.execute(s)
    con.commit()
    con.close()


def state_case(setup, commands, expect="refused", needle=None) -> Callable[[Path], Outcome]:
    """``setup(tmp) -> lib`` damages a library; every command in ``commands(tmp)`` must refuse with one
    line (containing ``needle``) or, with expect='works', succeed (exit 0)."""

    def run(tmp: Path) -> Outcome:
        lib = setup(tmp)
        msgs, ok, detail = [], True, ""
        for args in commands(tmp, lib):
            code, out, tb = cli(*args)
            detail += out + tb
            if expect == "works":
                ok = ok and code == 0 and no_crash(code, out, tb)
                msgs.append("works")
                continue
            o = refused(code, out, tb, tmp)
            ok = ok and o.handled and (needle is None or needle in out)
            msgs.append(o.message)
        return Outcome(ok, msgs[0] if msgs else "", detail)

    return run


def _reads(tmp, lib):
    return [("search", "--db", lib, "--audio", tmp / "sounds" / "low.wav"), ("prune", "--db", lib)]


def _reads_and_index(tmp, lib):
    return [*_reads(tmp, lib), ("index", tmp / "sounds", "--db", lib)]


def _foreign(tmp):
    lib = tmp / "lib"
    lib.mkdir()
    con = sqlite3.connect(lib / "library.sqlite")
    con.execute("CREATE TABLE contacts (name TEXT)")
    con.close()
    (tmp / "sounds").mkdir()
    write_tone(tmp / "sounds" / "low.wav", FREQS["low"])
    return lib


def _fresh_sounds(tmp):
    write_tone(tmp / "sounds" / "low.wav", FREQS["low"])
    return tmp / "lib"


def _bytes_db(data: bytes):
    def setup(tmp):
        lib = _fresh_sounds(tmp)
        lib.mkdir()
        (lib / "library.sqlite").write_bytes(data)
        return lib

    return setup


def _unfinished(tmp):
    from atae.library.db import LibraryDB

    lib = _fresh_sounds(tmp)
    lib.mkdir()
    LibraryDB(lib, create=True).close()
    return lib


def _damage_vectors(data: bytes | None):
    def setup(tmp):
        lib = indexed_library(tmp)
        for p in lib.glob("vectors-*.faiss"):
            if data is None:
                p.unlink()
                p.mkdir()
            else:
                p.write_bytes(data)
        return lib

    return setup


STATES = [
    (
        "db-foreign",
        "LIB/library.sqlite is another program's SQLite database",
        _foreign,
        _reads_and_index,
        "refused",
        "not an atae library",
    ),
    (
        "db-random",
        "LIB/library.sqlite holds random bytes",
        _bytes_db(np.random.default_rng(2).bytes(8192)),
        _reads_and_index,
        "refused",
        "unreadable",
    ),
    (
        "db-dir",
        "LIB/library.sqlite is a folder",
        lambda tmp: (_fresh_sounds(tmp).mkdir(), (tmp / "lib" / "library.sqlite").mkdir(), tmp / "lib")[2],
        _reads_and_index,
        "refused",
        None,
    ),
    (
        "db-empty",
        "LIB/library.sqlite is empty (killed at creation): reads refuse",
        _bytes_db(b""),
        _reads,
        "refused",
        "unfinished",
    ),
    (
        "db-empty-index",
        "... and `index` finishes it",
        _bytes_db(b""),
        lambda tmp, lib: [("index", tmp / "sounds", "--db", lib, "--audio-encoder", "bands")],
        "works",
        None,
    ),
    (
        "db-unfinished",
        "schema but no settings (killed before the tower loaded): reads refuse",
        _unfinished,
        _reads,
        "refused",
        "unfinished",
    ),
    (
        "db-unfinished-index",
        "... and `index` finishes it",
        _unfinished,
        lambda tmp, lib: [("index", tmp / "sounds", "--db", lib, "--audio-encoder", "bands")],
        "works",
        None,
    ),
    (
        "db-future",
        "schema version 99",
        lambda tmp: (
            _sql(indexed_library(tmp), "UPDATE meta SET value='99' WHERE key='schema_version'"),
            tmp / "lib",
        )[1],
        _reads_and_index,
        "refused",
        "upgrade atae",
    ),
    (
        "db-garbage-version",
        "schema version 'abc'",
        lambda tmp: (
            _sql(indexed_library(tmp), "UPDATE meta SET value='abc' WHERE key='schema_version'"),
            tmp / "lib",
        )[1],
        _reads_and_index,
        "refused",
        None,
    ),
    (
        "db-bad-settings",
        "tower settings that are not JSON",
        lambda tmp: (
            _sql(indexed_library(tmp), "UPDATE meta SET value='{oops' WHERE key='audio_tower'"),
            tmp / "lib",
        )[1],
        _reads_and_index,
        "refused",
        "corrupt",
    ),
    (
        "vectors-random",
        "the FAISS file holds random bytes (rebuilt from SQLite)",
        _damage_vectors(np.random.default_rng(3).bytes(4096)),
        _reads_and_index,
        "works",
        None,
    ),
    (
        "vectors-truncated",
        "the FAISS file is cut short (rebuilt)",
        _damage_vectors(b"IxM2"),
        _reads_and_index,
        "works",
        None,
    ),
    ("vectors-dir-read", "the FAISS file is a folder: reads work", _damage_vectors(None), _reads, "works",
     None),
    (
        "vectors-dir-index",
        "the FAISS file is a folder: index refuses",
        _damage_vectors(None),
        lambda tmp, lib: [("index", tmp / "sounds", "--db", lib)],
        "refused",
        "cannot write the vector index",
    ),
    (
        "lock-dir",
        "LIB/lock is a folder (index refuses, reads work)",
        lambda tmp: (indexed_library(tmp) / "lock").unlink() or (tmp / "lib" / "lock").mkdir() or tmp / "lib",
        lambda tmp, lib: [("index", tmp / "sounds", "--db", lib)],
        "refused",
        "cannot write to the library",
    ),
    (
        "db-path-is-file",
        "--db names a regular file",
        lambda tmp: (_fresh_sounds(tmp).write_text("x"), tmp / "lib")[1],
        lambda tmp, lib: [("index", tmp / "sounds", "--db", lib), ("search", "--db", lib, "a")],
        "refused",
        None,
    ),
    (
        "db-foreign-folder",
        "--db names a folder of other files",
        lambda tmp: (_fresh_sounds(tmp), (tmp / "sounds" / "notes.txt").write_text("x"), tmp / "sounds")[2],
        lambda tmp, lib: [("index", tmp / "sounds", "--db", lib)],
        "refused",
        "not an atae library",
    ),
    (
        "model-removed",
        "the model the library was indexed with is deleted",
        lambda tmp: _model_library(tmp, lambda run: shutil.rmtree(run)),
        lambda tmp, lib: [("search", "--db", lib, "high")],
        "refused",
        "missing",
    ),
    (
        "model-changed",
        "the model folder changed after indexing",
        lambda tmp: _model_library(
            tmp,
            lambda run: (run / "config.json").write_text((run / "config.json").read_text() + "\n"),
        ),
        lambda tmp, lib: [("search", "--db", lib, "high")],
        "refused",
        "changed since the library was indexed",
    ),
    (
        "index-missing-root",
        "index a folder that does not exist",
        lambda tmp: indexed_library(tmp),
        lambda tmp, lib: [("index", tmp / "nowhere", "--db", lib)],
        "refused",
        None,
    ),
]


def _model_library(tmp: Path, damage=None) -> Path:
    """A library indexed with a model whose adapters are the identity on the fake towers (so the words
    'low', 'mid', 'high' find their tones), then ``damage(run)``."""
    import torch

    from atae.model import AlignedModel
    from library_fakes import BandTower, WordTower

    m = AlignedModel(BandTower().info, WordTower().info, hidden=16, out_dim=16)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.eye(16) if p.ndim == 2 else torch.zeros_like(p))
    m.save(tmp / "run")
    d = tmp / "sounds"
    for name, f in FREQS.items():
        write_tone(d / f"{name}.wav", f)
    code, out, tb = cli("index", d, "--db", tmp / "lib", "--model", tmp / "run")
    assert code == 0, out + tb
    if damage is not None:
        damage(tmp / "run")
    return tmp / "lib"


# --- other entry points: extract ---------------------------------------------------------------


def extract_case(rows: str, expect: str, needle: str) -> Callable[[Path], Outcome]:
    def run(tmp: Path) -> Outcome:
        d = tmp / "audio"
        write_tone(d / "low.wav", FREQS["low"])
        csv = tmp / "caps.csv"
        csv.write_bytes(rows.encode("latin-1") if isinstance(rows, str) else rows)
        code, out, tb = cli(
            "extract",
            "--csv",
            csv,
            "--audio-dir",
            d,
            "--out",
            tmp / "feats",
            "--audio-encoder",
            "bands",
            "--text-encoder",
            "words",
            "--no-progress",
        )
        if expect == "refused":
            o = refused(code, out, tb, tmp)
            return Outcome(o.handled and needle in out, o.message, o.detail)
        line = next((x for x in out.splitlines() if needle in x), "")
        return Outcome(code == 0 and no_crash(code, out, tb) and bool(line), short(line, tmp), out + tb)

    return run


EXTRACT = [
    (
        "csv-no-columns",
        "captions CSV without the file_name column",
        "name,text\nlow.wav,a hum\n",
        "refused",
        "missing columns",
    ),
    (
        "csv-missing-audio",
        "a CSV row whose audio file is missing",
        "file_name,caption_1\nlow.wav,a hum\ngone.wav,nothing\n",
        "works",
        "gone.wav",
    ),
    (
        "csv-empty-caption",
        "a CSV row with an empty caption",
        "file_name,caption_1,caption_2\nlow.wav,a hum,\n",
        "works",
        "empty",
    ),
    (
        "csv-latin1",
        "a CSV that is not UTF-8",
        "file_name,caption_1\nlow.wav,un caf\xe9 bruyant\n",
        "works",
        "cached: 1 clips",
    ),
    (
        "csv-control-name",
        "a CSV naming a file with terminal controls",
        'file_name,caption_1\nlow.wav,a hum\n"\x1b]2;x\x07a.wav",a hum\n',
        "works",
        "\\x1b]2;x\\x07a.wav",
    ),
    ("csv-empty", "an empty CSV", "", "refused", "empty"),
]


# --- HTTP --------------------------------------------------------------------------------------------------

LOCAL = "http://127.0.0.1:8000"


def http_case(
    request: Callable, expect: int | tuple, needle: str | None = None
) -> Callable[[Path], Outcome]:
    """``request(client, tmp)`` -> response; handled when the status is ``expect`` and an error is JSON
    {error, fix}, never a 500 or a traceback."""

    def run(tmp: Path) -> Outcome:
        from fastapi.testclient import TestClient

        from atae.library import Library
        from atae.server.app import create_app

        lib_dir = _model_library(tmp)  # text search works, so each case tests what it names
        with (
            Library.open(lib_dir) as lib,
            TestClient(
                create_app(lib, max_upload_bytes=3_000_000), raise_server_exceptions=False, base_url=LOCAL
            ) as c,
        ):
            r = request(c, tmp)
        want = expect if isinstance(expect, tuple) else (expect,)
        ok = r.status_code in want and "Traceback" not in r.text
        msg = f"{r.status_code}"
        if r.status_code >= 400:
            try:
                body = r.json()
                ok = ok and bool(body.get("error"))
                msg += f" {body['error']}"[:140]
            except ValueError:
                ok = False
        if needle is not None:
            ok = ok and needle in r.text
        return Outcome(ok, msg.replace(str(tmp), "DIR"), r.text[:2000])

    return run


def _upload(name: str, data: bytes, **headers):
    return lambda c, tmp: c.post("/api/search", files={"file": (name, data, "audio/wav")}, headers=headers)


def _flac_hour() -> bytes:
    rate = 1000
    t = np.arange(3600 * rate) / rate
    x = (0.3 * np.sin(2 * np.pi * np.where(t < 30, 400.0, 125.0) * t)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="FLAC")
    return buf.getvalue()


def _wav_file_bytes(rate, seconds) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(rate * seconds), np.float32), rate, format="WAV")
    return buf.getvalue()


HTTP = [
    ("id-superscript", "GET /api/audio/² (a Unicode digit)", lambda c, t: c.get("/api/audio/²"), 404),
    ("id-arabic", "GET /api/audio/١ (Arabic-Indic one)", lambda c, t: c.get("/api/audio/١"), 404),
    (
        "id-fullwidth",
        "GET /api/waveform/１.png (fullwidth one)",
        lambda c, t: c.get("/api/waveform/１.png"),
        404,
    ),
    ("id-waveform-sup", "GET /api/waveform/².png", lambda c, t: c.get("/api/waveform/².png"), 404),
    ("id-negative", "GET /api/audio/-1", lambda c, t: c.get("/api/audio/-1"), 404),
    ("id-huge", "GET /api/audio/ with a 40-digit id", lambda c, t: c.get("/api/audio/" + "9" * 40), 404),
    ("id-float", "GET /api/audio/1.0", lambda c, t: c.get("/api/audio/1.0"), 404),
    ("id-nul", "GET /api/audio/1%00", lambda c, t: c.get("/api/audio/1%00"), 404),
    (
        "traversal",
        "GET /api/audio/..%2F..%2Fetc%2Fpasswd",
        lambda c, t: c.get("/api/audio/..%2F..%2Fetc%2Fpasswd"),
        404,
    ),
    (
        "range-bogus",
        "Range: bytes=abc on an audio file",
        lambda c, t: c.get("/api/audio/1", headers={"Range": "bytes=abc"}),
        (200, 206, 400, 416),
    ),
    (
        "range-beyond",
        "Range beyond the end of the file",
        lambda c, t: c.get("/api/audio/1", headers={"Range": "bytes=99999999-"}),
        416,
    ),
    (
        "host-rebinding",
        "Host: attacker.example (DNS rebinding)",
        lambda c, t: c.get("/api/search", params={"q": "low"}, headers={"Host": "attacker.example:8000"}),
        400,
        "--allow-host",
    ),
    (
        "host-userinfo",
        "Host: 127.0.0.1@attacker.example",
        lambda c, t: c.get("/api/stats", headers={"Host": "127.0.0.1@attacker.example"}),
        400,
    ),
    (
        "host-suffix",
        "Host: 127.0.0.1.attacker.example",
        lambda c, t: c.get("/api/stats", headers={"Host": "127.0.0.1.attacker.example"}),
        400,
    ),
    (
        "host-long",
        "a 10,000-character Host",
        lambda c, t: c.get("/api/stats", headers={"Host": "a" * 10000}),
        400,
    ),
    (
        "origin-post",
        "POST from Origin: http://attacker.example",
        lambda c, t: _upload("q.wav", _wav_file_bytes(SR, 1), Origin="http://attacker.example")(c, t),
        403,
    ),
    (
        "origin-null",
        "POST from Origin: null (sandboxed page)",
        lambda c, t: _upload("q.wav", _wav_file_bytes(SR, 1), Origin="null")(c, t),
        403,
    ),
    (
        "fetch-cross-site",
        "no-cors GET /api/audio/1 from another site (Sec-Fetch-Site)",
        lambda c, t: c.get(
            "/api/audio/1", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}
        ),
        403,
    ),
    (
        "upload-1hz",
        "upload of a WAV claiming 1 Hz",
        lambda c, t: _upload("q.wav", wav_header(1, 1, 16, 160000) + b"\0" * 160000)(c, t),
        400,
        "1 Hz",
    ),
    (
        "upload-hour",
        "upload of 60 minutes of FLAC (uses its first 30 s)",
        lambda c, t: _upload("hour.flac", _flac_hour())(c, t),
        200,
    ),
    ("upload-text", "upload of text named .wav", lambda c, t: _upload("q.wav", b"hello" * 100)(c, t), 400),
    ("upload-empty", "upload of 0 bytes", lambda c, t: _upload("q.wav", b"")(c, t), 400),
    (
        "upload-control-name",
        "upload named with terminal controls",
        lambda c, t: _upload("\x1b]2;x\x07.wav", b"junk" * 10)(c, t),
        400,
    ),
    (
        "upload-no-file",
        "multipart POST without a file field",
        lambda c, t: c.post("/api/search", data={"k": "3"}),
        400,
    ),
    (
        "upload-not-multipart",
        "POST with a JSON body",
        lambda c, t: c.post("/api/search", json={"q": "x"}),
        400,
    ),
    (
        "upload-two-files",
        "POST with two files",
        lambda c, t: c.post(
            "/api/search",
            files=[("file", ("a.wav", b"1", "audio/wav")), ("file", ("b.wav", b"2", "audio/wav"))],
        ),
        400,
    ),
    (
        "upload-too-big",
        "a 4 MB upload (limit 3 MB)",
        lambda c, t: _upload("big.wav", b"\0" * 4_000_000)(c, t),
        413,
    ),
    (
        "upload-lying-length",
        "Content-Length claims 10 GB",
        lambda c, t: c.post(
            "/api/search",
            content=b"x",
            headers={"content-length": str(10**10), "content-type": "multipart/form-data; boundary=x"},
        ),
        413,
    ),
    (
        "query-controls",
        "a query holding terminal controls",
        lambda c, t: c.get("/api/search", params={"q": "\x1b]2;x\x07 low"}),
        (200, 400),
    ),
    (
        "query-huge-k",
        "k=10^30",
        lambda c, t: c.get("/api/search", params={"q": "low", "k": "1" + "0" * 30}),
        400,
    ),
    (
        "query-bad-scorer",
        "scorer=../../etc",
        lambda c, t: c.get("/api/search", params={"q": "low", "scorer": "../../etc"}),
        400,
    ),
    (
        "query-nan-duration",
        "min_duration=nan",
        lambda c, t: c.get("/api/search", params={"q": "low", "min_duration": "nan"}),
        (200, 400),
    ),
    (
        "query-bad-glob",
        "glob='[' (an unbalanced pattern)",
        lambda c, t: c.get("/api/search", params={"q": "low", "glob": "["}),
        (200, 400),
    ),
    ("method-put", "PUT /api/search", lambda c, t: c.put("/api/search"), 405),
]

