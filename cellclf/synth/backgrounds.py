"""Hybrid slides, step 1: a real tissue background and the real nuclei already in it.

A background is either a whole-slide file (OpenSlide: ``.svs``, ``.tif``, …; a level-0 box of
it) or a folder of tiles with a ``points.csv`` of nucleus centres (``image,x,y`` and optionally
``class`` and ``split``, as in ``../shared/data/real/bm_graz`` and ``crchisto``). Tiles are laid
side by side into one mosaic. The real nuclei come from the point annotations where there are
any, otherwise from the classical candidate detector (stated in every truth feature's
``nucleus_source``). Everything is resampled to the output µm/px when that differs.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cellclf.detect.classical import detect_cells
from cellclf.errors import ConfigError
from cellclf.wsi.slide import Slide

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
MAX_BACKGROUND_PX = 40_000_000       # held in memory (~3 GB peak at the limit): --region beyond
DETECT_TILE_PX = 1024
DETECT_HALO_PX = 64
SOURCE_POINTS = "point_annotation"
SOURCE_DETECTOR = "classical_detector"


@dataclass(frozen=True)
class Background:
    """RGB uint8 mosaic at ``mpp`` with its real nuclei (output px) and where they came from."""

    rgb: np.ndarray
    mpp: float
    nuclei_xy: np.ndarray             # (N, 2) px in ``rgb``
    nuclei_class: tuple[str, ...]     # the source's own class per nucleus ("" when none)
    nucleus_source: str               # SOURCE_POINTS or SOURCE_DETECTOR
    name: str
    tiles: tuple[tuple[str, int, int, int, int], ...]   # (tile name, x, y, w, h) in the mosaic


def _resample(rgb: np.ndarray, factor: float) -> np.ndarray:
    if abs(factor - 1.0) < 1e-6:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.LANCZOS))


def detect_nuclei(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """Classical detector candidates (N, 2) px over a large RGB image, tile by tile with a
    halo; each tile keeps the centres in its own core."""
    h, w = rgb.shape[:2]
    found = []
    for y in range(0, h, DETECT_TILE_PX):
        for x in range(0, w, DETECT_TILE_PX):
            ya, xa = max(0, y - DETECT_HALO_PX), max(0, x - DETECT_HALO_PX)
            yb = min(h, y + DETECT_TILE_PX + DETECT_HALO_PX)
            xb = min(w, x + DETECT_TILE_PX + DETECT_HALO_PX)
            xy = detect_cells(np.ascontiguousarray(rgb[ya:yb, xa:xb]), mpp).astype(np.float64)
            xy += (xa, ya)
            own = ((xy[:, 0] >= x) & (xy[:, 0] < x + DETECT_TILE_PX) & (xy[:, 1] >= y)
                   & (xy[:, 1] < y + DETECT_TILE_PX))
            found.append(xy[own])
    return np.concatenate(found) if found else np.zeros((0, 2))


def _from_slide(path: Path, mpp_out: float | None, region, slide_mpp: float | None
                ) -> Background:
    with Slide(path, mpp=slide_mpp) as slide:
        x, y, w, h = region or (0, 0, slide.width, slide.height)
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > slide.width or y + h > slide.height:
            raise ConfigError(f"{path}: region {x},{y},{w},{h} is not inside the slide "
                              f"({slide.width}x{slide.height} px); pass --region X,Y,W,H")
        out_mpp = float(mpp_out or slide.mpp)
        ow, oh = round(w * slide.mpp / out_mpp), round(h * slide.mpp / out_mpp)
        if ow * oh > MAX_BACKGROUND_PX:
            raise ConfigError(f"{path}: a {ow}x{oh} px background is too large to blend in "
                              f"memory; pass --region X,Y,W,H (level-0 px) of at most "
                              f"{MAX_BACKGROUND_PX // 1_000_000} MP")
        rgb = slide.read_region_mpp(x, y, w, h, ow, oh)
    xy = detect_nuclei(rgb, out_mpp)
    return Background(rgb, out_mpp, xy, ("",) * len(xy), SOURCE_DETECTOR, path.stem,
                      ((path.name, 0, 0, ow, oh),))


def _read_points(folder: Path) -> dict[str, list[tuple[float, float, str]]]:
    path = folder / "points.csv"
    if not path.is_file():
        return {}
    out: dict[str, list[tuple[float, float, str]]] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"image", "x", "y"} - set(reader.fieldnames or ())
        if missing:
            raise ConfigError(f"{path}: needs columns image,x,y (optional class, split); "
                              f"missing {sorted(missing)}")
        for row in reader:
            key = f"{row.get('split') or ''}/{row['image']}"
            out.setdefault(key, []).append((float(row["x"]), float(row["y"]),
                                            row.get("class") or ""))
    return out


def _tile_key(folder: Path, img: Path) -> str:
    rel = img.relative_to(folder).parts
    split = rel[-2] if len(rel) >= 3 and rel[0] == "images" else ""
    return f"{split}/{img.stem}"


def _from_tiles(folder: Path, tile_mpp: float | None, mpp_out: float | None,
                max_tiles: int | None) -> Background:
    if tile_mpp is None:
        raise ConfigError(f"{folder}: tiles carry no µm/px; pass --background-mpp (e.g. 0.26 "
                          "for bm_graz, 0.55 for crchisto)")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if max_tiles:
        images = images[:max_tiles]
    if not images:
        raise ConfigError(f"{folder}: no tile images ({', '.join(IMAGE_EXTS)}) found")
    points = _read_points(folder)
    out_mpp = float(mpp_out or tile_mpp)
    factor = tile_mpp / out_mpp
    tiles = [_resample(np.asarray(Image.open(p).convert("RGB")), factor) for p in images]
    cols = math.ceil(math.sqrt(len(tiles)))
    cell_w = max(t.shape[1] for t in tiles)
    cell_h = max(t.shape[0] for t in tiles)
    rows = math.ceil(len(tiles) / cols)
    mosaic = np.full((rows * cell_h, cols * cell_w, 3), 255, np.uint8)
    xy: list[tuple[float, float]] = []
    classes: list[str] = []
    placed = []
    use_points = bool(points)
    for k, (img, tile) in enumerate(zip(images, tiles, strict=True)):
        x0, y0 = (k % cols) * cell_w, (k // cols) * cell_h
        th, tw = tile.shape[:2]
        mosaic[y0:y0 + th, x0:x0 + tw] = tile
        placed.append((str(img.relative_to(folder)), x0, y0, tw, th))
        if use_points:
            for px, py, cls in points.get(_tile_key(folder, img), []):
                xy.append((x0 + px * factor, y0 + py * factor))
                classes.append(cls)
        else:
            found = detect_nuclei(tile, out_mpp) + (x0, y0)
            xy.extend(map(tuple, found))
            classes.extend([""] * len(found))
    if mosaic.shape[0] * mosaic.shape[1] > MAX_BACKGROUND_PX:
        raise ConfigError(f"{folder}: the tile mosaic is too large to blend in memory; pass "
                          "--max-tiles")
    return Background(mosaic, out_mpp, np.asarray(xy, np.float64).reshape(-1, 2),
                      tuple(classes), SOURCE_POINTS if use_points else SOURCE_DETECTOR,
                      folder.name, tuple(placed))


def load_background(path: str | Path, mpp: float | None = None,
                    background_mpp: float | None = None,
                    region: tuple[int, int, int, int] | None = None,
                    max_tiles: int | None = None) -> Background:
    """Read a background slide (``region`` in level-0 px) or tile folder at ``mpp`` µm/px
    (default: the background's own)."""
    path = Path(path)
    if path.is_dir():
        return _from_tiles(path, background_mpp, mpp, max_tiles)
    if path.is_file():
        return _from_slide(path, mpp, region, background_mpp)
    raise ConfigError(f"background {path} not found: pass a slide file or a folder of tiles "
                      "with points.csv")
