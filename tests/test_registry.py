"""Tower registry: names, lazy construction, default pair selection."""

from __future__ import annotations

import sys
import types

import pytest

from atae.errors import AtaeError
from atae.towers import registry as R


class _Dummy:
    def __init__(self, weights=None, **kw):
        self.weights = weights
        self.kw = kw


@pytest.fixture
def dummy_module(monkeypatch):
    mod = types.ModuleType("atae_test_dummy_towers")
    mod.Dummy = _Dummy
    monkeypatch.setitem(sys.modules, "atae_test_dummy_towers", mod)
    return "atae_test_dummy_towers:Dummy"


def test_names():
    assert {"aisfx", "cnn14", "efficientat-mn04"} <= set(R.AUDIO_TOWERS)
    assert {f"efficientat-mn{s}" for s in ("04", "05", "10", "20", "30", "40")} <= set(R.AUDIO_TOWERS)
    assert set(R.TEXT_TOWERS) == {"minilm", "distilroberta-base"}
    for target in [*R.AUDIO_TOWERS.values(), *R.TEXT_TOWERS.values()]:
        assert target.startswith("atae.towers.") and ":" in target


def test_listing_names_imports_no_tower_module():
    # listing names (e.g. for --help choices) must not import torch or any tower implementation
    import subprocess

    code = ("import sys, atae.towers.registry as r; r.AUDIO_TOWERS; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('atae.towers.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['atae.towers.registry']"
    assert R.AUDIO_TOWER_OPTIONS["efficientat-mn10"] == {"size": "mn10"}


def test_unknown_names_list_valid_ones():
    with pytest.raises(AtaeError) as e:
        R.get_audio_tower("vggish")
    assert "cnn14" in str(e.value) and "efficientat-mn04" in str(e.value)
    with pytest.raises(AtaeError) as e:
        R.get_text_tower("no-such-model-or-dir")
    assert "distilroberta-base" in str(e.value)


def test_get_audio_tower_passes_size_and_weights(monkeypatch, dummy_module):
    monkeypatch.setitem(R.AUDIO_TOWERS, "efficientat-mn20", dummy_module)
    t = R.get_audio_tower("efficientat-mn20", "w.pt", window_s=2.0)
    assert isinstance(t, _Dummy) and t.weights == "w.pt" and t.kw == {"size": "mn20", "window_s": 2.0}


def test_get_text_tower_name_and_directory(monkeypatch, dummy_module, tmp_path):
    monkeypatch.setitem(R.TEXT_TOWERS, "minilm", dummy_module)
    t = R.get_text_tower("minilm", weights="/x")
    assert t.weights == "/x" and t.kw == {"model": "minilm"}
    real = sys.modules.get("atae.towers.hf_text")
    fake = types.ModuleType("atae.towers.hf_text")
    fake.HFTextTower = lambda model, **kw: ("hf", model, kw)
    monkeypatch.setitem(sys.modules, "atae.towers.hf_text", fake)
    assert R.get_text_tower(str(tmp_path), layer=-1) == ("hf", str(tmp_path), {"layer": -1})
    if real is not None:
        assert sys.modules["atae.towers.hf_text"] is fake


def test_default_towers(monkeypatch, tmp_path):
    monkeypatch.setenv("ATAE_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert R.default_towers() == ("aisfx", "minilm")
    f = tmp_path / "weights" / "cnn14" / "Cnn14_mAP=0.431.pth"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"x")
    assert R.default_towers() == ("aisfx", "minilm")  # text weights still missing
    d = tmp_path / "weights" / "distilroberta-base"
    d.mkdir(parents=True)
    for name in ("config.json", "vocab.json", "merges.txt", "model.safetensors"):
        (d / name).write_text("{}")
    assert R.default_towers() == ("cnn14", "distilroberta-base")
