"""EfficientAT MobileNetV3: front end against a float64 numpy version, architecture, golden parity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from atae.errors import AudioError, WeightsError
from atae.towers import efficientat as E

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def random_state():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in E.MN(0.4).state_dict().items()}


def _numpy_frontend(x: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Float64 reference: pre-emphasis, symmetric Hann 800 centred in 1024, reflect pad, rFFT power."""
    x = x.astype(np.float64)
    y = x[1:] - 0.97 * x[:-1]
    n = np.arange(800)
    win = np.zeros(1024)
    win[112:912] = 0.5 - 0.5 * np.cos(2 * np.pi * n / 799)
    pad = np.pad(y, 512, mode="reflect")
    frames = np.stack([pad[i * 320: i * 320 + 1024] for i in range(1 + len(y) // 320)])
    power = np.abs(np.fft.rfft(frames * win, axis=1)) ** 2
    return (np.log(basis.astype(np.float64) @ power.T + 1e-5) + 4.5) / 5


def _kaldi_float64() -> np.ndarray:
    mel = lambda f: 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)  # noqa: E731
    edges = np.linspace(mel(0.0), mel(15000.0), 130)
    m = mel(np.arange(512) * 32000 / 1024)
    up = (m[None] - edges[:-2, None]) / (edges[1:-1, None] - edges[:-2, None])
    down = (edges[2:, None] - m[None]) / (edges[2:, None] - edges[1:-1, None])
    return np.maximum(0.0, np.minimum(up, down))


def test_kaldi_mel_banks_formula():
    got = E.kaldi_mel_banks()
    assert got.shape == (128, 512) and got.dtype == np.float32
    assert np.allclose(got, _kaldi_float64(), atol=2e-5)
    assert got[:, 481:].max() == 0.0  # bins above 15 kHz (k > 480) are unused; k = 480 is the edge itself
    assert got[:, 480].max() < 1e-4  # exactly 0 in exact arithmetic, float32 rounding leaves ~1e-5


def test_front_end_matches_float64_numpy():
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal(32000)).astype(np.float32)
    fe = E.MelFrontEnd()
    with torch.no_grad():
        got = fe(torch.from_numpy(x)[None])[0, 0].numpy()
    want = _numpy_frontend(x, fe.mel_basis.numpy())
    assert got.shape == want.shape == (128, 1 + (32000 - 1) // 320)
    assert np.abs(got - want).max() < 2e-4


def test_make_divisible_and_widths():
    assert [E.make_divisible(v) for v in (6.4, 9.6, 28.8, 268.8, 73.6)] == [8, 16, 32, 272, 72]
    dims = {s: (E.MN(E.WIDTHS[s]).feature_dim, E.MN(E.WIDTHS[s]).hidden_dim) for s in ("mn04", "mn10")}
    assert dims == {"mn04": (384, 512), "mn10": (960, 1280)}


def test_forward_shapes_any_length(random_state):
    net = E.MN(0.4).eval()
    net.load_state_dict(random_state)
    for frames in (32, 101, 500):
        with torch.no_grad():
            out = net(torch.randn(2, 1, 128, frames))
        assert out["features"].shape == (2, 384) and out["mlp_hidden"].shape == (2, 512)
        assert out["logits"].shape == (2, 527)


def test_tower_policy_and_errors(random_state):
    t = E.EfficientATTower(random_state, embedding="mlp_hidden")
    assert t.dim == 512 and t.info.dim == 512 and t.info.name == "efficientat-mn04"
    short = np.random.default_rng(1).standard_normal(3000).astype(np.float32) * 0.1
    e = t.encode(short)
    padded = t.encode(np.concatenate([short, np.zeros(E.MIN_SAMPLES - 3000, np.float32)]))
    assert np.allclose(e.seq, padded.seq) and np.allclose(e.times, [[0, 3000 / 32000]])
    out = t.run_batch(padded_wave := np.pad(short, (0, E.MIN_SAMPLES - 3000))[None])
    assert np.allclose(e.tags[0], 1 / (1 + np.exp(-out["logits"][0].astype(np.float64))), atol=1e-6)
    assert padded_wave.shape == (1, E.MIN_SAMPLES)
    w = E.EfficientATTower(random_state, window_s=1.0)
    enc = w.encode_many([np.zeros(160000, np.float32), np.ones(32000, np.float32) * 0.01])
    assert [x.seq.shape for x in enc] == [(5, 384), (1, 384)]
    with pytest.raises(AudioError):
        t.encode(np.zeros((100, 2), np.float32))
    with pytest.raises(ValueError):
        E.EfficientATTower(random_state, embedding="logits")
    with pytest.raises(ValueError):
        E.EfficientATTower(random_state, size="mn99")


def test_wrong_width_and_bad_files(random_state, tmp_path):
    with pytest.raises(WeightsError, match="wrong shapes"):
        E.EfficientATTower(random_state, size="mn05")
    p = tmp_path / "mn04.pt"
    torch.save(random_state, p)
    assert E.EfficientATTower(p).info.weights_sha256 is not None
    t = tmp_path / "trunc.pt"
    t.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(WeightsError):
        E.EfficientATTower(t)
    cnn = tmp_path / "cnn.pt"
    torch.save({"fc1.weight": torch.zeros(2, 2)}, cnn)
    with pytest.raises(WeightsError, match="missing"):
        E.EfficientATTower(cnn)


# ------------------------------------------------------------------------------------------ golden
@pytest.fixture(scope="module")
def golden(shared):
    d = shared / "golden" / "efficientat_mn04"
    weights = shared / "data" / "weights" / "efficientat_mn04" / "mn04_as_mAP_432.pt"
    return d, np.load(d / "efficientat_mn04_golden.npz"), E.EfficientATTower(weights)


@pytest.mark.golden
def test_golden_keys_and_mel_basis(golden):
    d, z, tower = golden
    keys = json.loads((d / "keys.json").read_text())
    sd = tower.net.state_dict()
    assert [k["key"] for k in keys] == list(sd)  # same names, same order
    assert all(list(sd[k["key"]].shape) == k["shape"] for k in keys)
    assert np.allclose(tower.frontend.mel_basis.numpy(), z["mel_basis"], atol=1e-6)


@pytest.mark.golden
def test_golden_outputs_all_clips(golden):
    d, z, tower = golden
    top5 = json.loads((d / "top5.json").read_text())
    for j in range(6):
        wave = z[f"wave32k_{j}"]
        with torch.no_grad():
            mel = tower.frontend(torch.from_numpy(wave)[None])
        assert np.allclose(mel[0, 0].numpy(), z[f"mel_{j}"], atol=2e-4)
        out = tower.run_batch(wave[None])
        for k in ("logits", "features", "mlp_hidden"):
            assert np.allclose(out[k][0], z[f"{k}_{j}"], atol=1e-4, rtol=1e-4), (j, k)
        got_top = np.argsort(-out["tags"][0])[:5]
        assert got_top.tolist() == z[f"top5_idx_{j}"].tolist()
        assert got_top.tolist() == [t["audioset_index"] for t in top5[j]["top5"]]
        enc = tower.encode(wave)
        assert np.allclose(enc.seq[0], z[f"features_{j}"], atol=1e-4, rtol=1e-4)
        assert math.isclose(float(enc.tags[0].max()), top5[j]["top5"][0]["prob"], abs_tol=1e-5)
