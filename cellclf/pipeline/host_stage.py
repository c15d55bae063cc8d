"""The host (CPU) stage of ``run_slide`` and the review-image writer.

:class:`HostStage`: tiles read by the :class:`~cellclf.wsi.tile_reader.TileReader` threads → the
detector and the crop cutter in a second thread pool (at most 8 tiles in flight) → the cells each
tile owns → crops classified by any engine in batches of about ``batch_cells``. The detector is a
parameter (any ``detect(tile_rgb, mpp) -> centres_px``; the classical one by default).

:class:`ReviewWriter`: gated cells' review items built and handed to the store off the main loop
(one writer thread keeps the store's order, a pool encodes the images).
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cellclf.bounded_work import InFlight, bounded_map
from cellclf.detect.classical import detect_cells
from cellclf.model.engine import Engine
from cellclf.pipeline.stage import REVIEW_CONTEXT_PX, CellBatch, Detector
from cellclf.review.types import ReviewItem
from cellclf.wsi.crops import cut_crops
from cellclf.wsi.tile_reader import TileReader
from cellclf.wsi.tiling import Tile

TILES_IN_FLIGHT = 8  # tiles detected ahead of the classifier


class HostStage:
    """Detect and cut on the host (thread pool), classify with ``engine`` in batches."""

    def __init__(self, engine: Engine, reader: TileReader, crop_px: int, *, batch_cells: int = 512,
                 workers: int = 0, with_context: bool = False,
                 detect: Detector = detect_cells) -> None:
        self.engine, self.reader, self.crop_px = engine, reader, int(crop_px)
        self.batch_cells, self.with_context, self.detect = batch_cells, with_context, detect
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers or 2),
                                       thread_name_prefix="cellclf-detect")
        self.timings: dict[str, float] = {"classify": 0.0}
        self.info = {"stage": "host", "decode": "host"}

    def _cells_of(self, item: tuple[Tile, np.ndarray]) -> tuple:
        """One tile: its owned cells' level-0 centres, crops and (with review) the window and the
        centres the context views of its gated cells are cut from once the batch is gated."""
        tile, rgb = item
        centres, xy0 = tile.owned_cells(self.detect(rgb, self.reader.work_mpp))
        crops = cut_crops(rgb, centres, self.crop_px)
        return xy0, crops, (rgb, centres) if self.with_context else None

    def run(self, tiles: list[Tile]) -> Iterator[CellBatch]:
        pending: list[tuple] = []
        tiles_done = 0
        cells = bounded_map(self.pool.submit, self._cells_of, self.reader.iter_tiles(tiles),
                            TILES_IN_FLIGHT)
        for item in cells:
            tiles_done += 1
            if len(item[0]):
                pending.append(item)
            if sum(len(p[0]) for p in pending) >= self.batch_cells:
                yield self._classify(pending, tiles_done)
                pending, tiles_done = [], 0
        if pending or tiles_done:
            yield self._classify(pending, tiles_done)

    def _classify(self, pending: list[tuple], tiles_done: int) -> CellBatch:
        k = len(self.engine.classes)
        if not pending:
            return CellBatch(np.zeros((0, 2)), np.zeros((0, k), np.float32),
                             lambda rows: (np.zeros((0, self.crop_px, self.crop_px, 3), np.uint8),
                                           None), tiles_done)
        xy0 = np.concatenate([p[0] for p in pending])
        crops = np.concatenate([p[1] for p in pending])
        windows = [p[2] for p in pending] if self.with_context else None
        t0 = time.perf_counter()
        probs = self.engine.classify(crops)
        self.timings["classify"] += time.perf_counter() - t0
        return CellBatch(xy0, probs, lambda rows: (
            crops[rows], None if windows is None else context_views(windows, rows)), tiles_done)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> HostStage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def context_views(windows: list[tuple[np.ndarray, np.ndarray]], rows: np.ndarray) -> np.ndarray:
    """Review context views (n, ctx, ctx, 3) of the batch ``rows``, cut from the tile windows
    (``(rgb, owned centres in tile px)`` per tile, in batch order) only for the rows asked for:
    the gated cells, a tenth of a batch or less, instead of every cell."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    out = np.empty((len(rows), REVIEW_CONTEXT_PX, REVIEW_CONTEXT_PX, 3), np.uint8)
    starts = np.cumsum([0] + [len(centres) for _, centres in windows])
    owner = np.searchsorted(starts, rows, side="right") - 1
    for k in np.unique(owner):
        mine = np.flatnonzero(owner == k)
        rgb, centres = windows[k]
        out[mine] = cut_crops(rgb, centres[rows[mine] - starts[k]], REVIEW_CONTEXT_PX)
    return out


def png_bytes(rgb: np.ndarray) -> bytes:
    """Lossless PNG of an RGB uint8 image: rows "Sub"-filtered with numpy, deflated by zlib at level
    1 (which releases the GIL, so crops encode in parallel threads; the labelling rounds' crop
    files); about twice Pillow's speed at the same size."""
    a = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
    h, w = a.shape[:2]
    flat = a.reshape(h, w * 3)
    rows = np.empty((h, w * 3 + 1), np.uint8)
    rows[:, 0] = 1  # filter type Sub: each byte minus the byte one pixel to the left
    rows[:, 1:4] = flat[:, :3]
    np.subtract(flat[:, 3:], flat[:, :-3], out=rows[:, 4:], dtype=np.uint8, casting="unsafe")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)) + chunk(b"IEND", b""))


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    """JPEG of an RGB uint8 image (libjpeg-turbo through imagecodecs; releases the GIL, so the
    review images encode in parallel threads): a fifth of the PNG size or less."""
    import imagecodecs

    return bytes(imagecodecs.jpeg8_encode(np.ascontiguousarray(rgb[..., :3]), level=quality))


Encode = Callable[[Callable[[np.ndarray], bytes], list[np.ndarray]], list[bytes]]


def _encode_here(f: Callable[[np.ndarray], bytes], images: list[np.ndarray]) -> list[bytes]:
    return [f(x) for x in images]


class ReviewWriter:
    """Hands gated cells to ``on_review`` off the main loop: one writer thread keeps the store's
    order, a pool encodes the images; at most ``depth`` batches wait (memory stays flat)."""

    def __init__(self, on_review: Callable[[list[ReviewItem]], None], workers: int,
                 depth: int = 4) -> None:
        self.on_review = on_review
        self.encoders = ThreadPoolExecutor(max(1, workers), thread_name_prefix="cellclf-jpeg")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="cellclf-review")
        self.pending: InFlight[None] = InFlight(depth)

    def submit(self, make_items: Callable[[Encode], list[ReviewItem]]) -> None:
        """``make_items(encode)`` builds the items; it runs on the writer thread."""
        def job() -> None:
            self.on_review(make_items(lambda f, xs: list(self.encoders.map(f, xs))))

        self.pending.push(self.writer.submit(job))

    def close(self, wait: bool = True) -> None:
        """Wait for every batch (re-raising a failure), or drop what is queued (``wait=False``)."""
        try:
            if wait:
                for _ in self.pending.drain():
                    pass
        finally:
            self.writer.shutdown(wait=wait, cancel_futures=not wait)
            self.encoders.shutdown(wait=wait, cancel_futures=not wait)

    def __enter__(self) -> ReviewWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        """Every gated cell is in the store before the results are written; after an error, what
        is queued is dropped (the rerun redoes the slide)."""
        self.close(wait=exc_type is None)


REVIEW_CROP_JPEG_QUALITY = 90     # the model's crop: 64² px, ~1.8 KB on the demo slide
REVIEW_CONTEXT_JPEG_QUALITY = 80  # the context view: 160² px, ~5.1 KB on the demo slide


def _crop_jpeg(rgb: np.ndarray) -> bytes:
    return jpeg_bytes(rgb, REVIEW_CROP_JPEG_QUALITY)


def _context_jpeg(rgb: np.ndarray) -> bytes:
    return jpeg_bytes(rgb, REVIEW_CONTEXT_JPEG_QUALITY)


def review_items(slide_id: str, slide_path: str, ids: np.ndarray, xy0: np.ndarray,
                 probs: np.ndarray, reason: np.ndarray, conformal: np.ndarray, crops: np.ndarray,
                 ctx: np.ndarray | None, classes: list[str], priority: np.ndarray,
                 encode: Encode = _encode_here, audit: np.ndarray | None = None,
                 blind: np.ndarray | None = None, site: str | None = None, *,
                 image_mpp: float | None = None,
                 slide_mpp: float | None = None) -> list[ReviewItem]:
    """ReviewItems for gated cells (every row given is one; ``ids`` are their cell ids);
    ``encode(encoder, images)`` maps an encoder (over a thread pool in ``run_slide``).

    Crop and context are stored as JPEG at the model's ``image_mpp`` (8.5 KB per queued cell in
    the store on the demo slide; 16 KB with the former lossless PNG crop); with ``slide_mpp`` (the
    slide's level-0 µm/px) the review app cuts native-resolution views from ``slide_path`` while
    the slide is reachable (docs/review.md).
    """
    pred = probs.argmax(axis=1)
    crop_jpeg = encode(_crop_jpeg, list(crops))
    ctx_jpeg = encode(_context_jpeg, list(ctx)) if ctx is not None else [b""] * len(ids)
    return [ReviewItem(
        slide_id=slide_id, cell_id=int(ids[i]), x=float(xy0[i, 0]), y=float(xy0[i, 1]),
        predicted=classes[pred[i]], probs={c: float(probs[i, k]) for k, c in enumerate(classes)},
        conformal_set=[c for k, c in enumerate(classes) if conformal[i, k]], reason=str(reason[i]),
        priority=float(priority[i]), crop_png=crop_jpeg[i], context_image=ctx_jpeg[i],
        slide_path=slide_path, audit=bool(audit is not None and audit[i]),
        blind=bool(blind is not None and blind[i]), site=site, image_mpp=image_mpp,
        slide_mpp=slide_mpp) for i in range(len(ids))]
