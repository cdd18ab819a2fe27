"""Training losses; ``make_loss(name, **params)`` builds one from a recipe's ``[loss]`` table."""

from __future__ import annotations

from atae.losses.contrastive import SeedContrastiveLoss
from atae.losses.infonce import InfoNCELoss

LOSSES = {"seed": SeedContrastiveLoss, "infonce": InfoNCELoss}


def make_loss(name: str, **params):
    from atae.errors import DataError

    if name not in LOSSES:
        raise DataError(f"unknown loss {name!r}", fix=f"use one of {sorted(LOSSES)}")
    try:
        return LOSSES[name](**params)
    except (TypeError, ValueError) as e:
        raise DataError(f"bad parameters for loss {name!r}: {e}",
                        fix="check the recipe's [loss] table") from e


__all__ = ["SeedContrastiveLoss", "InfoNCELoss", "LOSSES", "make_loss"]
