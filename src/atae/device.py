"""Which torch device a command runs its towers and adapters on (``--device``, ``device=``).

``auto`` is a CUDA GPU when one is present, else the CPU (Apple's MPS is used only when asked for:
its float32 kernels differ from the CPU's by more than the golden tolerances of some towers). A device that
is asked for but missing is an error that says what is there, never a silent fall-back to the CPU.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from atae.errors import AtaeError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI reads CHOICES at start-up
    import torch

CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``name`` (see the module docstring); ``AtaeError`` when it is not usable."""
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m:
        if not torch.cuda.is_available():
            raise AtaeError(f"--device {name}: no CUDA GPU is available here (torch {torch.__version__}, "
                            f"CUDA build: {torch.version.cuda or 'no'})",
                            fix="use --device cpu (or auto), or a CUDA build of torch on a GPU machine")
        index = int(m.group(1) or 0)
        if index >= torch.cuda.device_count():
            raise AtaeError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                            fix=f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise AtaeError("--device mps: Apple's Metal backend is not available here",
                            fix="use --device cpu (or auto)")
        return torch.device("mps")
    raise AtaeError(f"unknown device {name!r}", fix=f"use {CHOICES}")


def gpus_per_worker(device) -> float:
    """GPUs each Ray tower actor asks for: one when the towers run on CUDA (Ray then places the actors on
    GPU nodes and gives each its own card), else none."""
    import torch

    return 1.0 if torch.device(str(device)).type == "cuda" else 0.0


def default_batch(device: torch.device, cpu: int, accelerator: int) -> int:
    """A batch size suited to ``device``: accelerators want many clips at once, a CPU a few."""
    return cpu if device.type == "cpu" else accelerator
