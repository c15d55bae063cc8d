"""Detector choice: a name (``classical``, ``classical-fixed``, ``learned``) → ``detect(rgb, mpp)``.

Sits between the callers that make candidates (``cellclf detect``, tile folders) and the detector
implementations in :mod:`cellclf.detect.classical` and friends.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cellclf.annotations.tile_folder import TileSet, read_tile
from cellclf.detect.classical import DetectParams, detect_cells
from cellclf.detect.learned import SHIPPED_DETECTOR, LearnedDetector
from cellclf.detect.stain import adapt_params, estimate_stain, sample_pixels
from cellclf.errors import ConfigError

DETECTORS = ("classical", "classical-adaptive", "learned")


class AdaptiveClassical:
    """The classical detector in a tile set's own stain space (one estimate for the whole set)."""

    def __init__(self, tiles: TileSet | Sequence[np.ndarray],
                 params: DetectParams | None = None) -> None:
        images = ([read_tile(p) for p in tiles.images.values()] if isinstance(tiles, TileSet)
                  else list(tiles))
        sample = sample_pixels(images)
        self.stain = estimate_stain(sample)
        self.params = adapt_params(params or DetectParams(), self.stain)
        self.stain_record = self.stain.to_dict()

    def __call__(self, tile_rgb: np.ndarray, mpp: float) -> np.ndarray:
        return detect_cells(tile_rgb, mpp, self.params)


def make_tile_detector(name: str, tiles: TileSet | Sequence[np.ndarray],
                       bundle: str | Path | None = None):
    """A ``detect(tile_rgb, mpp) -> centres`` callable for the tiles of ``tiles`` (a tile set or
    the RGB images themselves; only the stain-adaptive detector looks at them).

    ``classical``: fixed Ruifrok-Johnston stain and glass 245 (measured better on real tiles, see
    docs/benchmarks.md); ``classical-adaptive``: the set's own Macenko stain and glass;
    ``learned``: the heat-map network of a detector bundle (default: the shipped
    ``models/cellclf-detector-v1``)."""
    if name == "learned":
        return LearnedDetector(bundle or SHIPPED_DETECTOR)
    if name == "classical":
        return detect_cells
    if name == "classical-adaptive":
        return AdaptiveClassical(tiles)
    raise ConfigError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
