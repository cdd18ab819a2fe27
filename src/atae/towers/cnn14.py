"""PANNs CNN14, the seed's audio tower, in pure PyTorch (no torchlibrosa/librosa at run time).

Module and parameter names are those of ``Cnn14`` in qiuqiangkong/audioset_tagging_cnn, so the official
``Cnn14_mAP=0.431.pth`` (``ck["model"]``) loads with ``strict=True``. The frozen front end is built here
from its formulas: the STFT as a Conv1d with Hann-windowed DFT weights (n_fft 1024, hop 320, centre
reflect padding, power 2) and librosa's Slaney mel filterbank (64 bins, 50-14000 Hz), then
10*log10(max(mel, 1e-10)). The seed uses the 2048-d post-ReLU ``embedding``; the AudioSet head gives the
527 tag probabilities.

Sequence policy (``Cnn14Tower``): ``window_s=None`` is the seed's whole-clip mode, one vector per clip
(clips longer than 30 s become 30 s chunks, see ``window_spans``); ``window_s`` set gives fixed windows,
so a search can say where in a long file a match is. Input shorter than 9920 samples (0.31 s; the five
2x2 poolings need 32 frames) is zero-padded at the end to that length.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from atae.errors import WeightsError
from atae.towers.base import AudioEncoding, AudioTower, TowerInfo, encode_by_length
from atae.weights import check_state_keys

SAMPLE_RATE = 32000
N_FFT = 1024
HOP = 320
N_MELS = 64
FMIN, FMAX = 50.0, 14000.0
N_CLASSES = 527
MIN_SAMPLES = 9920  # 1 + 9920 // 320 = 32 frames: the minimum the 5 poolings accept
AMIN = 1e-10


# ----------------------------------------------------------------------------------------- front end
def hann_periodic(n: int) -> np.ndarray:
    """scipy/librosa ``get_window('hann', n, fftbins=True)`` in float64."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


def dft_conv_weights(n_fft: int = N_FFT) -> tuple[np.ndarray, np.ndarray]:
    """(real, imag) Conv1d weights (n_fft//2+1, 1, n_fft) float32: window[n] * exp(-2j pi k n / n_fft).

    The DFT matrix is computed as powers of the root of unity (``omega ** (k*n)``), the way the
    official constructor does, so the float32 weights come out identical to the checkpoint's."""
    n = np.arange(n_fft)
    dft = np.power(np.exp(-2j * np.pi / n_fft), np.outer(n, n))[:, : n_fft // 2 + 1]
    windowed = dft * hann_periodic(n_fft)[:, None]
    return (np.real(windowed).T.astype(np.float32)[:, None, :],
            np.imag(windowed).T.astype(np.float32)[:, None, :])


# librosa's default (Slaney) mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0


def hz_to_mel_slaney(f):
    f = np.asarray(f, dtype=np.float64)
    return np.where(f >= _MIN_LOG_HZ, _MIN_LOG_MEL + np.log(np.maximum(f, 1e-10) / _MIN_LOG_HZ) / _LOGSTEP,
                    f / _F_SP)


def mel_to_hz_slaney(m):
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp(_LOGSTEP * (m - _MIN_LOG_MEL)), _F_SP * m)


def mel_filterbank_slaney(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS,
                          fmin: float = FMIN, fmax: float = FMAX) -> np.ndarray:
    """``librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax)`` (htk=False, norm='slaney'): (n_mels, bins).

    Triangles on the Slaney mel scale, each scaled by 2 / (its bandwidth in Hz) so filters have equal
    area; stored in float32 before the area scaling, as librosa does."""
    fft_hz = np.linspace(0.0, sr / 2.0, 1 + n_fft // 2)
    mel_hz = mel_to_hz_slaney(np.linspace(hz_to_mel_slaney(fmin), hz_to_mel_slaney(fmax), n_mels + 2))
    fdiff = np.diff(mel_hz)
    ramps = mel_hz[:, None] - fft_hz[None, :]
    w = np.zeros((n_mels, fft_hz.size), dtype=np.float32)
    for i in range(n_mels):
        w[i] = np.maximum(0.0, np.minimum(-ramps[i] / fdiff[i], ramps[i + 2] / fdiff[i + 1]))
    enorm = 2.0 / (mel_hz[2:n_mels + 2] - mel_hz[:n_mels])
    w *= enorm[:, None]
    return w


class _STFT(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_real = nn.Conv1d(1, N_FFT // 2 + 1, N_FFT, stride=HOP, bias=False)
        self.conv_imag = nn.Conv1d(1, N_FFT // 2 + 1, N_FFT, stride=HOP, bias=False)
        if not self.conv_real.weight.is_meta:
            real, imag = dft_conv_weights()
            with torch.no_grad():
                self.conv_real.weight.copy_(torch.from_numpy(real))
                self.conv_imag.weight.copy_(torch.from_numpy(imag))
        for p in self.parameters():
            p.requires_grad_(False)


class _Spectrogram(nn.Module):
    """|STFT|^2, (B, N) -> (B, 1, T, 513), T = 1 + N // 320."""

    def __init__(self):
        super().__init__()
        self.stft = _STFT()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x[:, None, :], (N_FFT // 2, N_FFT // 2), mode="reflect")
        real = self.stft.conv_real(x)
        imag = self.stft.conv_imag(x)
        return (real ** 2 + imag ** 2).transpose(1, 2)[:, None, :, :]


class _LogMel(nn.Module):
    def __init__(self):
        super().__init__()
        if torch.empty(0).is_meta:  # built on the meta device: shapes only, the weights come from a file
            melw = torch.empty(1 + N_FFT // 2, N_MELS)
        else:
            melw = torch.from_numpy(mel_filterbank_slaney().T.copy())
        self.melW = nn.Parameter(melw, requires_grad=False)

    def forward(self, power: torch.Tensor) -> torch.Tensor:
        mel = torch.matmul(power, self.melW)
        return 10.0 * torch.log10(torch.clamp(mel, min=AMIN))  # ref 1.0: the offset term is 0


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor, pool: tuple[int, int]) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, pool) if pool != (1, 1) else x


class Cnn14(nn.Module):
    """CNN14 with the official key names. ``forward(wave (B, N) at 32 kHz)`` -> dict of tensors.

    Eval-mode only semantics are reproduced (dropout/SpecAugment are identity at inference)."""

    channels = (1, 64, 128, 256, 512, 1024, 2048)

    def __init__(self, classes_num: int = N_CLASSES):
        super().__init__()
        self.spectrogram_extractor = _Spectrogram()
        self.logmel_extractor = _LogMel()
        self.bn0 = nn.BatchNorm2d(N_MELS)
        for k in range(1, 7):
            setattr(self, f"conv_block{k}", ConvBlock(self.channels[k - 1], self.channels[k]))
        self.fc1 = nn.Linear(2048, 2048, bias=True)
        self.fc_audioset = nn.Linear(2048, classes_num, bias=True)

    def logmel(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, N) -> log-mel (B, 1, T, 64) before bn0."""
        return self.logmel_extractor(self.spectrogram_extractor(wave))

    def forward(self, wave: torch.Tensor, *, return_blocks: bool = False) -> dict[str, torch.Tensor]:
        x = self.logmel(wave)
        out: dict[str, torch.Tensor] = {}
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # BatchNorm over the mel axis
        if return_blocks:
            out["logmel_bn0"] = x
        for k in range(1, 7):
            x = getattr(self, f"conv_block{k}")(x, (2, 2) if k < 6 else (1, 1))
            if return_blocks:
                out[f"conv_block{k}"] = x
        x = x.mean(dim=3)
        x = x.amax(dim=2) + x.mean(dim=2)
        emb = F.relu(self.fc1(x))
        logits = self.fc_audioset(emb)
        out.update(embedding=emb, logits=logits, clipwise_output=torch.sigmoid(logits))
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> Cnn14:
        """Build without random initialisation (80 M parameters) and take ``state`` strictly."""
        with torch.device("meta"):
            net = cls()
        net.load_state_dict(state, strict=True, assign=True)
        for p in net.parameters():
            p.requires_grad_(False)
        return net.eval()


class FastCnn14(nn.Module):
    """Inference-only CNN14 with the same numbers (within float32 rounding), for extraction speed.

    Differences from ``Cnn14.forward``, none of which changes the function: BatchNorm of every conv
    block folded into the conv weights and a bias; in-place ReLU; block 6 (2048 channels on a 2-bin,
    T/32-frame map, 17 % of the FLOPs but half the time in oneDNN's direct convolution) computed as
    unfold + one matrix product, about 12 % faster overall on this CPU. The front end stays the official
    DFT convolution: ``torch.stft`` would save ~3 % of the time but moves quiet log-mel bins by up to
    0.07 dB and the embedding of the golden chirp by 7e-5 (a third of the fixture's tolerance)."""

    def __init__(self, net: Cnn14):
        super().__init__()
        self.spectrogram_extractor, self.logmel_extractor = net.spectrogram_extractor, net.logmel_extractor
        self.bn0 = net.bn0
        for k in range(1, 7):
            b = getattr(net, f"conv_block{k}")
            for j, (conv, bn) in enumerate(((b.conv1, b.bn1), (b.conv2, b.bn2)), start=1):
                w, bias = self._fold(conv, bn)
                if k == 6:  # (O, I*3*3) for the unfold + matmul path
                    w = w.reshape(w.shape[0], -1).contiguous()
                self.register_buffer(f"w{k}_{j}", w)
                self.register_buffer(f"b{k}_{j}", bias)
        self.fc1, self.fc_audioset = net.fc1, net.fc_audioset

    @staticmethod
    def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            return (conv.weight * scale[:, None, None, None]).contiguous(), bn.bias - bn.running_mean * scale

    def forward(self, wave: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.logmel_extractor(self.spectrogram_extractor(wave))  # (B, 1, T, 64)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        for k in range(1, 6):
            x = F.relu_(F.conv2d(x, getattr(self, f"w{k}_1"), getattr(self, f"b{k}_1"), padding=1))
            x = F.relu_(F.conv2d(x, getattr(self, f"w{k}_2"), getattr(self, f"b{k}_2"), padding=1))
            x = F.avg_pool2d(x, 2)
        for j in (1, 2):  # block 6: 3x3 conv as unfold + GEMM, no pooling
            b, _, h, w = x.shape
            cols = F.unfold(x, 3, padding=1)  # (B, C*9, H*W)
            y = torch.matmul(getattr(self, f"w6_{j}"), cols) + getattr(self, f"b6_{j}")[:, None]
            x = F.relu_(y.view(b, -1, h, w))
        x = x.mean(dim=3)
        x = x.amax(dim=2) + x.mean(dim=2)
        emb = F.relu(self.fc1(x))
        logits = self.fc_audioset(emb)
        return {"embedding": emb, "logits": logits, "clipwise_output": torch.sigmoid(logits)}


# ------------------------------------------------------------------------------------------ loading
_FRONT_END = ("spectrogram_extractor.stft.conv_real.weight", "spectrogram_extractor.stft.conv_imag.weight",
              "logmel_extractor.melW")
_FIX = ("get the official Cnn14_mAP=0.431.pth with `atae weights fetch cnn14` (or pass it with "
        "--audio-weights)")


def checkpoint_state_dict(obj, path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The CNN14 state_dict inside a loaded checkpoint: the official ``{'iteration', 'model', 'sampler'}``
    dict, a plain state_dict, or one saved from ``DataParallel`` (``module.`` prefixes)."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError("not a CNN14 checkpoint: expected a state_dict or a dict with a 'model' "
                           "state_dict", path=path, fix=_FIX)
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


@functools.cache
def _reference() -> tuple[dict[str, torch.Size], dict[str, torch.Tensor]]:
    """Expected shapes (from a meta-device model) and the formula front-end tensors, computed once."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Cnn14().state_dict().items()}
    real, imag = dft_conv_weights()
    front = dict(zip(_FRONT_END, (torch.from_numpy(real), torch.from_numpy(imag),
                                  torch.from_numpy(mel_filterbank_slaney().T.copy())), strict=True))
    return shapes, front


def check_state_dict(state: dict[str, torch.Tensor], path: str | Path | None = None) -> None:
    """Refuse a state_dict that is not the 32 kHz / 64-mel / 527-class CNN14, naming offending keys."""
    shapes, front = _reference()
    check_state_keys(state, shapes, "CNN14 (32 kHz, 64 mels, 527 classes)", path=path, fix=_FIX)
    for k, ref in front.items():  # frozen tensors: another sample rate / window / mel range shows here
        if not torch.allclose(state[k].float(), ref, atol=1e-4, rtol=1e-3):
            raise WeightsError(f"{k} differs from the 32 kHz CNN14 front end (a CNN14 variant for another "
                               "sample rate or mel range?)", path=path, fix=_FIX)


def load_cnn14_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Safely load and validate a CNN14 weights file (official .pth, plain state_dict, or safetensors)."""
    from atae.weights import load_checkpoint

    state = checkpoint_state_dict(load_checkpoint(path, what="CNN14", fix=_FIX), path)
    check_state_dict(state, path)
    return state


# --------------------------------------------------------------------------------------------- tower
class Cnn14Tower(AudioTower):
    """Frozen CNN14: 32 kHz mono in, 2048-d ``embedding`` per element out, AudioSet tags per element.

    ``weights``: a path (official ``.pth``, plain state_dict ``.pt``, or ``.safetensors``), or an
    in-memory state_dict (tests/benchmarks; ``info.weights_sha256`` is then None), or None to resolve
    the registry's ``cnn14`` entry (never downloads).
    """

    name = "cnn14"
    sample_rate = SAMPLE_RATE
    dim = 2048
    min_samples = MIN_SAMPLES
    has_tags = True
    max_batch_samples = 8 * 30 * SAMPLE_RATE  # cap on samples per forward pass (memory)

    def __init__(self, weights: str | Path | dict | None = None, *, window_s: float | None = None,
                 hop_s: float | None = None, device: str = "cpu"):
        if window_s is not None and window_s * SAMPLE_RATE < MIN_SAMPLES:
            raise ValueError(f"window_s must be at least {MIN_SAMPLES / SAMPLE_RATE:.2f} s for CNN14")
        self.window_s, self.hop_s = window_s, hop_s
        self.device = torch.device(device)
        if isinstance(weights, dict):
            state = checkpoint_state_dict(weights)
            check_state_dict(state)
            self.weights_path = None
        else:
            from atae import weights as wreg

            self.weights_path = wreg.resolve("cnn14", weights)
            state = load_cnn14_weights(self.weights_path)
        self.net = Cnn14.from_state_dict(state).to(self.device)
        self.fast = FastCnn14(self.net).to(self.device).eval()
        self._info: TowerInfo | None = None

    @property
    def info(self) -> TowerInfo:
        if self._info is None:
            from atae.weights import weights_id

            sha = weights_id(self.weights_path) if self.weights_path is not None else None
            opts = {"output": "embedding", "window_s": self.window_s, "hop_s": self.hop_s}
            self._info = TowerInfo(self.name, "audio", self.dim, sha, self.sample_rate, opts)
        return self._info

    @torch.inference_mode()
    def run_batch(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, N) equal-length waves -> (embeddings (B, 2048), tag probabilities (B, 527)) float32."""
        out = self.fast(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device))
        return out["embedding"].float().cpu().numpy(), out["clipwise_output"].float().cpu().numpy()

    def encode(self, wave: np.ndarray) -> AudioEncoding:
        return self.encode_many([wave])[0]

    def encode_many(self, waves: list[np.ndarray]) -> list[AudioEncoding]:
        """Segments of equal length (across all clips) run through the network together.

        Only equal-length segments share a batch: zero-padding to a common length would change the
        max/mean pooling over time, i.e. the numbers."""
        prepared = [self.segments(w) for w in waves]
        return encode_by_length(prepared, self.run_batch, self.dim, N_CLASSES, self.max_batch_samples)
