"""Detector choice: a name (``classical``, ``classical-fixed``, ``learned``) → ``detect(rgb, mpp)``.

Sits between the callers that make candidates (``cellclf detect``, tile folders) and the detector
implementations in :mod:`cellclf.detect.classical` and friends.
"""

from __future__ import annotations

import numpy as np

from cellclf.annotations.tile_folder import TileSet, read_tile
from cellclf.detect.classical import DetectParams, detect_cells
from cellclf.detect.stain import adapt_params, estimate_stain, sample_tiles
from cellclf.errors import ConfigError

DETECTORS = ("classical", "classical-adaptive")


class AdaptiveClassical:
    """The classical detector in a tile set's own stain space (one estimate for the whole set)."""

    def __init__(self, tiles: TileSet, params: DetectParams | None = None) -> None:
        sample = sample_tiles([read_tile(p) for p in tiles.images.values()])
        self.stain = estimate_stain(sample)
        self.params = adapt_params(params or DetectParams(), self.stain)
        self.stain_record = self.stain.to_dict()

    def __call__(self, tile_rgb: np.ndarray, mpp: float) -> np.ndarray:
        return detect_cells(tile_rgb, mpp, self.params)


def make_tile_detector(name: str, tiles: TileSet):
    """A ``detect(tile_rgb, mpp) -> centres`` callable for the tiles of ``tiles``.

    ``classical``: fixed Ruifrok-Johnston stain and glass 245 (measured better on real tiles, see
    docs/benchmarks.md); ``classical-adaptive``: the set's own Macenko stain and glass."""
    if name == "classical":
        return detect_cells
    if name == "classical-adaptive":
        return AdaptiveClassical(tiles)
    raise ConfigError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
