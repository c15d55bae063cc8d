"""Detector choice: a name (``classical``, ``classical-adaptive``, ``learned``) → ``detect(rgb, mpp)``.

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
from cellclf.detect.stain import adapt_params, estimate_stain, level_params, sample_pixels
from cellclf.errors import ConfigError

DETECTORS = ("classical", "classical-adaptive", "learned")


class SetClassical:
    """The classical detector at a tile set's own nuclear H level (``hem_cap``, see
    :func:`~cellclf.detect.stain.level_params`), one estimate for the whole set; with
    ``adaptive_stain`` also in the set's own Macenko stain space and glass."""

    def __init__(self, tiles: TileSet | Sequence[np.ndarray], params: DetectParams | None = None,
                 adaptive_stain: bool = False) -> None:
        images = ([read_tile(p) for p in tiles.images.values()] if isinstance(tiles, TileSet)
                  else list(tiles))
        sample = sample_pixels(images)
        params = params or DetectParams()
        self.stain_record = None
        if adaptive_stain:
            stain = estimate_stain(sample)
            params = adapt_params(params, stain)
            self.stain_record = stain.to_dict()
        self.params = level_params(params, sample)
        self.hem_cap = self.params.hem_cap

    def __call__(self, tile_rgb: np.ndarray, mpp: float) -> np.ndarray:
        return detect_cells(tile_rgb, mpp, self.params)


def make_tile_detector(name: str, tiles: TileSet | Sequence[np.ndarray],
                       bundle: str | Path | None = None):
    """A ``detect(tile_rgb, mpp) -> centres`` callable for the tiles of ``tiles`` (a tile set or
    the RGB images themselves; only the stain-adaptive detector looks at them).

    ``classical``: fixed Ruifrok-Johnston stain and glass 245 at the set's own nuclear H level
    (measured better on real tiles, see docs/benchmarks.md); ``classical-adaptive``: the set's own
    Macenko stain and glass as well;
    ``learned``: the heat-map network of a detector bundle (default: the shipped
    ``models/cellclf-detector-v2``)."""
    if name == "learned":
        return LearnedDetector(bundle or SHIPPED_DETECTOR)
    if name == "classical":
        return SetClassical(tiles)
    if name == "classical-adaptive":
        return SetClassical(tiles, adaptive_stain=True)
    raise ConfigError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
