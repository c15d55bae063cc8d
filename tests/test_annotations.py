"""Annotation readers on small hand-written files: CSV (px, µm), GeoJSON, manifests, crop folders."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellclf.annotations.crop_folder import read_crop_folder
from cellclf.annotations.labelled_data import (
    ClassMap,
    SlideEntry,
    discover,
    load_points,
    read_csv_points,
    read_geojson_points,
    read_manifest,
)
from cellclf.errors import AnnotationError

CLASSES = ("eosinophil", "neutrophil", "mast_cell", "other")


def test_class_map_defaults_aliases_and_policy() -> None:
    cm = ClassMap(CLASSES)
    assert cm.label("eosinophil") == "eosinophil"
    assert cm.label("Eosinophils") == "eosinophil"
    assert cm.label("Mast cell") == "mast_cell"
    assert cm.label("eos") == "eosinophil"
    for distractor in ("lymphocyte", "plasma_cell", "epithelial", "fibroblast", "red_cell",
                       "macrophage"):
        assert cm.label(distractor) == "other"
    assert cm.label("basophil") == "other"
    assert cm.label(None) == "other"
    strict = ClassMap(CLASSES, mapping={"Eo": "eosinophil"}, unknown="error")
    assert strict.label("Eo") == "eosinophil" and strict.label("lymphocyte") == "other"
    with pytest.raises(AnnotationError, match=r"f\.csv: class name 'basophil'.*class_map"):
        strict.label("basophil", "f.csv")
    np.testing.assert_array_equal(cm.indices(["neutrophil", "x", "mast_cell"]), [1, 3, 2])


def test_csv_in_pixels_groups_by_slide(tmp_path: Path) -> None:
    p = tmp_path / "pts.csv"
    p.write_text("slide,x,y,class\na.svs,10,20,eosinophil\nsub/b.tif,1.5,2.5,lymphocyte\n"
                 "a.svs,30,40,Neutrophil\n\n")
    got = read_csv_points(p)
    a, b = (tmp_path / "a.svs").resolve(), (tmp_path / "sub/b.tif").resolve()
    assert set(got) == {a, b}
    np.testing.assert_array_equal(got[a].xy, [[10, 20], [30, 40]])
    assert got[a].names == ("eosinophil", "Neutrophil")
    assert not got[a].in_um and np.array_equal(got[a].level0(0.25), got[a].xy)
    assert got[b].names == ("lymphocyte",)


def test_csv_in_micrometres_converts_with_slide_mpp(tmp_path: Path) -> None:
    p = tmp_path / "pts.csv"
    p.write_text("x,y,label\n5,10,eos\n")
    pts = read_csv_points(p, coords="um", slide=tmp_path / "s.svs")[tmp_path / "s.svs"]
    assert pts.in_um
    np.testing.assert_allclose(pts.level0(0.25), [[20, 40]])  # 5 µm / 0.25 µm/px = 20 px
    np.testing.assert_allclose(pts.level0(0.5), [[10, 20]])


@pytest.mark.parametrize("text, msg", [
    ("slide,x,class\na.svs,1,eos\n", r"line 1: header lacks columns \['y'\]"),
    ("slide,x,y,class\na.svs,1,2,eos\na.svs,one,2,eos\n", "line 3: x and y must be numbers"),
    ("slide,x,y,class\na.svs,1,2,eos\na.svs,-1,2,eos\n", "line 3: .*≥ 0"),
    ("slide,x,y,class\na.svs,1,2,\n", "line 2: empty class"),
    ("x,y,class\n1,2,eos\n", "no 'slide' column"),
    ("slide,x,y,class\na.svs,nan,2,eos\n", "line 2"),
])
def test_malformed_csv_names_the_line(tmp_path: Path, text: str, msg: str) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(AnnotationError, match=msg) as err:
        read_csv_points(p)
    assert str(p) in str(err.value)


def _fc(*features: dict) -> dict:
    return {"type": "FeatureCollection", "features": list(features)}


def _feat(geom: dict, name: str | None = "eosinophil", **props) -> dict:
    p = dict(props)
    if name:
        p["classification"] = {"name": name}
    return {"type": "Feature", "geometry": geom, "properties": p}


def test_geojson_point_multipoint_polygon(tmp_path: Path) -> None:
    p = tmp_path / "a.geojson"
    square = [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]
    p.write_text(json.dumps(_fc(
        _feat({"type": "Point", "coordinates": [5, 6]}, ambiguous=True),
        _feat({"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]}, "neutrophil"),
        _feat({"type": "Polygon", "coordinates": square}, "Mast cell"),
    )))
    pts = read_geojson_points(p)
    np.testing.assert_allclose(pts.xy, [[5, 6], [1, 2], [3, 4], [5, 5]])
    assert pts.names == ("eosinophil", "neutrophil", "neutrophil", "Mast cell")
    np.testing.assert_array_equal(pts.ambiguous, [True, False, False, False])
    assert load_points(SlideEntry(tmp_path / "a.svs", p)).names == pts.names


def test_malformed_geojson_names_the_feature(tmp_path: Path) -> None:
    p = tmp_path / "bad.geojson"
    p.write_text(json.dumps(_fc(_feat({"type": "Point", "coordinates": [1, 2]}),
                                _feat({"type": "Point", "coordinates": ["a", 2]}))))
    with pytest.raises(AnnotationError, match=r"bad\.geojson: feature 1"):
        read_geojson_points(p)
    p.write_text("{oops")
    with pytest.raises(AnnotationError, match="not valid JSON at line 1"):
        read_geojson_points(p)


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_manifest_csv_and_yaml(tmp_path: Path) -> None:
    for n in ("s1", "s2", "s3"):
        _touch(tmp_path / f"{n}.svs")
        _touch(tmp_path / f"{n}.geojson")
    _touch(tmp_path / "ann" / "s3.csv")
    m = tmp_path / "m.csv"
    m.write_text("slide,annotations,split,mpp\ns1.svs,,train,\ns2.svs,s2.geojson,val,0.25\n"
                 "s3.svs,ann/s3.csv,,\n")
    e = read_manifest(m)
    assert [x.slide.name for x in e] == ["s1.svs", "s2.svs", "s3.svs"]
    assert [x.split for x in e] == ["train", "val", None]
    assert e[0].annotations == tmp_path / "s1.geojson" and e[1].mpp == 0.25
    assert e[2].annotations == tmp_path / "ann" / "s3.csv"
    y = tmp_path / "m.yaml"
    y.write_text("slides:\n  - {slide: s1.svs, split: test}\n  - slide: s2.svs\n")
    src = discover(y)
    assert src.kind == "manifest" and [x.split for x in src.entries] == ["test", None]
    assert discover(m).kind == "manifest"


@pytest.mark.parametrize("text, msg", [
    ("slide,split\ns1.svs,holdout\n", "line 2: split 'holdout'"),
    ("slide,split\nmissing.svs,train\n", "line 2: slide .*missing.svs not found"),
    ("slide\ns1.svs\ns1.svs\n", "line 3: slide s1.svs is listed twice"),
    ("slide,mpp\ns1.svs,fast\n", "line 2: mpp 'fast'"),
    ("path\ns1.svs\n", "needs a 'slide' column"),
    ("slide\n", "lists no slides"),
    ("slide,annotations\ns1.svs,nope.geojson\n", "line 2: annotation file"),
])
def test_bad_manifests(tmp_path: Path, text: str, msg: str) -> None:
    _touch(tmp_path / "s1.svs")
    _touch(tmp_path / "s1.geojson")
    m = tmp_path / "m.csv"
    m.write_text(text)
    with pytest.raises(AnnotationError, match=msg):
        read_manifest(m)


def test_discover_slide_folder_points_csv_and_errors(tmp_path: Path) -> None:
    _touch(tmp_path / "a.tiff")
    _touch(tmp_path / "a.geojson")
    _touch(tmp_path / "b.svs")  # no truth: not listed
    src = discover(tmp_path)
    assert src.kind == "slides" and [e.slide.name for e in src.entries] == ["a.tiff"]
    pts = tmp_path / "pts.csv"
    pts.write_text("slide,x,y,class\nb.svs,1,2,eos\n")
    src = discover(pts)
    assert src.kind == "points_csv" and src.entries[0].slide == (tmp_path / "b.svs").resolve()
    with pytest.raises(AnnotationError, match="not found"):
        discover(tmp_path / "absent")
    empty = tmp_path / "empty"
    _touch(empty / "c.svs")
    with pytest.raises(AnnotationError, match="none has a same-stem .geojson"):
        discover(empty)


def _png(path: Path, size: int, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)


def test_crop_folder_reads_resizes_and_refuses(tmp_path: Path, caplog) -> None:
    _png(tmp_path / "eosinophil" / "s1__1.png", 64, (200, 50, 50))
    _png(tmp_path / "lymphocyte" / "s1__2.png", 64, (50, 50, 200))
    _png(tmp_path / "Mast cell" / "s2__3.png", 128, (120, 50, 150))
    assert discover(tmp_path).kind == "crops"
    cm = ClassMap(CLASSES)
    with pytest.raises(AnnotationError, match="--mpp"):
        read_crop_folder(tmp_path, cm, 64, 0.5, None)
    with caplog.at_level(logging.WARNING):
        f = read_crop_folder(tmp_path, cm, 64, 0.5, 0.5)
    assert f.crops.shape == (3, 64, 64, 3) and f.crops.dtype == np.uint8
    assert sorted(f.labels.tolist()) == [0, 2, 3]
    assert f.resized == 1 and "mapped to 'other'" in caplog.text
    (tmp_path / "eosinophil" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(AnnotationError, match="broken.png: not a readable image"):
        read_crop_folder(tmp_path, cm, 64, 0.5, 0.5)
