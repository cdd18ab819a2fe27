"""Adapters against a naive per-element implementation; save/load round trip and damaged model folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from atae.errors import ModelError
from atae.model import Adapter, AlignedModel
from atae.towers.base import TowerInfo


def _infos(fa=12, ft=8):
    return (TowerInfo("fake-audio", "audio", fa, "a" * 64, 16000, {"window_s": None}),
            TowerInfo("fake-text", "text", ft, None, None, {"layer": -2}))


def _naive(adapter: Adapter, z, mask):
    """Seed as written: Linear -> ReLU -> Linear on every element, then mean over real elements only."""
    out = []
    for b in range(z.shape[0]):
        elems = [adapter.fc2(torch.relu(adapter.fc1(z[b, i]))) for i in range(z.shape[1]) if mask[b, i]]
        out.append(torch.stack(elems).sum(0) / len(elems))
    return torch.stack(out)


def test_adapter_equals_per_element_mlp_with_masked_mean():
    torch.manual_seed(0)
    ad = Adapter(6, hidden=16, out_dim=4).double()
    z = torch.randn(3, 5, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    want = _naive(ad, z, mask)
    torch.testing.assert_close(ad(z, mask), want, rtol=1e-12, atol=1e-12)
    # padding never enters: garbage in padded slots changes nothing
    z2 = z.clone()
    z2[~mask] = 1e6
    torch.testing.assert_close(ad(z2, mask), want, rtol=1e-12, atol=1e-12)
    # packed form: rows of the real elements only
    rows = z[mask]
    seg = torch.repeat_interleave(torch.arange(3), mask.sum(1))
    torch.testing.assert_close(ad.forward_packed(rows, seg, 3, mask.sum(1)), want, rtol=1e-12, atol=1e-12)


def test_adapter_rejects_wrong_feature_size():
    with pytest.raises(ModelError, match=r"\(B, T, 6\)"):
        Adapter(6)(torch.zeros(1, 2, 7))


def test_embeddings_shapes_and_normalize():
    fa, ft = _infos()
    m = AlignedModel(fa, ft, hidden=32, out_dim=16)
    ea = m.embed_audio(torch.randn(4, 1, 12), torch.ones(4, 1, dtype=torch.bool))
    et = m.embed_text(torch.randn(2, 7, 8), torch.ones(2, 7, dtype=torch.bool), normalize=True)
    assert ea.shape == (4, 16) and et.shape == (2, 16)
    torch.testing.assert_close(et.norm(dim=1), torch.ones(2))


def test_save_load_round_trip(tmp_path):
    fa, ft = _infos()
    torch.manual_seed(1)
    m = AlignedModel(fa, ft, hidden=32, out_dim=16, extras={"hybrid_weight": 0.25})
    m.train_summary = {"recipe": "atae", "best_epoch": 3}
    m.save(tmp_path / "run")
    back = AlignedModel.load(tmp_path / "run")
    assert back.audio_info.to_dict() == fa.to_dict() and back.text_info.to_dict() == ft.to_dict()
    assert back.extras == {"hybrid_weight": 0.25} and back.train_summary["best_epoch"] == 3
    z, mask = torch.randn(3, 4, 8), torch.ones(3, 4, dtype=torch.bool)
    torch.testing.assert_close(back.embed_text(z, mask), m.embed_text(z, mask))
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["format_version"] == 1 and cfg["audio_tower"]["dim"] == 12 and cfg["out_dim"] == 16
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_caption_reference_round_trips_as_float16(tmp_path):
    fa, ft = _infos()
    m = AlignedModel(fa, ft, hidden=8, out_dim=4)
    assert AlignedModel.load(m.save(tmp_path / "none")).caption_reference is None
    ref = np.random.default_rng(0).standard_normal((7, 4)).astype(np.float32)
    m.caption_reference = ref
    back = AlignedModel.load(m.save(tmp_path / "ref"))
    np.testing.assert_array_equal(back.caption_reference, ref.astype(np.float16).astype(np.float32))
    m.caption_reference = ref[:, :3]  # not the model's output width: refused on load, never guessed
    m.save(tmp_path / "bad")
    with pytest.raises(ModelError, match="caption_reference"):
        AlignedModel.load(tmp_path / "bad")


def test_encode_is_the_masked_mean_embedding_at_unit_length():
    fa, ft = _infos()
    torch.manual_seed(3)
    m = AlignedModel(fa, ft, hidden=16, out_dim=8)
    rng = np.random.default_rng(1)
    seqs = [rng.standard_normal((n, 8)).astype(np.float32) for n in (1, 4, 2)]
    got = m.encode_text(seqs, batch=2)
    for s, g in zip(seqs, got, strict=True):
        e = m.embed_text(torch.from_numpy(s)[None], normalize=True)[0].detach().numpy()
        np.testing.assert_allclose(g, e, atol=1e-6)
    with pytest.raises(ModelError, match="sequences"):
        m.encode_audio([np.zeros((2, 5), np.float32)])


def test_load_errors_name_the_problem(tmp_path):
    fa, ft = _infos()
    with pytest.raises(ModelError, match="not found"):
        AlignedModel.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json is missing"):
        AlignedModel.load(tmp_path / "empty")
    d = AlignedModel(fa, ft, hidden=8, out_dim=4).save(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())

    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="corrupt"):
        AlignedModel.load(d)
    (d / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(ModelError, match="version 99"):
        AlignedModel.load(d)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "adapters.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="does not match"):
        AlignedModel.load(d)
    (d / "adapters.safetensors").unlink()
    with pytest.raises(ModelError, match="missing"):
        AlignedModel.load(d)
