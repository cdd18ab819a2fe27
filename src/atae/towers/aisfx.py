"""aiSFX audio tower (offline default): the DCASE cross-task CNN trained on sound-effect libraries.

Our own definition of the network of the ``aisfx`` 0.1.2 package (CC BY 4.0 weights, shipped in the
wheel) and of its *intended* preprocessing. The package's librosa path never transposes its
(mel x time) spectrogram, so it blocks the mel axis as if it were time and yields one block per clip of
any length (the golden parity fixtures of ``tests/test_aisfx.py`` record both). We feed the network
time-major blocks, as its ``forward`` documents and the paper describes:

44.1 kHz mono -> peak normalisation -> power mel spectrogram (n_fft 2048, hop 1024, periodic Hann,
centred with zero padding, 96 HTK mel bands over 0-22050 Hz, each filter scaled to unit L1 norm, as
librosa 0.9.2 with ``htk=True, norm=1``) -> log10(S * 10000 + 1) -> / 9.457798957824707 -> blocks of
100 frames (2.32 s) every 50 frames (1.16 s), a partial last block dropped (the package's rule) ->
4 conv blocks (64/128/256/512) -> mean over frequency -> max over time -> 512-d per block.

Sequence policy: ``window_s=None`` gives every native block as one element of Z (T = number of blocks,
with the block's time span), the tower's natural sequence; a clip is then summarised by the masked mean
over blocks, as the package's own clip embedding. With ``window_s`` set, each element is the mean of the
blocks that start inside one window of ``window_spans`` (for search in long files). Clips shorter than
one block (2.32 s) are zero-padded to ``min_samples`` (zeros do not change the peak normalisation).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from atae.errors import WeightsError
from atae.towers.base import AudioEncoding, AudioTower, TowerInfo, window_spans

SAMPLE_RATE = 44100
N_FFT = 2048
HOP = 1024
N_MELS = 96
BLOCK = 100  # frames per block
BLOCK_HOP = 50  # round(100 * 0.5), the package's default emb_hop_size
SPEC_MAX = 9.457798957824707  # the package's 'original' normalisation constant (min 0)
_HEAD_KEY = re.compile(r"^fc\.\d+\.[024]\.(weight|bias)$")  # the 9 unused per-dataset classifier heads


# ----------------------------------------------------------------------------------------- front end
def _hz_to_mel_htk(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz_htk(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS,
                   fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """(n_mels, 1 + n_fft//2) float32 triangles on the HTK mel scale, each row scaled to unit L1 norm."""
    fmax = sr / 2.0 if fmax is None else fmax
    fft_hz = np.linspace(0.0, sr / 2.0, 1 + n_fft // 2)
    mel_hz = _mel_to_hz_htk(np.linspace(_hz_to_mel_htk(fmin), _hz_to_mel_htk(fmax), n_mels + 2))
    fdiff = np.diff(mel_hz)
    ramps = mel_hz[:, None] - fft_hz[None, :]
    w = np.zeros((n_mels, fft_hz.size), dtype=np.float32)  # float32 storage, as librosa
    for i in range(n_mels):
        w[i] = np.maximum(0.0, np.minimum(-ramps[i] / fdiff[i], ramps[i + 2] / fdiff[i + 1]))
    norms = np.sum(np.abs(w), axis=1, keepdims=True)
    return (w / np.where(norms > 0, norms, 1.0).astype(np.float32)).astype(np.float32)


_MEL = mel_filterbank()
_WINDOW = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT))  # periodic Hann, float64


def logmel(wave: np.ndarray) -> np.ndarray:
    """Peak-normalised log-mel spectrogram, time-major (frames, 96) float32, before the /SPEC_MAX step.

    ``frames = 1 + len(wave) // 1024`` (centred frames, zero padding at both ends)."""
    y = np.asarray(wave, dtype=np.float32)
    peak = np.max(np.abs(y)) if y.size else np.float32(0)
    y = y / (peak if peak != 0 else np.float32(1))
    y = np.pad(y, N_FFT // 2)  # center=True, pad_mode='constant'
    n_frames = 1 + (y.shape[0] - N_FFT) // HOP
    frames = np.lib.stride_tricks.as_strided(
        y, shape=(n_frames, N_FFT), strides=(y.strides[0] * HOP, y.strides[0]), writeable=False)
    out = np.empty((n_frames, N_MELS), dtype=np.float32)
    step = 512  # frames per chunk: keeps the float64 FFT buffer small for long clips
    for s in range(0, n_frames, step):
        spec = np.fft.rfft(frames[s:s + step] * _WINDOW, axis=1).astype(np.complex64)
        power = spec.real ** 2 + spec.imag ** 2  # float32, as np.abs(S) ** 2 on complex64
        out[s:s + step] = power @ _MEL.T
    return np.log10(out * np.float32(10000.0) + np.float32(1.0))


def block_starts(n_frames: int) -> list[int]:
    """First frame of each 100-frame block (hop 50; the package's drop-partial rule; at least one)."""
    n = int(np.ceil((n_frames - BLOCK) / BLOCK_HOP + 1))
    if (n_frames - BLOCK) % BLOCK_HOP != 0:
        n -= 1
    return [BLOCK_HOP * b for b in range(max(n, 1))]


def make_blocks(spec: np.ndarray) -> np.ndarray:
    """(frames, 96) log-mel -> (B, 100, 96) normalised blocks, zero rows past the end."""
    x = spec / np.float32(SPEC_MAX)
    starts = block_starts(x.shape[0])
    x = np.concatenate([x, np.zeros((BLOCK, x.shape[1]), dtype=np.float32)])
    return np.stack([x[s:s + BLOCK] for s in starts]).astype(np.float32)


# ------------------------------------------------------------------------------------------- network
class _ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor, pool: int) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.max_pool2d(x, pool) if pool > 1 else x


class _EmbeddingNet(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.conv_block1 = _ConvBlock(1, width)
        self.conv_block2 = _ConvBlock(width, 2 * width)
        self.conv_block3 = _ConvBlock(2 * width, 4 * width)
        self.conv_block4 = _ConvBlock(4 * width, 8 * width)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        """(B, time 100, mel 96) -> (B, 512): mean over frequency, then max over time."""
        x = blocks.unsqueeze(1)
        x = self.conv_block1(x, 2)
        x = self.conv_block2(x, 2)
        x = self.conv_block3(x, 2)
        x = self.conv_block4(x, 1)
        return x.mean(dim=3).amax(dim=2)


class AisfxNet(nn.Module):
    """The checkpoint's embedding part; key names ``embedding_net.conv_block{1..4}.*`` as upstream."""

    def __init__(self):
        super().__init__()
        self.embedding_net = _EmbeddingNet()

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        return self.embedding_net(blocks)


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The embedding-net state_dict from the package's ``checkpoint.pth`` (a pickled
    ``(state_dict, ds_dict)`` whose dict holds numpy ints), loaded by ``atae.weights.load_checkpoint``
    (``weights_only=True`` with numpy's data constructors allowed). The classifier heads are dropped
    explicitly; any other extra or missing key is an error."""
    from atae.weights import load_checkpoint as safe_load

    path = Path(path)
    fix = "reinstall it: pip install --force-reinstall --no-deps aisfx==0.1.2 (or pass the right file)"
    obj = safe_load(path, what="aiSFX", fix=fix)
    state = obj[0] if isinstance(obj, tuple) and obj and isinstance(obj[0], dict) else obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError("not an aiSFX checkpoint (expected a (state_dict, ds_dict) tuple)",
                           path=path, fix=fix)
    emb = {k: v for k, v in state.items() if k.startswith("embedding_net.")}
    other = [k for k in state if not k.startswith("embedding_net.") and not _HEAD_KEY.match(k)]
    with torch.device("meta"):  # shapes only: the tower builds the real network
        expected = AisfxNet().state_dict()
    missing = sorted(set(expected) - set(emb))
    unexpected = sorted(set(emb) - set(expected)) + other
    bad_shape = [k for k in expected if k in emb and emb[k].shape != expected[k].shape]
    if missing or unexpected or bad_shape:
        raise WeightsError(
            f"checkpoint does not match the aiSFX network: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {bad_shape[:5]}", path=path, fix=fix)
    return emb


# --------------------------------------------------------------------------------------------- tower
class AisfxTower(AudioTower):
    name = "aisfx"
    sample_rate = SAMPLE_RATE
    dim = 512
    min_samples = (BLOCK - 1) * HOP  # 101,376 samples (2.30 s): 1 + n // 1024 = 100 frames
    has_tags = False
    batch_blocks = 16  # blocks per forward pass: bounded memory, no speed lost vs larger batches

    def __init__(self, weights: str | Path | None = None, *, window_s: float | None = None,
                 hop_s: float | None = None, device: str = "cpu"):
        from atae import weights as wreg

        self.weights_path = wreg.resolve("aisfx", weights)
        self.window_s, self.hop_s = window_s, hop_s
        self.device = torch.device(device)
        self.net = AisfxNet()
        self.net.load_state_dict(load_checkpoint(self.weights_path), strict=True)
        # channels_last: ~10-20% faster on CPU (oneDNN), outputs within 3e-6 of the default layout
        self.net.eval().to(self.device, memory_format=torch.channels_last)
        self._info: TowerInfo | None = None

    @property
    def info(self) -> TowerInfo:
        if self._info is None:
            from atae.weights import weights_id

            opts = {"preprocessing": "time-major", "block_frames": BLOCK, "block_hop_frames": BLOCK_HOP,
                    "window_s": self.window_s, "hop_s": self.hop_s}
            self._info = TowerInfo(self.name, "audio", self.dim, weights_id(self.weights_path),
                                   self.sample_rate, opts)
        return self._info

    @torch.inference_mode()
    def embed_blocks(self, blocks: np.ndarray) -> np.ndarray:
        """(B, 100, 96) normalised blocks -> (B, 512) float32, in batches."""
        out = []
        for s in range(0, blocks.shape[0], self.batch_blocks):
            x = torch.from_numpy(np.ascontiguousarray(blocks[s:s + self.batch_blocks])).to(self.device)
            out.append(self.net(x).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def _prepare(self, wave: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        n = int(np.asarray(wave).shape[0])
        blocks = make_blocks(logmel(self.pad_to_min(wave)))
        starts = np.asarray(block_starts(1 + max(n, self.min_samples) // HOP), dtype=np.float64) * HOP
        times = np.stack([starts, starts + BLOCK * HOP], axis=1) / SAMPLE_RATE
        times[:, 1] = np.minimum(times[:, 1], max(n, 1) / SAMPLE_RATE)
        return blocks, times, n

    def _finish(self, emb: np.ndarray, times: np.ndarray, n: int) -> AudioEncoding:
        if self.window_s is None:
            return AudioEncoding(emb.astype(np.float32), times)
        seq, spans = [], []
        for a, b in window_spans(n, SAMPLE_RATE, self.window_s, self.hop_s):
            inside = (times[:, 0] >= a / SAMPLE_RATE - 1e-9) & (times[:, 0] < max(b, a + 1) / SAMPLE_RATE)
            if not inside.any():  # window shorter than a block hop: nearest block
                inside = np.zeros(len(times), bool)
                inside[int(np.argmin(np.abs(times[:, 0] - a / SAMPLE_RATE)))] = True
            seq.append(emb[inside].mean(axis=0))
            spans.append((a / SAMPLE_RATE, b / SAMPLE_RATE))
        return AudioEncoding(np.stack(seq).astype(np.float32), np.asarray(spans, dtype=np.float64))

    def encode(self, wave: np.ndarray) -> AudioEncoding:
        blocks, times, n = self._prepare(wave)
        return self._finish(self.embed_blocks(blocks), times, n)

    def encode_many(self, waves: list[np.ndarray]) -> list[AudioEncoding]:
        """All blocks of all clips go through the network together, in batches."""
        prepared = [self._prepare(w) for w in waves]
        if not prepared:
            return []
        emb = self.embed_blocks(np.concatenate([p[0] for p in prepared]))
        out, pos = [], 0
        for blocks, times, n in prepared:
            out.append(self._finish(emb[pos:pos + blocks.shape[0]], times, n))
            pos += blocks.shape[0]
        return out
