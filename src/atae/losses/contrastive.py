"""The seed's loss: pml ContrastiveLoss on cosine similarity over audio AND text embeddings together.

Audio and text embeddings of a batch are concatenated and each gets the label of its audio clip, so every
pair in the batch counts: audio-text, audio-audio and text-text, and two captions of the same clip are
positives. Per pair with cosine s: ``max(0, pos_margin - s)`` for a positive, ``max(0, s - neg_margin)``
for a negative (pos_margin 1, neg_margin 0 as in the seed). Pairs (i, j) and (j, i) both count, the
diagonal does not (pml's all-pairs convention).

Reduction (facts.md section 2):

* ``"pml"`` (default, what the seed's code did by keeping pml's default ``AvgNonZeroReducer``): mean of
  the non-zero positive-pair losses **plus** mean of the non-zero negative-pair losses.
* ``"all_nonzero"`` (the paper's sentence "mean across all non-zero loss values"): one mean over every
  non-zero pair loss, positive or negative. Negatives outnumber positives about 30:1 in a batch of 32,
  so this variant weights the positive pull far less.
"""

from __future__ import annotations

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import ContrastiveLoss
from pytorch_metric_learning.reducers import DoNothingReducer
from torch import nn

REDUCTIONS = ("pml", "all_nonzero")


class SeedContrastiveLoss(nn.Module):
    """``loss(audio_emb (B,D), text_emb (B,D), clip_ids (B,)) -> scalar``."""

    def __init__(self, pos_margin: float = 1.0, neg_margin: float = 0.0, reduction: str = "pml"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.pos_margin, self.neg_margin, self.reduction = float(pos_margin), float(neg_margin), reduction
        kwargs = {} if reduction == "pml" else {"reducer": DoNothingReducer()}
        self.pml = ContrastiveLoss(pos_margin=self.pos_margin, neg_margin=self.neg_margin,
                                   distance=CosineSimilarity(), **kwargs)

    def forward(self, audio_emb: torch.Tensor, text_emb: torch.Tensor,
                clip_ids: torch.Tensor) -> torch.Tensor:
        emb = torch.cat([audio_emb, text_emb], dim=0)
        labels = torch.cat([clip_ids, clip_ids], dim=0)  # labels for BOTH halves (see facts.md pitfall)
        out = self.pml(emb, labels)
        if self.reduction == "pml":
            return out
        parts = [out[name]["losses"] for name in ("pos_loss", "neg_loss")
                 if torch.is_tensor(out[name]["losses"]) and out[name]["losses"].numel() > 0]
        if not parts:
            return emb.sum() * 0.0
        losses = torch.cat([p.reshape(-1) for p in parts])
        nz = losses[losses > 0]
        return nz.mean() if nz.numel() else emb.sum() * 0.0

    def extra_state_summary(self) -> dict:
        return {"name": "seed", "pos_margin": self.pos_margin, "neg_margin": self.neg_margin,
                "reduction": self.reduction}
