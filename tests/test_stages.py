"""run_slide's pieces: the stage interface (host stage with a pluggable detector), the cells a tile
owns, the bounded queue of work in flight, one slide handle per run, and one tissue thumbnail
whichever reader makes it."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cellclf.bounded_work import InFlight, bounded_map
from cellclf.card import load_card
from cellclf.detect.classical import detect_cells
from cellclf.model.engine import OnnxEngine
from cellclf.pipeline.host_stage import HostStage
from cellclf.pipeline.run_slide import RunParams, run_slide
from cellclf.wsi import slide as slide_module
from cellclf.wsi.slide import Slide
from cellclf.wsi.tile_reader import TileReader
from cellclf.wsi.tiling import tile_grid
from cellclf.wsi.tissue import slide_tissue_mask, tissue_thumbnail


def test_owned_cells_partition_the_slide() -> None:
    """Every detection of overlapping tiles is kept by exactly one tile (the one whose core holds
    it); tile px come back unchanged, level-0 px agree with to_level0."""
    tiles = tile_grid(1000, 700, 0.25, 0.5, 100.0, 20.0)
    rng = np.random.default_rng(0)
    points0 = rng.uniform((0, 0), (1000, 700), (500, 2))
    kept = []
    for tile in tiles:
        in_read = tile.to_tile_px(points0)  # every point, seen from this tile (most outside)
        centres, xy0 = tile.owned_cells(in_read.astype(np.float32))
        assert centres.dtype == np.float32 and xy0.dtype == np.float64
        np.testing.assert_allclose(xy0, tile.to_level0(centres), atol=1e-9)
        kept.append(xy0)
    allkept = np.concatenate(kept)
    assert len(allkept) == len(points0)
    np.testing.assert_allclose(np.sort(allkept[:, 0]), np.sort(points0[:, 0]), atol=1e-3)
    empty_c, empty_xy0 = tiles[0].owned_cells(np.zeros((0, 2), np.float32))
    assert empty_c.shape == (0, 2) and empty_xy0.shape == (0, 2)


def test_bounded_map_is_ordered_and_bounded() -> None:
    running, peak = 0, 0
    lock = threading.Lock()

    def work(x: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.002 * (x % 3))
        with lock:
            running -= 1
        return x * x

    with ThreadPoolExecutor(8) as pool:
        submitted = []

        def submit(fn, item):  # noqa: ANN001, ANN202
            submitted.append(item)
            return pool.submit(fn, item)

        out = []
        for y in bounded_map(submit, work, range(40), depth=3):
            # the consumer is never more than depth-1 items behind the producer
            assert len(submitted) - len(out) <= 3
            out.append(y)
    assert out == [x * x for x in range(40)]
    assert peak <= 3


def test_in_flight_reraises_and_cancels() -> None:
    with ThreadPoolExecutor(1) as pool:
        q: InFlight[int] = InFlight(1)
        assert q.push(pool.submit(lambda: 1)) == []
        assert q.push(pool.submit(lambda: 2)) == [1]

        def boom() -> int:
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            q.push(pool.submit(boom))
            list(q.drain())
        q.cancel()
        assert len(q) == 0


def test_host_stage_takes_any_detector(tiny_svs, shipped_model) -> None:
    """A detector passed in replaces the classical one: the stage yields exactly its cells (the
    ones the tiles own), classified by the engine; review images are the crops of chosen rows."""
    card = load_card(shipped_model)
    engine = OnnxEngine(shipped_model)
    calls = []

    def grid_detector(rgb: np.ndarray, mpp: float) -> np.ndarray:
        calls.append(mpp)
        h, w = rgb.shape[:2]
        ys, xs = np.mgrid[16:h - 16:40, 16:w - 16:40]
        return np.column_stack((xs.ravel(), ys.ravel())).astype(np.float32)

    with TileReader(tiny_svs[0], card.mpp, workers=2) as reader:
        tiles = reader.grid(256.0, 20.0, slide_tissue_mask(reader))
        with HostStage(engine, reader, card.crop_px, batch_cells=50, detect=grid_detector) as stage:
            batches = list(stage.run(tiles))
        want = []
        for tile, rgb in reader.iter_tiles(tiles):
            want.append(tile.owned_cells(grid_detector(rgb, reader.work_mpp))[1])
    assert calls and set(calls) == {card.mpp}
    assert sum(b.tiles_done for b in batches) == len(tiles)
    xy0 = np.concatenate([b.xy0 for b in batches])
    np.testing.assert_array_equal(xy0, np.concatenate(want))
    probs = np.concatenate([b.probs for b in batches])
    assert probs.shape == (len(xy0), len(card.classes))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    b = next(b for b in batches if len(b) > 3)
    crops, ctx = b.review_images(np.array([0, 2]))
    assert crops.shape == (2, card.crop_px, card.crop_px, 3) and ctx is None
    np.testing.assert_allclose(engine.classify(crops), b.probs[[0, 2]], atol=1e-5)


def test_run_slide_opens_the_slide_once(tiny_svs, shipped_model, monkeypatch) -> None:
    """One TileReader serves thumbnail, OOD sample and tiles: the calling thread opens one Slide
    (the reader's check of the file); worker threads keep their own handles."""
    opened: list[str] = []
    real_init = Slide.__init__

    def counting_init(self, *args, **kwargs):  # noqa: ANN001, ANN202
        if threading.current_thread() is threading.main_thread():
            opened.append(str(args[0] if args else kwargs.get("path")))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(slide_module.Slide, "__init__", counting_init)
    card = load_card(shipped_model)
    res = run_slide(tiny_svs[0], OnnxEngine(shipped_model), card, slide_id="s",
                    params=RunParams(workers=2))
    assert res.n_cells > 0
    assert opened == [str(tiny_svs[0])]


def _thumbnails_agree(path: Path, max_px: int) -> None:
    with Slide(path) as slide:
        a, ds_a = slide.thumbnail(max_px)
        t_a, tds_a = tissue_thumbnail(slide)
    with TileReader(path, 0.5, workers=2) as reader:
        b, ds_b = reader.thumbnail(max_px)
        t_b, tds_b = tissue_thumbnail(reader)
    assert a.shape == b.shape and ds_a == pytest.approx(ds_b)
    assert t_a.shape == t_b.shape and tds_a == pytest.approx(tds_b)
    for x, y in ((a, b), (t_a, t_b)):
        diff = np.abs(x.astype(int) - y.astype(int))
        # the fast path decodes with libjpeg-turbo, OpenSlide with libjpeg: ≤ a few levels
        assert diff.mean() < 1.0 and np.percentile(diff, 99.9) <= 8, (diff.mean(), diff.max())


def test_thumbnails_agree_on_synthetic_slide(tiny_slide, tiny_svs) -> None:
    _thumbnails_agree(tiny_slide[0], 300)
    _thumbnails_agree(tiny_svs[0], 500)


def test_thumbnails_agree_on_cmu_svs(shared_wsi: Path) -> None:
    _thumbnails_agree(shared_wsi / "CMU-1-Small-Region.svs", 1024)


def test_detect_cells_is_the_default_detector(shipped_model, tiny_svs) -> None:
    card = load_card(shipped_model)
    with TileReader(tiny_svs[0], card.mpp, workers=2) as reader:
        stage = HostStage(OnnxEngine(shipped_model), reader, card.crop_px)
        stage.close()
    assert stage.detect is detect_cells


def test_host_stage_context_views_are_cut_for_the_asked_rows(tiny_svs, shipped_model) -> None:
    """With review, the stage cuts context views only for the rows asked for (the gated cells),
    from the tile windows the batch came from: the same pixels as cutting every cell's view from
    its tile, for any rows in any order, across the tiles of a batch."""
    from cellclf.pipeline.stage import REVIEW_CONTEXT_PX
    from cellclf.wsi.crops import cut_crops

    card = load_card(shipped_model)
    engine = OnnxEngine(shipped_model)

    def grid_detector(rgb: np.ndarray, mpp: float) -> np.ndarray:
        h, w = rgb.shape[:2]
        ys, xs = np.mgrid[16:h - 16:40, 16:w - 16:40]
        return np.column_stack((xs.ravel(), ys.ravel())).astype(np.float32)

    with TileReader(tiny_svs[0], card.mpp, workers=2) as reader:
        tiles = reader.grid(256.0, 45.0, slide_tissue_mask(reader))
        with HostStage(engine, reader, card.crop_px, batch_cells=200, with_context=True,
                       detect=grid_detector) as stage:
            batches = [b for b in stage.run(tiles) if len(b)]
        every = []  # every owned cell's view, cut the former way (all cells, then rows)
        for tile, rgb in reader.iter_tiles(tiles):
            centres, _ = tile.owned_cells(grid_detector(rgb, reader.work_mpp))
            every.append(cut_crops(rgb, centres, REVIEW_CONTEXT_PX))
    every_ctx = np.concatenate(every)
    b = max(batches, key=len)
    assert len(b) > 40
    first = sum(len(x) for x in batches[:batches.index(b)])
    rng = np.random.default_rng(0)
    for rows in (np.array([len(b) - 1, 0, 7]), np.sort(rng.choice(len(b), 25, replace=False)),
                 np.arange(len(b)), np.zeros(0, np.int64)):
        crops, ctx = b.review_images(rows)
        assert ctx.shape == (len(rows), REVIEW_CONTEXT_PX, REVIEW_CONTEXT_PX, 3)
        np.testing.assert_array_equal(ctx, every_ctx[first + rows])
        assert crops.shape == (len(rows), card.crop_px, card.crop_px, 3)


def test_onnx_spinning_does_not_change_probabilities(shipped_model) -> None:
    """onnxruntime's thread spinning (off by default in the pipeline) is scheduling only."""
    crops = np.random.default_rng(1).integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)
    quiet = OnnxEngine(shipped_model, threads=2).classify(crops)
    spinning = OnnxEngine(shipped_model, threads=2, spin=True).classify(crops)
    np.testing.assert_array_equal(quiet, spinning)
