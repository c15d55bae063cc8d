"""Tile folders (tiles + points.csv with image,x,y,class[,split]) as training and evaluation data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cellclf.annotations.labelled_data import discover, load_points
from cellclf.cli import app
from cellclf.errors import AnnotationError
from tests.test_detect_tiles import MPP, _write_tiles

REPO = Path(__file__).resolve().parents[1]


def test_a_tile_folder_is_discovered_with_its_splits_and_pixel_centres(tmp_path: Path) -> None:
    csv, rows = _write_tiles(tmp_path / "tiles")
    for data in (tmp_path / "tiles", csv):  # the folder, or its CSV directly
        source = discover(data, mpp=MPP)
        assert source.kind == "tiles" and [e.slide_id for e in source.entries] == ["a", "b"]
        assert [e.split for e in source.entries] == ["train", "val"]  # "validation" → val
        assert all(e.mpp == MPP for e in source.entries)
        pts = load_points(source.entries[1])
        want = np.array([(x, y) for n, x, y, _ in rows if n == "b"])
        assert np.allclose(pts.xy, want + 0.5, atol=0.006)  # 0-based pixel → pixel centre
        assert set(pts.names) == {"lymph", "epi"}


def test_tile_folder_without_mpp_or_with_bad_rows_is_refused(tmp_path: Path) -> None:
    csv, _ = _write_tiles(tmp_path / "tiles")
    with pytest.raises(AnnotationError, match="--mpp"):
        discover(tmp_path / "tiles")
    text = csv.read_text()
    csv.write_text(text + "zz,epi,1,1,train\n")
    with pytest.raises(AnnotationError, match=r"line \d+: image 'zz' is not under"):
        discover(tmp_path / "tiles", mpp=MPP)
    csv.write_text(text.replace(",validation\n", ",holdout\n"))
    with pytest.raises(AnnotationError, match="split 'holdout'"):
        discover(tmp_path / "tiles", mpp=MPP)


@pytest.mark.slow
def test_cli_train_and_evaluate_on_a_tile_folder(tmp_path: Path) -> None:
    _write_tiles(tmp_path / "tiles")
    out = tmp_path / "bundle"
    res = CliRunner().invoke(app, [
        "train", "-c", str(REPO / "configs" / "train-tiny.yaml"), "--data", str(tmp_path / "tiles"),
        "--mpp", str(MPP), "--out", str(out), "--cache", str(tmp_path / "cache"),
        "train.epochs=1", "train.min_steps=2", "data.crop_px=32", "data.class_map.epi=eosinophil"])
    assert res.exit_code == 0, res.output
    card = json.loads((out / "card.json").read_text())
    t = card["training"]
    assert t["data_kind"] == "tiles"
    assert t["slides"]["train"] == ["a"] and t["slides"]["val"] == ["b"]
    assert t["counts"]["train"]["eosinophil"] == 6 and t["counts"]["train"]["other"] >= 6
    res = CliRunner().invoke(app, ["evaluate", str(out), "-d", str(tmp_path / "tiles"), "--mpp",
                                   str(MPP), "-o", str(tmp_path / "eval"), "--no-progress",
                                   "--class-map", "epi=eosinophil"])
    assert res.exit_code == 0, res.output
    met = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert met["n_slides"] == 2 and met["detection"]["n_truth"]["eosinophil"] == 12
    assert met["detection"]["recall_all"] == 1.0
