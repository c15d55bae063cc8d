"""Parallel tile reader: the ``read`` stage (list[Tile] → (Tile, RGB uint8 at the working mpp)).

A thread pool reads tiles; openslide-python and imagecodecs release the GIL, so threads scale
over cores without pickling slide handles. Each worker thread opens its own handles lazily, once:
an OpenSlide handle (:class:`~cellclf.wsi.slide.Slide`) when it needs OpenSlide, and a
:class:`~cellclf.wsi.jpeg_tiles.JpegTileSource` (its own file descriptor) for the fast JPEG path. Handles
are never reopened per tile. Neighbouring windows overlap by their halos and are read by different
threads at the same time, so decoded tiles are shared: one ``OpenSlideCache`` for all the OpenSlide
handles, one :class:`~cellclf.wsi.jpeg_tiles.TileCache` for the fast path (``cache_mb`` each).
``iter_tiles`` yields tiles in input order and keeps at most ``prefetch`` reads in flight, so
memory stays flat however many tiles there are.

Fast path: levels that :func:`cellclf.wsi.jpeg_tiles.probe` finds JPEG-tiled are decoded straight from
the file; every other read goes through OpenSlide. Both share :func:`cellclf.wsi.slide.plan_read` and
:func:`cellclf.wsi.slide.finish_read`, so they pick the same level and resize the same way.
``fast=False`` forces OpenSlide for everything.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cellclf.bounded_work import bounded_map
from cellclf.errors import ConfigError
from cellclf.wsi.jpeg_tiles import JpegTileSource, TileCache, probe
from cellclf.wsi.slide import Slide, finish_read, plan_read
from cellclf.wsi.tiling import Tile, spread_evenly, tile_grid


def default_workers() -> int:
    """Worker threads when none are asked for: the CPU cores this process may use (≤ 32)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 32))


class TileReader:
    """Reads tiles of one slide at ``work_mpp`` with a pool of ``workers`` threads.

    Use as a context manager (or call :meth:`close`). ``tiles_read`` counts tile reads.
    ``cache_mb`` bounds the decoded JPEG tiles the fast path keeps for neighbouring windows.
    """

    def __init__(self, path: str | Path, work_mpp: float, mpp: float | None = None,
                 workers: int = 0, fast: bool = True, prefetch: int = 0,
                 cache_mb: int = 256) -> None:
        self.path = Path(path)
        with Slide(self.path, mpp) as slide:  # validates the file and resolves mpp once
            self.mpp = slide.mpp
            self.width, self.height = slide.width, slide.height
            self.vendor = slide.vendor
            self.is_plain_image = slide.is_plain_image
            self.level_dimensions = slide.level_dimensions
            self.level_downsamples = slide.level_downsamples
        if not work_mpp > 0:
            raise ConfigError(f"work_mpp must be a positive µm per pixel, got {work_mpp!r}")
        self.work_mpp = float(work_mpp)
        self.fast_levels = probe(self.path, self.level_dimensions, self.vendor) if fast else {}
        self.workers = workers if workers > 0 else default_workers()
        self.prefetch = prefetch if prefetch > 0 else 2 * self.workers
        self.cache = TileCache(max(0, cache_mb) << 20)  # decoded JPEG tiles, shared by threads
        self._os_cache = None  # OpenSlide's tile cache, shared by the worker handles
        self.tiles_read = 0
        self._local = threading.local()
        self._lock = threading.Lock()
        self._handles: list[Slide | JpegTileSource] = []
        self._pool: ThreadPoolExecutor | None = None

    # -- per-thread handles -----------------------------------------------------------------
    def _slide(self) -> Slide:
        slide = getattr(self._local, "slide", None)
        if slide is None:
            with self._lock:
                if self._os_cache is None:
                    import openslide

                    self._os_cache = openslide.OpenSlideCache(max(1, self.cache.max_bytes))
            slide = self._local.slide = Slide(self.path, self.mpp, cache=self._os_cache)
            with self._lock:
                self._handles.append(slide)
        return slide

    def _source(self) -> JpegTileSource:
        source = getattr(self._local, "source", None)
        if source is None:
            source = self._local.source = JpegTileSource(self.path, self.fast_levels, self.cache)
            with self._lock:
                self._handles.append(source)
        return source

    # -- reading ----------------------------------------------------------------------------
    def grid(self, tile_um: float, halo_um: float, tissue=None,
             min_tissue_fraction: float = 0.0) -> list[Tile]:
        """:func:`cellclf.wsi.tiling.tile_grid` for this slide at this reader's working mpp."""
        return tile_grid(self.width, self.height, self.mpp, self.work_mpp, tile_um, halo_um,
                         tissue, min_tissue_fraction)

    def tissue_sample(self, tissue, tile_um: float, k: int) -> list[np.ndarray]:
        """``k`` tissue tile cores (no halo) spread evenly over the slide, read at the working mpp:
        the one sample the slide guard and the stain estimate measure."""
        cores = self.grid(tile_um, 0.0, tissue)
        return [rgb for _, rgb in self.iter_tiles(spread_evenly(cores, k))]

    def read_box(self, x0: float, y0: float, w0: float, h0: float, out_w: int,
                 out_h: int) -> np.ndarray:
        """Level-0 box → RGB uint8 (out_h, out_w, 3) in the calling thread (fast path if it can)."""
        plan = plan_read(self.level_downsamples, x0, y0, w0, h0, out_w, out_h)
        if plan.level in self.fast_levels:
            level_rgb = self._source().read_level(plan.level, plan.x, plan.y, plan.w, plan.h)
            return finish_read(level_rgb, plan)
        return self._slide().read_region_mpp(x0, y0, w0, h0, out_w, out_h)

    def read_tile(self, tile: Tile) -> np.ndarray:
        """One tile's read window at the working mpp, in the calling thread."""
        x0, y0, x1, y1 = tile.read
        rgb = self.read_box(x0, y0, x1 - x0, y1 - y0, tile.out_w, tile.out_h)
        with self._lock:
            self.tiles_read += 1
        return rgb

    def thumbnail(self, max_px: int = 2048) -> tuple[np.ndarray, float]:
        """Whole slide, longest side ≤ ``max_px``: (RGB, level-0 px per thumbnail px along x).

        As :meth:`cellclf.wsi.slide.Slide.thumbnail` (the same rows, band by band), but the bands are
        read by the worker threads through the fast path: seconds instead of tens on big slides.
        """
        ds = max(1.0, max(self.width, self.height) / max_px)
        out_w, out_h = max(1, round(self.width / ds)), max(1, round(self.height / ds))
        rows = np.linspace(0, out_h, max(1, min(out_h, 4 * self.workers)) + 1).round().astype(int)
        step_y = self.height / out_h
        bands = [(int(r0), int(r1)) for r0, r1 in zip(rows[:-1], rows[1:], strict=True) if r1 > r0]
        parts = self._executor().map(
            lambda b: self.read_box(0, b[0] * step_y, self.width, (b[1] - b[0]) * step_y, out_w,
                                    b[1] - b[0]), bands)
        return np.concatenate(list(parts), axis=0), self.width / out_w

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="cellclf-read")
        return self._pool

    def iter_tiles(self, tiles: Iterable[Tile]) -> Iterator[tuple[Tile, np.ndarray]]:
        """Yield ``(tile, rgb)`` in input order; at most ``prefetch`` reads in flight."""
        return bounded_map(self._executor().submit, lambda tile: (tile, self.read_tile(tile)),
                           tiles, self.prefetch)

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the workers and close every handle they opened."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        with self._lock:
            handles, self._handles = self._handles, []
        for handle in handles:
            handle.close()
        self._local = threading.local()

    def __enter__(self) -> TileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
