"""Tile folders as data: a folder of real image tiles (PNG/JPEG/TIFF) + µm/px + a points CSV.

Sits beside the slide readers at the start of the detection and evaluation flows::

    TILES/ (any depth) ──find_tiles──▶ {image stem: file}
    points.csv (image,x,y[,class][,split,...]) ──read_tile_points──▶ {image: TilePoints}
    open_tile_set(TILES, mpp, truth, where) ──▶ TileSet (the images to use + their truth)

Coordinates are 0-based tile pixels (x right, y down) of the full-resolution tile, as in
``../shared/data/real/*/points.csv``. ``where`` (``{"split": "validation"}``) keeps the images
whose CSV rows carry those values, so one CSV can describe several subsets (crchisto's split,
cpm15's magnification). Malformed input raises :class:`~cellclf.errors.AnnotationError` naming
the file and line.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellclf.errors import AnnotationError

TILE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
UNCLASSIFIED = "unclassified"


@dataclass(frozen=True)
class TilePoints:
    """One tile's annotated points: ``xy`` (N×2 float64, tile px) and their class names."""

    xy: np.ndarray
    classes: tuple[str, ...]


@dataclass(frozen=True)
class TileSet:
    """The tiles to process (image stem → file, sorted), their µm/px, and truth when given."""

    root: Path
    mpp: float
    images: dict[str, Path]
    truth: dict[str, TilePoints] | None

    def truth_of(self, image: str) -> TilePoints:
        """Truth of one tile (empty when the CSV has no rows for it)."""
        if self.truth is None or image not in self.truth:
            return TilePoints(np.zeros((0, 2)), ())
        return self.truth[image]


def is_tile_folder(path: str | Path) -> bool:
    """True when ``path`` is a directory holding at least one tile image (at any depth)."""
    p = Path(path)
    return p.is_dir() and any(f.suffix.lower() in TILE_EXTS for f in p.rglob("*") if f.is_file())


def find_tiles(root: str | Path) -> dict[str, Path]:
    """Image stem → file for every tile under ``root`` (recursive, sorted by stem).

    Stems must be unique, since the points CSV names images by stem (or by file name).
    """
    root = Path(root)
    if not root.is_dir():
        raise AnnotationError(f"{root}: not a folder of tiles (PNG/JPEG/TIFF); check the path")
    found: dict[str, Path] = {}
    for f in sorted(root.rglob("*")):
        if not f.is_file() or f.suffix.lower() not in TILE_EXTS:
            continue
        if f.stem in found:
            raise AnnotationError(
                f"{root}: two tiles share the name {f.stem!r} ({found[f.stem]} and {f}); the points "
                "CSV names tiles by file name, so rename one")
        found[f.stem] = f
    if not found:
        raise AnnotationError(f"{root}: no tile images ({', '.join(TILE_EXTS)}) found")
    return dict(sorted(found.items()))


def _image_key(name: str) -> str:
    """CSV image name → tile stem (``img1``, ``img1.jpg`` and ``sub/img1.png`` all give img1)."""
    p = Path(name.strip())
    return p.stem if p.suffix.lower() in TILE_EXTS else p.name


def read_tile_points(path: str | Path,
                     where: Mapping[str, str] | None = None) -> dict[str, TilePoints]:
    """Points CSV ``image,x,y[,class]`` (extra columns allowed) → {image stem: TilePoints}.

    ``where`` keeps only rows whose columns equal the given values (e.g. ``{"split":
    "validation"}``); rows without a class get ``"unclassified"``.
    """
    path = Path(path)
    where = dict(where or {})
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read the points CSV ({e.strerror})") from e
    if not rows:
        raise AnnotationError(f"{path}: empty points CSV; expected a header image,x,y[,class]")
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in ("image", "x", "y") if c not in header]
    if missing:
        raise AnnotationError(f"{path}: header {rows[0]} lacks column(s) {missing}; expected "
                              "image,x,y[,class] with 0-based tile pixel coordinates")
    for col in where:
        if col.lower() not in header:
            raise AnnotationError(f"{path}: cannot filter on {col!r}: no such column in "
                                  f"{rows[0]}")
    col = {c: header.index(c) for c in header}
    cls_col = col.get("class")
    pts: dict[str, list[tuple[float, float]]] = {}
    names: dict[str, list[str]] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < len(header):
            raise AnnotationError(f"{path}:{lineno}: {len(row)} fields, the header has "
                                  f"{len(header)}")
        if any(row[col[k.lower()]].strip() != v for k, v in where.items()):
            continue
        try:
            x, y = float(row[col["x"]]), float(row[col["y"]])
        except ValueError as e:
            raise AnnotationError(f"{path}:{lineno}: x, y must be numbers, got "
                                  f"{row[col['x']]!r}, {row[col['y']]!r}") from e
        if not (np.isfinite(x) and np.isfinite(y)):  # a dot just off the edge (-0.7) is real
            raise AnnotationError(f"{path}:{lineno}: x, y must be finite 0-based pixel "
                                  f"coordinates, got {x}, {y}")
        key = _image_key(row[col["image"]])
        pts.setdefault(key, []).append((x, y))
        name = row[cls_col].strip() if cls_col is not None else ""
        names.setdefault(key, []).append(name or UNCLASSIFIED)
    return {k: TilePoints(np.asarray(v, dtype=np.float64).reshape(-1, 2), tuple(names[k]))
            for k, v in sorted(pts.items())}


def parse_where(items: list[str] | None) -> dict[str, str]:
    """``["split=validation"]`` → ``{"split": "validation"}`` (CLI ``--where``)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise AnnotationError(f"--where {item!r}: expected COLUMN=VALUE, e.g. split=validation")
        out[key.strip()] = value.strip()
    return out


def open_tile_set(root: str | Path, mpp: float | None, truth: str | Path | None = None,
                  where: Mapping[str, str] | None = None) -> TileSet:
    """The tiles under ``root`` at ``mpp`` µm/px, with truth from a points CSV if given.

    With ``where``, only images with matching CSV rows are used (``where`` needs ``truth``).
    Every image the CSV names must exist under ``root``.
    """
    root = Path(root)
    if mpp is None or not mpp > 0:
        raise AnnotationError(f"{root}: a tile folder has no scale; pass --mpp (µm per pixel of "
                              "the tiles, e.g. 0.5 for 20x, 0.25 for 40x)")
    images = find_tiles(root)
    if truth is None:
        if where:
            raise AnnotationError("--where filters the rows of --truth; pass a points CSV")
        return TileSet(root, float(mpp), images, None)
    points = read_tile_points(truth, where)
    unknown = sorted(set(points) - set(images))
    if unknown:
        raise AnnotationError(f"{truth}: names {len(unknown)} image(s) not under {root} (e.g. "
                              f"{unknown[:3]}); check the folder or the CSV's image column")
    if where:
        if not points:
            raise AnnotationError(f"{truth}: no rows match {dict(where)}")
        images = {k: v for k, v in images.items() if k in points}
    return TileSet(root, float(mpp), images, points)


def read_tile(path: str | Path) -> np.ndarray:
    """RGB uint8 (H, W, 3) pixels of one tile image (grey and RGBA are converted)."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise AnnotationError(f"{path}: cannot read the tile image ({e})") from e
