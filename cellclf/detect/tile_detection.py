"""Detection on a tile folder: every tile of a :class:`TileSet` → centres, scored against truth.

Sits beside :mod:`cellclf.detect.slide_detection` (whole slides) for data that comes as loose
tiles (``cellclf detect TILES --mpp M --truth points.csv``)::

    TileSet ──read_tile──▶ RGB ──detector(rgb, mpp)──▶ centres (tile px, continuous)
      ──score_tile_set──▶ recall / precision / F1 / duplicates (one-to-one within match_um)

Truth points are 0-based pixel indices, so a pixel's centre is ``i + 0.5`` in the detector's
continuous coordinates; the CSV written here uses the same 0-based convention as the truth.
Tiles are matched separately (a candidate never matches a point of another tile) and the counts
pooled over the set.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cellclf.annotations.tile_folder import TileSet, read_tile
from cellclf.detect.matching import detection_metrics

Detector = Callable[[np.ndarray, float], np.ndarray]


def detect_tile_set(tiles: TileSet, detector: Detector) -> dict[str, np.ndarray]:
    """Image stem → candidate centres (N×2 float64, continuous tile px) for every tile."""
    return {name: np.asarray(detector(read_tile(path), tiles.mpp), dtype=np.float64).reshape(-1, 2)
            for name, path in tiles.images.items()}


def score_tile_set(tiles: TileSet, found: dict[str, np.ndarray], match_um: float) -> dict:
    """Pooled detection metrics (see :func:`detection_metrics`) plus per-tile F1 and counts.

    Each tile is moved to its own stretch of one long strip (gaps wider than the match radius),
    so a single matching call scores all tiles without cross-tile matches.
    """
    if tiles.truth is None:
        raise ValueError("score_tile_set needs a TileSet opened with truth")
    radius_px = match_um / tiles.mpp
    pred_all, truth_all, names_all = [], [], []
    per_tile: dict[str, dict] = {}
    offset = 0.0
    for name in tiles.images:
        pred = found[name]
        t = tiles.truth_of(name)
        truth_xy = t.xy + 0.5  # 0-based pixel index -> continuous pixel centre
        m = detection_metrics(pred, truth_xy, list(t.classes), radius_px)
        per_tile[name] = {k: m[k] for k in ("n_pred", "n_matched", "f1", "recall_all",
                                            "precision", "n_duplicates")}
        per_tile[name]["n_truth"] = len(t.xy)
        span = max(pred[:, 0].max() if len(pred) else 0.0,
                   truth_xy[:, 0].max() if len(truth_xy) else 0.0)
        shift = np.array([offset, 0.0])
        pred_all.append(pred + shift)
        truth_all.append(truth_xy + shift)
        names_all.extend(t.classes)
        offset += span + 4 * radius_px + 1.0
    metrics = detection_metrics(np.concatenate(pred_all), np.concatenate(truth_all), names_all,
                                radius_px)
    area_mm2 = sum(_tile_area_px(p) for p in tiles.images.values()) * (tiles.mpp * 1e-3) ** 2
    metrics.update(match_um=match_um, mpp=tiles.mpp, n_tiles=len(tiles.images),
                   tile_area_mm2=area_mm2,
                   candidates_per_mm2=metrics["n_pred"] / area_mm2 if area_mm2 else None,
                   per_tile=per_tile)
    return metrics


def _tile_area_px(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return im.width * im.height


def write_points_csv(path: str | Path, found: dict[str, np.ndarray],
                     label: str = "candidate") -> None:
    """Candidates as a points CSV ``image,x,y,class`` (0-based px, the truth CSV's convention)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "x", "y", "class"])
        for name, xy in found.items():
            for x, y in xy - 0.5:
                w.writerow([name, f"{x:.2f}", f"{y:.2f}", label])
    tmp.replace(path)
