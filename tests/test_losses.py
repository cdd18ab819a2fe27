"""Both losses recomputed by hand: explicit loops over pairs / rows, cosine and log-softmax written out."""

from __future__ import annotations

import math

import pytest
import torch

from atae.losses import InfoNCELoss, SeedContrastiveLoss, make_loss


def _cos(u, v):
    u, v = [float(x) for x in u], [float(x) for x in v]
    dot = sum(a * b for a, b in zip(u, v, strict=True))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def _batch(seed=0, b=6, d=5):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, d, generator=g, dtype=torch.float64)
    t = torch.randn(b, d, generator=g, dtype=torch.float64)
    ids = torch.tensor([3, 7, 7, 1, 3, 9])[:b]  # duplicate labels: the same clip twice, twice
    return a, t, ids


def _contrastive_by_hand(a, t, ids, reduction):
    emb = list(a) + list(t)
    lab = [int(x) for x in ids] * 2
    pos, neg = [], []
    for i in range(len(emb)):
        for j in range(len(emb)):
            if i == j:
                continue
            s = _cos(emb[i], emb[j])
            if lab[i] == lab[j]:
                pos.append(max(0.0, 1.0 - s))
            else:
                neg.append(max(0.0, s - 0.0))
    pos_nz, neg_nz = [x for x in pos if x > 0], [x for x in neg if x > 0]
    if reduction == "pml":
        return (sum(pos_nz) / len(pos_nz) if pos_nz else 0.0) + (sum(neg_nz) / len(neg_nz) if neg_nz else 0.0)
    allnz = pos_nz + neg_nz
    return sum(allnz) / len(allnz)


@pytest.mark.parametrize("reduction", ["pml", "all_nonzero"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seed_contrastive_matches_hand_computation(reduction, seed):
    a, t, ids = _batch(seed)
    got = SeedContrastiveLoss(reduction=reduction)(a, t, ids)
    assert float(got) == pytest.approx(_contrastive_by_hand(a, t, ids, reduction), rel=1e-9, abs=1e-12)


def test_seed_contrastive_counts_same_modality_pairs():
    # every cross-clip audio-text and text-text cosine is <= 0 (no negative loss); only the audio-audio
    # pair (cos = 1/sqrt 2) is a violating negative, so the loss is non-zero on the negative side only
    # because same-modality pairs count
    r = 1 / math.sqrt(2)
    a = torch.tensor([[1.0, 0.0], [r, r]], dtype=torch.float64)
    t = torch.tensor([[r, -r], [0.0, 1.0]], dtype=torch.float64)
    ids = torch.tensor([0, 1])
    pos = 1 - r  # each of the 4 ordered audio-text positive pairs
    assert float(SeedContrastiveLoss()(a, t, ids)) == pytest.approx(pos + r)
    got = float(SeedContrastiveLoss(reduction="all_nonzero")(a, t, ids))
    assert got == pytest.approx((4 * pos + 2 * r) / 6)


def test_seed_contrastive_gradients_flow():
    a, t, ids = _batch(0)
    a.requires_grad_(True)
    SeedContrastiveLoss()(a, t, ids).backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def _infonce_by_hand(a, t, ids, temp, multi):
    b = len(ids)
    lab = [int(x) for x in ids]
    logits = [[_cos(t[i], a[j]) / temp for j in range(b)] for i in range(b)]

    def direction(mat):
        total = 0.0
        for i in range(b):
            lse = math.log(sum(math.exp(mat[i][k]) for k in range(b)))
            targets = [j for j in range(b) if (lab[j] == lab[i] if multi else j == i)]
            total += -sum((mat[i][j] - lse) / len(targets) for j in targets)
        return total / b

    transposed = [[logits[j][i] for j in range(b)] for i in range(b)]
    return 0.5 * (direction(logits) + direction(transposed))


@pytest.mark.parametrize("multi", [True, False])
@pytest.mark.parametrize("temp", [0.07, 0.5])
def test_infonce_matches_hand_computation(multi, temp):
    a, t, ids = _batch(4)
    got = InfoNCELoss(temperature=temp, multi_positive=multi)(a, t, ids)
    # the temperature is held as a float32 log, so agreement is to float32 precision of T
    assert float(got) == pytest.approx(_infonce_by_hand(a, t, ids, temp, multi), rel=1e-6)


def test_infonce_learnable_temperature_trains_and_is_clamped():
    a, t, ids = _batch(5)
    loss = InfoNCELoss(temperature=0.1, learnable=True)
    params = list(loss.parameters())
    assert len(params) == 1
    loss(a.float(), t.float(), ids).backward()
    assert params[0].grad is not None and float(params[0].grad) != 0.0
    with torch.no_grad():
        params[0].fill_(math.log(1e-6))
    assert loss.temperature == pytest.approx(0.01)
    fixed = InfoNCELoss(temperature=0.1)
    assert list(fixed.parameters()) == [] and "log_temperature" in fixed.state_dict()


def test_make_loss_rejects_unknown_names_and_params():
    from atae.errors import DataError

    assert isinstance(make_loss("infonce", temperature=0.05), InfoNCELoss)
    with pytest.raises(DataError, match="unknown loss"):
        make_loss("triplet")
    with pytest.raises(DataError, match="bad parameters"):
        make_loss("seed", margin=3)
