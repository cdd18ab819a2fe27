"""Tower names -> tower classes, imported lazily (so listing names never loads torch models).

Every command that takes ``--audio-encoder``/``--text-encoder`` goes through here, so a new tower is one
line in these tables.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from atae.errors import AtaeError, WeightsError

# name -> "module:Class"
AUDIO_TOWERS: dict[str, str] = {
    "aisfx": "atae.towers.aisfx:AisfxTower",
    "cnn14": "atae.towers.cnn14:Cnn14Tower",
    "efficientat-mn04": "atae.towers.efficientat:EfficientATTower",
    "efficientat-mn05": "atae.towers.efficientat:EfficientATTower",
    "efficientat-mn10": "atae.towers.efficientat:EfficientATTower",
    "efficientat-mn20": "atae.towers.efficientat:EfficientATTower",
    "efficientat-mn30": "atae.towers.efficientat:EfficientATTower",
    "efficientat-mn40": "atae.towers.efficientat:EfficientATTower",
}
# constructor options implied by a name (several names share one class)
AUDIO_TOWER_OPTIONS: dict[str, dict] = {
    n: {"size": n.split("-", 1)[1]} for n in AUDIO_TOWERS if n.startswith("efficientat-")
}

TEXT_TOWERS: dict[str, str] = {
    "minilm": "atae.towers.hf_text:HFTextTower",
    "distilroberta-base": "atae.towers.hf_text:HFTextTower",
}

SEED_PAIR = ("cnn14", "distilroberta-base")
OFFLINE_PAIR = ("aisfx", "minilm")


def _load(target: str):
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def get_audio_tower(name: str, weights=None, **opts):
    """Build the audio tower ``name`` (weights: explicit path, else the registry's resolution order)."""
    if name not in AUDIO_TOWERS:
        raise AtaeError(f"unknown audio encoder {name!r}", fix=f"use one of: {', '.join(AUDIO_TOWERS)}")
    kwargs = {**AUDIO_TOWER_OPTIONS.get(name, {}), **opts}
    return _load(AUDIO_TOWERS[name])(weights, **kwargs)


def has_tag_head(name: str) -> bool:
    """Whether the registered audio tower ``name`` has an AudioSet head (no weights are loaded)."""
    return name in AUDIO_TOWERS and bool(_load(AUDIO_TOWERS[name]).has_tags)


def get_text_tower(name: str, weights=None, **opts):
    """Build the text tower ``name``; a name that is an existing directory is a local HF model folder."""
    if name in TEXT_TOWERS:
        return _load(TEXT_TOWERS[name])(model=name, weights=weights, **opts)
    if Path(name).expanduser().is_dir():
        return _load("atae.towers.hf_text:HFTextTower")(model=str(Path(name).expanduser()), **opts)
    raise AtaeError(f"unknown text encoder {name!r}",
                    fix=f"use one of: {', '.join(TEXT_TOWERS)}, or a local Hugging Face model directory")


# audio towers from the strongest for search to the weakest: mn04 tags AudioSet as well as CNN14 (mAP
# 0.432 vs 0.431) eight times faster, and both have the AudioSet head that zero-shot search needs
AUDIO_PREFERENCE = ("efficientat-mn04", "cnn14", "aisfx")


def best_audio_tower() -> str:
    """The first of ``AUDIO_PREFERENCE`` whose weights resolve (``aisfx`` ships with the install)."""
    from atae.weights import is_available

    return next((n for n in AUDIO_PREFERENCE if is_available(n)), AUDIO_PREFERENCE[-1])


def default_towers() -> tuple[str, str]:
    """The seed's pair (cnn14 + distilroberta-base) when both weights resolve, else the offline pair."""
    from atae.weights import resolve

    try:
        for n in SEED_PAIR:
            resolve(n)
    except WeightsError:
        return OFFLINE_PAIR
    return SEED_PAIR


def get_towers(audio: str | None = None, audio_weights=None, text: str | None = None, text_weights=None,
               **opts):
    """(audio tower, text tower) by name, ``default_towers()`` for a name not given (``atae extract`` and
    ``atae train``); ``opts`` (e.g. ``device``) go to both."""
    if audio is None or text is None:
        default_audio, default_text = default_towers()
        audio, text = audio or default_audio, text or default_text
    return get_audio_tower(audio, audio_weights, **opts), get_text_tower(text, text_weights, **opts)
