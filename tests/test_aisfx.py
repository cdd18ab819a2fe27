"""aiSFX tower: golden parity (time-major), front end checked by a second method, sequence policy,
strict and safe checkpoint loading."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from atae.errors import AtaeError, WeightsError
from atae.towers import aisfx
from atae.towers.aisfx import AisfxTower, block_starts, load_checkpoint, logmel, mel_filterbank

SR = 44100


@pytest.fixture(scope="module")
def tower() -> AisfxTower:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        return AisfxTower()
    except AtaeError as exc:
        pytest.skip(f"aisfx weights not installed: {exc}")


def _noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


# ------------------------------------------------------------------------------------------- golden
@pytest.mark.golden
def test_golden_timemajor(shared, tower):
    g = np.load(shared / "golden" / "aisfx" / "aisfx_golden.npz")
    for j in range(6):
        wave = g[f"wave44k_{j}"]
        np.testing.assert_allclose(logmel(wave).T, g[f"logmel_{j}"], atol=1e-5, rtol=0)
        enc = tower.encode(wave)
        np.testing.assert_allclose(enc.seq, g[f"timemajor_embeddings_{j}"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(enc.seq.mean(axis=0), g[f"timemajor_mean_{j}"], atol=1e-4, rtol=0)


@pytest.mark.golden
def test_golden_asis_is_the_upstream_bug_not_ours(shared, tower):
    """The package's librosa path blocks the mel axis (one block per clip); we do not reproduce that."""
    g = np.load(shared / "golden" / "aisfx" / "aisfx_golden.npz")
    for j in range(6):
        enc = tower.encode(g[f"wave44k_{j}"])
        assert g[f"asis_embeddings_{j}"].shape[0] == 1 and enc.seq.shape[0] == 3
        assert np.abs(enc.seq.mean(axis=0) - g[f"asis_mean_{j}"]).max() > 1e-2
        # ...but the as-is numbers are the same network fed the (mel, time) block, which checks the net alone
        spec = g[f"logmel_{j}"] / np.float32(aisfx.SPEC_MAX)  # (96, 216): mel rows treated as time
        block = np.concatenate([spec, np.zeros((4, spec.shape[1]), np.float32)])[None]
        np.testing.assert_allclose(tower.embed_blocks(block), g[f"asis_embeddings_{j}"], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------- front end
def test_mel_filterbank_by_hand():
    fb = mel_filterbank()
    assert fb.shape == (96, 1025) and fb.dtype == np.float32
    assert np.all(fb >= 0)
    np.testing.assert_allclose(fb.sum(axis=1), 1.0, rtol=1e-5)
    # HTK mel: the band centres are equally spaced on 2595*log10(1+f/700) between 0 and 22050 Hz
    top = 2595 * np.log10(1 + 22050 / 700)
    centres = 700 * (10 ** (np.linspace(0, top, 98)[1:-1] / 2595) - 1)
    bin_hz = 22050 / 1024
    peaks = np.argmax(fb, axis=1) * bin_hz
    assert np.all(np.abs(peaks - centres) <= bin_hz)


def test_logmel_matches_torch_stft():
    """Second method: torch.stft (periodic Hann, centred, zero padding) -> power -> mel -> log."""
    wave = _noise(3.0, seed=1)
    wave[:1000] *= 3  # peak somewhere specific
    y = torch.from_numpy(wave.astype(np.float64) / np.abs(wave).max())
    spec = torch.stft(y, 2048, 1024, window=torch.hann_window(2048, periodic=True, dtype=torch.float64),
                      center=True, pad_mode="constant", return_complex=True)
    power = spec.abs() ** 2  # (1025, frames)
    mel = torch.from_numpy(mel_filterbank().astype(np.float64)) @ power
    expected = torch.log10(mel * 10000 + 1).T.numpy()
    got = logmel(wave)
    assert got.shape == (1 + wave.shape[0] // 1024, 96) == expected.shape
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("frames,expected", [(216, [0, 50, 100]), (100, [0]), (150, [0, 50]), (60, [0]),
                                             (200, [0, 50, 100]), (250, [0, 50, 100, 150])])
def test_block_rule(frames, expected):
    # ceil((L-100)/50 + 1), minus one if (L-100) is not a multiple of 50, at least 1 (by hand)
    assert block_starts(frames) == expected


# ---------------------------------------------------------------------------------- sequence policy
def test_blocks_and_times(tower):
    wave = _noise(10.0)
    enc = tower.encode(wave)
    # 431 frames -> ceil(331/50+1)=8, partial -> 7 blocks
    assert enc.seq.shape == (7, 512) and enc.seq.dtype == np.float32
    starts = 50 * 1024 * np.arange(7) / SR
    np.testing.assert_allclose(enc.times[:, 0], starts)
    np.testing.assert_allclose(enc.times[:, 1], np.minimum(starts + 100 * 1024 / SR, 10.0))
    assert enc.tags is None and not tower.has_tags


def test_short_clip_is_zero_padded(tower):
    wave = _noise(1.0, seed=2)
    enc = tower.encode(wave)
    padded = np.concatenate([wave, np.zeros(tower.min_samples - wave.shape[0], np.float32)])
    assert 1 + tower.min_samples // 1024 == 100  # exactly one block
    np.testing.assert_allclose(enc.seq, tower.encode(padded).seq, atol=1e-6)
    assert enc.seq.shape == (1, 512)
    np.testing.assert_allclose(enc.times, [[0.0, 1.0]])
    assert tower.encode(np.zeros(10, np.float32)).seq.shape == (1, 512)  # silence is fine


def test_encode_many_equals_encode(tower):
    waves = [_noise(3.0, 3), _noise(1.5, 4), _noise(6.0, 5)]
    many = tower.encode_many(waves)
    for w, e in zip(waves, many, strict=True):
        one = tower.encode(w)
        np.testing.assert_allclose(e.seq, one.seq, atol=1e-4)  # batch size may change summation order
        np.testing.assert_array_equal(e.times, one.times)


def test_window_mode_averages_blocks(tower):
    wave = _noise(10.0, seed=6)
    blocks = tower.encode(wave)
    win = AisfxTower(window_s=5.0).encode(wave)
    np.testing.assert_allclose(win.times, [[0.0, 5.0], [5.0, 10.0]])
    # block starts 0, 1.16, 2.32, 3.48, 4.64 | 5.80, 6.97
    np.testing.assert_allclose(win.seq[0], blocks.seq[:5].mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(win.seq[1], blocks.seq[5:].mean(axis=0), atol=1e-6)


def test_info(tower):
    info = tower.info
    assert (info.name, info.kind, info.dim, info.sample_rate) == ("aisfx", "audio", 512, 44100)
    assert info.weights_sha256 == hashlib.sha256(tower.weights_path.read_bytes()).hexdigest()
    assert AisfxTower(window_s=5.0).info.key() != info.key()


# ------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_loads_strictly(tower):
    state = load_checkpoint(tower.weights_path)
    assert len(state) == 48 and all(k.startswith("embedding_net.conv_block") for k in state)


def _saved(tmp_path, obj, name="ck.pth"):
    p = tmp_path / name
    torch.save(obj, p)
    return p


def test_wrong_model_checkpoint(tmp_path):
    p = _saved(tmp_path, torch.nn.Linear(4, 2).state_dict())
    with pytest.raises(WeightsError, match="does not match") as ei:
        load_checkpoint(p)
    assert "ck.pth" in str(ei.value)


def test_missing_and_extra_keys(tmp_path, tower):
    state = load_checkpoint(tower.weights_path)
    missing = {k: v for k, v in state.items() if "conv_block4.bn2" not in k}
    with pytest.raises(WeightsError, match="missing"):
        load_checkpoint(_saved(tmp_path, (missing, {}), "missing.pth"))
    extra = dict(state, **{"embedding_net.conv_block5.conv1.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="conv_block5"):
        load_checkpoint(_saved(tmp_path, (extra, {}), "extra.pth"))
    heads = dict(state, **{"fc.0.0.weight": torch.zeros(256, 512), "fc.3.4.bias": torch.zeros(81)})
    assert len(load_checkpoint(_saved(tmp_path, (heads, {}), "heads.pth"))) == 48  # heads dropped


def test_truncated_checkpoint(tmp_path, tower):
    data = tower.weights_path.read_bytes()
    p = tmp_path / "cut.pth"
    p.write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match="cannot load"):
        load_checkpoint(p)


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_arbitrary_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.pth"
    torch.save({"x": _Evil()}, p)
    with pytest.raises(WeightsError, match="cannot load"):
        load_checkpoint(p)
    assert not (tmp_path / "PWNED").exists()
