"""Find again the tower weights a model (or a library) was made with, by their SHA-256.

A trained model's numbers only mean something with the exact tower weights it was trained on, and its
config records their identity (``TowerInfo.weights_sha256``) and the file it read
(``AlignedModel.weights_files``). ``weights_for`` looks for a file with that identity: the path the user
gives, then the remembered path, then the registry's usual places (``$ATAE_HOME``, the Hugging Face
cache, a pip package) and any file fetched beside them. A file whose hash differs is never used quietly:
the error names it, both hashes and how to get the right one.
"""

from __future__ import annotations

from pathlib import Path

from atae import weights as W
from atae.errors import ModelError, WeightsError

# the options a TowerInfo records that are constructor arguments: a tower is rebuilt with them
AUDIO_OPTIONS = ("window_s", "hop_s", "embedding")
TEXT_OPTIONS = ("layer", "max_length")


def _candidates(name: str, remembered) -> list[Path]:
    out: list[Path] = []
    if remembered:
        out.append(Path(remembered).expanduser())
    try:
        out.append(W.resolve(name))
    except WeightsError:
        pass
    d = W.cache_dir(name)
    if d.is_dir() and W.get_spec(name).kind == "file":
        out += sorted(p for p in d.iterdir() if p.is_file() and not p.name.endswith(".part"))
    seen, unique = set(), []
    for p in out:
        if p.exists() and p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def weights_for(info, *, explicit=None, remembered=None) -> Path | None:
    """The weights file (or folder) whose identity is ``info.weights_sha256``.

    ``explicit`` (a user's --audio-weights/--text-weights) must match; ``remembered``: the path the model
    or library recorded. Returns ``explicit`` untouched for towers the registry does not know (or an
    identity that was never recorded), and raises ``WeightsError`` when no candidate matches."""
    want = getattr(info, "weights_sha256", None)
    if info.name not in W.WEIGHTS or not want:
        return Path(explicit).expanduser() if explicit is not None else None
    if explicit is not None:
        p = W.resolve(info.name, explicit)
        got = W.weights_id(p)
        if got != want:
            raise WeightsError(
                f"these {info.name} weights (SHA-256 {got[:12]}...) are not the ones the model or library "
                f"was made with (SHA-256 {want[:12]}...)",
                path=p,
                fix="pass the original weights file, or train / index again with these weights",
            )
        return p
    found = []
    for p in _candidates(info.name, remembered):
        got = W.weights_id(p)
        if got == want:
            return p
        found.append(f"{p} (SHA-256 {got[:12]}...)")
    spec = W.get_spec(info.name)
    fetchable = spec.sha256 == want
    seen = "; found only " + ", ".join(found) if found else ""
    raise WeightsError(
        f"the {info.name} weights this model or library was made with (SHA-256 {want[:12]}...) are not on "
        f"this machine{f', last seen at {remembered}' if remembered else ''}{seen}",
        fix=(f"run `atae weights fetch {info.name}`" if fetchable else "restore the original file")
        + " or pass it with --audio-weights/--text-weights",
    )


def _options(info, names) -> dict:
    return {k: info.options[k] for k in names if k in (info.options or {})}


def audio_tower_for(info, *, explicit=None, remembered=None, device: str = "cpu"):
    """The audio tower ``info`` describes: its weights found by ``weights_for``, its recorded options."""
    from atae.towers.registry import get_audio_tower

    found = weights_for(info, explicit=explicit, remembered=remembered)
    return get_audio_tower(info.name, found, device=device, **_options(info, AUDIO_OPTIONS))


def text_tower_for(info, *, explicit=None, remembered=None, device: str = "cpu"):
    """The text tower ``info`` describes (as ``audio_tower_for``); a local model folder is taken from
    ``explicit``, else from the folder the model remembers."""
    from atae.towers.registry import TEXT_TOWERS, get_text_tower

    opts = _options(info, TEXT_OPTIONS)
    if info.name in TEXT_TOWERS:
        found = weights_for(info, explicit=explicit, remembered=remembered)
        return get_text_tower(info.name, found, device=device, **opts)
    folder = explicit if explicit is not None else remembered
    if folder is None or not Path(folder).expanduser().is_dir():
        raise ModelError(f"the model's text encoder {info.name!r} is a local model folder"
                         + (f", last seen at {folder}" if folder is not None else ""),
                         fix="pass --text-weights DIR (the folder it was trained with)")
    return get_text_tower(str(folder), device=device, **opts)
