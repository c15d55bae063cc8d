"""Tile grid maths, hand-computed: partition, halo, scales, tissue filter, coordinate mapping."""

from __future__ import annotations

import numpy as np
import pytest

from cellclf.errors import ConfigError
from cellclf.wsi.tiling import Tile, core_edges, owner_index, tile_grid
from cellclf.wsi.tissue import TissueMask


def test_core_edges() -> None:
    assert core_edges(1000, 400) == [0, 400, 800, 1000]
    assert core_edges(800, 400) == [0, 400, 800]
    assert core_edges(801, 400.0) == [0, 400, 800, 801]
    assert core_edges(1000, 333.4) == [0, 333, 667, 1000]
    assert core_edges(300, 400) == [0, 300]
    # a remainder that rounds onto the slide edge gives no empty tile
    assert core_edges(1000, 499.9) == [0, 500, 1000]


def test_scale_one_partition_and_last_partial_tile() -> None:
    tiles = tile_grid(1000, 700, slide_mpp=0.5, work_mpp=0.5, tile_um=200, halo_um=10)
    assert [(t.col, t.row) for t in tiles] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    first, last = tiles[0], tiles[-1]
    assert first.core == (0, 0, 400, 400) and first.read == (-20, -20, 420, 420)
    assert (first.out_w, first.out_h) == (440, 440)
    assert last.core == (800, 400, 1000, 700) and last.read == (780, 380, 1020, 720)
    assert (last.out_w, last.out_h) == (240, 340) and last.scale == (1.0, 1.0)
    area = sum((t.core[2] - t.core[0]) * (t.core[3] - t.core[1]) for t in tiles)
    assert area == 1000 * 700


def test_scale_two() -> None:
    # 0.25 µm/px slide read at 0.5: 100 µm = 200 work px = 400 level-0 px; halo 10 µm = 40 px
    tiles = tile_grid(1000, 400, slide_mpp=0.25, work_mpp=0.5, tile_um=100, halo_um=10)
    assert [t.core for t in tiles] == [(0, 0, 400, 400), (400, 0, 800, 400), (800, 0, 1000, 400)]
    assert tiles[0].read == (-40, -40, 440, 440) and (tiles[0].out_w, tiles[0].out_h) == (240, 240)
    assert tiles[2].read == (760, -40, 1040, 440) and (tiles[2].out_w, tiles[2].out_h) == (140, 240)
    assert tiles[2].scale == (2.0, 2.0)


def test_non_integer_scale() -> None:
    # CMU svs: 0.499 µm/px read at 0.5; 512 µm = 1024 work px = 1026.052 level-0 px
    tiles = tile_grid(2220, 2967, slide_mpp=0.499, work_mpp=0.5, tile_um=512, halo_um=20)
    xs = sorted({t.core[0] for t in tiles} | {t.core[2] for t in tiles})
    ys = sorted({t.core[1] for t in tiles} | {t.core[3] for t in tiles})
    assert xs == [0, 1026, 2052, 2220]
    assert ys == [0, 1026, 2052, 2967]
    t0 = tiles[0]
    assert t0.read == (-40, -40, 1066, 1066)  # halo round(20 / 0.499) = 40
    assert t0.out_w == 1104  # round(1106 / 1.002004)
    assert t0.scale[0] == pytest.approx(1106 / 1104)
    area = sum((t.core[2] - t.core[0]) * (t.core[3] - t.core[1]) for t in tiles)
    assert area == 2220 * 2967


def test_every_point_has_exactly_one_owner() -> None:
    tiles = tile_grid(2220, 2967, slide_mpp=0.499, work_mpp=0.5, tile_um=300, halo_um=20)
    rng = np.random.default_rng(0)
    pts = np.column_stack((rng.uniform(0, 2220, 5000), rng.uniform(0, 2967, 5000)))
    edges = np.array([[t.core[0], t.core[1]] for t in tiles], dtype=float)
    pts = np.vstack([pts, edges, edges - 1e-9])  # points on and just before core boundaries
    pts = pts[(pts >= 0).all(axis=1)]
    counts = np.sum([t.owns(pts) for t in tiles], axis=0)
    assert (counts == 1).all()
    owner = owner_index(tiles, pts)
    assert (owner >= 0).all()
    assert all(tiles[k].owns(p)[0] for k, p in zip(owner, pts, strict=True))
    outside = np.array([[-1.0, 5.0], [2220.0, 5.0], [5.0, 2967.0]])
    assert (owner_index(tiles, outside) == -1).all()


def test_owns_is_half_open() -> None:
    tiles = tile_grid(1000, 700, slide_mpp=0.5, work_mpp=0.5, tile_um=200, halo_um=10)
    t = tiles[1]  # core (400, 0, 800, 400)
    pts = np.array([[400, 0], [799.999, 399.999], [800, 10], [10, 400], [399.999, 10]])
    assert t.owns(pts).tolist() == [True, True, False, False, False]
    assert tiles[2].owns(np.array([[800, 10]]))[0]


def test_coordinate_round_trip() -> None:
    tiles = tile_grid(2220, 2967, slide_mpp=0.499, work_mpp=0.5, tile_um=512, halo_um=20)
    t = tiles[4]
    assert t.to_level0(np.array([[0.0, 0.0]])).tolist() == [[t.read[0], t.read[1]]]
    assert np.allclose(t.to_level0(np.array([[t.out_w, t.out_h]])), [[t.read[2], t.read[3]]])
    pts = np.array([[0.5, 0.5], [100.25, 700.75], [t.out_w - 0.5, t.out_h - 0.5]])
    assert np.allclose(t.to_tile_px(t.to_level0(pts)), pts, atol=1e-9)
    assert np.allclose(Tile(0, 0, (10, 20, 30, 40), (0, 0, 40, 60), 20, 30).to_level0(
        np.array([[5.0, 3.0]])), [[10.0, 6.0]])


def test_tissue_filter() -> None:
    mask = np.zeros((4, 5), bool)  # 200 level-0 px per mask px over a 1000 × 700 slide
    mask[0, 0] = True  # a quarter of tile (0, 0)
    mask[1:3, 4] = True  # column x 800–1000, y 200–600: tiles (2, 0) and (2, 1)
    tm = TissueMask(mask, downsample=200.0)
    kw = dict(slide_mpp=0.5, work_mpp=0.5, tile_um=200, halo_um=10, tissue=tm)
    assert [(t.col, t.row) for t in tile_grid(1000, 700, **kw)] == [(0, 0), (2, 0), (2, 1)]
    # tile (2, 0) core 200×400 has 200×200 tissue: 0.5; tile (2, 1) 200×300 has 200×200: 0.667
    kept = tile_grid(1000, 700, min_tissue_fraction=0.3, **kw)
    assert [(t.col, t.row) for t in kept] == [(2, 0), (2, 1)]
    kept = tile_grid(1000, 700, min_tissue_fraction=0.6, **kw)
    assert [(t.col, t.row) for t in kept] == [(2, 1)]
    assert tile_grid(1000, 700, tissue=TissueMask(np.zeros((4, 5), bool), 200.0), slide_mpp=0.5,
                     work_mpp=0.5, tile_um=200, halo_um=10) == []


@pytest.mark.parametrize("bad", [dict(work_mpp=0.0), dict(slide_mpp=-1.0), dict(tile_um=0),
                                 dict(halo_um=-1.0), dict(work_mpp=float("nan"))])
def test_bad_parameters(bad: dict) -> None:
    kw = dict(slide_mpp=0.5, work_mpp=0.5, tile_um=200, halo_um=10) | bad
    with pytest.raises(ConfigError):
        tile_grid(1000, 700, **kw)
