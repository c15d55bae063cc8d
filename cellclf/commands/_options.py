"""Checks of command-line values shared by several commands: devices, backends, output paths and
numeric ranges (the model bundle, a path or a shipped model's name, is
:func:`cellclf.card.resolve_model`). Each bad value is an
:class:`~cellclf.errors.OptionError` naming the option and what to pass instead."""

from __future__ import annotations

import math
import os
from pathlib import Path

from cellclf.errors import OptionError

BACKENDS = ("auto", "torch", "onnx")


def check_device(device: str) -> str:
    """auto | cpu | cuda | cuda:N; cuda only where a GPU is visible to torch."""
    name, _, index = device.partition(":")
    if name not in ("auto", "cpu", "cuda") or (index and (name != "cuda" or not index.isdigit())):
        raise OptionError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N")
    if name == "cuda":
        from cellclf.model.engine import torch_available

        ok = False
        if torch_available():
            import torch

            ok = torch.cuda.is_available() and int(index or 0) < torch.cuda.device_count()
        if not ok:
            raise OptionError(f"--device {device}: no such CUDA GPU on this machine (or PyTorch "
                              "with CUDA is not installed); use --device auto or cpu")
    return device


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise OptionError(f"{option} {value!r} is not one of {', '.join(choices)}")
    return value


def check_positive(option: str, value: float | None, *, allow_none: bool = True,
                   upper: float | None = None, unit: str = "") -> float | None:
    """A finite number > 0 (and ≤ ``upper``), or None where the option is optional."""
    if value is None and allow_none:
        return None
    if value is None or not math.isfinite(value) or value <= 0 or (upper is not None
                                                                   and value > upper):
        limit = f" and at most {upper:g}{unit}" if upper is not None else ""
        raise OptionError(f"{option} must be a number greater than 0{limit}, got {value}")
    return value


def check_mpp(value: float | None, option: str = "--mpp") -> float | None:
    """µm per pixel of a real scan: 0.05–20 (100× oil to a 0.5× overview)."""
    if value is None:
        return None
    if not math.isfinite(value) or not 0.05 <= value <= 20:
        raise OptionError(f"{option} {value} is not a scanner pixel size: give µm per pixel "
                          "between 0.05 and 20 (0.25 for a 40× scan, 0.5 for 20×)")
    return value


def _writable_ancestor(path: Path) -> Path:
    """The nearest existing folder at or above ``path`` (where a new file or folder would go)."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_file(option: str, path: Path) -> Path:
    """An output file path: not a folder, and its folder writable (checked before any work)."""
    path = Path(path)
    if path.is_dir():
        raise OptionError(f"{option} {path} is a folder: give a file name (e.g. {path / 'out'}"
                          f"{path.suffix or '.geojson'})")
    base = _writable_ancestor(path.parent)
    if not base.is_dir():
        raise OptionError(f"{option} {path}: {base} is a file, not a folder; choose another path")
    if not os.access(base, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OptionError(f"{option} {path}: cannot write there (permission denied or a "
                          "read-only file system); choose a folder you may write to")
    return path


def check_output_dir(option: str, path: Path) -> Path:
    """An output folder: not an existing file, and writable (or creatable) before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OptionError(f"{option} {path} is a file, not a folder: give a folder (it is "
                          "created if missing)")
    base = _writable_ancestor(path)
    if not base.is_dir():
        raise OptionError(f"{option} {path}: {base} is a file, not a folder; choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OptionError(f"{option} {path}: cannot write there (permission denied or a "
                          "read-only file system); choose a folder you may write to")
    return path
