"""Tile grid at the working resolution (pure maths): the stage between ``tissue`` and ``read``.

A slide of ``width0 × height0`` level-0 px at ``slide_mpp`` µm/px is cut into square cores of
``tile_um`` µm measured at the working resolution ``work_mpp`` (``round(tile_um / work_mpp)`` work
px). With ``scale = work_mpp / slide_mpp`` level-0 px per work px (any positive float, e.g.
0.5 / 0.499 = 1.002), core ``i`` spans level-0 ``[round(i·T·scale), round((i+1)·T·scale))``, the
last one clipped to the slide: the cores are integer, half-open and partition ``[0, W) × [0, H)``
exactly, so every point of the slide has exactly one owner.

Each tile's read window is its core grown by ``round(halo_um / slide_mpp)`` level-0 px on every
side (it may leave the slide; the reader fills white there) and is read at ``out_w × out_h`` work
px, ``out = round(read size / scale)``. ``Tile.to_level0`` / ``Tile.to_tile_px`` use the tile's
exact float scale ``read size / out size`` per axis, in continuous coordinates (pixel ``i`` covers
``[i, i + 1)``), so a detector's centre maps to level-0 and back without drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cellclf.errors import ConfigError

if TYPE_CHECKING:
    from cellclf.wsi.tissue import TissueMask


@dataclass(frozen=True)
class Tile:
    """One tile: its owned core and the (larger) window read for it, all level-0 px."""

    col: int
    row: int
    core: tuple[int, int, int, int]  # (x0, y0, x1, y1), half-open; cores partition the slide
    read: tuple[int, int, int, int]  # core grown by the halo; may leave the slide
    out_w: int  # read window size at the working mpp, px
    out_h: int

    @property
    def scale(self) -> tuple[float, float]:
        """Level-0 px per tile px along x and y (exact for this tile)."""
        return ((self.read[2] - self.read[0]) / self.out_w,
                (self.read[3] - self.read[1]) / self.out_h)

    def to_level0(self, xy_px: np.ndarray) -> np.ndarray:
        """Tile px (N×2 float, continuous) → level-0 px."""
        sx, sy = self.scale
        xy = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
        return np.column_stack((self.read[0] + xy[:, 0] * sx, self.read[1] + xy[:, 1] * sy))

    def to_tile_px(self, xy0: np.ndarray) -> np.ndarray:
        """Level-0 px (N×2) → tile px (continuous)."""
        sx, sy = self.scale
        xy = np.asarray(xy0, dtype=np.float64).reshape(-1, 2)
        return np.column_stack(((xy[:, 0] - self.read[0]) / sx, (xy[:, 1] - self.read[1]) / sy))

    def owns(self, xy0: np.ndarray) -> np.ndarray:
        """Bool per level-0 point: inside the half-open core ``[x0, x1) × [y0, y1)``."""
        xy = np.asarray(xy0, dtype=np.float64).reshape(-1, 2)
        x0, y0, x1, y1 = self.core
        return (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)

    def owned_cells(self, centres_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The detections this tile owns (centre in its core), so neighbouring tiles' halos
        never count a cell twice: (their tile-px centres, as given; their level-0 centres)."""
        centres = np.asarray(centres_px).reshape(-1, 2)
        xy0 = self.to_level0(centres)
        keep = self.owns(xy0)
        return centres[keep], xy0[keep]


def core_edges(length0: int, core0: float) -> list[int]:
    """Integer core boundaries along one axis: 0, round(core0), round(2·core0), …, length0."""
    n = max(1, math.ceil(length0 / core0))
    edges = [0]
    for i in range(1, n + 1):
        edge = min(round(i * core0), length0)
        if edge > edges[-1]:
            edges.append(edge)
    if edges[-1] != length0:
        edges.append(length0)
    return edges


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ConfigError(f"tiling: {name} must be a positive number, got {value!r}")


def tile_grid(width0: int, height0: int, slide_mpp: float, work_mpp: float, tile_um: float,
              halo_um: float, tissue: TissueMask | None = None,
              min_tissue_fraction: float = 0.0) -> list[Tile]:
    """Tiles in row-major order; with ``tissue``, only those whose core's tissue share is
    greater than ``min_tissue_fraction`` (0 keeps every core that touches tissue)."""
    _check_positive(width0=width0, height0=height0, slide_mpp=slide_mpp, work_mpp=work_mpp,
                    tile_um=tile_um)
    if not (math.isfinite(halo_um) and halo_um >= 0):
        raise ConfigError(f"tiling: halo_um must be ≥ 0 µm, got {halo_um!r}")
    scale = work_mpp / slide_mpp
    tile_px = max(1, round(tile_um / work_mpp))
    halo0 = round(halo_um / slide_mpp)
    xs, ys = core_edges(int(width0), tile_px * scale), core_edges(int(height0), tile_px * scale)
    tiles = []
    for row, (y0, y1) in enumerate(zip(ys[:-1], ys[1:], strict=True)):
        for col, (x0, x1) in enumerate(zip(xs[:-1], xs[1:], strict=True)):
            if tissue is not None and tissue.fraction_in_box(x0, y0, x1, y1) <= min_tissue_fraction:
                continue
            read = (x0 - halo0, y0 - halo0, x1 + halo0, y1 + halo0)
            out_w = max(1, round((read[2] - read[0]) / scale))
            out_h = max(1, round((read[3] - read[1]) / scale))
            tiles.append(Tile(col, row, (x0, y0, x1, y1), read, out_w, out_h))
    return tiles


def owner_index(tiles: list[Tile], xy0: np.ndarray) -> np.ndarray:
    """Index into ``tiles`` of the tile whose core owns each level-0 point, -1 for none."""
    xy = np.asarray(xy0, dtype=np.float64).reshape(-1, 2)
    result = np.full(len(xy), -1, dtype=np.int64)
    if not tiles or not len(xy):
        return result
    x_starts = np.array(sorted({t.core[0] for t in tiles}))
    y_starts = np.array(sorted({t.core[1] for t in tiles}))
    grid = np.full((len(y_starts), len(x_starts)), -1, dtype=np.int64)
    for k, t in enumerate(tiles):
        grid[np.searchsorted(y_starts, t.core[1]), np.searchsorted(x_starts, t.core[0])] = k
    cx = np.searchsorted(x_starts, xy[:, 0], side="right") - 1
    cy = np.searchsorted(y_starts, xy[:, 1], side="right") - 1
    valid = (cx >= 0) & (cy >= 0)
    cand = np.where(valid, grid[np.maximum(cy, 0), np.maximum(cx, 0)], -1)
    cores = np.array([t.core for t in tiles], dtype=np.float64)
    c = cores[np.maximum(cand, 0)]
    inside = ((xy[:, 0] >= c[:, 0]) & (xy[:, 0] < c[:, 2]) & (xy[:, 1] >= c[:, 1])
              & (xy[:, 1] < c[:, 3]))
    result[(cand >= 0) & inside] = cand[(cand >= 0) & inside]
    return result


def spread_evenly(items: list, k: int) -> list:
    """``k`` items spread evenly over the list (all of them when there are fewer)."""
    if len(items) <= k:
        return list(items)
    idx = np.linspace(0, len(items) - 1, k).round().astype(int)
    return [items[i] for i in idx]
