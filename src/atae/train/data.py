"""Training and validation data as tensors: packed feature rows (no padding) and the pair index."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from atae.errors import DataError
from atae.features import caption_key, dataset_queries
from atae.model import AlignedModel


@dataclass
class PairSet:
    """Training pairs (audio key, text key, clip label); labels are ints, equal for the same clip."""

    pairs: list[tuple[str, str, int]]
    skipped: list[str] = field(default_factory=list)

    @classmethod
    def from_dataset(cls, dataset, audio_table=None, text_table=None, label_offset: int = 0) -> PairSet:
        """Every (clip, caption i) of a CaptionDataset with text key ``caption_key(clip.key, i)``. With tables
        given, clips or captions whose features are missing (failed extraction) are skipped and listed."""
        pairs, skipped = [], []
        for ci, clip in enumerate(dataset.clips):
            if audio_table is not None and clip.key not in audio_table:
                skipped.append(f"{clip.key}: no audio features (extraction failed?), clip left out")
                continue
            for i in range(len(clip.captions)):
                tkey = caption_key(clip.key, i)
                if text_table is not None and tkey not in text_table:
                    skipped.append(f"{tkey}: no text features, caption left out")
                    continue
                pairs.append((clip.key, tkey, label_offset + ci))
        return cls(pairs, skipped)

    def __len__(self) -> int:
        return len(self.pairs)


def _offsets(items: Sequence[tuple[object, str]], lengths: Sequence[int]) -> np.ndarray:
    """(N + 1,) int64 start of each item's rows; an empty cached sequence means a broken feature store."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if (lengths == 0).any():
        bad = items[int(np.flatnonzero(lengths == 0)[0])][1]
        raise DataError(f"cached sequence {bad!r} is empty", fix="re-extract the features")
    return np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])


@dataclass
class PackedSeqs:
    """Variable-length sequences stored back to back: rows ``data[offsets[i]:offsets[i+1]]`` are item i."""

    data: torch.Tensor  # (N_rows, F) float32
    offsets: torch.Tensor  # (N + 1,) int64

    @classmethod
    def from_table(cls, table, keys: Sequence[str]) -> PackedSeqs:
        return cls.from_items([(table, k) for k in keys], dim=getattr(getattr(table, "info", None), "dim", 0))

    @classmethod
    def from_items(cls, items: Sequence[tuple[object, str]], dim: int = 0) -> PackedSeqs:
        """Copy the rows of (table, key) items into one float32 block (allocated once)."""
        arrs = [t.get(k) for t, k in items]
        offsets = _offsets(items, [a.shape[0] for a in arrs])
        dim = arrs[0].shape[1] if arrs else int(dim)
        data = np.empty((int(offsets[-1]), dim), dtype=np.float32)
        for a, start in zip(arrs, offsets[:-1], strict=True):
            data[start:start + a.shape[0]] = a
        return cls(torch.from_numpy(data), torch.from_numpy(offsets))

    @classmethod
    def concat(cls, parts: Sequence[PackedSeqs]) -> PackedSeqs:
        if len(parts) == 1:
            return parts[0]
        data = torch.cat([p.data for p in parts])
        offs, base = [torch.zeros(1, dtype=torch.int64)], 0
        for p in parts:
            offs.append(p.offsets[1:] + base)
            base += int(p.offsets[-1])
        return cls(data, torch.cat(offs))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """Rows of items ``idx`` -> (rows (N, F), segment id per row, number of items, rows per item)."""
        starts, ends = self.offsets[idx], self.offsets[idx + 1]
        counts = ends - starts
        n = len(idx)
        if bool((counts == 1).all()):  # whole-clip audio: one row each, a plain index
            return self.data[starts], torch.arange(n), n, counts
        seg = torch.repeat_interleave(torch.arange(n), counts)
        first = torch.cumsum(counts, 0) - counts
        rows = torch.arange(int(counts.sum())) - first[seg] + starts[seg]
        return self.data[rows], seg, n, counts


class TableSeqs:
    """Same interface as PackedSeqs, reading each batch's rows from the (memory-mapped) tables instead
    of RAM: used when a training set's features would not fit the preload budget (e.g. the full FSD50K
    noisy set with a 768-d text tower is over 10 GB). Same numbers, a little slower per step."""

    def __init__(self, items: Sequence[tuple[object, str]]):
        self.items = list(items)  # (table, key)
        self.offsets = torch.from_numpy(_offsets(self.items, [len(t.get(k)) for t, k in self.items]))

    def __len__(self) -> int:
        return len(self.items)

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        arrs = [np.asarray(self.items[i][0].get(self.items[i][1]), dtype=np.float32) for i in idx.tolist()]
        counts = torch.tensor([a.shape[0] for a in arrs], dtype=torch.int64)
        n = len(arrs)
        seg = torch.repeat_interleave(torch.arange(n), counts)
        return torch.from_numpy(np.concatenate(arrs)), seg, n, counts


def preload_budget() -> int:
    """Bytes of training features loaded into RAM at most (env ATAE_TRAIN_PRELOAD_GB, default 4)."""
    return int(float(os.environ.get("ATAE_TRAIN_PRELOAD_GB", "4")) * 2 ** 30)


def _seqs(items: Sequence[tuple[object, str]], budget: int):
    """PackedSeqs (all rows in RAM) when they fit ``budget`` bytes, else TableSeqs (read per batch)."""
    nbytes = 0
    for t, k in items:
        a = t.get(k)
        nbytes += a.shape[0] * a.shape[1] * 4
        if nbytes > budget:
            return TableSeqs(items)
    return PackedSeqs.from_items(items)


def embed_packed(adapter, packed: PackedSeqs | TableSeqs, *, batch: int = 2048,
                 normalize: bool = True) -> torch.Tensor:
    """All items of a PackedSeqs through an adapter (on the adapter's device), in chunks, without
    gradients; the embeddings come back on the CPU."""
    outs = []
    with torch.no_grad():
        for a in range(0, len(packed), batch):
            idx = torch.arange(a, min(a + batch, len(packed)))
            rows, seg, n, counts = packed.gather(idx)
            e = adapter.forward_packed(rows, seg, n, counts)
            outs.append((torch.nn.functional.normalize(e, dim=-1) if normalize else e).cpu())
    return torch.cat(outs) if outs else torch.zeros(0, adapter.out_dim)


@dataclass
class TrainData:
    """One stage's training set as tensors: packed audio and text features and the pair index."""

    audio: PackedSeqs | TableSeqs
    text: PackedSeqs | TableSeqs
    a_idx: torch.Tensor  # (P,) item in ``audio`` of pair p
    t_idx: torch.Tensor  # (P,) item in ``text``
    labels: torch.Tensor  # (P,) clip label (distinct across sources)
    fingerprint: str
    skipped: list[str]

    @classmethod
    def build(cls, sources: Sequence[tuple[object, object, object]]) -> TrainData:
        """``sources``: (CaptionDataset, audio_table, text_table) triples, e.g. clean and noisy."""
        audio_items, text_items, a_idx, t_idx, labels, skipped = [], [], [], [], [], []
        h = hashlib.sha256()
        n_audio = n_text = label_base = 0
        for dataset, atab, ttab in sources:
            ps = PairSet.from_dataset(dataset, atab, ttab, label_offset=label_base)
            skipped += ps.skipped
            akeys = list(dict.fromkeys(a for a, _, _ in ps.pairs))
            apos = {k: i for i, k in enumerate(akeys)}
            tkeys = [t for _, t, _ in ps.pairs]
            audio_items += [(atab, k) for k in akeys]
            text_items += [(ttab, k) for k in tkeys]
            for j, (a, t, lab) in enumerate(ps.pairs):
                a_idx.append(n_audio + apos[a])
                t_idx.append(n_text + j)
                labels.append(lab)
                h.update(f"{a}\x00{t}\x00{lab}\n".encode())
            h.update(f"|{_info_key(atab)}|{_info_key(ttab)}|".encode())
            n_audio += len(akeys)
            n_text += len(tkeys)
            label_base += len(dataset.clips)
        if not a_idx:
            raise DataError("no training pairs: every clip or caption lacks cached features",
                            fix="check the extraction report (unreadable audio, empty captions)")
        budget = preload_budget()
        audio = _seqs(audio_items, budget)
        text = _seqs(text_items, budget - (audio.data.numel() * 4 if isinstance(audio, PackedSeqs) else 0))
        return cls(audio, text,
                   torch.tensor(a_idx), torch.tensor(t_idx), torch.tensor(labels), h.hexdigest(), skipped)

    def __len__(self) -> int:
        return len(self.a_idx)


@dataclass
class ValData:
    """Validation as the seed does it: every caption of the val clips queries all val clips."""

    audio: PackedSeqs
    text: PackedSeqs
    relevant: np.ndarray  # (Q,) column of each caption's clip
    fingerprint: str

    @classmethod
    def build(cls, dataset, audio_table, text_table) -> ValData:
        keys, _, tkeys, rel, _ = dataset_queries(dataset, audio_table, text_table)
        if not tkeys:
            raise DataError(f"validation set {getattr(dataset, 'name', '')!r} has no usable caption",
                            fix="check --val-csv/--val-audio and the extraction report")
        h = hashlib.sha256(("\n".join(keys + tkeys)).encode()).hexdigest()
        return cls(PackedSeqs.from_table(audio_table, keys),
                   PackedSeqs.from_table(text_table, tkeys), np.asarray(rel), h)

    def map_at_10(self, model: AlignedModel) -> float:
        from atae.metrics import map_at_k, ranks_single

        a = embed_packed(model.audio_adapter, self.audio)
        t = embed_packed(model.text_adapter, self.text)
        scores = (t @ a.T).numpy()
        return float(map_at_k(ranks_single(scores, self.relevant), 10).mean())


def _info_key(table) -> str:
    info = getattr(table, "info", None)
    return info.key() if info is not None and hasattr(info, "key") else "?"
