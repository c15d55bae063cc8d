"""Tests for cellclf.synth: pure maths, real OpenSlide reads of the files, truth, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pytest
from typer.testing import CliRunner

from cellclf.errors import CellclfError, ConfigError
from cellclf.synth import CELL_TYPES, TARGET_TYPES, pyramid_levels, render_slide
from cellclf.synth.celltypes import CODE, NO_TYPE
from cellclf.synth.layout import make_layout
from cellclf.synth.placement import CELL_DTYPE, block_row_cells, hard_core, n_blocks
from cellclf.synth.render import STAIN_E, STAIN_H, make_optics

HPF_MM2 = 0.237


def _features(path: Path) -> list[dict]:
    return json.loads(path.read_text())["features"]


def _od_concentrations(rgb: np.ndarray) -> np.ndarray:
    """Colour deconvolution with the reference Ruifrok–Johnston vectors: (..., 3) H, E, D."""
    od = -np.log(np.clip(rgb.astype(np.float64), 1.0, 255.0) / 245.0)
    m = np.array([(0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78)])
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    return od @ np.linalg.pinv(m)


# --- pure functions, hand-computed ----------------------------------------------------------

def test_pyramid_levels_hand_computed():
    assert pyramid_levels(2048, 2048) == [(2048, 2048), (512, 512)]
    assert pyramid_levels(1024, 700) == [(1024, 700)]
    assert pyramid_levels(1536, 1024) == [(1536, 1024), (384, 256)]
    assert pyramid_levels(100_000, 80_000) == [(100_000, 80_000), (25_000, 20_000),
                                               (6250, 5000), (1563, 1250), (391, 313)]


def test_hard_core_keeps_higher_priority_of_a_clashing_pair():
    c = np.zeros(3, CELL_DTYPE)
    c["type"] = CODE["lymphocyte"]            # exclusion factor 0.8
    c["ex"] = 4.0                              # clash below 0.8 * (4 + 4) = 6.4 µm
    c["x"] = [0.0, 5.0, 30.0]                  # cells 0 and 1 clash; cell 2 is alone
    c["prio"] = [0.2, 0.9, 0.1]
    assert hard_core(c).tolist() == [False, True, True]
    c["x"][1] = 7.0                            # 7 µm apart: no clash
    assert hard_core(c).tolist() == [True, True, True]


def test_optics_clean_at_difficulty_zero_and_varied_above():
    clean = make_optics(3, 0.0)
    h = np.asarray(STAIN_H) / np.linalg.norm(STAIN_H)
    e = np.asarray(STAIN_E) / np.linalg.norm(STAIN_E)
    np.testing.assert_allclose(clean.stain[0], h, atol=1e-6)
    np.testing.assert_allclose(clean.stain[1], e, atol=1e-6)
    assert clean.i0.tolist() == [245.0, 245.0, 245.0]
    assert clean.blur_um < 0.1 and clean.noise < 1.0 and clean.jpeg_quality >= 90
    hard = [make_optics(s, 1.0) for s in range(4)]
    assert max(np.abs(o.stain - clean.stain).max() for o in hard) > 0.05
    assert all(o.blur_um > clean.blur_um and o.noise > clean.noise for o in hard)


def test_ambiguous_share_scales_with_difficulty_and_is_zero_when_clean():
    def cells(difficulty: float) -> np.ndarray:
        lay = make_layout(3000.0, 3000.0, 21, difficulty)
        return np.concatenate([block_row_cells(lay, r) for r in range(n_blocks(lay)[0])])

    target = [CODE[n] for n in TARGET_TYPES]
    at03 = cells(0.3)
    t = at03[np.isin(at03["type"], target)]
    share = float(np.mean(t["amb_with"] != NO_TYPE))
    assert len(t) > 500
    assert 0.025 <= share <= 0.065, share
    amb = t[t["amb_with"] != NO_TYPE]
    assert set(zip(amb["type"].tolist(), amb["amb_with"].tolist(), strict=True)) <= {
        (CODE["eosinophil"], CODE["neutrophil"]), (CODE["neutrophil"], CODE["eosinophil"]),
        (CODE["mast_cell"], CODE["plasma_cell"])}
    assert np.all((amb["mix"] >= 0.3) & (amb["mix"] <= 0.8))
    assert not np.any(cells(0.0)["amb_with"] != NO_TYPE)


# --- the files, opened with OpenSlide -------------------------------------------------------

def test_tiff_opens_with_openslide(tiny_slide):
    slide_path, _ = tiny_slide
    with openslide.OpenSlide(str(slide_path)) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25, rel=1e-4)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.25, rel=1e-4)
        assert s.level_dimensions == ((2048, 2048), (512, 512))
        assert s.level_downsamples == pytest.approx((1.0, 4.0))
        region = np.asarray(s.read_region((768, 768), 0, (512, 512)))
        low = np.asarray(s.read_region((0, 0), 1, (512, 512)))
    assert region.shape == (512, 512, 4) and np.all(region[..., 3] == 255)
    assert region[..., :3].std() > 10          # tissue with cells, not blank
    assert low[..., :3].std() > 5


def test_svs_opens_as_aperio_with_mpp_and_objective(tiny_svs):
    slide_path, _ = tiny_svs
    assert slide_path.suffix == ".svs"
    with openslide.OpenSlide(str(slide_path)) as s:
        assert s.properties["openslide.vendor"] == "aperio"
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(s.properties["openslide.objective-power"]) == 20
        assert s.level_dimensions == ((1536, 1024), (384, 256))
        region = np.asarray(s.read_region((500, 300), 0, (300, 200)))[..., :3]
    assert region.shape == (200, 300, 3)


def test_truth_geojson_schema_counts_and_classes(tiny_slide):
    _, truth = tiny_slide
    feats = _features(truth)
    assert len(feats) > 200                          # 0.26 mm² with tissue and cells
    names = [f["properties"]["classification"]["name"] for f in feats]
    assert set(names) <= set(CELL_TYPES)
    for target in TARGET_TYPES:
        assert names.count(target) >= 3, target
    for f in feats:
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Point"
        x, y = f["geometry"]["coordinates"]
        assert 0 <= x < 2048 and 0 <= y < 2048
        p = f["properties"]
        assert p["objectType"] == "detection"
        assert len(p["classification"]["color"]) == 3
        assert isinstance(p["ambiguous"], bool)
        assert (p["ambiguous_with"] in CELL_TYPES) if p["ambiguous"] else (
            p["ambiguous_with"] is None)
        lo, hi = {"mast_cell": (8, 20), "macrophage": (15, 25), "red_cell": (6.8, 8)}.get(
            p["classification"]["name"], (7, 18))
        assert lo - 0.01 <= p["diameter_um"] <= hi + 0.01


def test_cells_lie_in_tissue_and_show_density_at_their_centre(tiny_slide):
    slide_path, truth = tiny_slide
    layout = make_layout(2048 * 0.25, 2048 * 0.25, 11, 0.3)
    xy = np.array([f["geometry"]["coordinates"] for f in _features(truth)])
    depth = layout.depth(xy[:, 0] * 0.25, xy[:, 1] * 0.25)[0]
    assert np.all(depth > 0)
    with openslide.OpenSlide(str(slide_path)) as s:
        img = np.asarray(s.read_region((0, 0), 0, s.dimensions))[..., :3]
    od = -np.log(np.clip(img.astype(np.float64), 1, 255) / 245.0).sum(-1)
    xi, yi = np.round(xy).astype(int).T
    centre = np.array([od[max(y - 2, 0):y + 3, max(x - 2, 0):x + 3].max()
                       for x, y in zip(xi, yi, strict=True)])
    assert np.all(centre > 0.8)                     # every cell has stain at its centre
    assert np.median(od[:64, :64]) < 0.1            # the corner is blank glass


def test_cell_colours_follow_their_stains(tiny_slide):
    slide_path, truth = tiny_slide
    with openslide.OpenSlide(str(slide_path)) as s:
        conc = _od_concentrations(np.asarray(s.read_region((0, 0), 0, s.dimensions))[..., :3])
    yy, xx = np.mgrid[-24:25, -24:25]
    r_um = np.hypot(xx, yy) * 0.25
    ring = (r_um > 3.5) & (r_um < 5.5)                # cytoplasm of granulocytes / mast cells
    by_class: dict[str, list[np.ndarray]] = {}
    for f in _features(truth):
        x, y = np.round(f["geometry"]["coordinates"]).astype(int)
        if 24 <= x < 2048 - 24 and 24 <= y < 2048 - 24 and not f["properties"]["ambiguous"]:
            win = conc[y - 24:y + 25, x - 24:x + 25]
            name = f["properties"]["classification"]["name"]
            by_class.setdefault(name, []).append(np.r_[win[ring].mean(0), win[r_um < 2].mean(0)])
    mean = {k: np.mean(v, axis=0) for k, v in by_class.items()}   # ring H, E, D, core H, E, D
    assert mean["eosinophil"][1] > 2.0 * mean["neutrophil"][1]    # bright eosin granules
    assert mean["eosinophil"][1] > 2.0 * mean["mast_cell"][1]
    assert mean["mast_cell"][0] > 1.3 * mean["eosinophil"][0]     # grey-purple granules
    assert mean["lymphocyte"][3] > 1.5 * mean["epithelial"][3]     # dense vs vesicular nuclei
    assert mean["neutrophil"][3] > 3.0 * mean["neutrophil"][4]     # dark lobes, little eosin


def test_eosinophil_hotspot_reaches_tens_per_hpf(tmp_path):
    _, truth = render_slide(tmp_path, 2400, 2000, mpp=0.5, seed=4, difficulty=0.3)
    feats = _features(truth)
    eos = np.array([f["geometry"]["coordinates"] for f in feats
                    if f["properties"]["classification"]["name"] == "eosinophil"]) * 0.5
    radius_um = np.sqrt(HPF_MM2 / np.pi) * 1000.0
    grid = np.mgrid[radius_um:1200 - radius_um:20.0, radius_um:1000 - radius_um:20.0]
    centres = grid.reshape(2, -1).T
    d2 = ((centres[:, None, :] - eos[None, :, :]) ** 2).sum(-1)
    peak = int((d2 < radius_um ** 2).sum(1).max())
    assert peak >= 20, peak
    assert len(eos) / 1.2 < 0.6 * peak / HPF_MM2     # the peak HPF is denser than the mean


# --- determinism, arguments, CLI ------------------------------------------------------------

def test_same_seed_same_bytes_any_workers_and_other_seed_differs(tmp_path):
    a = render_slide(tmp_path / "a", 900, 700, seed=7, workers=1)
    b = render_slide(tmp_path / "b", 900, 700, seed=7, workers=2)
    c = render_slide(tmp_path / "c", 900, 700, seed=8, workers=1)
    assert a[0].name == "synth_s7_d0.3.tif"
    assert a[0].read_bytes() == b[0].read_bytes()
    assert a[1].read_bytes() == b[1].read_bytes()
    assert a[0].read_bytes() != c[0].read_bytes()
    assert a[1].read_bytes() != c[1].read_bytes()
    assert not list((tmp_path / "a").glob(".synth-*"))   # scratch folder removed


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"width": 0}, "width"),
    ({"width": -5}, "width"),
    ({"height": 12.5}, "height"),
    ({"difficulty": 1.5}, "difficulty"),
    ({"difficulty": -0.1}, "difficulty"),
    ({"fmt": "png"}, "'png'"),
    ({"mpp": 0.0}, "mpp"),
    ({"seed": -1}, "seed"),
    ({"name": "a/b"}, "name"),
    ({"workers": -2}, "workers"),
])
def test_invalid_arguments_raise_clear_errors(tmp_path, kwargs, fragment):
    args = {"width": 256, "height": 256} | kwargs
    width, height = args.pop("width"), args.pop("height")
    with pytest.raises(ConfigError, match=fragment) as info:
        render_slide(tmp_path, width, height, **args)
    assert isinstance(info.value, CellclfError)
    assert not list(tmp_path.iterdir())


def test_cli_synth_writes_openable_svs(tmp_path):
    from cellclf.cli import app

    result = CliRunner().invoke(app, ["synth", str(tmp_path), "--width", "700", "--height",
                                      "500", "--seed", "2", "--format", "svs", "--name", "demo",
                                      "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo.geojson").is_file()
    with openslide.OpenSlide(str(tmp_path / "demo.svs")) as s:
        assert s.properties["openslide.vendor"] == "aperio"
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert float(s.properties["openslide.objective-power"]) == 40
    bad = CliRunner().invoke(app, ["synth", str(tmp_path), "--width", "700", "--height", "500",
                                   "--difficulty", "2"])
    assert isinstance(bad.exception, ConfigError)
