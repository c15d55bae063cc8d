"""The records annotations become: slide entries, annotated points, data sources; CSV rows.

Sits under :mod:`cellclf.annotations.labelled_data` (which finds and reads them) and
:mod:`cellclf.annotations.tile_source` (tile folders as entries); both build these plain,
frozen records. No reading of slides here.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellclf.errors import AnnotationError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SPLITS = ("train", "val", "test")


def normalise_name(name: str) -> str:
    """``"Mast cell"`` → ``"mast_cell"``: lower case, spaces/hyphens to underscores."""
    return "_".join(name.strip().lower().replace("-", " ").split())


@dataclass(frozen=True)
class SlideEntry:
    """One slide of a dataset: its file, its annotation file, an optional split and mpp."""

    slide: Path
    annotations: Path | None
    split: str | None = None
    mpp: float | None = None

    @property
    def slide_id(self) -> str:
        return self.slide.stem


@dataclass(frozen=True)
class Points:
    """Annotated cells of one slide: level-0 positions (or µm if ``in_um``) and source names."""

    xy: np.ndarray  # (N, 2) float64
    names: tuple[str | None, ...]
    ambiguous: np.ndarray  # (N,) bool
    source: Path
    in_um: bool = False

    def level0(self, slide_mpp: float) -> np.ndarray:
        return self.xy / slide_mpp if self.in_um else self.xy

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class DataSource:
    """What a DATA argument holds: ``kind`` is "slides", "manifest", "points_csv", "tiles" or
    "crops"."""

    kind: str
    path: Path
    entries: tuple[SlideEntry, ...] = ()


def csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    try:
        fh = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise AnnotationError(f"{path}: cannot read the CSV file ({exc}); check the path") from None
    with fh:
        reader = csv.DictReader(fh)
        rows = []
        try:
            header = [normalise_name(h) for h in (reader.fieldnames or [])]
            for row in reader:
                rows.append((reader.line_num, {normalise_name(k or ""): (v or "").strip()
                                               for k, v in row.items() if k is not None}))
        except csv.Error as exc:
            raise AnnotationError(f"{path}: line {reader.line_num}: {exc}") from None
        except UnicodeDecodeError:
            raise AnnotationError(f"{path}: not UTF-8 text (saved as UTF-16 or a binary file?); "
                                  "save it as 'CSV UTF-8 (comma delimited)'") from None
    return header, rows
