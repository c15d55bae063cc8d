"""QuPath-compatible GeoJSON point I/O: the format candidates, results and annotations travel in.

Sits at both ends of the flow: ``read_points`` turns ground truth / pathologist annotations
(QuPath exports, the synthetic slides' truth) into level-0 points with class names, and
``write_points`` streams detections (candidates, classified cells) into a FeatureCollection that
QuPath imports as detection objects. Coordinates are level-0 pixels, x right, y down.

Writing is streamed feature by feature into a temporary file beside the target, then renamed, so
a reader never sees a half-written file and a million cells never sit in memory twice.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellclf.errors import AnnotationError
from cellclf.outputs.atomic import current_umask

# QuPath-style display colours (RGB) for the classes this project knows; others get grey.
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "eosinophil": (230, 60, 40),
    "neutrophil": (60, 120, 230),
    "mast_cell": (150, 40, 170),
    "other": (140, 140, 140),
    "candidate": (240, 200, 0),
    "lymphocyte": (40, 40, 120),
    "plasma_cell": (90, 160, 90),
    "epithelial": (200, 150, 100),
    "fibroblast": (120, 90, 60),
    "red_cell": (250, 120, 120),
    "macrophage": (100, 180, 180),
}
_DEFAULT_COLOR = (128, 128, 128)
MAX_COORD_PX = 1e9  # no slide is a billion pixels wide: larger positions are a unit mistake


@dataclass(frozen=True)
class PointAnnotation:
    """One annotated point: level-0 position, class name (None if unclassified), properties."""

    x: float
    y: float
    name: str | None
    properties: dict[str, Any] = field(default_factory=dict)
    geometry: str = "Point"  # the source geometry type (Point, MultiPoint, Polygon, MultiPolygon)
    index: int = 0  # index of the source feature in the file


def class_color(name: str | None) -> tuple[int, int, int]:
    """Display colour for a class name (grey when unknown)."""
    return CLASS_COLORS.get(name or "", _DEFAULT_COLOR)


def _clean(value: Any) -> Any:
    """Make a value JSON-safe: numpy scalars to Python, NaN/inf to None, containers recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    item = getattr(value, "item", None)  # numpy scalar
    if callable(item):
        return _clean(item())
    tolist = getattr(value, "tolist", None)  # numpy array
    if callable(tolist):
        return _clean(tolist())
    raise TypeError(f"cannot write a value of type {type(value).__name__} to GeoJSON")


def _feature(x: float, y: float, name: str | None, extra: Mapping[str, Any] | None) -> str:
    props: dict[str, Any] = {"objectType": "detection"}
    if name is not None:
        props["classification"] = {"name": name, "color": list(class_color(name))}
    if extra:
        props.update(_clean(dict(extra)))
    feat = {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [float(x), float(y)]},
        "properties": props,
    }
    return json.dumps(feat, separators=(",", ":"), allow_nan=False)


def write_points(path: str | os.PathLike[str], points0: Iterable[tuple]) -> int:
    """Stream points into a QuPath-importable GeoJSON FeatureCollection; return how many.

    Each item is ``(x, y)``, ``(x, y, class_name)`` or ``(x, y, class_name, extra)`` in level-0 px.
    ``extra`` is merged into the feature's ``properties``; put per-cell numbers under a
    ``"measurements"`` key (a ``{name: number}`` mapping, as QuPath writes it). ``class_name`` None
    leaves the detection unclassified. The file is written to a temporary name beside ``path``
    and renamed when complete (atomic on one file system).
    """
    def features() -> Iterator[str]:
        for n, item in enumerate(points0):
            if len(item) < 2 or len(item) > 4:
                raise ValueError(f"point {n}: expected (x, y[, name[, extra]]), got {item!r}")
            x, y = float(item[0]), float(item[1])
            if not (math.isfinite(x) and math.isfinite(y)):
                raise ValueError(f"point {n}: coordinates must be finite, got ({x}, {y})")
            name = item[2] if len(item) > 2 else None
            extra = item[3] if len(item) > 3 else None
            yield _feature(x, y, name, extra)

    return write_features(path, features())


def write_features(path: str | os.PathLike[str], features: Iterable[str]) -> int:
    """Stream features already rendered as compact JSON (as :func:`write_points` renders them)
    into a FeatureCollection, atomically (temporary name, then rename); return how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    n = 0
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs are shared files
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write('{"type":"FeatureCollection","features":[')
            buf: list[str] = []
            for feature in features:
                buf.append(("\n" if n == 0 else ",\n") + feature)
                n += 1
                if len(buf) >= 4096:
                    fh.write("".join(buf))
                    buf.clear()
            fh.write("".join(buf))
            fh.write("\n]}\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


# ---------------------------------------------------------------- reading


class _Bad(Exception):
    """Internal: what is wrong with one feature (turned into AnnotationError with its index)."""


def _xy(coord: Any) -> tuple[float, float]:
    if not isinstance(coord, (list, tuple)) or len(coord) < 2:
        raise _Bad(f"a position must be a list [x, y], got {coord!r}")
    try:
        x, y = float(coord[0]), float(coord[1])
    except (TypeError, ValueError, OverflowError):
        raise _Bad(f"a position must hold numbers, got {coord!r}") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise _Bad(f"a position must be finite, got {coord!r}")
    if abs(x) > MAX_COORD_PX or abs(y) > MAX_COORD_PX:
        raise _Bad(f"a position must be level-0 pixels within ±{MAX_COORD_PX:.0e}, got {coord!r} "
                   "(were the coordinates written in another unit?)")
    return x, y


def _ring_area_centroid(ring: Any) -> tuple[float, float, float, int]:
    """Signed area, area-weighted centroid sums (Σx·a, Σy·a) and vertex count of one ring."""
    if not isinstance(ring, (list, tuple)) or len(ring) < 3:
        raise _Bad("a polygon ring needs at least 3 positions")
    pts = [_xy(c) for c in ring]
    a2 = cx = cy = 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1], strict=True):
        cross = x0 * y1 - x1 * y0
        a2 += cross
        cx += (x0 + x1) * cross
        cy += (y0 + y1) * cross
    return a2 / 2.0, cx / 6.0, cy / 6.0, len(pts)


def polygon_centroid(polygons: list[Any]) -> tuple[float, float]:
    """Area centroid of polygons given as GeoJSON coordinate arrays (holes subtract).

    Degenerate (zero-area) shapes fall back to the mean of their vertices.
    """
    area = sx = sy = 0.0
    vx = vy = 0.0
    nv = 0
    for poly in polygons:
        if not isinstance(poly, (list, tuple)) or not poly:
            raise _Bad("a polygon needs at least one ring")
        for k, ring in enumerate(poly):
            a, cx, cy, _ = _ring_area_centroid(ring)
            # exterior counts positive, holes negative, whatever their winding
            sign = 1.0 if k == 0 else -1.0
            s = sign if a >= 0 else -sign
            area += s * a
            sx += s * cx
            sy += s * cy
            if k == 0:
                pts = [_xy(c) for c in ring]
                vx += sum(p[0] for p in pts)
                vy += sum(p[1] for p in pts)
                nv += len(pts)
    if abs(area) > 1e-12:
        x, y = sx / area, sy / area
    else:
        x, y = vx / nv, vy / nv
    if not (math.isfinite(x) and math.isfinite(y)):
        raise _Bad("the polygon's centroid cannot be computed (degenerate shape)")
    return x, y


def _class_name(props: Mapping[str, Any]) -> str | None:
    cls = props.get("classification")
    if cls is None:
        return None
    if isinstance(cls, str):
        return cls
    if isinstance(cls, Mapping):
        name = cls.get("name")
        if name is None or isinstance(name, str):
            return name
        raise _Bad(f"classification.name must be a string, got {name!r}")
    raise _Bad(f"classification must be an object with a name, got {cls!r}")


def _feature_points(feat: Any, index: int) -> list[PointAnnotation]:
    if not isinstance(feat, Mapping):
        raise _Bad(f"a feature must be an object, got {type(feat).__name__}")
    if feat.get("type") != "Feature":
        raise _Bad(f"type must be 'Feature', got {feat.get('type')!r}")
    geom = feat.get("geometry")
    if not isinstance(geom, Mapping):
        raise _Bad("it has no geometry object")
    props = feat.get("properties") or {}
    if not isinstance(props, Mapping):
        raise _Bad("properties must be an object")
    name = _class_name(props)
    gtype = geom.get("type")
    coords = geom.get("coordinates")
    if coords is None:
        raise _Bad(f"its {gtype} geometry has no coordinates")
    if gtype == "Point":
        xys = [_xy(coords)]
    elif gtype == "MultiPoint":
        if not isinstance(coords, (list, tuple)):
            raise _Bad("MultiPoint coordinates must be a list of positions")
        xys = [_xy(c) for c in coords]
    elif gtype == "Polygon":
        xys = [polygon_centroid([coords])]
    elif gtype == "MultiPolygon":
        if not isinstance(coords, (list, tuple)) or not coords:
            raise _Bad("MultiPolygon coordinates must be a non-empty list of polygons")
        xys = [polygon_centroid(list(coords))]
    else:
        raise _Bad(
            f"geometry type {gtype!r} is not supported (use Point, MultiPoint, Polygon or "
            "MultiPolygon)"
        )
    props = dict(props)
    return [PointAnnotation(x, y, name, props, str(gtype), index) for x, y in xys]


def read_points(path: str | os.PathLike[str]) -> list[PointAnnotation]:
    """Read point annotations from a GeoJSON file (QuPath export or cellclf output).

    Accepts a FeatureCollection, a bare list of features, or a single Feature. Point gives one
    annotation, MultiPoint one per position, Polygon/MultiPolygon its area centroid. Raises
    :class:`AnnotationError` naming the file, and the feature index for a bad feature.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AnnotationError(f"{path}: annotation file not found; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: cannot read the annotation file ({exc})") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise AnnotationError(f"{path}: the JSON is nested too deeply to be GeoJSON") from None
    except ValueError as exc:
        if not isinstance(exc, json.JSONDecodeError):  # e.g. an integer of thousands of digits
            raise AnnotationError(f"{path}: not readable as GeoJSON ({exc})") from None
        raise AnnotationError(
            f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; "
            "export the annotations again as GeoJSON (QuPath: File > Export objects as GeoJSON)"
        ) from None
    if isinstance(data, list):
        features = data
    elif isinstance(data, Mapping) and data.get("type") == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise AnnotationError(f"{path}: FeatureCollection has no 'features' list")
    elif isinstance(data, Mapping) and data.get("type") == "Feature":
        features = [data]
    else:
        raise AnnotationError(
            f"{path}: expected a GeoJSON FeatureCollection, a list of features or a Feature; "
            f"got {type(data).__name__}"
            + (f" of type {data.get('type')!r}" if isinstance(data, Mapping) else "")
        )
    out: list[PointAnnotation] = []
    for i, feat in enumerate(features):
        try:
            out.extend(_feature_points(feat, i))
        except _Bad as exc:
            raise AnnotationError(f"{path}: feature {i}: {exc}; fix or remove that feature") from None
    return out
