"""Cell candidate detection: hand-drawn H&E-like tiles, numpy vs torch, whole slides, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cellclf.detect.classical import RJ_HE, DetectParams, detect_cells, gaussian_kernel, merge_peaks

MPP = 0.5
_M = RJ_HE[:2] / np.linalg.norm(RJ_HE[:2], axis=1, keepdims=True)


class Canvas:
    """Stain amounts (haematoxylin, eosin) on a µm grid, rendered by Beer–Lambert to RGB."""

    def __init__(self, w_um: float, h_um: float, mpp: float = MPP) -> None:
        self.mpp = mpp
        self.c = np.zeros((int(h_um / mpp), int(w_um / mpp), 2), np.float32)
        yy, xx = np.mgrid[0 : self.c.shape[0], 0 : self.c.shape[1]]
        self.x_um, self.y_um = (xx + 0.5) * mpp, (yy + 0.5) * mpp

    def disc(self, cx: float, cy: float, r: float, hem: float = 0.0, eos: float = 0.0) -> None:
        m = (self.x_um - cx) ** 2 + (self.y_um - cy) ** 2 <= r * r
        self.c[m, 0] = np.maximum(self.c[m, 0], hem)
        self.c[m, 1] = np.maximum(self.c[m, 1], eos)

    def rgb(self, glass: float = 242.0, noise: float = 3.0, seed: int = 0) -> np.ndarray:
        od = self.c[..., 0:1] * _M[0] + self.c[..., 1:2] * _M[1]
        img = glass * np.exp(-od) + np.random.default_rng(seed).normal(0, noise, od.shape)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _um(xy_px: np.ndarray) -> np.ndarray:
    return xy_px * MPP  # tile px (continuous) -> µm from the tile corner


def eosinophil(cv: Canvas, x: float, y: float, lobe_sep: float = 6.0) -> None:
    cv.disc(x, y, 7.0, eos=1.3)  # coarse orange granules filling a 14 µm cell
    cv.disc(x - lobe_sep / 2, y, 2.4, hem=0.9)
    cv.disc(x + lobe_sep / 2, y, 2.4, hem=0.9)


def neutrophil(cv: Canvas, x: float, y: float, angles=(200, 270, 340), ring: float = 3.2) -> None:
    cv.disc(x, y, 5.5, eos=0.35)  # pale pink cytoplasm
    for a in np.deg2rad(angles):
        cv.disc(x + ring * np.cos(a), y + ring * np.sin(a), 1.8, hem=1.0)


def test_blank_tile_has_no_candidates() -> None:
    assert detect_cells(Canvas(60, 60).rgb(), MPP).shape == (0, 2)
    white = np.full((100, 80, 3), 255, np.uint8)
    assert detect_cells(white, MPP).shape == (0, 2)


def test_round_blob_gives_one_centre() -> None:
    cv = Canvas(60, 60)
    cv.disc(31.0, 27.0, 3.5, hem=0.8)
    xy = detect_cells(cv.rgb(), MPP)
    assert xy.dtype == np.float32 and xy.shape == (1, 2)
    assert np.abs(_um(xy[0]) - [31.0, 27.0]).max() < 0.5


@pytest.mark.parametrize("lobe_sep", [4.5, 5.5, 6.0, 7.0])
def test_bilobed_eosinophil_gives_one_centre(lobe_sep: float) -> None:
    cv = Canvas(60, 60)
    eosinophil(cv, 30.0, 30.0, lobe_sep)
    xy = detect_cells(cv.rgb(), MPP)
    assert len(xy) == 1
    # close lobes give the cell centre; far-apart lobes at least a point within the 4 µm match
    assert np.hypot(*(_um(xy[0]) - 30.0)) < (1.0 if lobe_sep <= 6.0 else 4.0)


@pytest.mark.parametrize(("angles", "ring"), [((200, 270, 340), 3.2), ((180, 240, 300, 0), 3.2),
                                             ((90, 162, 234, 306, 18), 2.8)])
def test_lobed_neutrophil_gives_one_centre(angles, ring: float) -> None:
    cv = Canvas(60, 60)
    neutrophil(cv, 30.0, 30.0, angles, ring)
    xy = detect_cells(cv.rgb(), MPP)
    assert len(xy) == 1
    assert np.hypot(*(_um(xy[0]) - 30.0)) < 3.0


def test_two_touching_cells_give_two_centres() -> None:
    # two 10 µm cells side by side (membranes touching), nuclei 7 µm
    cv = Canvas(60, 60)
    for x in (25.0, 35.0):
        cv.disc(x, 30.0, 5.0, eos=0.4)
        cv.disc(x, 30.0, 3.5, hem=0.8)
    xy = detect_cells(cv.rgb(), MPP)
    assert len(xy) == 2
    got = sorted(_um(xy)[:, 0])
    assert got == pytest.approx([25.0, 35.0], abs=1.0)


def test_touching_eosinophils_stay_apart() -> None:
    cv = Canvas(80, 60)
    eosinophil(cv, 27.0, 30.0)
    eosinophil(cv, 41.0, 30.0)
    xy = detect_cells(cv.rgb(), MPP)
    # one point per cell, each inside its own cell (on a lobe at worst)
    assert sorted(_um(xy)[:, 0]) == pytest.approx([27.0, 41.0], abs=3.0)


def test_red_cell_and_faint_stroma_are_not_candidates() -> None:
    cv = Canvas(60, 60)
    cv.c[..., 1] = 0.25  # pale eosin stroma everywhere
    cv.disc(30, 30, 3.8, eos=0.7)  # red cell: eosin, no nucleus
    assert len(detect_cells(cv.rgb(), MPP)) == 0


def test_scattered_cells_found_at_other_mpp() -> None:
    rng = np.random.default_rng(3)
    centres = [(x, y) for x in range(15, 200, 22) for y in range(15, 140, 22)]
    for mpp in (0.25, 0.5, 1.0):
        cv = Canvas(210, 150, mpp)
        for x, y in centres:
            cv.disc(x + rng.uniform(-3, 3), y + rng.uniform(-3, 3), rng.uniform(3, 4.5),
                    hem=rng.uniform(0.5, 1.0))
        xy = detect_cells(cv.rgb(seed=1), mpp)
        assert len(xy) == len(centres), mpp


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        detect_cells(np.zeros((10, 10, 3), np.float32), MPP)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        detect_cells(np.zeros((10, 10), np.uint8), MPP)
    with pytest.raises(ValueError, match="mpp"):
        detect_cells(np.zeros((10, 10, 3), np.uint8), 0.0)


def test_gaussian_kernel_and_merge_rules_by_hand() -> None:
    k = gaussian_kernel(1.0, 2.0)
    assert len(k) == 5 and k.sum() == pytest.approx(1.0) and k[2] == k.max()
    p = DetectParams(min_distance_um=3.0, saddle_um=6.0, saddle_ratio=0.8)
    sm = np.zeros((3, 12), np.float32)
    sm[1] = [0, 1.0, 0.9, 0.85, 0.9, 0.95, 0.1, 0.2, 0.5, 0.2, 0.1, 0]
    rc = np.array([[1, 1], [1, 5], [1, 8]])
    # 1 and 5: 4 µm apart, ridge min 0.85 >= 0.8 * 0.95 -> merged into the stronger (index 0);
    # 8 is 3 µm from 5 but the valley (0.1) separates them, and 5 is gone anyway
    assert merge_peaks(sm, rc, p, 1.0).tolist() == [0, 0, 2]
    # equal values closer than min_distance: the first in row-major order wins, in any order
    sm2 = np.zeros((1, 5), np.float32)
    sm2[0, [1, 3]] = 1.0
    p2 = DetectParams(min_distance_um=3.0, saddle_um=3.0)
    assert merge_peaks(sm2, np.array([[0, 3], [0, 1]]), p2, 1.0).tolist() == [1, 1]


def _random_tiles(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        cv = Canvas(200, 150)
        cv.c[..., 1] = rng.uniform(0.1, 0.3)
        for _ in range(60):
            x, y = rng.uniform(0, 200), rng.uniform(0, 150)
            kind = rng.integers(3)
            if kind == 0:
                eosinophil(cv, x, y, rng.uniform(4, 7))
            elif kind == 1:
                neutrophil(cv, x, y, tuple(rng.uniform(0, 360, int(rng.integers(3, 6)))))
            else:
                cv.disc(x, y, rng.uniform(2.5, 4.5), hem=rng.uniform(0.3, 1.0))
        out.append(cv.rgb(seed=i, noise=6.0))
    return out


@pytest.mark.parametrize("hem_cap", [0.8, 1.4])  # the default and a dark slide's nuclear level
def test_torch_matches_numpy_on_cpu(hem_cap: float) -> None:
    pytest.importorskip("torch")
    from scipy.spatial import cKDTree

    from cellclf.detect.classical_torch import TorchDetector

    params = DetectParams(hem_cap=hem_cap)
    tiles = _random_tiles(4, 0)
    tiles.append(tiles[0][:150, :201])  # a different size in the same batch
    got = TorchDetector(params, device="cpu").detect(tiles, MPP)
    n_total = n_close = 0
    for tile, t_xy in zip(tiles, got, strict=True):
        n_xy = detect_cells(tile, MPP, params)
        assert abs(len(n_xy) - len(t_xy)) <= max(1, len(n_xy) // 100)
        d, _ = cKDTree(t_xy).query(n_xy)
        n_total += len(n_xy)
        n_close += int((d <= 1.0).sum())
    assert n_total > 100
    assert n_close / n_total >= 0.99


# ---------------------------------------------------------------- whole slides


def _truth(path: Path) -> tuple[np.ndarray, list[str]]:
    from cellclf.annotations.geojson import read_points

    pts = read_points(path)
    return np.array([(p.x, p.y) for p in pts]), [str(p.name) for p in pts]


TARGETS = ("eosinophil", "neutrophil", "mast_cell")


def test_detect_slide_meets_recall_bar_on_tiny_slide(tiny_slide) -> None:
    from cellclf.detect.matching import detection_metrics
    from cellclf.detect.slide_detection import detect_slide

    slide, truth = tiny_slide
    xy0, names = _truth(truth)
    pts = detect_slide(slide, progress=False, backend="numpy")
    assert pts.dtype == np.float64 and pts.shape[1] == 2
    met = detection_metrics(pts, xy0, names, 4.0 / 0.25)
    for cls in TARGETS:
        assert met["n_truth"][cls] > 0
        assert met["recall"][cls] >= 0.97, (cls, met)
    assert met["duplicate_rate"] <= 0.03
    assert met["precision"] >= 0.9


def test_tile_overlaps_do_not_duplicate(tiny_slide) -> None:
    from scipy.spatial import cKDTree

    from cellclf.detect.slide_detection import detect_slide

    slide, _ = tiny_slide
    one = detect_slide(slide, progress=False, backend="numpy", tile_um=512.0)
    many = detect_slide(slide, progress=False, backend="numpy", tile_um=100.0)  # 6×6 tiles
    # owned-core dedupe: no two candidates closer than 3 µm (12 level-0 px) anywhere
    assert len(cKDTree(many).query_pairs(3.0 / 0.25)) == 0
    # and cutting into tiles changes (almost) nothing: same cells within 1 µm
    d, _ = cKDTree(one).query(many)
    assert abs(len(many) - len(one)) <= 0.02 * len(one)
    assert (d <= 4.0).mean() >= 0.97


def test_torch_backend_matches_numpy_on_slide(tiny_slide) -> None:
    pytest.importorskip("torch")
    from scipy.spatial import cKDTree

    from cellclf.detect.slide_detection import detect_slide

    slide, _ = tiny_slide
    a = detect_slide(slide, progress=False, backend="numpy")
    b = detect_slide(slide, progress=False, backend="torch", batch_tiles=2, tile_um=256.0)
    c = detect_slide(slide, progress=False, backend="numpy", tile_um=256.0)
    d, _ = cKDTree(b).query(c)
    assert len(b) == len(c) and (d <= 2.0).mean() >= 0.99  # 2 level-0 px = 1 work px
    assert abs(len(a) - len(b)) <= 0.02 * len(a)


def test_cli_detect_writes_candidates_and_metrics(tiny_slide, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cellclf.annotations.geojson import read_points
    from cellclf.cli import app

    slide, truth = tiny_slide
    out = tmp_path / "cand.geojson"
    res = CliRunner().invoke(app, ["detect", str(slide), "-o", str(out), "--truth", str(truth),
                                   "--no-progress", "--backend", "numpy"])
    assert res.exit_code == 0, res.output
    pts = read_points(out)
    assert len(pts) > 100 and {p.name for p in pts} == {"candidate"}
    met = json.loads((tmp_path / "cand.metrics.json").read_text())
    assert met["n_pred"] == len(pts) and met["match_um"] == 4.0
    assert set(TARGETS) <= set(met["recall"])
    for word in ("eosinophil", "precision", "duplicate rate"):
        assert word in res.output
    # without truth: just the file; a file that is not a slide: a clear error
    out2 = tmp_path / "plain.geojson"
    res = CliRunner().invoke(app, ["detect", str(slide), "-o", str(out2), "--no-progress"])
    assert res.exit_code == 0 and len(read_points(out2)) == len(pts)
    bad = tmp_path / "not_a_slide.tif"
    bad.write_bytes(b"not a tiff")
    res = CliRunner().invoke(app, ["detect", str(bad), "-o", str(tmp_path / "x.geojson")])
    from cellclf.errors import CellclfError

    assert isinstance(res.exception, CellclfError) and "not_a_slide.tif" in str(res.exception)
