"""Tile folders as training and evaluation data: image tiles + their points CSV → slide entries.

Sits under :mod:`cellclf.annotations.labelled_data` (which calls it from ``discover`` and
``load_points``): a folder of real tiles (PNG/JPEG/TIFF, any depth) with ``points.csv``
(``image,x,y,class[,split]``, 0-based tile pixels, the format of ``cellclf detect --truth``)
becomes one :class:`SlideEntry` per annotated tile; each tile then opens as a one-level slide
at ``--mpp`` (``wsi.slide.open_plain_image``), so training, evaluation and calibration treat it
like any slide. The CSV's ``split`` column (train/val/validation/test) assigns tiles to splits.
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import numpy as np

from cellclf.annotations import records
from cellclf.annotations.tile_folder import find_tiles, read_tile_points
from cellclf.errors import AnnotationError


def is_tile_points_csv(path: Path) -> bool:
    """A tile folder's points CSV: an ``image`` column and no ``slide`` column."""
    header = _csv_header(path)
    return "image" in header and "slide" not in header


def _csv_header(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            first = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []  # not readable as a tile CSV: the slide-CSV reader says what is wrong
    return [h.strip().lower() for h in first]


@functools.lru_cache(maxsize=4)
def _tile_points_cached(path: str, mtime_ns: int) -> dict:
    return read_tile_points(path)


def tile_points(csv_path: Path, image: str) -> records.Points:
    """One tile's points from a tile folder's CSV: 0-based pixel indices → pixel centres."""
    table = _tile_points_cached(str(csv_path), csv_path.stat().st_mtime_ns)
    if image not in table:
        return records.Points(np.zeros((0, 2)), (), np.zeros(0, bool), csv_path)
    t = table[image]
    return records.Points(t.xy + 0.5, tuple(t.classes), np.zeros(len(t.xy), bool), csv_path)


def _tile_split(value: str) -> str | None:
    v = value.strip().lower()
    return {"validation": "val", "valid": "val"}.get(v, v) if v else None


def tile_folder_source(csv_path: Path, root: Path, mpp: float | None) -> records.DataSource:
    """A tile folder + its points CSV as a data source: one entry per annotated tile, split by
    the CSV's ``split`` column when it has one (train/val/validation/test)."""
    if mpp is None or not mpp > 0:
        raise AnnotationError(f"{root}: tiles have no scale; pass --mpp (µm per pixel of the "
                              "tiles, e.g. 0.5 for 20x, 0.25 for 40x)")
    images = find_tiles(root)
    header, rows = records.csv_rows(csv_path)
    split_of: dict[str, str | None] = {}
    for line, row in rows:
        name = Path((row.get("image") or "").strip())
        key = name.stem if name.suffix.lower() in records.IMAGE_EXTS else name.name
        if key not in images:
            raise AnnotationError(f"{csv_path}: line {line}: image {key!r} is not under {root}; "
                                  "check the folder or the CSV's image column")
        split = _tile_split(row.get("split") or "") if "split" in header else None
        if split is not None and split not in records.SPLITS:
            raise AnnotationError(f"{csv_path}: line {line}: split {row['split']!r}; use train, "
                                  "val (or validation) or test")
        split_of.setdefault(key, split)
    if not split_of:
        raise AnnotationError(f"{csv_path}: no annotated tiles")
    entries = tuple(records.SlideEntry(images[k], csv_path, split_of[k], float(mpp))
                    for k in sorted(split_of))
    return records.DataSource("tiles", root, entries)
