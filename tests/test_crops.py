"""Crops: hand-computed cuts, crops equal direct reads (tile borders, slide edges), one read per
tile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellclf.errors import ConfigError
from cellclf.wsi.crops import crop_corners, crop_halo_um, cut_crops, extract_crops
from cellclf.wsi.jpeg_tiles import array_tile_fn, write_pyramid_tiff
from cellclf.wsi.slide import Slide
from cellclf.wsi.tile_reader import TileReader
from cellclf.wsi.tiling import owner_index, tile_grid


def test_cut_crops_hand_computed() -> None:
    tile = np.arange(10 * 10 * 3, dtype=np.uint8).reshape(10, 10, 3)
    centres = np.array([[5.0, 5.0], [5.4, 4.6], [5.5, 5.5], [0.0, 0.0], [9.9, 5.0]])
    assert crop_corners(centres, 4).tolist() == [[3, 3], [3, 3], [4, 4], [-2, -2], [8, 3]]
    crops = cut_crops(tile, centres, 4)
    assert crops.shape == (5, 4, 4, 3) and crops.dtype == np.uint8
    assert np.array_equal(crops[0], tile[3:7, 3:7])
    assert np.array_equal(crops[1], tile[3:7, 3:7])
    assert np.array_equal(crops[2], tile[4:8, 4:8])
    assert (crops[3][:2] == 255).all() and (crops[3][:, :2] == 255).all()  # white outside
    assert np.array_equal(crops[3][2:, 2:], tile[0:2, 0:2])
    assert np.array_equal(crops[4][:, :2], tile[3:7, 8:10]) and (crops[4][:, 2:] == 255).all()
    assert cut_crops(tile, np.zeros((0, 2)), 4).shape == (0, 4, 4, 3)
    with pytest.raises(ConfigError):
        cut_crops(tile, centres, 0)


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory) -> Path:
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:768, 0:1024].astype(np.float32)
    v = 0.5 + 0.3 * np.sin(xx / 17.0) * np.cos(yy / 13.0) + rng.normal(0, 0.05, (768, 1024))
    rgb = np.stack([230 - 90 * v, 200 - 160 * v, 230 - 60 * v], -1).clip(0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("crops") / "crops.tif"
    return write_pyramid_tiff(path, 1024, 768, array_tile_fn(rgb), 0.25, min_level_px=256)


def _direct_crops(path: Path, centres0: np.ndarray, work_mpp: float, crop_px: int,
                  tile_um: float, mpp: float | None = None) -> np.ndarray:
    """The same windows read one by one with Slide.read_region_mpp (float level-0 boxes)."""
    with Slide(path, mpp) as slide:
        tiles = tile_grid(slide.width, slide.height, slide.mpp, work_mpp, tile_um,
                          crop_halo_um(crop_px, work_mpp))
        owner = owner_index(tiles, centres0)
        out = []
        for k, c0 in zip(owner, centres0, strict=True):
            t = tiles[k]
            sx, sy = t.scale
            ax, ay = crop_corners(t.to_tile_px(c0[None]), crop_px)[0]
            out.append(slide.read_region_mpp(t.read[0] + ax * sx, t.read[1] + ay * sy,
                                             crop_px * sx, crop_px * sy, crop_px, crop_px))
    return np.stack(out)


def _centres(width: int, height: int, cores: list[int]) -> np.ndarray:
    rng = np.random.default_rng(1)
    pts = [rng.uniform([0, 0], [width, height], (30, 2))]
    for c in cores:  # on, just before and just after tile borders
        pts.append(np.array([[c, 100.0], [c - 0.5, 200.0], [c + 0.4, 300.0], [150.0, c]]))
    pts.append(np.array([[0.0, 0.0], [3.2, height - 1.0], [width - 0.5, 7.0],
                         [width - 1.0, height - 1.0]]))  # slide corners and edges
    return np.vstack(pts)


@pytest.mark.parametrize("work_mpp", [0.25, 0.5])
def test_crops_equal_direct_reads(slide_path: Path, work_mpp: float) -> None:
    # 32 µm tiles: 128 level-0 px cores, so many centres sit on tile borders
    centres = _centres(1024, 768, [128, 256, 384, 512])
    crops = extract_crops(slide_path, centres, work_mpp, 32, workers=2, tile_um=32)
    direct = _direct_crops(slide_path, centres, work_mpp, 32, tile_um=32)
    assert crops.shape == (len(centres), 32, 32, 3)
    assert np.array_equal(crops, direct)  # integer scales: exact
    # the corner crop is a quarter slide, three quarters glass
    assert (crops[-4][:16] == 255).all() and (crops[-4][16:, 16:] != 255).any()


def test_crops_non_integer_scale_on_cmu(shared_wsi: Path) -> None:
    path = shared_wsi / "CMU-1-Small-Region.svs"  # 0.499 µm/px read at 0.5
    centres = _centres(2220, 2967, [1026, 2052])
    crops = extract_crops(path, centres, 0.5, 64, workers=2)
    direct = _direct_crops(path, centres, 0.5, 64, tile_um=512)
    # the same bilinear taps; only float rounding of the tap positions may differ by 1 level
    assert np.abs(crops.astype(int) - direct).max() <= 1
    assert crops.std() > 10


def test_each_owning_tile_read_once(slide_path: Path) -> None:
    centres = np.array([[10.0, 10.0], [100.0, 120.0], [500.0, 300.0], [130.0, 5.0],
                        [20.0, 30.0], [510.0, 310.0]])
    with TileReader(slide_path, 0.25, workers=2) as reader:
        crops = extract_crops(slide_path, centres, 0.25, 32, tile_um=32, reader=reader)
        # 128 px cores: the centres fall in cores (0, 0) ×3, (1, 0) ×1 and (3, 2) ×2
        assert reader.tiles_read == 3
    with Slide(slide_path) as slide:
        assert np.array_equal(crops[2], slide.read_region_mpp(484, 284, 32, 32, 32, 32))


def test_centres_outside_and_bad_input(slide_path: Path) -> None:
    centres = np.array([[-10.0, 50.0], [2000.0, 2000.0]])
    crops = extract_crops(slide_path, centres, 0.25, 32, workers=1, tile_um=32)
    assert (crops[1] == 255).all()
    assert (crops[0][:, :26] == 255).all() and (crops[0][:, 26:] != 255).any()
    assert extract_crops(slide_path, np.zeros((0, 2)), 0.25, 32).shape == (0, 32, 32, 3)
    with pytest.raises(ConfigError, match="crops.tif"):
        extract_crops(slide_path, np.array([[np.nan, 1.0]]), 0.25, 32)


def test_cut_crops_equal_a_gather_of_the_same_pixels() -> None:
    """The per-crop slice copy equals a fancy-index gather of the same windows (white beyond the
    tile), for centres inside, on and beyond the tile's edges."""
    rng = np.random.default_rng(3)
    tile = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    centres = np.vstack([rng.uniform(-20, 140, (60, 2)), [[0, 0], [119.5, 89.5], [60, 45]]])
    for crop in (1, 16, 33, 64):
        got = cut_crops(tile, centres, crop)
        corners = crop_corners(centres, crop)
        pad = 200
        src = np.pad(tile, ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
        offsets = np.arange(crop)
        rows = corners[:, 1, None] + pad + offsets
        cols = corners[:, 0, None] + pad + offsets
        np.testing.assert_array_equal(got, src[rows[:, :, None], cols[:, None, :]])
        assert got.dtype == np.uint8 and got.flags.c_contiguous
