"""Tests for the hybrid synthetic slides (synthetic cells in real tissue), their optics
estimates, and the v2 synthetic renderer. Real OpenSlide reads, real files; the real-tissue
tests skip when ../shared is absent."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from cellclf.errors import CellclfError, ConfigError
from cellclf.model.config import DataConfig
from cellclf.synth import TARGET_TYPES, render_slide
from cellclf.synth.architecture import glands_near
from cellclf.synth.hybrid import render_hybrid
from cellclf.synth.layout import make_layout
from cellclf.synth.local_optics import (
    concentrations,
    edge_blur_px,
    local_conditions,
    macenko_stains,
    noise_std,
    optical_density,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BM_GRAZ = SHARED / "real" / "bm_graz"
CMU = SHARED / "wsi" / "CMU-1-Small-Region.svs"
needs_bm = pytest.mark.skipif(not (BM_GRAZ / "points.csv").is_file(),
                              reason="../shared/data/real/bm_graz (real tiles) not present")
needs_cmu = pytest.mark.skipif(not CMU.is_file(),
                               reason="../shared/data/wsi/CMU-1-Small-Region.svs not present")
OTHER = DataConfig.other_class


def _features(path: Path) -> list[dict]:
    return json.loads(path.read_text())["features"]


def _discs(size: int = 256, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size), np.float32)
    yy, xx = np.ogrid[:size, :size]
    for _ in range(60):
        y, x = rng.integers(0, size, 2)
        r = rng.integers(4, 12)
        img[(yy - y) ** 2 + (xx - x) ** 2 < r * r] = 1.0
    return img


# --- optics estimates (pure maths against known truth) --------------------------------------

@pytest.mark.parametrize("sigma", [0.0, 1.0, 2.0, 3.0])
def test_edge_blur_recovers_known_gaussian_blur(sigma):
    img = _discs()
    blurred = ndimage.gaussian_filter(img, sigma) if sigma else img
    assert edge_blur_px(blurred) == pytest.approx(sigma, abs=0.35)


def test_noise_std_recovers_sensor_noise_on_flat_field():
    rng = np.random.default_rng(1)
    flat = 200.0 + rng.normal(0.0, 3.0, (256, 256))
    assert noise_std(flat) == pytest.approx(3.0, rel=0.1)


def test_macenko_recovers_the_stain_vectors_an_image_was_made_with():
    h = np.array([0.55, 0.78, 0.30]) / np.linalg.norm([0.55, 0.78, 0.30])
    e = np.array([0.12, 0.95, 0.28]) / np.linalg.norm([0.12, 0.95, 0.28])
    rng = np.random.default_rng(2)
    conc = np.stack([rng.gamma(1.5, 0.4, 40000), rng.gamma(2.0, 0.2, 40000)], 1)
    od = conc @ np.stack([h, e])
    rgb = np.clip(250.0 * np.exp(-od), 0, 255).astype(np.uint8).reshape(200, 200, 3)
    stains = macenko_stains(optical_density(rgb, np.full(3, 250.0)))
    assert float(stains[0] @ h) > 0.99 and float(stains[1] @ e) > 0.99
    back = concentrations(od.reshape(200, 200, 3).astype(np.float32), stains)
    assert np.corrcoef(back[..., 0].ravel(), conc[:, 0])[0, 1] > 0.98


# --- hybrid slides on a background folder built here (no shared data needed) ----------------

@pytest.fixture(scope="module")
def synthetic_background(tmp_path_factory) -> Path:
    """A tile folder with points.csv, cut from a v1 synthetic slide (its truth as points)."""
    root = tmp_path_factory.mktemp("bg")
    slide, truth = render_slide(root / "src", 1536, 1536, mpp=0.5, seed=4, workers=1)
    with openslide.OpenSlide(str(slide)) as s:
        rgb = np.asarray(s.read_region((0, 0), 0, (1536, 1536)))[..., :3]
    folder = root / "tiles"
    (folder / "images").mkdir(parents=True)
    with (folder / "points.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "x", "y", "class"])
        for k, (x0, y0) in enumerate([(0, 0), (768, 0), (0, 768), (768, 768)]):
            Image.fromarray(rgb[y0:y0 + 768, x0:x0 + 768]).save(
                folder / "images" / f"t{k}.png")
            for f in _features(truth):
                x, y = f["geometry"]["coordinates"]
                if x0 <= x < x0 + 768 and y0 <= y < y0 + 768:
                    w.writerow([f"t{k}", x - x0, y - y0, f["properties"]["classification"]
                                ["name"]])
    return folder


@pytest.mark.slow
def test_hybrid_truth_schema_and_real_nuclei_as_other(synthetic_background, tmp_path):
    res = render_hybrid(tmp_path, synthetic_background, seed=3, background_mpp=0.5,
                        per_mm2=600.0)
    feats = _features(res.truth)
    syn = [f for f in feats if f["properties"]["synthetic"]]
    real = [f for f in feats if not f["properties"]["synthetic"]]
    assert len(syn) == res.n_synthetic > 20 and len(real) == res.n_real > 100
    n_points = sum(1 for _ in (synthetic_background / "points.csv").open()) - 1
    assert res.n_real + res.n_hidden == n_points
    for f in syn:
        p = f["properties"]
        assert p["classification"]["name"] in (*TARGET_TYPES, "plasma_cell")
        assert p["nucleus_source"] == "synthetic" and p["diameter_um"] > 7
        assert isinstance(p["ambiguous"], bool)
        if p["classification"]["name"] == "plasma_cell":
            assert p["ambiguous_with"] == "mast_cell"
    assert {f["properties"]["classification"]["name"] for f in real} == {OTHER}
    assert {f["properties"]["nucleus_source"] for f in real} == {"point_annotation"}
    assert {n["properties"]["classification"]["name"] for n in syn} >= set(TARGET_TYPES)
    with openslide.OpenSlide(str(res.slide)) as s:
        assert s.dimensions == (2 * 768, 2 * 768)
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5, rel=1e-3)


@pytest.mark.slow
def test_hybrid_same_seed_same_bytes_other_seed_differs(synthetic_background, tmp_path):
    a = render_hybrid(tmp_path / "a", synthetic_background, seed=5, background_mpp=0.5)
    b = render_hybrid(tmp_path / "b", synthetic_background, seed=5, background_mpp=0.5)
    c = render_hybrid(tmp_path / "c", synthetic_background, seed=6, background_mpp=0.5)
    assert a.slide.read_bytes() == b.slide.read_bytes()
    assert a.truth.read_bytes() == b.truth.read_bytes()
    assert a.truth.read_bytes() != c.truth.read_bytes()


def test_hybrid_cli_and_clear_errors(synthetic_background, tmp_path):
    from cellclf.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["synth-hybrid", str(synthetic_background), str(tmp_path),
                             "--background-mpp", "0.5", "--format", "svs", "--name", "h"])
    assert ok.exit_code == 0, ok.output
    with openslide.OpenSlide(str(tmp_path / "h.svs")) as s:
        assert s.properties["openslide.vendor"] == "aperio"
    no_mpp = runner.invoke(app, ["synth-hybrid", str(synthetic_background), str(tmp_path)])
    assert isinstance(no_mpp.exception, ConfigError)        # main() prints it, exit code 2
    assert "--background-mpp" in str(no_mpp.exception)
    bad = runner.invoke(app, ["synth-hybrid", str(tmp_path / "nope"), str(tmp_path)])
    assert isinstance(bad.exception, ConfigError) and "not found" in str(bad.exception)
    region = runner.invoke(app, ["synth-hybrid", str(synthetic_background), str(tmp_path),
                                 "--region", "1,2"])
    assert isinstance(region.exception, CellclfError) and "X,Y,W,H" in str(region.exception)
    with pytest.raises(ConfigError, match="cells-per-mm2"):
        render_hybrid(tmp_path, synthetic_background, background_mpp=0.5, per_mm2=0.0)


# --- hybrid slides in real tissue -------------------------------------------------------------

def _tile_and_truth(res) -> tuple[np.ndarray, list[dict]]:
    with openslide.OpenSlide(str(res.slide)) as s:
        rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions))[..., :3].astype(np.float32)
    return rgb, _features(res.truth)


@needs_bm
@pytest.mark.slow
def test_hybrid_on_bm_graz_keeps_tissue_and_matches_local_stain(tmp_path):
    res = render_hybrid(tmp_path, BM_GRAZ, seed=2, background_mpp=0.26, max_tiles=1,
                        per_mm2=800.0)
    out, feats = _tile_and_truth(res)
    src = np.asarray(Image.open(sorted((BM_GRAZ / "images").iterdir())[0]).convert("RGB"),
                     np.float32)
    assert out.shape == src.shape
    syn = np.asarray([f["geometry"]["coordinates"] for f in feats
                      if f["properties"]["synthetic"]])
    yy, xx = np.mgrid[:src.shape[0], :src.shape[1]]
    far = np.ones(src.shape[:2], bool)
    for x, y in syn:
        far &= (xx - x) ** 2 + (yy - y) ** 2 > (15 / 0.26) ** 2
    assert far.mean() > 0.3
    # away from synthetic cells the real tissue is untouched (JPEG re-encoding only)
    assert float(np.abs(out[far] - src[far]).mean()) < 3.0
    # synthetic nuclei are as dark as the tile's real nuclei (local stain amounts)
    cond = local_conditions(src.astype(np.uint8), 512)
    od = optical_density(out.astype(np.uint8), cond.i0).sum(-1)
    real_xy = np.asarray([f["geometry"]["coordinates"] for f in feats
                          if not f["properties"]["synthetic"]])
    names = [f["properties"]["classification"]["name"] for f in feats
             if f["properties"]["synthetic"]]

    def peak(xy):
        return np.median([od[int(y) - 6:int(y) + 7, int(x) - 6:int(x) + 7].max() for x, y in xy
                          if 8 < x < od.shape[1] - 8 and 8 < y < od.shape[0] - 8])

    mast = syn[[n == "mast_cell" for n in names]]
    assert len(mast) >= 3
    assert 0.6 < peak(mast) / peak(real_xy) < 1.6


@needs_bm
@pytest.mark.slow
def test_hybrid_cells_take_the_focus_of_their_tissue(tmp_path):
    """The same real tile, sharp and blurred (σ = 2.5 px): cells blended into the blurred one
    are measurably blurrier."""
    src = np.asarray(Image.open(sorted((BM_GRAZ / "images").iterdir())[0]).convert("RGB"))
    blurred = ndimage.gaussian_filter(src.astype(np.float32), (2.5, 2.5, 0))
    blurs = []
    for label, img in (("sharp", src), ("blur", np.clip(blurred, 0, 255).astype(np.uint8))):
        folder = tmp_path / label
        (folder / "images").mkdir(parents=True)
        Image.fromarray(img).save(folder / "images" / "t.png")
        res = render_hybrid(tmp_path / f"out_{label}", folder, seed=1, background_mpp=0.26,
                            per_mm2=800.0)
        out, feats = _tile_and_truth(res)
        grey = optical_density(out.astype(np.uint8), np.full(3, 255.0)).sum(-1)
        vals = []
        for f in feats:
            if f["properties"]["synthetic"] and f["properties"]["classification"]["name"] == \
                    "eosinophil":
                x, y = (int(v) for v in f["geometry"]["coordinates"])
                win = grey[max(0, y - 40):y + 40, max(0, x - 40):x + 40]
                vals.append(edge_blur_px(win))
        assert len(vals) >= 3
        blurs.append(float(np.median(vals)))
    assert blurs[1] > blurs[0] + 1.0


@needs_cmu
def test_hybrid_on_cmu_region_uses_detector_nuclei(tmp_path):
    res = render_hybrid(tmp_path, CMU, seed=0, region=(0, 0, 1024, 1024))
    feats = _features(res.truth)
    real = [f for f in feats if not f["properties"]["synthetic"]]
    assert res.nucleus_source == "classical_detector" and len(real) > 50
    assert {f["properties"]["nucleus_source"] for f in real} == {"classical_detector"}
    with pytest.raises(ConfigError, match="region"):
        render_hybrid(tmp_path, CMU, region=(2000, 0, 1024, 1024))


# --- style v2 -------------------------------------------------------------------------------

@pytest.mark.slow
def test_v2_slide_has_glands_crowding_and_the_same_truth_format(tmp_path):
    slide, truth = render_slide(tmp_path, 3072, 3072, mpp=0.5, seed=5, workers=1, style="v2")
    assert slide.name == "synth_s5_d0.3_v2.tif"
    layout = make_layout(3072 * 0.5, 3072 * 0.5, 5, 0.3, "v2")
    glands = glands_near(layout, 0, 0, 1536, 1536)
    assert len(glands) >= 2
    feats = _features(truth)
    keys = {"objectType", "classification", "ambiguous", "ambiguous_with", "diameter_um"}
    assert all(set(f["properties"]) == keys for f in feats)
    xy = np.asarray([f["geometry"]["coordinates"] for f in feats]) * 0.5
    names = np.asarray([f["properties"]["classification"]["name"] for f in feats])
    g = glands[0]
    ring = np.hypot(xy[:, 0] - g["x"], xy[:, 1] - g["y"]) < g["a"] * 1.05
    assert (names[ring] == "epithelial").sum() >= 8           # a ring of epithelium
    with openslide.OpenSlide(str(slide)) as s:
        px = np.asarray(s.read_region((int(g["x"] / 0.5) - 2, int(g["y"] / 0.5) - 2), 0,
                                      (5, 5)))[..., :3]
    assert px.mean() > 200                                    # the lumen is (nearly) empty
    lym = xy[names == "lymphocyte"]
    from scipy.spatial import cKDTree
    d, _ = cKDTree(lym).query(lym, k=2)
    assert (d[:, 1] < 0.8 * 8.0).mean() > 0.05                # touching / overlapping nuclei


@pytest.mark.slow
def test_v2_is_deterministic_over_workers_and_v1_default_unchanged(tmp_path):
    a = render_slide(tmp_path / "a", 2048, 1536, seed=8, workers=1, style="v2")
    b = render_slide(tmp_path / "b", 2048, 1536, seed=8, workers=2, style="v2")
    v1 = render_slide(tmp_path / "c", 2048, 1536, seed=8, workers=1)
    assert a[0].read_bytes() == b[0].read_bytes() and a[1].read_bytes() == b[1].read_bytes()
    assert v1[0].read_bytes() != a[0].read_bytes()
    with pytest.raises(ConfigError, match="style"):
        render_slide(tmp_path, 512, 512, style="v3")


def test_cli_synth_style_v2(tmp_path):
    from cellclf.cli import app

    ok = CliRunner().invoke(app, ["synth", str(tmp_path), "--width", "700", "--height", "500",
                                  "--workers", "1", "--style", "v2", "--name", "v2"])
    assert ok.exit_code == 0, ok.output
    with openslide.OpenSlide(str(tmp_path / "v2.tif")) as s:
        assert s.dimensions == (700, 500)
    assert "style=v2" in (tmp_path / "v2.tif").read_bytes()[:1 << 16].decode("latin-1")
    bad = CliRunner().invoke(app, ["synth", str(tmp_path), "--width", "700", "--height", "500",
                                   "--style", "v3"])
    assert isinstance(bad.exception, ConfigError) and "v2" in str(bad.exception)
