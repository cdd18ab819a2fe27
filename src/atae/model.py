"""The trainable part of the seed: two adapters that map frozen tower sequences into one shared space.

Each adapter is Linear -> ReLU -> Linear applied to every element of a (T, F) sequence, then the mean over
the real (unmasked) elements. The second Linear commutes with the mean, so it is applied *after*
averaging: mathematically the same model as the seed, with one matrix product per sequence instead of
per element (this is where training spends its time). The model never opens audio: it only sees
tower outputs, and it records which towers made them so a later command cannot mix incompatible
features.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from atae.errors import ModelError
from atae.io import atomic_path, atomic_write_text
from atae.towers.base import TowerInfo

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "adapters.safetensors"
REFERENCE_KEY = "caption_reference"  # tensor in WEIGHTS_NAME beside the adapters (see AlignedModel)


class Adapter(nn.Module):
    """Per-element two-layer perceptron followed by a masked mean over the sequence."""

    def __init__(self, in_dim: int, hidden: int = 512, out_dim: int = 512):
        super().__init__()
        self.in_dim, self.hidden, self.out_dim = int(in_dim), int(hidden), int(out_dim)
        self.fc1 = nn.Linear(self.in_dim, self.hidden)
        self.fc2 = nn.Linear(self.hidden, self.out_dim)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """z: (B, T, F) padded; mask: (B, T) bool, True = real element (None: all real). -> (B, out_dim)."""
        if z.dim() != 3 or z.shape[-1] != self.in_dim:
            raise ModelError(f"adapter expects (B, T, {self.in_dim}) features, got {tuple(z.shape)}",
                             fix="use features made by the tower this model was trained with")
        h = torch.relu(self.fc1(z))
        if mask is None:
            pooled = h.mean(dim=1)
        else:
            m = mask.to(h.dtype).unsqueeze(-1)
            n = m.sum(dim=1).clamp_min(1.0)  # an all-padding row gives zeros, never NaN
            pooled = (h * m).sum(dim=1) / n
        return self.fc2(pooled)

    def forward_packed(self, x: torch.Tensor, seg: torch.Tensor, n_seg: int,
                       counts: torch.Tensor) -> torch.Tensor:
        """Same function on a packed batch: x (N, F) rows, seg (N,) sequence id of each row in [0, n_seg),
        counts (n_seg,) rows per sequence, each on any device (moved to the adapter's). No padding is ever
        computed."""
        dev = self.fc1.weight.device
        h = torch.relu(self.fc1(x.to(dev)))
        pooled = torch.zeros(n_seg, self.hidden, dtype=h.dtype, device=dev).index_add_(0, seg.to(dev), h)
        pooled = pooled / counts.to(dev, h.dtype).clamp_min(1.0).unsqueeze(-1)
        return self.fc2(pooled)


class AlignedModel(nn.Module):
    """Audio adapter + text adapter + the identity of the towers whose features they expect."""

    def __init__(self, audio_info: TowerInfo, text_info: TowerInfo, hidden: int = 512, out_dim: int = 512,
                 extras: dict | None = None):
        super().__init__()
        self.audio_info, self.text_info = audio_info, text_info
        self.hidden, self.out_dim = int(hidden), int(out_dim)
        self.audio_adapter = Adapter(audio_info.dim, hidden, out_dim)
        self.text_adapter = Adapter(text_info.dim, hidden, out_dim)
        self.extras: dict = dict(extras or {})  # persisted in config.json (e.g. a hybrid weight)
        self.train_summary: dict = {}  # persisted in config.json (recipe, epochs, best val score)
        self.caption_reference = None
        # {"audio": path, "text": path}: the tower weights read at training, so later commands find them
        # again (checked by SHA-256 against the tower infos, ``atae.towers.trained_with``)
        self.weights_files: dict[str, str] = {}

    @property
    def caption_reference(self) -> np.ndarray | None:
        """(N, out_dim) float16 unit text-adapter embeddings of the training captions, or None: how far a
        query is from what the adapters were trained on (``atae.scoring.Fusion``); saved beside the
        adapters. Held in float16 whatever is assigned, as it is saved and as the gate reads it."""
        return self._caption_reference

    @caption_reference.setter
    def caption_reference(self, ref) -> None:
        self._caption_reference = None if ref is None else np.ascontiguousarray(ref, np.float16)

    def embed_audio(self, z: torch.Tensor, mask: torch.Tensor | None = None, *,
                    normalize: bool = False) -> torch.Tensor:
        e = self.audio_adapter(z, mask)
        return nn.functional.normalize(e, dim=-1) if normalize else e

    def embed_text(self, z: torch.Tensor, mask: torch.Tensor | None = None, *,
                   normalize: bool = False) -> torch.Tensor:
        e = self.text_adapter(z, mask)
        return nn.functional.normalize(e, dim=-1) if normalize else e

    def encode_audio(self, seqs: Sequence[np.ndarray], *, batch: int = 1024) -> np.ndarray:
        """(N, out_dim) float32 unit vectors of N audio-tower sequences, each a (T_i, F) array."""
        return _encode(self.audio_adapter, seqs, batch)

    def encode_text(self, seqs: Sequence[np.ndarray], *, batch: int = 1024) -> np.ndarray:
        """(N, out_dim) float32 unit vectors of N text-tower token sequences, each a (T_i, F) array."""
        return _encode(self.text_adapter, seqs, batch)

    # ---------------------------------------------------------------- persistence
    def config(self) -> dict:
        return {
            "format": "atae-model",
            "format_version": FORMAT_VERSION,
            "hidden": self.hidden,
            "out_dim": self.out_dim,
            "audio_tower": self.audio_info.to_dict(),
            "text_tower": self.text_info.to_dict(),
            "extras": self.extras,
            "training": self.train_summary,
            "weights_files": dict(self.weights_files),
        }

    def save(self, directory: str | Path) -> Path:
        """Write adapters.safetensors then config.json, each atomically; config holds the weights' sha256
        so a half-written pair is detected on load."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if self.caption_reference is not None:
            state[REFERENCE_KEY] = torch.from_numpy(self.caption_reference)
        with atomic_path(d / WEIGHTS_NAME) as tmp:
            save_file(state, tmp)
            sha = _sha256(Path(tmp))
        cfg = self.config()
        cfg["weights_sha256"] = sha
        atomic_write_text(d / CONFIG_NAME, json.dumps(cfg, indent=2, sort_keys=True, default=_json_default))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> AlignedModel:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = Path(directory)
        fix = ("pass the folder written by `atae train --out RUN` "
               "(it holds config.json and adapters.safetensors)")
        if not d.is_dir():
            raise ModelError("model directory not found", path=d, fix=fix)
        cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
        if not cfg_path.is_file():
            raise ModelError("not a trained model: config.json is missing", path=d,
                             fix=fix + "; an unfinished run resumes with the same `atae train` command")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"config.json is corrupt ({e})", path=cfg_path, fix="retrain the model") from e
        if not isinstance(cfg, dict) or cfg.get("format") != "atae-model":
            raise ModelError("config.json is not an atae model config", path=cfg_path, fix=fix)
        if cfg.get("format_version") != FORMAT_VERSION:
            raise ModelError(f"model format version {cfg.get('format_version')} is not supported "
                             f"(this atae reads version {FORMAT_VERSION})", path=cfg_path,
                             fix="retrain the model with this version of atae, or use the atae that made it")
        if not w_path.is_file():
            raise ModelError("adapters.safetensors is missing", path=d, fix="retrain the model")
        if cfg.get("weights_sha256") and _sha256(w_path) != cfg["weights_sha256"]:
            raise ModelError("adapters.safetensors does not match config.json (corrupt or half-written)",
                             path=w_path, fix="retrain the model, or restore both files together")
        try:
            model = cls(TowerInfo.from_dict(cfg["audio_tower"]), TowerInfo.from_dict(cfg["text_tower"]),
                        hidden=cfg["hidden"], out_dim=cfg["out_dim"], extras=cfg.get("extras") or {})
            model.train_summary = cfg.get("training") or {}
            model.weights_files = {k: str(v) for k, v in (cfg.get("weights_files") or {}).items()}
            state = load_file(str(w_path))
            ref = state.pop(REFERENCE_KEY, None)
            model.load_state_dict(state, strict=True)
            if ref is not None:
                if ref.ndim != 2 or ref.shape[1] != model.out_dim:
                    raise RuntimeError(f"{REFERENCE_KEY} has shape {tuple(ref.shape)}")
                model.caption_reference = ref.numpy()
        except (KeyError, TypeError) as e:
            raise ModelError(f"config.json lacks a field ({e})", path=cfg_path,
                             fix="retrain the model") from e
        except (SafetensorError, RuntimeError, OSError) as e:
            raise ModelError(f"cannot load adapter weights ({e})", path=w_path,
                             fix="retrain the model") from e
        model.eval()
        return model


def _encode(adapter: Adapter, seqs: Sequence[np.ndarray], batch: int) -> np.ndarray:
    """Sequences of any lengths through an adapter without padding (``forward_packed``), unit length."""
    out = np.zeros((len(seqs), adapter.out_dim), np.float32)
    for a in range(0, len(seqs), batch):
        part = [np.asarray(x, dtype=np.float32) for x in seqs[a:a + batch]]
        for x in part:
            if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] != adapter.in_dim:
                raise ModelError(f"adapter expects (T, {adapter.in_dim}) sequences, got {x.shape}",
                                 fix="use features made by the tower this model was trained with")
        counts = torch.tensor([len(x) for x in part])
        seg = torch.repeat_interleave(torch.arange(len(part)), counts)
        rows = torch.from_numpy(np.concatenate(part))
        with torch.no_grad():
            e = adapter.forward_packed(rows, seg, len(part), counts)
            out[a:a + len(part)] = nn.functional.normalize(e, dim=-1).cpu().numpy()
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
