"""CNN14: front end against independent formulas, golden parity, sequence policy, safe loading."""

from __future__ import annotations

import io
import json
import math
import pickle

import numpy as np
import pytest
import torch

from atae.errors import AudioError, WeightsError
from atae.towers import cnn14 as C

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def random_state():
    torch.manual_seed(0)
    net = C.Cnn14().eval()
    with torch.no_grad():  # non-trivial BN statistics so folding is exercised
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and m.num_features != C.N_MELS:
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.8, 1.2)
                m.bias.uniform_(-0.1, 0.1)
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def tower(random_state):
    return C.Cnn14Tower(random_state)


@pytest.fixture(scope="module")
def saved(random_state, tmp_path_factory):
    """The random weights as a plain state_dict file (320 MB: written once per module)."""
    p = tmp_path_factory.mktemp("cnn14") / "cnn14.pt"
    torch.save(random_state, p)
    return p


# ------------------------------------------------------------------------------ front end, no fixture
def test_slaney_mel_scale_known_points():
    # Slaney scale: 3 mels per 200 Hz below 1 kHz (so 1 kHz = 15 mel), log-spaced above (6.4x per 27 mel)
    assert C.hz_to_mel_slaney(1000.0) == pytest.approx(15.0)
    assert C.hz_to_mel_slaney(200.0) == pytest.approx(3.0)
    assert C.hz_to_mel_slaney(6400.0) == pytest.approx(15.0 + 27.0)
    f = np.array([0.0, 50.0, 999.0, 1000.0, 5000.0, 14000.0])
    assert np.allclose(C.mel_to_hz_slaney(C.hz_to_mel_slaney(f)), f)


def test_mel_filterbank_shape_peaks_and_area():
    w = C.mel_filterbank_slaney().astype(np.float64)  # (64, 513)
    assert w.shape == (64, 513) and (w >= 0).all()
    edges = C.mel_to_hz_slaney(np.linspace(C.hz_to_mel_slaney(50.0), C.hz_to_mel_slaney(14000.0), 66))
    freqs = np.arange(513) * 32000 / 1024
    # each triangle vanishes outside its edges and has area 1 in Hz (Slaney normalisation)
    for i in range(64):
        outside = (freqs <= edges[i]) | (freqs >= edges[i + 2])
        assert np.all(w[i, outside] == 0)
    wide = [i for i in range(64) if edges[i + 2] - edges[i] > 400]  # sampled finely enough to integrate
    areas = w[wide].sum(axis=1) * (32000 / 1024)
    assert np.allclose(areas, 1.0, rtol=0.03)


def test_power_spectrogram_equals_numpy_rfft():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(32000).astype(np.float32)
    net = C.Cnn14().eval()
    with torch.no_grad():
        got = net.spectrogram_extractor(torch.from_numpy(x)[None])[0, 0].numpy()
    pad = np.pad(x.astype(np.float64), 512, mode="reflect")
    n_frames = 1 + len(x) // 320
    frames = np.stack([pad[i * 320: i * 320 + 1024] for i in range(n_frames)])
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(1024) / 1024)
    want = np.abs(np.fft.rfft(frames * win, axis=1)) ** 2
    assert got.shape == want.shape == (n_frames, 513)
    assert np.allclose(got, want, rtol=1e-3, atol=1e-3 * want.max() * 1e-3)


def test_forward_outputs(random_state):
    net = C.Cnn14.from_state_dict(random_state)
    with torch.no_grad():
        out = net(torch.randn(2, 32000))
    assert out["embedding"].shape == (2, 2048) and (out["embedding"] >= 0).all()
    assert torch.allclose(out["clipwise_output"], torch.sigmoid(out["logits"]))
    assert out["logits"].shape == (2, 527)


def test_fast_path_matches_official_forward(random_state):
    net = C.Cnn14.from_state_dict(random_state)
    fast = C.FastCnn14(net).eval()
    x = torch.randn(2, 48000)
    with torch.no_grad():
        a, b = net(x), fast(x)
    for k in ("embedding", "logits", "clipwise_output"):
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), k


# --------------------------------------------------------------------------------- sequence policy
def test_whole_clip_and_short_clip_padding(tower, random_state):
    net = C.Cnn14.from_state_dict(random_state)
    rng = np.random.default_rng(2)
    short = (0.1 * rng.standard_normal(5000)).astype(np.float32)
    enc = tower.encode(short)
    assert enc.seq.shape == (1, 2048) and enc.tags.shape == (1, 527)
    assert np.allclose(enc.times, [[0.0, 5000 / 32000]])
    padded = np.concatenate([short, np.zeros(C.MIN_SAMPLES - 5000, np.float32)])
    with torch.no_grad():
        want = net(torch.from_numpy(padded)[None])
    assert np.allclose(enc.seq[0], want["embedding"][0].numpy(), atol=1e-4)
    assert np.allclose(enc.tags[0], want["clipwise_output"][0].numpy(), atol=1e-5)


def test_windows_and_batching_equal_individual(random_state):
    t = C.Cnn14Tower(random_state, window_s=1.0, hop_s=0.5)
    rng = np.random.default_rng(3)
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (56000, 32000, 20000)]
    many = t.encode_many(waves)
    assert [e.seq.shape[0] for e in many] == [3, 1, 1]  # 1.75 s: [0, 1), [0.5, 1.5), [0.75, 1.75)
    assert np.allclose(many[0].times[-1], [0.75, 1.75])  # last window aligned to the end
    net = C.Cnn14.from_state_dict(random_state)
    with torch.no_grad():
        second = net(torch.from_numpy(waves[0][16000:48000])[None])["embedding"][0].numpy()
    assert np.allclose(many[0].seq[1], second, atol=1e-4)  # window 1 = [0.5 s, 1.5 s)
    for w, e in zip(waves, many, strict=True):
        single = t.encode(w)
        assert np.allclose(single.seq, e.seq, atol=1e-5) and np.allclose(single.times, e.times)


def test_empty_clip_is_padded_silence(tower):
    e = tower.encode(np.zeros(0, np.float32))
    assert e.seq.shape == (1, 2048) and np.allclose(e.times, [[0.0, 0.0]])
    assert np.allclose(e.seq, tower.encode(np.zeros(C.MIN_SAMPLES, np.float32)).seq)


def test_bad_audio(tower):
    with pytest.raises(AudioError, match="mono"):
        tower.encode(np.zeros((32000, 2), np.float32))
    with pytest.raises(AudioError, match="NaN"):
        tower.encode(np.full(32000, np.nan, np.float32))
    with pytest.raises(ValueError):
        C.Cnn14Tower({}, window_s=0.1)


def test_info(tower, saved):
    assert tower.info.dim == 2048 and tower.info.sample_rate == 32000 and tower.info.weights_sha256 is None
    t = C.Cnn14Tower(saved)
    import hashlib

    assert t.info.weights_sha256 == hashlib.sha256(saved.read_bytes()).hexdigest()
    key = t.info.key()
    t.window_s, t._info = 2.0, None  # same weights, other sequence policy -> another cache key
    assert t.info.key() != key


# ---------------------------------------------------------------------------------------- loading
def _official_like(state):
    """The layout of Cnn14_mAP=0.431.pth: a dict whose sampler state holds numpy arrays and ints."""
    rng = np.random.default_rng(0)
    return {"iteration": 660000, "model": state,
            "sampler": {"indexes_per_class": [np.arange(5) + i for i in range(3)],
                        "queue": [np.int64(x) for x in rng.integers(0, 527, 10)],
                        "pointers_of_classes": [0] * 3}}


def test_loads_official_layout_and_dataparallel(tmp_path, random_state):
    p = tmp_path / "Cnn14_mAP=0.431.pth"
    torch.save(_official_like(random_state), p)  # numpy objects inside: the allowlist must take them
    st = C.load_cnn14_weights(p)
    assert torch.equal(st["fc1.weight"], random_state["fc1.weight"])
    dp = C.checkpoint_state_dict({"model": {"module." + k: v for k, v in random_state.items()}})
    assert set(dp) == set(random_state)


def test_loads_safetensors(tmp_path, random_state):
    from safetensors.torch import save_file

    small = {k: v.contiguous() for k, v in random_state.items() if not k.startswith(("conv_block5",
                                                                                      "conv_block6", "fc1"))}
    q = tmp_path / "cnn14.safetensors"
    save_file(small, str(q))
    with pytest.raises(WeightsError, match="conv_block5"):  # read fine, then checked like any file
        C.load_cnn14_weights(q)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_arbitrary_pickle_is_refused(tmp_path, random_state, capsys):
    p = tmp_path / "evil.pth"
    torch.save({"model": random_state, "extra": _Evil()}, p)
    with pytest.raises(WeightsError) as e:
        C.load_cnn14_weights(p)
    assert "print" in str(e.value)  # names the global it refused
    assert "pwned" not in capsys.readouterr().out


def test_bad_checkpoints_are_clear_errors(tmp_path, random_state, saved):
    d = dict(random_state)
    missing = {k: v for k, v in d.items() if k != "fc1.bias"}
    with pytest.raises(WeightsError, match="fc1.bias"):
        C.Cnn14Tower(missing)
    with pytest.raises(WeightsError, match="unexpected.*foo.weight"):
        C.Cnn14Tower({**d, "foo.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="fc_audioset.weight"):
        C.Cnn14Tower({**d, "fc_audioset.weight": torch.zeros(10, 2048), "fc_audioset.bias": torch.zeros(10)})
    other_rate = dict(d)
    other_rate["logmel_extractor.melW"] = d["logmel_extractor.melW"].roll(3, dims=1)
    with pytest.raises(WeightsError, match="melW"):
        C.Cnn14Tower(other_rate)
    trunc = tmp_path / "truncated.pth"
    with open(saved, "rb") as f:
        trunc.write_bytes(f.read(saved.stat().st_size // 2))
    with pytest.raises(WeightsError, match="truncated"):
        C.Cnn14Tower(trunc)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError):
        C.Cnn14Tower(garbage)
    other_model = tmp_path / "mn.pt"
    torch.save({"features.0.0.weight": torch.zeros(8, 1, 3, 3)}, other_model)
    with pytest.raises(WeightsError, match="missing"):
        C.Cnn14Tower(other_model)
    with pytest.raises(WeightsError, match="not found"):
        C.Cnn14Tower(tmp_path / "absent.pth")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_without_torch_is_refused(tmp_path):
    p = tmp_path / "plain.pkl"
    p.write_bytes(pickle.dumps({"model": {"a": 1}}))
    with pytest.raises(WeightsError):
        C.load_cnn14_weights(p)
    buf = io.BytesIO()
    torch.save([1, 2, 3], buf)
    q = tmp_path / "list.pt"
    q.write_bytes(buf.getvalue())
    with pytest.raises(WeightsError, match="not a CNN14 checkpoint"):
        C.load_cnn14_weights(q)


# ------------------------------------------------------------------------------------------ golden
def _lowbias32(x: np.ndarray) -> np.ndarray:
    """The fixture's 32-bit hash on uint32 arrays: numpy's uint32 products wrap mod 2**32, as required."""
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def _r(i: int, n: int) -> np.ndarray:
    h = _lowbias32(np.array([i + 1], dtype=np.uint64))[0]
    k = np.arange(n, dtype=np.uint64)  # k + h may pass 2**32: the cast to uint32 is the "& 0xFFFFFFFF"
    return (_lowbias32(k + np.uint64(h)).astype(np.float64) + 0.5) / 2**31 - 1.0


def _formula_value(key: str, shape: tuple, r: np.ndarray) -> np.ndarray:
    leaf = key.rsplit(".", 1)[-1]
    if key.startswith("bn0."):
        return {"weight": 1 + 0.1 * r, "bias": 0.1 * r, "running_mean": -40 + 10 * r,
                "running_var": 400 * (1 + 0.25 * (r + 1))}[leaf]
    if ".bn" in key:
        return {"weight": 1 + 0.1 * r, "bias": 0.1 * r, "running_mean": 0.1 * r,
                "running_var": 0.75 + 0.5 * (r + 1) / 2}[leaf]
    if ".conv" in key:
        return (r * math.sqrt(2.0)) * math.sqrt(3 / (shape[1] * 3 * 3))
    if key == "fc1.weight":
        return (r * math.sqrt(2.0)) * math.sqrt(3 / 2048)
    if key == "fc_audioset.weight":
        return (r * 1.0) * math.sqrt(3 / 2048)
    return 0.1 * r  # fc biases


@pytest.fixture(scope="module")
def golden(shared):
    d = shared / "golden" / "cnn14"
    keys = json.loads((d / "keys.json").read_text())
    z = np.load(d / "cnn14_golden.npz")
    real, imag = C.dft_conv_weights()
    frozen = {"spectrogram_extractor.stft.conv_real.weight": real,
              "spectrogram_extractor.stft.conv_imag.weight": imag,
              "logmel_extractor.melW": C.mel_filterbank_slaney().T.copy()}
    state = {}
    for e in keys:
        key, shape = e["key"], tuple(e["shape"])
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0, dtype=torch.int64)
            continue
        if not e["overwritten"]:
            arr = frozen[key]
        else:
            n = int(np.prod(shape))
            arr = _formula_value(key, shape, _r(e["index"], n)).astype(np.float32).reshape(shape)
        assert arr.shape == shape, key
        assert np.array_equal(arr.ravel()[:5], np.asarray(e["first5"], dtype=np.float32)), key
        assert float(arr.astype(np.float64).sum()) == pytest.approx(e["check_sum"], rel=1e-6, abs=1e-6), key
        state[key] = torch.from_numpy(np.ascontiguousarray(arr))
    return state, z


@pytest.mark.golden
def test_golden_front_end(golden):
    _, z = golden
    assert np.array_equal(C.mel_filterbank_slaney().T, z["melW"])
    net = C.Cnn14().eval()
    with torch.no_grad():
        x = torch.from_numpy(z["wave_0"])[None]
        power = net.spectrogram_extractor(x)[0, 0].numpy()
        logmel = net.logmel(x)[0, 0].numpy()
    assert np.allclose(power, z["power_spec_0"], rtol=1e-5, atol=1e-6 * z["power_spec_0"].max())
    assert np.abs(logmel - z["logmel_0"]).max() <= 0.1


@pytest.mark.golden
def test_golden_network_all_inputs(golden):
    state, z = golden
    net = C.Cnn14.from_state_dict(state)  # strict
    for j in range(3):
        with torch.no_grad():
            out = net(torch.from_numpy(z[f"wave_{j}"])[None], return_blocks=(j == 0))
        assert np.allclose(out["embedding"][0].numpy(), z[f"embedding_{j}"], atol=2e-4, rtol=1e-4)
        assert np.allclose(out["logits"][0].numpy(), z[f"logits_{j}"], atol=2e-4, rtol=1e-4)
        assert np.allclose(out["clipwise_output"][0].numpy(), z[f"clipwise_output_{j}"], atol=2e-5)
        if j == 0:
            assert np.allclose(out["logmel_bn0"][0, 0].numpy(), z["logmel_bn0_0"], atol=1e-3)
            for b in range(1, 7):
                got, want = out[f"conv_block{b}"][0].numpy(), z[f"conv_block{b}_out_0"]
                assert got.shape == want.shape
                assert np.allclose(got, want, atol=2e-4, rtol=1e-4), b


@pytest.mark.golden
def test_golden_through_the_tower(golden):
    state, z = golden
    t = C.Cnn14Tower(state)  # the fast, BN-folded inference path
    encs = t.encode_many([z[f"wave_{j}"] for j in range(3)])
    for j, e in enumerate(encs):
        assert e.seq.shape == (1, 2048)
        assert np.allclose(e.seq[0], z[f"embedding_{j}"], atol=2e-4, rtol=1e-4)
        assert np.allclose(e.tags[0], z[f"clipwise_output_{j}"], atol=2e-5)
