"""Property-based tests (hypothesis) of the annotation readers: QuPath GeoJSON, points CSV and
slide manifests (CSV and YAML). For any generated file a reader either returns well-formed points
(finite level-0 coordinates) or raises :class:`AnnotationError` with a message naming the file;
never another exception. 10,400 generated inputs in all (see ``EXAMPLES``)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellclf.annotations.geojson import read_points
from cellclf.annotations.labelled_data import discover, read_csv_points, read_manifest
from cellclf.errors import AnnotationError

pytestmark = pytest.mark.slow

EXAMPLES = {"geojson_structured": 3000, "geojson_bytes": 1200, "csv": 2600, "manifest_csv": 1800,
            "manifest_yaml": 1800}
assert sum(EXAMPLES.values()) >= 10_000

WORK = Path(tempfile.mkdtemp(prefix="cellclf-hyp-"))
SLIDE = WORK / "s1.svs"
SLIDE.write_bytes(b"not really a slide, but a file that exists")
(WORK / "s1.geojson").write_text('{"type": "FeatureCollection", "features": []}')


def _settings(name: str) -> settings:
    return settings(max_examples=EXAMPLES[name], deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck), database=None)


def _check(read, path: Path):
    """Run a reader: AnnotationError naming the file is fine; anything else fails the test."""
    try:
        return read(path)
    except AnnotationError as exc:
        assert str(exc).strip() and str(path) in str(exc), repr(exc)
        return None


# ---------------------------------------------------------------- GeoJSON

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**400, 10**400),
                    st.sampled_from([1e300, -1e300, 1e308, 5e-324, 0.0, 12.5]))
json_scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=8))
position = st.one_of(st.lists(numbers, min_size=0, max_size=4), json_scalars)
ring = st.lists(position, min_size=0, max_size=6)
geometry = st.one_of(
    st.fixed_dictionaries({"type": st.just("Point"), "coordinates": position}),
    st.fixed_dictionaries({"type": st.just("MultiPoint"),
                           "coordinates": st.one_of(st.lists(position, max_size=4), json_scalars)}),
    st.fixed_dictionaries({"type": st.just("Polygon"),
                           "coordinates": st.one_of(st.lists(ring, max_size=3), json_scalars)}),
    st.fixed_dictionaries({"type": st.just("MultiPolygon"),
                           "coordinates": st.lists(st.lists(ring, max_size=2), max_size=2)}),
    st.fixed_dictionaries({"type": st.sampled_from(["LineString", "Circle", None, 3])}),
    json_scalars)
classification = st.one_of(st.none(), st.text(max_size=10), json_scalars,
                           st.fixed_dictionaries({"name": json_scalars}))
feature = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["Feature", "feature", None]),
                           "geometry": geometry,
                           "properties": st.one_of(st.fixed_dictionaries(
                               {"classification": classification,
                                "ambiguous": json_scalars}), json_scalars)}),
    json_scalars)
document = st.one_of(
    st.fixed_dictionaries({"type": st.just("FeatureCollection"),
                           "features": st.one_of(st.lists(feature, max_size=5), json_scalars)}),
    st.lists(feature, max_size=5), feature, json_scalars)


def _dump(doc) -> str:
    try:
        return json.dumps(doc)  # NaN/inf become the (non-JSON) tokens NaN/Infinity, as in the wild
    except (ValueError, OverflowError):
        return str(doc)


def _points_ok(pts) -> None:
    for p in pts:
        assert math.isfinite(p.x) and math.isfinite(p.y), p
        assert p.name is None or isinstance(p.name, str)


@_settings("geojson_structured")
@given(document)
def test_geojson_structured(doc) -> None:
    path = WORK / "g.geojson"
    path.write_text(_dump(doc))
    pts = _check(read_points, path)
    if pts is not None:
        _points_ok(pts)


@_settings("geojson_bytes")
@given(st.one_of(st.binary(max_size=200),
                 st.text(alphabet='{}[]",:0123456789.eE-+ntrufalsFeaturePoint', max_size=120)))
def test_geojson_raw(data) -> None:
    path = WORK / "r.geojson"
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    pts = _check(read_points, path)
    if pts is not None:
        _points_ok(pts)


# ---------------------------------------------------------------- CSV points

cell = st.one_of(st.text(max_size=6), st.sampled_from(["1e300", "nan", "-inf", "12", "3.5", "",
                                                       "s1.svs", "missing.svs", "eosinophil",
                                                       '"', "\x00", "1e999"]))
header = st.lists(st.sampled_from(["slide", "x", "y", "class", "label", "X", " y ", "ambiguous",
                                   "extra", ""]), min_size=0, max_size=6)
encodings = st.sampled_from(["utf-8", "utf-16", "latin-1", "utf-8-sig"])


def _csv_text(head, rows, sep=",") -> str:
    lines = [sep.join(head)] + [sep.join(r) for r in rows]
    return "\n".join(lines) + "\n"


@_settings("csv")
@given(header, st.lists(st.lists(cell, max_size=6), max_size=5), encodings, st.booleans())
def test_points_csv(head, rows, encoding, with_slide) -> None:
    path = WORK / "p.csv"
    try:
        path.write_bytes(_csv_text(head, rows).encode(encoding))
    except UnicodeEncodeError:
        path.write_bytes(_csv_text(head, rows).encode("utf-8", "replace"))
    out = _check(lambda p: read_csv_points(p, slide=SLIDE if with_slide else None), path)
    source = _check(discover, path)  # as train/evaluate/calibrate read DATA
    if source is not None:
        assert all(e.slide.is_file() for e in source.entries)
    if out is not None:
        for pts in out.values():
            assert pts.xy.shape == (len(pts.names), 2) and (pts.xy >= 0).all()
            assert (pts.xy < 1e9).all() and all(isinstance(n, str) for n in pts.names)


# ---------------------------------------------------------------- manifests

manifest_cell = st.one_of(cell, st.sampled_from(["s1.svs", "s1.geojson", "train", "val", "TEST",
                                                 "0.25", "-1", "abc", "../s1.svs"]))


@_settings("manifest_csv")
@given(st.lists(st.sampled_from(["slide", "annotations", "split", "mpp", "x", "notes", ""]),
                max_size=5),
       st.lists(st.lists(manifest_cell, max_size=5), max_size=4), encodings)
def test_manifest_csv(head, rows, encoding) -> None:
    path = WORK / "m.csv"
    try:
        path.write_bytes(_csv_text(head, rows).encode(encoding))
    except UnicodeEncodeError:
        path.write_bytes(_csv_text(head, rows).encode("utf-8", "replace"))
    entries = _check(read_manifest, path)
    if entries is not None:
        for e in entries:
            assert e.slide.is_file() and e.annotations is not None and e.annotations.is_file()
            assert e.mpp is None or 0 < e.mpp < 100


yaml_value = st.recursive(json_scalars | manifest_cell,
                          lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.sampled_from(["slide", "annotations", "split",
                                                             "mpp", "slides"]), inner, max_size=4),
                          max_leaves=8)


@_settings("manifest_yaml")
@given(st.one_of(yaml_value, st.text(max_size=80), st.binary(max_size=80)))
def test_manifest_yaml(doc) -> None:
    import yaml

    path = WORK / "m.yaml"
    if isinstance(doc, bytes):
        path.write_bytes(doc)
    elif isinstance(doc, str):
        path.write_text(doc)
    else:
        path.write_text(yaml.safe_dump(doc))
    entries = _check(read_manifest, path)
    if entries is not None:
        for e in entries:
            assert e.slide.is_file() and (e.mpp is None or 0 < e.mpp < 100)
