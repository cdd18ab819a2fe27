"""EfficientAT MobileNetV3 (``mn04_as`` ... ``mn40_as``, AudioSet-pretrained) as an audio tower.

Our own definition of the network of fschmid56/EfficientAT (MIT): torchvision-style MobileNetV3-Large
blocks with channel-only squeeze-excitation, all four downsampling stages at stride 2, BatchNorm eps 1e-3,
and the 'mlp' head (pool -> Linear -> Hardswish -> Linear -> 527 logits). One definition serves every
width (``mn04`` = 0.4 ... ``mn40`` = 4.0); the official state_dicts load with ``strict=True``.

Front end (``MelFrontEnd``), as the official ``AugmentMelSTFT`` in eval mode: 32 kHz -> pre-emphasis
``y[n] = x[n+1] - 0.97 x[n]`` -> STFT (n_fft 1024, hop 320, symmetric Hann of 800 centred in the 1024
frame, centre reflect padding) -> power -> Kaldi mel filterbank (128 bins, 0-15000 Hz, computed here)
-> ``(log(mel + 1e-5) + 4.5) / 5``.

Outputs: ``features`` (global average of the last feature map, 384-d for mn04), ``mlp_hidden`` (the
head's Hardswish layer, 512-d for mn04), ``logits`` and AudioSet probabilities ``sigmoid(logits)``.
Sequence policy as every tower (``window_spans``): whole clip by default, fixed windows on request.
Input shorter than 9921 samples (32 frames, 0.31 s) is zero-padded at the end to that length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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
WIN = 800
HOP = 320
N_MELS = 128
FMIN, FMAX = 0.0, 15000.0
N_CLASSES = 527
MIN_SAMPLES = 1 + 31 * HOP  # 32 frames after pre-emphasis: five stride-2 stages keep >= 1 frame
WIDTHS = {"mn01": 0.1, "mn02": 0.2, "mn04": 0.4, "mn05": 0.5, "mn10": 1.0, "mn20": 2.0, "mn30": 3.0,
          "mn40": 4.0}
BN_EPS = 1e-3


# ----------------------------------------------------------------------------------------- front end
def kaldi_mel_banks(n_mels: int = N_MELS, n_fft: int = N_FFT, sr: int = SAMPLE_RATE, fmin: float = FMIN,
                    fmax: float = FMAX) -> np.ndarray:
    """Kaldi-style triangular mel filters (n_mels, n_fft//2) float32, no area normalisation.

    Mel scale ``1127 ln(1 + f/700)``; triangles are linear in mel over FFT bins ``k * sr / n_fft``.
    Computed with float32 torch tensors and float64 Python scalars in the same operation order as
    ``torchaudio.compliance.kaldi.get_mel_banks`` (which the official front end uses), so the filters
    are bit-identical to the official ones without depending on torchaudio."""
    mel_low = 1127.0 * math.log(1.0 + fmin / 700.0)
    mel_high = 1127.0 * math.log(1.0 + fmax / 700.0)
    delta = (mel_high - mel_low) / (n_mels + 1)
    b = torch.arange(n_mels).unsqueeze(1)
    left = mel_low + b * delta
    center = mel_low + (b + 1.0) * delta
    right = mel_low + (b + 2.0) * delta
    mel = (1127.0 * (1.0 + (sr / n_fft * torch.arange(n_fft // 2)) / 700.0).log()).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    return torch.clamp(torch.minimum(up, down), min=0.0).numpy().astype(np.float32)


class MelFrontEnd(nn.Module):
    """(B, N) 32 kHz waves -> (B, 1, 128, T) normalised log-mel, T = 1 + (N - 1) // 320."""

    def __init__(self):
        super().__init__()
        basis = np.pad(kaldi_mel_banks(), ((0, 0), (0, 1)))  # the Nyquist bin gets no filter
        self.register_buffer("mel_basis", torch.from_numpy(basis), persistent=False)
        self.register_buffer("window", torch.hann_window(WIN, periodic=False), persistent=False)
        self.register_buffer("preemphasis", torch.tensor([[[-0.97, 1.0]]]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv1d(x[:, None, :], self.preemphasis).squeeze(1)
        spec = torch.stft(x, N_FFT, hop_length=HOP, win_length=WIN, window=self.window, center=True,
                          pad_mode="reflect", normalized=False, return_complex=True)
        power = spec.real ** 2 + spec.imag ** 2
        mel = torch.matmul(self.mel_basis, power)
        return ((torch.log(mel + 1e-5) + 4.5) / 5.0)[:, None]


# ------------------------------------------------------------------------------------------ network
def make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of 8 without dropping more than 10% (MobileNet convention)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


@dataclass(frozen=True)
class _Bneck:
    cin: int
    kernel: int
    expanded: int
    cout: int
    se: bool
    hs: bool  # Hardswish (else ReLU)
    stride: int


# MobileNetV3-Large (input, kernel, expanded, output, SE, activation, stride) at width 1.0
_LARGE = [
    (16, 3, 16, 16, False, False, 1), (16, 3, 64, 24, False, False, 2), (24, 3, 72, 24, False, False, 1),
    (24, 5, 72, 40, True, False, 2), (40, 5, 120, 40, True, False, 1), (40, 5, 120, 40, True, False, 1),
    (40, 3, 240, 80, False, True, 2), (80, 3, 200, 80, False, True, 1), (80, 3, 184, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1), (80, 3, 480, 112, True, True, 1), (112, 3, 672, 112, True, True, 1),
    (112, 5, 672, 160, True, True, 2), (160, 5, 960, 160, True, True, 1), (160, 5, 960, 160, True, True, 1),
]


def _cna(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, act: str | None = None):
    """torchvision ConvNormActivation: keys ``0`` conv (no bias), ``1`` BN, ``2`` activation."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout, eps=BN_EPS, momentum=0.01)]
    if act == "hs":
        layers.append(nn.Hardswish())
    elif act == "re":
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class _SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, squeeze)
        self.fc2 = nn.Linear(squeeze, channels)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale_activation(self.fc2(self.activation(self.fc1(x.mean((2, 3))))))
        return x * s[:, :, None, None]


class _ConcurrentSE(nn.Module):
    """EfficientAT's SE wrapper; with the channel-only SE and 'max' aggregation over one layer it is
    that layer (kept for the key names ``conc_se_layers.0``)."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.conc_se_layers = nn.ModuleList([_SqueezeExcitation(channels, squeeze)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conc_se_layers[0](x)


class _InvertedResidual(nn.Module):
    def __init__(self, c: _Bneck):
        super().__init__()
        act = "hs" if c.hs else "re"
        layers: list[nn.Module] = []
        if c.expanded != c.cin:
            layers.append(_cna(c.cin, c.expanded, act=act))
        layers.append(_cna(c.expanded, c.expanded, c.kernel, c.stride, groups=c.expanded, act=act))
        if c.se:
            layers.append(_ConcurrentSE(c.expanded, make_divisible(c.expanded // 4, 8)))
        layers.append(_cna(c.expanded, c.cout))
        self.block = nn.Sequential(*layers)
        self.use_res = c.stride == 1 and c.cin == c.cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y + x if self.use_res else y


class MN(nn.Module):
    """EfficientAT MobileNetV3 with an AudioSet 'mlp' head; ``width`` 0.4 is ``mn04``.

    ``forward(mel (B, 1, 128, T))`` -> dict with ``features`` (B, 6*C_last), ``mlp_hidden`` (B, H),
    ``logits`` (B, 527)."""

    def __init__(self, width: float = 0.4, num_classes: int = N_CLASSES):
        super().__init__()
        cfg = [_Bneck(make_divisible(a * width), k, make_divisible(e * width), make_divisible(o * width), se,
                      hs, s) for a, k, e, o, se, hs, s in _LARGE]
        layers: list[nn.Module] = [_cna(1, cfg[0].cin, 3, 2, act="hs")]
        layers += [_InvertedResidual(c) for c in cfg]
        last = 6 * cfg[-1].cout
        layers.append(_cna(cfg[-1].cout, last, act="hs"))
        self.features = nn.Sequential(*layers)
        hidden = make_divisible(1280 * width)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, hidden),
                                        nn.Hardswish(), nn.Dropout(0.2), nn.Linear(hidden, num_classes))
        self.feature_dim, self.hidden_dim = last, hidden

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.features(x)
        feats = x.mean((2, 3))
        h = self.classifier[3](self.classifier[2](feats))  # pool+flatten == feats
        logits = self.classifier[5](self.classifier[4](h))
        return {"features": feats, "mlp_hidden": h, "logits": logits}


# ------------------------------------------------------------------------------------------ loading
def _fix(size: str) -> str:
    return (f"get {size}_as with `atae weights fetch efficientat-{size}` (or pass the file with "
            f"--audio-weights); a checkpoint of another width needs the matching --audio-encoder name")


def load_mn_weights(path: str | Path, size: str = "mn04") -> dict[str, torch.Tensor]:
    """Safely load an EfficientAT state_dict and check it fits ``MN(WIDTHS[size])`` exactly."""
    from atae.weights import load_checkpoint

    state = load_checkpoint(path, what=f"EfficientAT {size}", fix=_fix(size))
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise WeightsError("not an EfficientAT checkpoint: expected a state_dict of tensors", path=path,
                           fix=_fix(size))
    check_state_dict(state, size, path)
    return state


def check_state_dict(state: dict[str, torch.Tensor], size: str, path: str | Path | None = None) -> None:
    with torch.device("meta"):  # shapes only: no random init of a model the tower builds again
        ref = {k: v.shape for k, v in MN(WIDTHS[size]).state_dict().items()}
    check_state_keys(state, ref, f"EfficientAT {size}", path=path, fix=_fix(size))


# --------------------------------------------------------------------------------------------- tower
EMBEDDINGS = ("features", "mlp_hidden")


class EfficientATTower(AudioTower):
    """Frozen EfficientAT MobileNetV3: 32 kHz mono in; per element an embedding and AudioSet tags.

    ``embedding="features"`` (default; 384-d for mn04) or ``"mlp_hidden"`` (512-d). Leave-one-out 1-NN
    cosine accuracy (``bench/bench_towers.py --esc50``): ESC-50 fold 4 from 16 kHz files 0.910 vs 0.920,
    from the 44.1 kHz originals 0.925 vs 0.915, folds 1-4 (1,600 clips, 16 kHz) 0.935 vs 0.931 -- a tie
    within noise; ``features`` wins on full-bandwidth audio and the larger set, and is smaller.
    ``weights``: path, in-memory state_dict (tests), or None for the registry's resolution.
    """

    sample_rate = SAMPLE_RATE
    min_samples = MIN_SAMPLES
    has_tags = True
    max_batch_samples = 16 * 30 * SAMPLE_RATE

    def __init__(self, weights: str | Path | dict | None = None, *, size: str = "mn04",
                 window_s: float | None = None, hop_s: float | None = None, embedding: str = "features",
                 device: str = "cpu"):
        if size not in WIDTHS:
            raise ValueError(f"unknown EfficientAT size {size!r}; use one of {', '.join(WIDTHS)}")
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, not {embedding!r}")
        if window_s is not None and window_s * SAMPLE_RATE < MIN_SAMPLES:
            raise ValueError(f"window_s must be at least {MIN_SAMPLES / SAMPLE_RATE:.2f} s for EfficientAT")
        self.size, self.embedding = size, embedding
        self.name = f"efficientat-{size}"
        self.window_s, self.hop_s = window_s, hop_s
        self.device = torch.device(device)
        if isinstance(weights, dict):
            check_state_dict(weights, size)
            state, self.weights_path = weights, None
        else:
            from atae import weights as wreg

            self.weights_path = wreg.resolve(self.name, weights)
            state = load_mn_weights(self.weights_path, size)
        self.net = MN(WIDTHS[size])
        self.net.load_state_dict(state, strict=True)
        self.net.eval().to(self.device)
        self.frontend = MelFrontEnd().to(self.device)
        self.dim = self.net.feature_dim if embedding == "features" else self.net.hidden_dim
        self._info: TowerInfo | None = None

    @property
    def info(self) -> TowerInfo:
        if self._info is None:
            from atae.weights import weights_id

            sha = weights_id(self.weights_path) if self.weights_path is not None else None
            opts = {"embedding": self.embedding, "window_s": self.window_s, "hop_s": self.hop_s}
            self._info = TowerInfo(self.name, "audio", self.dim, sha, self.sample_rate, opts)
        return self._info

    @torch.inference_mode()
    def run_batch(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """(B, N) equal-length waves -> dict of float32 arrays: features, mlp_hidden, logits, tags."""
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        out = self.net(self.frontend(x))
        res = {k: v.float().cpu().numpy() for k, v in out.items()}
        res["tags"] = 1.0 / (1.0 + np.exp(-res["logits"]))
        return res

    def encode(self, wave: np.ndarray) -> AudioEncoding:
        return self.encode_many([wave])[0]

    def encode_many(self, waves: list[np.ndarray]) -> list[AudioEncoding]:
        """Equal-length segments (across clips) share a forward pass; no padding between clips."""
        prepared = [self.segments(w) for w in waves]

        def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            out = self.run_batch(batch)
            return out[self.embedding], out["tags"]

        return encode_by_length(prepared, run, self.dim, N_CLASSES, self.max_batch_samples)
