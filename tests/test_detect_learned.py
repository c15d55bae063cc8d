"""The learned detector: peak finding, targets, the shipped bundle (ONNX ↔ torch parity, no torch
needed at inference), detection on drawn cells and real colon tiles, and train-detector."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cellclf.detect.learned import SHIPPED_DETECTOR, LearnedDetector, heat_peaks, read_detector_card
from cellclf.errors import BundleError
from tests.test_detect import Canvas

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"
needs_bundle = pytest.mark.skipif(not (SHIPPED_DETECTOR / "card.json").exists(),
                                  reason=f"{SHIPPED_DETECTOR} not built")
LICENCE_CLEAN = {"cellclf synthetic slides", "cellclf synthetic slides, v2 style", "bm_graz",
                 "CMU-1-Small-Region.svs", "OS-1-detail.ome.tif"}


def test_heat_peaks_by_hand() -> None:
    yy, xx = np.mgrid[0:40, 0:60] + 0.5
    heat = (0.9 * np.exp(-((xx - 10.5) ** 2 + (yy - 20.5) ** 2) / 8)
            + 0.5 * np.exp(-((xx - 40.5) ** 2 + (yy - 12.5) ** 2) / 8)).astype(np.float32)
    heat[30:32, 50:52] = 0.7  # a 2×2 plateau: one peak, the first in row-major order
    rc = heat_peaks(heat, 2, 0.3)
    assert sorted(map(tuple, rc.tolist())) == [(12, 40), (20, 10), (30, 50)]
    assert len(heat_peaks(heat, 2, 0.8)) == 1
    assert len(heat_peaks(np.zeros((10, 10), np.float32), 2, 0.1)) == 0


def test_gaussian_targets_peak_at_points() -> None:
    torch = pytest.importorskip("torch")
    from cellclf.detect.learned_net import gaussian_targets

    t = gaussian_targets([torch.tensor([[10.5, 5.5], [30.0, 20.0]]), torch.zeros((0, 2))],
                         32, 40, 1.5)
    assert t.shape == (2, 32, 40) and float(t[0, 5, 10]) == pytest.approx(1.0)
    assert float(t[0, 5, 12]) == pytest.approx(np.exp(-0.5 * 4 / 1.5**2), rel=1e-5)
    assert float(t[1].max()) == 0.0


@needs_bundle
def test_shipped_card_states_contract_data_and_terms() -> None:
    card = read_detector_card(SHIPPED_DETECTOR)
    levels = card["network"].get("levels", 3)
    assert card["mpp"] > 0 and card["stride"] == 2 ** (levels - 1) and 0 < card["threshold"] < 1
    names = {d["name"] for d in card["data"]}
    # only data whose terms allow shipped weights (README of ../shared/data/real and wsi/SOURCE)
    assert "bm_graz" in names and names <= LICENCE_CLEAN
    assert not any("crchisto" in n.lower() or "cpm15" in n.lower() for n in names)
    assert all(d.get("terms") for d in card["data"])
    assert any("Kainz" in d.get("citation", "") for d in card["data"])
    size = sum(f.stat().st_size for f in SHIPPED_DETECTOR.iterdir())
    assert size < 5e6


@needs_bundle
def test_onnx_and_torch_agree() -> None:
    torch = pytest.importorskip("torch")
    from cellclf.detect.learned_net import HeatmapGraph, TorchLearnedDetector, net_from_card

    det = LearnedDetector(SHIPPED_DETECTOR)
    net = net_from_card(det.card)
    net.load_state_dict(torch.load(SHIPPED_DETECTOR / "detector.pt", weights_only=True))
    graph = HeatmapGraph(net).eval()
    rng = np.random.default_rng(0)
    cv = _cells(rng)
    rgb = cv.rgb()
    x, _, _ = det.prepare(rgb, cv.mpp)
    a = det._onnx().run(None, {"tiles": x[None]})[0]
    with torch.inference_mode():
        b = graph(torch.from_numpy(np.array(x[None]))).numpy()
    assert np.abs(a - b).max() < 1e-4
    # the batched torch path (device stage) finds the same cells as onnxruntime on the host
    tiles = np.stack([rgb, rgb[::-1].copy()])
    batch = TorchLearnedDetector(SHIPPED_DETECTOR, device="cpu").detect(torch.from_numpy(tiles),
                                                                        cv.mpp)
    from cellclf.detect.matching import match_points

    for tile, xy in zip(tiles, batch, strict=True):
        ref = det(tile, cv.mpp)
        assert len(ref) > 20
        m = match_points(ref, xy, 1.5 / cv.mpp)
        assert m.n_matched >= 0.95 * max(len(ref), len(xy))


def _cells(rng: np.random.Generator) -> Canvas:
    cv = Canvas(160, 160)
    for gx in range(5):
        for gy in range(5):
            cv.disc(15 + 32 * gx + rng.uniform(-3, 3), 15 + 32 * gy + rng.uniform(-3, 3),
                    rng.uniform(2.8, 4.0), hem=rng.uniform(0.6, 1.1))
    cv.c[..., 1] = np.maximum(cv.c[..., 1], 0.35)  # pink stroma everywhere
    return cv


@needs_bundle
def test_learned_detector_finds_drawn_nuclei_and_ignores_glass() -> None:
    rng = np.random.default_rng(5)
    cv = _cells(rng)
    det = LearnedDetector(SHIPPED_DETECTOR)
    xy = det(cv.rgb(), cv.mpp)
    assert 23 <= len(xy) <= 27
    blank = np.full((300, 300, 3), 243, np.uint8)
    assert len(det(blank, 0.5)) == 0
    with pytest.raises(ValueError, match="uint8"):
        det(np.zeros((10, 10, 3), np.float32), 0.5)


def test_bad_bundles_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="card.json"):
        LearnedDetector(tmp_path)
    (tmp_path / "card.json").write_text(json.dumps({"kind": "classifier"}))
    with pytest.raises(BundleError, match="cell-detector"):
        LearnedDetector(tmp_path)


@needs_bundle
def test_edited_onnx_is_refused(tmp_path: Path) -> None:
    b = tmp_path / "b"
    shutil.copytree(SHIPPED_DETECTOR, b)
    with (b / "detector.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match="sha256"):
        LearnedDetector(b)(np.full((64, 64, 3), 200, np.uint8), 0.5)


@needs_bundle
def test_detects_without_torch(tmp_path: Path) -> None:
    """The deploy install: torch import blocked, the learned detector still runs via the CLI."""
    from PIL import Image

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    Image.fromarray(_cells(np.random.default_rng(1)).rgb()).save(tiles / "t.png")
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['cellclf', 'detect', "
            f"{str(tiles)!r}, '--mpp', '0.5', '--detector', 'learned', '-o', "
            f"{str(tmp_path / 'c.csv')!r}]; from cellclf.cli import main; main()")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert len((tmp_path / "c.csv").read_text().splitlines()) > 20


@needs_bundle
@pytest.mark.skipif(not (REAL / "crchisto").is_dir(), reason="../shared/data/real/crchisto absent")
def test_learned_detector_on_real_colon_validation(tmp_path: Path) -> None:
    """The shipped detector never saw crchisto: F1 on its validation tiles is the real measure."""
    from typer.testing import CliRunner

    from cellclf.cli import app

    out = tmp_path / "crc.csv"
    res = CliRunner().invoke(app, [
        "detect", str(REAL / "crchisto" / "images"), "--mpp", "0.55", "--where",
        "split=validation", "--truth", str(REAL / "crchisto" / "points.csv"), "-o", str(out),
        "--detector", "learned"])
    assert res.exit_code == 0, res.output
    met = json.loads(out.with_name("crc.metrics.json").read_text())
    assert met["f1"] >= 0.65 and met["duplicate_rate"] < 0.03  # v2: 0.675, v1 0.604, classical 0.707


@pytest.mark.slow
def test_train_detector_cli_and_fine_tune(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from typer.testing import CliRunner

    from cellclf.cli import app
    from tests.test_detect_tiles import _write_tiles

    csv, _ = _write_tiles(tmp_path / "tiles")
    out = tmp_path / "det"
    res = CliRunner().invoke(app, ["train-detector", str(tmp_path / "tiles"), "--truth",
                                   str(csv), "--mpp", "0.5", "-o", str(out), "--minutes",
                                   "0.05"])
    assert res.exit_code == 0, res.output
    card = read_detector_card(out)
    assert card["training"]["steps"] >= 1 and card["parity_max_abs_diff"] < 1e-4
    assert card["validation"] is not None
    assert LearnedDetector(out)(np.full((64, 64, 3), 240, np.uint8), 0.5).shape[1] == 2
    res = CliRunner().invoke(app, ["train-detector", str(tmp_path / "tiles"), "--truth",
                                   str(csv), "--mpp", "0.5", "-o", str(tmp_path / "det2"),
                                   "--minutes", "0.05", "--init", str(out)])
    assert res.exit_code == 0, res.output
    assert read_detector_card(tmp_path / "det2")["training"]["init"] == str(out)


def test_training_patches_keep_points_on_their_cells() -> None:
    """Crops, zooms, flips and rotations move the points with the pixels."""
    from cellclf.detect.learned_train import PointImage, _patches

    rgb = np.full((300, 400, 3), 255, np.uint8)
    xy = np.array([[100.5, 80.5], [250.5, 200.5], [330.5, 60.5]])
    yy, xx = np.mgrid[0:300, 0:400] + 0.5
    for x, y in xy:
        rgb[(xx - x) ** 2 + (yy - y) ** 2 <= 16] = 0
    tiles, pts, _ = _patches([PointImage("a", rgb, xy)], 200, 64, np.random.default_rng(2), 0.25)
    seen = 0
    for tile, p in zip(tiles, pts, strict=True):
        for x, y in p:
            if 2 <= x < 62 and 2 <= y < 62:
                assert tile[int(y), int(x)].max() < 128
                seen += 1
    assert seen >= 10


@needs_bundle
def test_learned_detect_slide_targets_and_torch_backend(tiny_slide) -> None:
    """Whole-slide detection with the learned detector (onnxruntime, and torch batches as in the
    device stage): the synthetic target recall bar and no tile-overlap duplicates."""
    pytest.importorskip("torch")
    from cellclf.detect.matching import detection_metrics, match_points
    from cellclf.detect.slide_detection import detect_slide
    from tests.test_detect import TARGETS, _truth

    slide, truth = tiny_slide
    xy0, names = _truth(truth)
    pts = detect_slide(slide, progress=False, backend="numpy", detector="learned", workers=1)
    met = detection_metrics(pts, xy0, names, 4.0 / 0.25)
    for cls in TARGETS:
        assert met["recall"][cls] >= 0.97, (cls, met)
    assert met["duplicate_rate"] <= 0.03 and met["precision"] >= 0.9
    on_torch = detect_slide(slide, progress=False, backend="torch", detector="learned",
                            workers=1)
    m = match_points(pts, on_torch, 1.0 / 0.25)
    assert m.n_matched >= 0.97 * max(len(pts), len(on_torch))


@pytest.mark.slow
def test_train_detector_from_slide_and_qupath_points(tiny_svs, tmp_path: Path) -> None:
    """A slide with QuPath GeoJSON points trains a bundle (annotated region, split 4:1)."""
    pytest.importorskip("torch")
    from typer.testing import CliRunner

    from cellclf.cli import app

    slide, truth = tiny_svs
    out = tmp_path / "det"
    res = CliRunner().invoke(app, ["train-detector", str(slide), "--truth", str(truth), "-o",
                                   str(out), "--minutes", "0.05"])
    assert res.exit_code == 0, res.output
    card = read_detector_card(out)
    assert card["validation"]["f1"] >= 0.0 and (out / "detector.onnx").is_file()
    res = CliRunner().invoke(app, ["train-detector", str(slide), "--truth", str(tmp_path / "no"),
                                   "-o", str(out)])
    from cellclf.errors import CellclfError

    assert isinstance(res.exception, CellclfError) and "no" in str(res.exception)


def test_four_level_bundle_with_ignore_weights_runs_on_any_tile_size(tmp_path: Path) -> None:
    """A 4-level network (stride 8) trained a few steps with a loss-weight mask: exported,
    ONNX = torch, and both detectors accept tiles whose sides are not multiples of 8."""
    pytest.importorskip("torch")
    from cellclf.detect.learned_net import TorchLearnedDetector
    from cellclf.detect.learned_train import PointImage, _patches, train_detector

    rng = np.random.default_rng(0)
    rgb = np.full((160, 160, 3), 235, np.uint8)
    xy = rng.uniform(10, 150, (30, 2))
    yy, xx = np.mgrid[0:160, 0:160] + 0.5
    for x, y in xy:
        rgb[(xx - x) ** 2 + (yy - y) ** 2 <= 9] = (80, 40, 140)
    weight = np.full((160, 160), 255, np.uint8)
    weight[:, :40] = 0
    im = PointImage("a", rgb, xy, weight)
    _, _, w = _patches([im], 8, 64, np.random.default_rng(1))
    assert w.dtype == np.float32 and set(np.unique(w)) <= {0.0, 1.0} and w.min() == 0.0
    card = train_detector([im], [im], tmp_path / "det", [], mpp=0.5, minutes=0.5, max_steps=3,
                          batch=4, patch_px=64, width=4, levels=4, blur_um=0.5, threads=1)
    assert card["network"]["levels"] == 4 and card["stride"] == 8
    assert card["parity_max_abs_diff"] < 1e-4 and card["training"]["steps"] == 3
    noise = np.random.default_rng(3).normal(0, 4, (101, 77, 3))  # no flat heat plateaus
    tile = np.clip(rgb[:101, :77] + noise, 0, 255).astype(np.uint8)
    a = LearnedDetector(tmp_path / "det")
    heat, _ = a.heat(tile, 0.5)
    assert heat.shape == (101, 77)
    # a barely trained net: peaks above its own 90th heat percentile, the same on both paths
    a.threshold = float(np.quantile(heat, 0.9))
    b = TorchLearnedDetector(tmp_path / "det", device="cpu")
    b.threshold = a.threshold
    got_a, got_b = a(tile, 0.5), b.detect(torch_tiles(tile), 0.5)[0]
    assert len(got_a) > 0
    from cellclf.detect.matching import match_points

    assert match_points(got_a, got_b, 1.5).n_matched >= 0.9 * max(len(got_a), len(got_b))


def torch_tiles(tile: np.ndarray):
    import torch

    return torch.from_numpy(tile[None].copy())
