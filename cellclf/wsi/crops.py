"""Cell crops: the ``crop`` stage (candidate centres → N × crop_px × crop_px × 3 uint8).

``cut_crops`` cuts windows out of one tile already in memory. ``extract_crops`` serves arbitrary
level-0 centres (training annotations, re-reading review cells): it lays a tile grid whose halo
covers a crop's half-width plus 2 px, gives each centre to the tile whose core owns it, reads only
the tiles that own at least one centre, each once (:class:`~cellclf.wsi.tile_reader.TileReader`, parallel),
and cuts every crop from its owner's tile. Because the halo covers half a crop, a crop cut from a
tile equals a direct read of the same window, at tile borders and slide edges too (white beyond the
slide).

A crop centred on tile-px ``(cx, cy)`` (continuous coordinates, pixel ``i`` covers ``[i, i+1)``)
covers px ``[a, a + crop_px)`` with ``a = round(c − crop_px / 2)`` (halves round up).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cellclf.errors import ConfigError
from cellclf.wsi.tile_reader import TileReader
from cellclf.wsi.tiling import owner_index

DEFAULT_TILE_UM = 512.0


def crop_corners(centres_px: np.ndarray, crop_px: int) -> np.ndarray:
    """Top-left px (N×2 int) of the crop_px windows centred on ``centres_px`` (N×2 float)."""
    xy = np.asarray(centres_px, dtype=np.float64).reshape(-1, 2)
    return np.floor(xy - crop_px / 2 + 0.5).astype(np.int64)


def cut_crops(tile_rgb: np.ndarray, centres_px: np.ndarray, crop_px: int) -> np.ndarray:
    """Crops (N, crop_px, crop_px, 3) uint8 centred on tile-px centres; white outside the tile."""
    if crop_px < 1:
        raise ConfigError(f"crop_px must be ≥ 1, got {crop_px}")
    corners = crop_corners(centres_px, crop_px)
    n = len(corners)
    if n == 0:
        return np.zeros((0, crop_px, crop_px, 3), np.uint8)
    h, w = tile_rgb.shape[:2]
    pad = int(max(0, -corners.min(), (corners[:, 0] + crop_px - w).max(),
                  (corners[:, 1] + crop_px - h).max()))
    src = tile_rgb[..., :3]
    if pad:  # only when a crop leaves the tile (halo smaller than half a crop)
        src = np.pad(src, ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
    # one slice copy per crop (rows of contiguous bytes): ~40× faster than a fancy-index gather
    out = np.empty((n, crop_px, crop_px, 3), np.uint8)
    for i, (x, y) in enumerate((corners + pad).tolist()):
        out[i] = src[y:y + crop_px, x:x + crop_px]
    return out


def crop_halo_um(crop_px: int, work_mpp: float) -> float:
    """Tile halo that keeps every owned centre's crop inside the read window (+2 px slack)."""
    return (crop_px / 2 + 2) * work_mpp


def extract_crops(path: str | Path, centres0: np.ndarray, work_mpp: float, crop_px: int,
                  mpp: float | None = None, workers: int = 0, *,
                  tile_um: float = DEFAULT_TILE_UM, fast: bool = True,
                  reader: TileReader | None = None) -> np.ndarray:
    """Crops (N, crop_px, crop_px, 3) at ``work_mpp`` centred on level-0 ``centres0`` (N×2),
    in input order. Pass an open ``reader`` to reuse its handles (``path``/``mpp`` then unused).
    """
    xy0 = np.asarray(centres0, dtype=np.float64).reshape(-1, 2)
    if crop_px < 1:
        raise ConfigError(f"crop_px must be ≥ 1, got {crop_px}")
    crops = np.full((len(xy0), crop_px, crop_px, 3), 255, np.uint8)
    if len(xy0) == 0:
        return crops
    if not np.isfinite(xy0).all():
        raise ConfigError(f"{path}: cell centres contain NaN or infinite coordinates")
    own_reader = reader is None
    rd = reader if reader is not None else TileReader(path, work_mpp, mpp, workers, fast)
    try:
        tiles = rd.grid(tile_um, crop_halo_um(crop_px, rd.work_mpp))
        owner = owner_index(tiles, xy0)
        needed = np.unique(owner[owner >= 0])
        wanted = [tiles[int(k)] for k in needed]
        for k, (tile, rgb) in zip(needed, rd.iter_tiles(wanted), strict=True):
            idx = np.flatnonzero(owner == k)
            crops[idx] = cut_crops(rgb, tile.to_tile_px(xy0[idx]), crop_px)
        # centres outside the slide have no owner: read their windows directly
        for i in np.flatnonzero(owner < 0):
            crops[i] = _direct_crop(rd, xy0[i], crop_px)
    finally:
        if own_reader:
            rd.close()
    return crops


def _direct_crop(reader: TileReader, centre0: np.ndarray, crop_px: int) -> np.ndarray:
    scale = reader.work_mpp / reader.mpp
    half0 = crop_px / 2 * scale
    return reader.read_box(centre0[0] - half0, centre0[1] - half0, crop_px * scale,
                           crop_px * scale, crop_px, crop_px)
