"""Detector choice: a name (``classical``, ``classical-fixed``, ``learned``) → ``detect(rgb, mpp)``.

Sits between the callers that make candidates (``cellclf detect``, tile folders) and the detector
implementations in :mod:`cellclf.detect.classical` and friends.
"""

from __future__ import annotations

from cellclf.annotations.tile_folder import TileSet
from cellclf.detect.classical import detect_cells
from cellclf.errors import ConfigError

DETECTORS = ("classical", "classical-fixed")


def make_tile_detector(name: str, tiles: TileSet):
    """A ``detect(tile_rgb, mpp) -> centres`` callable for the tiles of ``tiles``."""
    if name == "classical-fixed":
        return detect_cells
    if name == "classical":
        return detect_cells
    raise ConfigError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
