"""Annotations in: QuPath GeoJSON, CSV points, crop folders and manifests → labelled cells.

Sits at the start of the training flow: ``discover(DATA)`` tells what DATA is (a folder of slides
with same-stem ``.geojson``/``.csv`` truth, a manifest, a points CSV, a tile folder with its
``points.csv`` (``image,x,y,class[,split]``, 0-based tile px; each tile a one-level slide at
``--mpp``), or a crop folder ``DIR/<class>/*.png``) and lists :class:`SlideEntry` rows;
``load_points`` reads one slide's annotated cells (level-0 px, source class names);
:class:`ClassMap` maps source names to the model's classes. ``dataset.py`` turns these into
crops. Malformed input raises :class:`~cellclf.errors.AnnotationError` naming the file and the
feature index or line number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellclf.annotations.geojson import read_points
from cellclf.annotations.records import (
    IMAGE_EXTS,
    SPLITS,
    DataSource,
    Points,
    SlideEntry,
    csv_rows,
    normalise_name,
)
from cellclf.annotations.tile_source import is_tile_points_csv, tile_folder_source, tile_points
from cellclf.card import DEFAULT_OTHER_CLASS
from cellclf.errors import AnnotationError

SLIDE_EXTS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif",
              ".svslide", ".btf")
MAX_COORD = 1e9  # no slide is a billion pixels (or µm) across: larger values are a unit mistake

# Source names that always mean a target class (after normalisation: lower case, "_" separators).
DEFAULT_ALIASES: dict[str, str] = {
    "eos": "eosinophil", "eosinophil": "eosinophil", "eosinophils": "eosinophil",
    "neut": "neutrophil", "neutrophil": "neutrophil", "neutrophils": "neutrophil",
    "pmn": "neutrophil", "mast": "mast_cell", "mast_cell": "mast_cell", "mastcell": "mast_cell",
    "mast_cells": "mast_cell",
}
# Names known to be non-target cells (the synthetic truth's distractors and common QuPath classes).
KNOWN_OTHER = frozenset({
    "other", "lymphocyte", "plasma_cell", "epithelial", "fibroblast", "red_cell", "macrophage",
    "stroma", "tumor", "tumour", "immune_cells", "necrosis", "endothelial", "ignore",
})


@dataclass(frozen=True)
class ClassMap:
    """Source class name → model class. Unknown names go to ``other_class`` or raise."""

    classes: tuple[str, ...]
    other_class: str = DEFAULT_OTHER_CLASS
    mapping: Mapping[str, str] = field(default_factory=dict)  # extra, checked first
    unknown: str = "other"  # "other" | "error"

    @classmethod
    def from_config(cls, data_cfg: object) -> ClassMap:
        return cls(tuple(data_cfg.classes), data_cfg.other_class,  # type: ignore[attr-defined]
                   dict(data_cfg.class_map), data_cfg.unknown_class)  # type: ignore[attr-defined]

    def label(self, name: str | None, where: str = "") -> str:
        """Model class for a source name; AnnotationError (naming ``where``) if refused."""
        if name is not None:
            if name in self.mapping:
                return self.mapping[name]
            key = normalise_name(name)
            norm_map = {normalise_name(k): v for k, v in self.mapping.items()}
            for cand in (key, key.removesuffix("s")):
                if cand in norm_map:
                    return norm_map[cand]
                if cand in self.classes:
                    return cand
                if cand in DEFAULT_ALIASES and DEFAULT_ALIASES[cand] in self.classes:
                    return DEFAULT_ALIASES[cand]
                if cand in KNOWN_OTHER:
                    return self.other_class
        if self.unknown == "other":
            return self.other_class
        raise AnnotationError(
            f"{where}: class name {name!r} is not one of {list(self.classes)} and has no mapping; "
            f"add it to data.class_map (e.g. data.class_map.{name}=other) or set "
            "data.unknown_class=other")

    def index(self, name: str | None, where: str = "") -> int:
        return self.classes.index(self.label(name, where))

    def indices(self, names: Sequence[str | None], where: str = "") -> np.ndarray:
        cache: dict[str | None, int] = {}
        out = np.empty(len(names), dtype=np.int64)
        for i, n in enumerate(names):
            if n not in cache:
                cache[n] = self.index(n, where)
            out[i] = cache[n]
        return out


# ---------------------------------------------------------------- GeoJSON and CSV points


def read_geojson_points(path: str | Path) -> Points:
    """QuPath GeoJSON (Point, MultiPoint, Polygon → centroid) via
    :func:`cellclf.annotations.geojson.read_points`."""
    pts = read_points(path)
    xy = np.array([(p.x, p.y) for p in pts], dtype=np.float64).reshape(-1, 2)
    amb = np.array([bool(p.properties.get("ambiguous", False)) for p in pts], dtype=bool)
    return Points(xy, tuple(p.name for p in pts), amb, Path(path))


def read_csv_points(path: str | Path, coords: str = "px", slide: Path | None = None,
                    ) -> dict[Path, Points]:
    """CSV ``slide,x,y,class`` (header required; ``slide`` optional for a one-slide file).

    ``coords`` "px" = level-0 pixels, "um" = micrometres from the slide's top-left corner.
    Relative slide paths are resolved against the CSV's folder. Returns {slide path: Points};
    a file without a slide column is attributed to ``slide``.
    """
    path = Path(path)
    if coords not in ("px", "um"):
        raise AnnotationError(f"{path}: coords must be 'px' or 'um', got {coords!r}")
    header, rows = csv_rows(path)
    cls_col = next((c for c in ("class", "label", "classification", "name") if c in header), None)
    missing = [c for c in ("x", "y") if c not in header] + ([] if cls_col else ["class"])
    if missing:
        raise AnnotationError(f"{path}: line 1: header lacks columns {missing}; expected "
                              f"slide,x,y,class (got {header})")
    if "slide" not in header and slide is None:
        raise AnnotationError(f"{path}: line 1: no 'slide' column; add one naming each row's "
                              "slide file, or list this CSV in a manifest beside its slide")
    grouped: dict[Path, tuple[list[tuple[float, float]], list[str | None], list[bool]]] = {}
    for line, row in rows:
        if not any(row.values()):
            continue
        try:
            x, y = float(row["x"]), float(row["y"])
        except ValueError:
            raise AnnotationError(f"{path}: line {line}: x and y must be numbers, got "
                                  f"x={row['x']!r}, y={row['y']!r}") from None
        if not (np.isfinite(x) and np.isfinite(y)) or x < 0 or y < 0 or max(x, y) > MAX_COORD:
            raise AnnotationError(f"{path}: line {line}: x, y must be finite and ≥ 0 "
                                  f"({coords} from the slide's top-left corner, below "
                                  f"{MAX_COORD:.0e}), got {x}, {y}")
        name = row.get(cls_col or "class") or None
        if name is None:
            raise AnnotationError(f"{path}: line {line}: empty class; give every row a class")
        if "slide" in header and row.get("slide"):
            sp = Path(row["slide"]).expanduser()
            sp = sp if sp.is_absolute() else (path.parent / sp)
        elif slide is not None:
            sp = slide
        else:
            raise AnnotationError(f"{path}: line {line}: empty slide; name the slide file")
        amb = row.get("ambiguous", "").lower() in ("1", "true", "yes")
        xs, names, ambs = grouped.setdefault(sp.resolve(), ([], [], []))
        xs.append((x, y))
        names.append(name)
        ambs.append(amb)
    return {sp: Points(np.array(xs, dtype=np.float64).reshape(-1, 2), tuple(names),
                       np.array(ambs, dtype=bool), path, in_um=coords == "um")
            for sp, (xs, names, ambs) in grouped.items()}


def load_points(entry: SlideEntry, coords: str = "px") -> Points:
    """The annotated cells of one slide entry (GeoJSON or CSV annotation file)."""
    ann = entry.annotations
    if ann is None:
        raise AnnotationError(f"{entry.slide}: no annotation file; put a same-stem .geojson "
                              "beside the slide or name it in the manifest")
    if not ann.is_file():
        raise AnnotationError(f"{ann}: annotation file for {entry.slide.name} not found")
    if ann.suffix.lower() == ".csv" and is_tile_points_csv(ann):
        return tile_points(ann, entry.slide.stem)
    if ann.suffix.lower() == ".csv":
        by_slide = read_csv_points(ann, coords=coords, slide=entry.slide.resolve())
        empty = Points(np.zeros((0, 2)), (), np.zeros(0, bool), ann, in_um=coords == "um")
        return by_slide.get(entry.slide.resolve(), empty)
    return read_geojson_points(ann)


# ---------------------------------------------------------------- manifests and discovery


def _manifest_rows(path: Path) -> list[tuple[str, dict[str, object]]]:
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
            raise AnnotationError(f"{path}: not a readable YAML manifest ({exc})") from None
        items = data.get("slides") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise AnnotationError(f"{path}: a YAML manifest is a list of {{slide, annotations, "
                                  "split}} entries (or has them under 'slides:')")
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise AnnotationError(f"{path}: entry {i}: expected a mapping with 'slide'")
            out.append((f"entry {i}", {normalise_name(str(k)): v for k, v in item.items()}))
        return out
    header, rows = csv_rows(path)
    if "slide" not in header:
        raise AnnotationError(f"{path}: line 1: a manifest needs a 'slide' column "
                              f"(slide,annotations,split); got {header}")
    return [(f"line {line}", dict(row)) for line, row in rows if any(row.values())]


def read_manifest(path: str | Path) -> list[SlideEntry]:
    """Manifest (CSV or YAML): ``slide``, ``annotations`` (default: same-stem .geojson),
    optional ``split`` (train/val/test) and ``mpp``. Paths relative to the manifest's folder."""
    path = Path(path)
    entries: list[SlideEntry] = []
    seen: set[Path] = set()
    for where, row in _manifest_rows(path):
        def rel(value: object) -> Path:
            p = Path(str(value)).expanduser()
            return p if p.is_absolute() else path.parent / p

        if not row.get("slide"):
            raise AnnotationError(f"{path}: {where}: empty 'slide'")
        slide = rel(row["slide"])
        if not _is_file(slide):
            raise AnnotationError(f"{path}: {where}: slide {slide} not found")
        if slide.resolve() in seen:
            raise AnnotationError(f"{path}: {where}: slide {slide.name} is listed twice")
        seen.add(slide.resolve())
        ann = rel(row["annotations"]) if row.get("annotations") else _same_stem_annotation(slide)
        if ann is None or not _is_file(ann):
            raise AnnotationError(f"{path}: {where}: annotation file "
                                  f"{ann or slide.with_suffix('.geojson')} not found")
        split = str(row["split"]).strip().lower() if row.get("split") else None
        if split is not None and split not in SPLITS:
            raise AnnotationError(f"{path}: {where}: split {split!r} must be one of {SPLITS}")
        mpp = None
        if row.get("mpp") not in (None, ""):
            try:
                mpp = float(row["mpp"])  # type: ignore[arg-type]
            except (TypeError, ValueError, OverflowError):
                raise AnnotationError(f"{path}: {where}: mpp {row['mpp']!r} is not a number") \
                    from None
            if not 0 < mpp < 100:
                raise AnnotationError(f"{path}: {where}: mpp must be µm per pixel, > 0 and below "
                                      f"100, got {mpp}")
        entries.append(SlideEntry(slide, ann, split, mpp))
    if not entries:
        raise AnnotationError(f"{path}: the manifest lists no slides")
    return entries


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False for a name the OS cannot even look up (too long, NUL byte)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _same_stem_annotation(slide: Path) -> Path | None:
    for ext in (".geojson", ".json", ".csv"):
        cand = slide.with_suffix(ext)
        if cand.is_file():
            return cand
    return None


def _is_crop_folder(path: Path) -> bool:
    subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    return bool(subdirs) and any(
        f.suffix.lower() in IMAGE_EXTS for d in subdirs for f in d.iterdir())


def discover(data: str | Path, mpp: float | None = None) -> DataSource:
    """Tell what DATA is and list its slides (none for a crop folder); ``mpp`` is the µm/px of
    a tile folder's images (``--mpp``)."""
    path = Path(data).expanduser()
    if not path.exists():
        raise AnnotationError(f"{path}: training data not found; pass a folder of slides with "
                              "same-stem .geojson, a manifest (.csv/.yaml) or a crop folder")
    if path.is_file():
        if path.suffix.lower() in (".yaml", ".yml"):
            return DataSource("manifest", path, tuple(read_manifest(path)))
        if path.suffix.lower() == ".csv" and is_tile_points_csv(path):
            return tile_folder_source(path, path.parent, mpp)
        if path.suffix.lower() == ".csv":
            header, _ = csv_rows(path)
            if "x" in header or "y" in header:  # a points CSV (one missing column is an error)
                slides = sorted(read_csv_points(path))
                missing = [s for s in slides if not _is_file(s)]
                if missing:
                    raise AnnotationError(f"{path}: slide {missing[0]} named in the CSV not found"
                                          f"{f' (and {len(missing) - 1} more)' if missing[1:] else ''}"
                                          "; relative paths are read from the CSV's folder")
                return DataSource("points_csv", path, tuple(SlideEntry(s, path) for s in slides))
            return DataSource("manifest", path, tuple(read_manifest(path)))
        raise AnnotationError(f"{path}: expected a folder, a manifest (.csv/.yaml) or a points "
                              "CSV (slide,x,y,class)")
    slides = sorted(f for f in path.iterdir()
                    if f.is_file() and f.suffix.lower() in SLIDE_EXTS and not f.name.startswith("."))
    with_truth = [SlideEntry(s, a) for s in slides if (a := _same_stem_annotation(s)) is not None]
    if with_truth:
        return DataSource("slides", path, tuple(with_truth))
    if (path / "points.csv").is_file() and is_tile_points_csv(path / "points.csv"):
        return tile_folder_source(path / "points.csv", path, mpp)
    if _is_crop_folder(path):
        return DataSource("crops", path)
    hint = f" ({len(slides)} slides but none has a same-stem .geojson)" if slides else ""
    raise AnnotationError(f"{path}: no annotated slides and no crop sub-folders{hint}; expected "
                          "SLIDE.svs + SLIDE.geojson pairs or DIR/<class>/*.png crops")
