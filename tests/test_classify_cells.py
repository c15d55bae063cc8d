"""``cellclf classify-cells``: existing cells (a QuPath export) classified without detection give
the same probabilities and decisions as ``infer`` for the same cells, in the input order."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cellclf.pipeline.batch import run_batch
from cellclf.pipeline.classify_cells import run_classify_cells

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(shipped_model, tmp_path_factory) -> Path:
    """The shipped bundle without its OOD guard: the guard flags the tiny slide, which would send
    every cell to review and leave the gate's decisions untested."""
    out = tmp_path_factory.mktemp("bundle") / "no-ood"
    out.mkdir()
    for name in ("card.json", "model.onnx"):
        shutil.copy(shipped_model / name, out / name)
    card = json.loads((out / "card.json").read_text())
    del card["ood"]
    (out / "card.json").write_text(json.dumps(card))
    return out


@pytest.fixture(scope="module")
def inferred(tiny_slide, model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("infer_for_classify")
    report = run_batch([str(tiny_slide[0])], model, out, backend="onnx", workers=2)
    assert report.exit_code == 0
    return out


def _table(path: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in pq.read_table(path).to_pydict().items()}


def _qupath_export(src: Path, dst: Path, order: np.ndarray, polygons: bool) -> None:
    """infer's cells as a QuPath detection export (no classification), in ``order``; polygons as
    small squares centred on the cell (centroid = the cell centre)."""
    feats = json.loads(src.read_text())["features"]
    out = []
    for i in order:
        x, y = feats[i]["geometry"]["coordinates"]
        if polygons:
            ring = [[x - 3, y - 3], [x + 3, y - 3], [x + 3, y + 3], [x - 3, y + 3], [x - 3, y - 3]]
            geom = {"type": "Polygon", "coordinates": [ring]}
        else:
            geom = {"type": "Point", "coordinates": [x, y]}
        out.append({"type": "Feature", "geometry": geom,
                    "properties": {"objectType": "detection"}})
    tissue = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        [[0, 0], [2048, 0], [2048, 2048], [0, 2048], [0, 0]]]},
        "properties": {"objectType": "annotation", "classification": {"name": "Tissue"}}}
    # QuPath exports the annotation the detections were made in too: not a cell
    dst.write_text(json.dumps({"type": "FeatureCollection", "features": [tissue, *out]}))


@pytest.mark.parametrize("polygons", [False, True])
def test_same_results_as_infer_in_input_order(inferred, tiny_slide, model, tmp_path,
                                              polygons):
    ref = _table(inferred / "tiny" / "cells.parquet")
    n = len(ref["x"])
    order = np.random.default_rng(3).permutation(n)  # not infer's order
    cells = tmp_path / "qupath.geojson"
    _qupath_export(inferred / "tiny" / "cells.geojson", cells, order, polygons)
    folder, counts, n_review = run_classify_cells(tiny_slide[0], cells, model,
                                                  tmp_path / "out", backend="onnx", workers=2)
    got = _table(folder / "cells.parquet")
    want = {k: v[order] for k, v in ref.items()}
    assert len(got["x"]) == n > 100
    np.testing.assert_allclose(got["x"], want["x"], atol=0.01)
    np.testing.assert_allclose(got["y"], want["y"], atol=0.01)
    for col in [c for c in ref if c.startswith("p_")]:
        np.testing.assert_allclose(got[col], want[col], atol=1e-5, err_msg=col)
    for col in ("class", "decision", "reason", "conformal_set"):
        assert (got[col] == want[col]).all(), col
    assert 0 < (got["decision"] == "accepted").sum() < n  # the gate decided both ways
    np.testing.assert_array_equal(got["cell_id"], np.arange(n))
    # cells.geojson: one feature per input cell, input order, classification and probabilities
    feats = json.loads((folder / "cells.geojson").read_text())["features"]
    assert len(feats) == len(order)
    assert [f["properties"]["classification"]["name"] for f in feats] == list(got["class"])
    assert feats[5]["properties"]["measurements"]["p_" + got["class"][5]] == pytest.approx(
        got["p_" + got["class"][5]][5], abs=1e-6)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["n_cells"] == len(order) and summary["counts"] == counts
    # exactly the gated cells are in the review store, with the input index as cell id
    with sqlite3.connect(tmp_path / "out" / "review.sqlite") as con:
        ids = sorted(r[0] for r in con.execute("SELECT cell_id FROM items"))
    assert ids == list(np.flatnonzero(got["decision"] == "review"))
    assert n_review == len(ids) > 0


def test_cli_refuses_cells_outside_the_slide_and_empty_exports(tiny_slide, shipped_model,
                                                              tmp_path):
    bad = tmp_path / "far.geojson"
    bad.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [100, 100]},
         "properties": {}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1e6, 5]},
         "properties": {}}]}))
    empty = tmp_path / "empty.geojson"
    empty.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    for path, words in ((bad, "outside the slide"), (empty, "no cells")):
        r = subprocess.run([sys.executable, "-m", "cellclf.cli", "classify-cells",
                            str(tiny_slide[0]), "--cells", str(path), "--model",
                            str(shipped_model), "--out", str(tmp_path / "o"), "--backend", "onnx"],
                           capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 2, r.stderr
        assert words in " ".join(r.stderr.split()) and "Traceback" not in r.stderr
