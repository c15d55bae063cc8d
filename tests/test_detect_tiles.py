"""Tile folders as detection input: reading, scoring and ``cellclf detect TILES --truth``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cellclf.annotations.tile_folder import open_tile_set, parse_where, read_tile_points
from cellclf.cli import app
from cellclf.detect.tile_detection import score_tile_set
from cellclf.errors import AnnotationError
from tests.test_detect import Canvas

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
MPP = 0.5


def _write_tiles(root: Path, seed: int = 0) -> tuple[Path, list[tuple[str, float, float, str]]]:
    """Two tiles with round nuclei on a grid; returns the CSV path and its rows (0-based px)."""
    rng = np.random.default_rng(seed)
    rows = []
    for k, (name, ext) in enumerate((("a", ".png"), ("b", ".jpg"))):
        cv = Canvas(120, 100)
        for gx in range(4):
            for gy in range(3):
                x, y = 18 + 28 * gx + rng.uniform(-3, 3), 18 + 30 * gy + rng.uniform(-3, 3)
                cv.disc(x, y, 3.5, hem=0.9)
                rows.append((name, x / MPP - 0.5, y / MPP - 0.5, "lymph" if gx % 2 else "epi"))
        sub = root / ("sub" if k else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(cv.rgb(seed=k)).save(sub / f"{name}{ext}", quality=95)
    csv = root / "points.csv"
    csv.write_text("image,class,x,y,split\n" + "".join(
        f"{n},{c},{x:.2f},{y:.2f},{'train' if n == 'a' else 'validation'}\n"
        for n, x, y, c in rows))
    return csv, rows


def test_cli_detect_tile_folder_scores_per_class(tmp_path: Path) -> None:
    tiles = tmp_path / "tiles"
    csv, rows = _write_tiles(tiles)
    out = tmp_path / "cand.csv"
    res = CliRunner().invoke(app, ["detect", str(tiles), "--mpp", str(MPP), "--truth", str(csv),
                                   "-o", str(out)])
    assert res.exit_code == 0, res.output
    for word in ("lymph", "epi", "F1", "precision", "duplicate rate"):
        assert word in res.output
    met = json.loads((tmp_path / "cand.metrics.json").read_text())
    assert met["n_tiles"] == 2 and sum(met["n_truth"].values()) == len(rows) == 24
    assert met["recall_all"] == 1.0 and met["precision"] == 1.0 and met["f1"] == 1.0
    cand = read_tile_points(out)
    assert set(cand) == {"a", "b"} and sum(len(p.xy) for p in cand.values()) == 24
    # the written candidates are 0-based like the truth: within 1 px of the drawn centres
    truth = read_tile_points(csv)
    for name in ("a", "b"):
        d = np.linalg.norm(cand[name].xy[:, None] - truth[name].xy[None], axis=2).min(axis=1)
        assert d.max() < 1.5
    # --where keeps one split; a tighter radius than the position error drops the matches
    res = CliRunner().invoke(app, ["detect", str(tiles), "--mpp", str(MPP), "--truth", str(csv),
                                   "--where", "split=validation", "-o", str(out)])
    assert res.exit_code == 0 and json.loads((tmp_path / "cand.metrics.json").read_text())[
        "n_tiles"] == 1


def test_scoring_never_matches_across_tiles(tmp_path: Path) -> None:
    csv, _ = _write_tiles(tmp_path / "t")
    ts = open_tile_set(tmp_path / "t", MPP, csv)
    own = {k: ts.truth_of(k).xy + 0.5 for k in ("a", "b")}
    assert score_tile_set(ts, own, 4.0)["f1"] == 1.0
    # all points of both tiles given as tile a's candidates, none for b: b's cells stay missed
    # (the cells sit on the same grid ±3 µm, so a cross-tile match would be within reach)
    moved = {"a": np.concatenate([own["a"], own["b"]]), "b": np.zeros((0, 2))}
    m = score_tile_set(ts, moved, 4.0)
    assert m["n_matched"] == 12 and m["recall_all"] == 0.5 and m["per_tile"]["b"]["n_matched"] == 0


def test_bad_tile_inputs_are_refused_clearly(tmp_path: Path) -> None:
    csv, _ = _write_tiles(tmp_path / "t")
    with pytest.raises(AnnotationError, match="--mpp"):
        open_tile_set(tmp_path / "t", None, csv)
    bad = tmp_path / "bad.csv"
    bad.write_text("image,x\na,1\n")
    with pytest.raises(AnnotationError, match="lacks column"):
        read_tile_points(bad)
    bad.write_text("image,x,y\na,1,zz\n")
    with pytest.raises(AnnotationError, match="bad.csv:2"):
        read_tile_points(bad)
    bad.write_text("image,x,y\nnope,1,2\n")
    with pytest.raises(AnnotationError, match="not under"):
        open_tile_set(tmp_path / "t", MPP, bad)
    with pytest.raises(AnnotationError, match="no rows match"):
        open_tile_set(tmp_path / "t", MPP, csv, {"split": "test"})
    with pytest.raises(AnnotationError, match="COLUMN=VALUE"):
        parse_where(["split"])
    res = CliRunner().invoke(app, ["detect", str(tmp_path / "t"), "-o", str(tmp_path / "o.csv")])
    assert isinstance(res.exception, AnnotationError)


@pytest.mark.skipif(not (REAL / "crchisto").is_dir(), reason="../shared/data/real/crchisto absent")
def test_real_colon_tiles_through_cli(tmp_path: Path) -> None:
    out = tmp_path / "crc.csv"
    res = CliRunner().invoke(app, [
        "detect", str(REAL / "crchisto" / "images"), "--mpp", "0.55", "--where",
        "split=validation", "--truth", str(REAL / "crchisto" / "points.csv"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    met = json.loads(out.with_name("crc.metrics.json").read_text())
    assert met["n_tiles"] == 10 and sum(met["n_truth"].values()) > 2000
    assert {"epithelial", "fibroblast", "inflammatory"} <= set(met["recall"])
    assert met["f1"] > 0.65 and met["duplicate_rate"] < 0.03
    assert 0.8 <= met["hem_cap"] <= 2.0  # the set's own nuclear H level
