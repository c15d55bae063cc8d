"""GeoJSON point I/O: QuPath-shaped output, round trips, every geometry kind, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cellclf.annotations.geojson import class_color, polygon_centroid, read_points, write_points
from cellclf.errors import AnnotationError


def test_write_is_qupath_shaped_and_round_trips(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "cells.geojson"
    pts = [
        (10.5, 20.25, "eosinophil", {"measurements": {"p_eos": np.float32(0.75)}}),
        (np.float64(3.0), 4, "mast_cell"),
        (7.0, 8.0),
        (1.0, 2.0, None, {"measurements": {"score": float("nan")}, "gate": "review"}),
    ]
    n = write_points(out, iter(pts))
    assert n == 4
    data = json.loads(out.read_text())
    assert data["type"] == "FeatureCollection"
    f0 = data["features"][0]
    assert f0["type"] == "Feature"
    assert f0["geometry"] == {"type": "Point", "coordinates": [10.5, 20.25]}
    assert f0["properties"]["objectType"] == "detection"
    assert f0["properties"]["classification"] == {
        "name": "eosinophil",
        "color": list(class_color("eosinophil")),
    }
    assert f0["properties"]["measurements"]["p_eos"] == pytest.approx(0.75)
    assert "classification" not in data["features"][2]["properties"]
    assert data["features"][3]["properties"]["measurements"] == {"score": None}
    back = read_points(out)
    assert [(p.x, p.y, p.name) for p in back] == [
        (10.5, 20.25, "eosinophil"),
        (3.0, 4.0, "mast_cell"),
        (7.0, 8.0, None),
        (1.0, 2.0, None),
    ]
    assert back[3].properties["gate"] == "review"
    assert [p.index for p in back] == [0, 1, 2, 3]
    assert not list(tmp_path.glob("sub/.*tmp"))  # temp file renamed away


def test_write_empty_and_failed_write_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "empty.geojson"
    assert write_points(out, []) == 0
    assert json.loads(out.read_text()) == {"type": "FeatureCollection", "features": []}

    def gen():
        yield (1.0, 2.0, "a")
        raise RuntimeError("producer failed")

    bad = tmp_path / "bad.geojson"
    with pytest.raises(RuntimeError):
        write_points(bad, gen())
    assert not bad.exists()
    assert list(tmp_path.iterdir()) == [out]
    with pytest.raises(ValueError, match="finite"):
        write_points(bad, [(float("nan"), 1.0)])
    assert not bad.exists()


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _feat(geom: dict, props: dict | None = None) -> dict:
    return {"type": "Feature", "geometry": geom, "properties": props or {}}


def test_read_all_geometry_kinds_bare_list(tmp_path: Path) -> None:
    square = [[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]
    feats = [
        _feat({"type": "Point", "coordinates": [1, 2]}, {"classification": {"name": "neutrophil"}}),
        _feat({"type": "MultiPoint", "coordinates": [[5, 6], [7, 8]]}, {"classification": "x"}),
        _feat({"type": "Polygon", "coordinates": [square]}, {"objectType": "annotation"}),
        _feat(
            {"type": "MultiPolygon",
             "coordinates": [[square], [[[10, 0], [12, 0], [12, 4], [10, 4], [10, 0]]]]},
            {"classification": {"name": "mast_cell", "colorRGB": -1}},
        ),
    ]
    pts = read_points(_write(tmp_path / "a.geojson", feats))
    got = [(p.x, p.y, p.name, p.geometry, p.index) for p in pts]
    # multipolygon: areas 16 at (2,2) and 8 at (11,2) -> x = (32 + 88) / 24 = 5
    assert got == [
        (1.0, 2.0, "neutrophil", "Point", 0),
        (5.0, 6.0, "x", "MultiPoint", 1),
        (7.0, 8.0, "x", "MultiPoint", 1),
        (2.0, 2.0, None, "Polygon", 2),
        (pytest.approx(5.0), pytest.approx(2.0), "mast_cell", "MultiPolygon", 3),
    ]


def test_polygon_centroid_hole_and_winding_and_degenerate() -> None:
    outer = [[0, 0], [0, 10], [10, 10], [10, 0]]  # clockwise in y-up terms
    hole = [[0, 0], [5, 0], [5, 10], [0, 10]]  # the left half
    # remaining right half has centroid (7.5, 5)
    assert polygon_centroid([[outer, hole]]) == pytest.approx((7.5, 5.0))
    assert polygon_centroid([[[[1, 1], [3, 3], [5, 5]]]]) == pytest.approx((3.0, 3.0))


def test_single_feature_file(tmp_path: Path) -> None:
    p = _write(tmp_path / "one.json", _feat({"type": "Point", "coordinates": [3, 4]}))
    assert [(q.x, q.y) for q in read_points(p)] == [(3.0, 4.0)]


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ({"type": "FeatureCollection"}, "'features' list"),
        ({"type": "Polygon", "coordinates": []}, "expected a GeoJSON FeatureCollection"),
        ([_feat({"type": "Point", "coordinates": [0, 0]}), {"type": "Feat"}], "feature 1: type"),
        ([_feat({"type": "Point", "coordinates": [0, "a"]})], "feature 0: a position"),
        ([_feat({"type": "LineString", "coordinates": [[0, 0], [1, 1]]})], "LineString"),
        ([_feat({"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]})], "at least 3"),
        ([{"type": "Feature", "properties": {}}], "feature 0: it has no geometry"),
        ([_feat({"type": "Point"})], "no coordinates"),
        ([_feat({"type": "Point", "coordinates": [0, 0]}, {"classification": 5})], "classif"),
    ],
)
def test_malformed_features_name_file_and_index(tmp_path: Path, obj, needle: str) -> None:
    p = _write(tmp_path / "bad.geojson", obj)
    with pytest.raises(AnnotationError, match="bad.geojson") as info:
        read_points(p)
    assert needle in str(info.value)


def test_bad_json_reports_line_and_column(tmp_path: Path) -> None:
    p = tmp_path / "broken.geojson"
    p.write_text('{"type": "FeatureCollection",\n "features": [,]}')
    with pytest.raises(AnnotationError, match=r"broken.geojson.*line 2, column 15"):
        read_points(p)
    with pytest.raises(AnnotationError, match="not found"):
        read_points(tmp_path / "missing.geojson")


def test_cells_geojson_fast_path_writes_the_generic_bytes(tmp_path: Path, monkeypatch) -> None:
    """cells.geojson formatted directly is byte for byte what write_points + json.dumps write,
    and the parquet's conformal-set strings equal the per-row join, for random cells (any
    classes, non-ASCII names, every reason); a non-finite probability takes the generic path."""
    from cellclf.outputs.results import (
        _cell_points,
        conformal_strings,
        write_cells_geojson,
    )
    from cellclf.outputs.slide_result import SlideResult

    rng = np.random.default_rng(2)
    classes = ["eosinophil", "neutrophil", "mastzelle_ä", "other"]
    n = 500
    probs = rng.dirichlet(np.ones(4), n).astype(np.float32)
    probs[0] = [1.0, 0.0, 0.0, 0.0]
    xy0 = np.column_stack([rng.uniform(0, 1e5, n), rng.integers(0, 9, n) * 1e16])
    reason = rng.choice(["accepted", "low_confidence", "ood_slide", 'odd "quoted"'], n)
    result = SlideResult("s", "p", 0.25, 1, 1, None, classes, xy0, probs, probs.max(1) > 0.6,
                         reason.astype(object), rng.random((n, 4)) < 0.3, 1.0,
                         np.zeros((4, 4, 3), np.uint8), 1.0)
    from cellclf.outputs import results

    monkeypatch.setattr(results, "_CHUNK_CELLS", 64)  # several chunks, a ragged last one
    assert write_cells_geojson(tmp_path / "fast.geojson", result) == n
    write_points(tmp_path / "generic.geojson", _cell_points(result))
    assert (tmp_path / "fast.geojson").read_bytes() == (tmp_path / "generic.geojson").read_bytes()
    names = np.asarray(classes, dtype=object)
    assert conformal_strings(result.conformal, classes).tolist() == [
        "|".join(names[row]) for row in result.conformal]
    result.probs[3, 1] = np.nan  # generic path: null, as before
    write_cells_geojson(tmp_path / "nan.geojson", result)
    assert '"p_neutrophil":null' in (tmp_path / "nan.geojson").read_text()
