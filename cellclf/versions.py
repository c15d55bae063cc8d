"""Software versions recorded beside every output (model cards, summary.json), so results say
what produced them."""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Sequence
from importlib import metadata

INFERENCE_PACKAGES = ("cellclf", "numpy", "openslide-python", "openslide-bin", "tifffile", "torch",
                      "onnxruntime")
TRAINING_PACKAGES = ("cellclf", "torch", "torchvision", "lightning", "albumentations", "numpy")


def software_versions(packages: Sequence[str] = INFERENCE_PACKAGES) -> dict[str, str]:
    """Python, each installed package of ``packages`` and the OpenSlide C library."""
    out = {"python": platform.python_version()}
    for pkg in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    with contextlib.suppress(ImportError, AttributeError):
        import openslide

        out["openslide"] = openslide.__library_version__
    return out
