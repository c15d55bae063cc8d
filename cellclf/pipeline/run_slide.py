"""run_slide: one slide through the whole flow — open, tissue, tiles, read, detect, crop, classify,
gate — returning a :class:`cellclf.outputs.results.SlideResult`. Writes nothing itself; review items are
handed to a callback as they are produced, so memory stays flat in slide size.

Stages overlap: tiles are read and decoded by the reader's worker threads, detection and crop cutting
run in a second thread pool, classification runs in large batches on the engine's device (GPU when
present), and the gate is pure maths on the probabilities.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellclf.errors import ConfigError, ModelMismatchError
from cellclf.gate.audit_bound import (
    DEFAULT_AUDIT_RATE,
    DEFAULT_BLIND_SHARE,
    audit_mask,
    audit_priority,
    blind_mask,
)

REVIEW_CONTEXT_PX = 160  # side of the context image at the model's mpp (80 µm at 0.5 µm/px)


@dataclass(frozen=True)
class RunParams:
    """Knobs of one inference run (all recorded in summary.json)."""

    tile_um: float = 512.0
    workers: int = 0  # reader threads; 0 = all cores
    batch: int = 512  # crops per classification batch
    mpp_override: float | None = None
    max_mpp_ratio: float = 1.5  # refuse slides coarser than model mpp × this
    ood_sample_tiles: int = 12  # tissue tiles sampled for the slide's stain/focus statistics
    min_tissue_fraction: float = 0.0
    stage: str = "auto"  # detect+crop+classify: "device" (torch engine's device), "host", or auto
    tiles_per_batch: int = 8  # tiles per device batch
    device_decode: str = "auto"  # JPEG decode on the device stage's device: auto | on | off
    audit_rate: float = DEFAULT_AUDIT_RATE  # share of auto-accepted cells queued for the audit
    blind_share: float = DEFAULT_BLIND_SHARE  # share of gated cells also reviewed blind
    site: str | None = None  # site / scanner tag of the audit (default: the slide's vendor)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Acc:
    xy0: list[np.ndarray] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)
    accept: list[np.ndarray] = field(default_factory=list)
    audited: list[np.ndarray] = field(default_factory=list)
    reason: list[np.ndarray] = field(default_factory=list)
    conformal: list[np.ndarray] = field(default_factory=list)
    n: int = 0


def check_model_fits(slide_mpp: float, model_mpp: float, path: Path, max_ratio: float) -> None:
    """Refuse slides scanned too coarsely for the model (the model would see upsampled pixels)."""
    if slide_mpp > model_mpp * max_ratio:
        raise ModelMismatchError(
            f"{path}: slide resolution {slide_mpp:.3f} µm/px is coarser than the model's "
            f"{model_mpp:.3f} µm/px × {max_ratio}: the model cannot see the cells' detail. Use a "
            "higher-magnification scan, or a model trained at this resolution (check --mpp if the "
            "slide's metadata is wrong).")


def png_bytes(rgb: np.ndarray) -> bytes:
    """Lossless PNG of an RGB uint8 image: rows "Sub"-filtered with numpy, deflated by zlib at level
    1 (which releases the GIL, so review crops encode in parallel threads); about twice Pillow's
    speed at the same size."""
    import struct
    import zlib

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
    """JPEG of an RGB uint8 image (libjpeg-turbo through imagecodecs; releases the GIL): the
    review context images, a fifth of their PNG size."""
    import imagecodecs

    return bytes(imagecodecs.jpeg8_encode(np.ascontiguousarray(rgb[..., :3]), level=quality))


class _ReviewWriter:
    """Hands gated cells to ``on_review`` off the main loop: one writer thread keeps the store's
    order, a pool encodes the PNGs; at most ``depth`` batches wait (memory stays flat)."""

    def __init__(self, on_review: Callable[[list], None], workers: int, depth: int = 4) -> None:
        from collections import deque

        self.on_review = on_review
        self.encoders = ThreadPoolExecutor(max(1, workers), thread_name_prefix="cellclf-png")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="cellclf-review")
        self.pending: deque = deque()
        self.depth = depth

    def submit(self, make_items: Callable[[Callable], list]) -> None:
        """``make_items(encode_map)`` builds the items; it runs on the writer thread."""
        def job() -> None:
            self.on_review(make_items(lambda f, xs: list(self.encoders.map(f, xs))))

        self.pending.append(self.writer.submit(job))
        while len(self.pending) > self.depth:
            self.pending.popleft().result()

    def close(self, wait: bool = True) -> None:
        """Wait for every batch (re-raising a failure), or drop what is queued (``wait=False``)."""
        try:
            while wait and self.pending:
                self.pending.popleft().result()
        finally:
            self.writer.shutdown(wait=wait, cancel_futures=not wait)
            self.encoders.shutdown(wait=wait, cancel_futures=not wait)


def run_slide(path: str | Path, engine: Any, card: dict, *, slide_id: str,
              params: RunParams | None = None,
              on_review: Callable[[list], None] | None = None,
              progress: Callable[[int, int], None] | None = None) -> Any:
    """Run one slide; ``on_review(items)`` receives ReviewItem batches for gated cells."""
    from cellclf.detect.classical import detect_halo_um
    from cellclf.gate.conformal import aps_sets
    from cellclf.gate.slide_guard import OODParams, is_ood, sample_tiles, slide_stats
    from cellclf.gate.thresholds import GateParams, apply_gate, review_priority
    from cellclf.outputs.results import SlideResult
    from cellclf.wsi.crops import crop_halo_um
    from cellclf.wsi.slide import Slide
    from cellclf.wsi.tile_reader import TileReader
    from cellclf.wsi.tiling import tile_grid
    from cellclf.wsi.tissue import require_tissue, tissue_mask, tissue_thumbnail_px

    params = params or RunParams()
    path = Path(path)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    work_mpp, crop_px = float(card["mpp"]), int(card["crop_px"])
    classes = list(card["classes"])
    with Slide(path, mpp=params.mpp_override) as slide:
        check_model_fits(slide.mpp, work_mpp, path, params.max_mpp_ratio)
        mpp, width, height, vendor = slide.mpp, slide.width, slide.height, slide.vendor
    site = params.site or vendor
    reader = TileReader(path, work_mpp, mpp=params.mpp_override, workers=params.workers)
    try:
        small, small_ds = reader.thumbnail(tissue_thumbnail_px(width, height, mpp))
        tissue = require_tissue(tissue_mask(small, small_ds, mpp), path)
        thumb, ds = _overlay_thumbnail(reader, small, small_ds, 1600)
        tissue_mm2 = tissue.area_mm2(mpp)
        # the halo holds a whole cell for detection and a whole crop for every owned cell
        halo_um = max(detect_halo_um(), crop_halo_um(crop_px, work_mpp),
                      # with a review queue, whole context views (no white strip at tile edges)
                      crop_halo_um(REVIEW_CONTEXT_PX, work_mpp) if on_review is not None else 0.0)
        tiles = tile_grid(width, height, mpp, work_mpp, params.tile_um, halo_um, tissue,
                          params.min_tissue_fraction)
        timings["open_tissue_tiling"] = time.perf_counter() - t0

        gate = (GateParams.from_dict(card["gate"], classes=classes) if card.get("gate") else None)
        aps = card.get("conformal")
        ood_info: dict[str, Any] = {"flagged": False, "reasons": []}
        t1 = time.perf_counter()
        if card.get("ood"):
            # the same windows as calibration.slide_ood_stats (cores without halo)
            cores = tile_grid(width, height, mpp, work_mpp, params.tile_um, 0.0, tissue)
            sample = [rgb for _, rgb in reader.iter_tiles(sample_tiles(cores, params.ood_sample_tiles))]
            stats = slide_stats(sample, work_mpp, workers=reader.workers)
            flagged, reasons = is_ood(stats, OODParams.from_dict(card["ood"]))
            ood_info = {"flagged": bool(flagged), "reasons": list(reasons), "stats": stats.to_dict()}
        timings["ood_check"] = time.perf_counter() - t1

        def consume(xy0: np.ndarray, probs: np.ndarray, cut: Callable[[np.ndarray], tuple]) -> None:
            """Gate one batch of classified cells; ``cut(rows)`` → (crops, context) for review."""
            if gate is not None:
                accept, reason = apply_gate(probs, gate, ood_slide=ood_info["flagged"])
            else:
                accept = np.zeros(len(probs), bool)
                reason = np.full(len(probs), "uncertified_class", dtype=object)
            conf = aps_sets(probs, aps) if aps else probs >= probs.max(axis=1, keepdims=True)
            ids = acc.n + np.arange(len(probs))
            audited = (audit_mask(slide_id, ids, accept, params.audit_rate)
                       if review is not None else np.zeros(len(probs), bool))
            if review is not None and ((~accept) | audited).any():
                rows = np.flatnonzero((~accept) | audited)
                crops, ctx = cut(rows)
                audit_rows = audited[rows]
                # audit items look like any other queued cell: a queue reason, a spread priority
                shown_reason = np.where(audit_rows, "low_confidence", reason[rows])
                priority = np.where(audit_rows, audit_priority(slide_id, ids[rows]),
                                    review_priority(probs[rows]))
                blind = audit_rows | blind_mask(slide_id, ids[rows], params.blind_share)
                args = (slide_id, str(path), ids[rows], xy0[rows], probs[rows], shown_reason,
                        conf[rows], crops, ctx, classes, priority, audit_rows, blind, site)
                review.submit(lambda encode, args=args: _review_items(*args, encode=encode))
            acc.xy0.append(xy0)
            acc.probs.append(probs.astype(np.float32))
            acc.accept.append(accept)
            acc.audited.append(audited)
            acc.reason.append(np.asarray(reason, dtype=object))
            acc.conformal.append(conf)
            acc.n += len(xy0)

        acc = _Acc()
        review = _ReviewWriter(on_review, reader.workers) if on_review is not None else None
        t2 = time.perf_counter()
        on_device = _use_device_stage(engine, params.stage)
        decoded_on_device = False
        if on_device:
            t_wait, decoded_on_device = _run_device_stage(engine, reader, tiles, work_mpp,
                                                          crop_px, params, consume, progress,
                                                          timings)
        else:
            t_wait = _run_host_stage(engine, reader, tiles, work_mpp, crop_px, params, consume,
                                     progress, with_context=on_review is not None)
        if review is not None:
            review.close()  # every gated cell is in the store before the results are written
            review = None
    finally:
        if review is not None:  # an error: drop what is queued, the rerun redoes the slide
            review.close(wait=False)
        reader.close()
    timings["read_detect_classify"] = time.perf_counter() - t2
    timings["device_stage_wait" if on_device else "classify"] = t_wait
    timings["total"] = time.perf_counter() - t0
    k = len(classes)
    cat = (lambda xs, shape, dt: np.concatenate(xs) if xs else np.zeros(shape, dt))  # noqa: E731
    return SlideResult(
        slide_id=slide_id, path=str(path), mpp=mpp, width=width, height=height, vendor=vendor,
        classes=classes, xy0=cat(acc.xy0, (0, 2), np.float64), probs=cat(acc.probs, (0, k), np.float32),
        accept=cat(acc.accept, (0,), bool), reason=cat(acc.reason, (0,), object),
        conformal=cat(acc.conformal, (0, k), bool), tissue_area_mm2=tissue_mm2,
        thumbnail=thumb, thumb_downsample=ds, ood=ood_info, timings_s=timings,
        extra={"n_tiles": len(tiles), "stage": "device" if on_device else "host",
               "decode": "device" if decoded_on_device else "host"},
        audited=cat(acc.audited, (0,), bool),
        audit_rate=params.audit_rate if on_review is not None else 0.0)


def _overlay_thumbnail(reader: Any, small: np.ndarray, small_ds: float,
                       max_px: int) -> tuple[np.ndarray, float]:
    """The overlay's thumbnail: the tissue thumbnail shrunk when it is large enough, else a read."""
    if max(small.shape[:2]) < max_px:
        return reader.thumbnail(max_px)
    from PIL import Image

    scale = max_px / max(small.shape[:2])
    size = (max(1, round(small.shape[1] * scale)), max(1, round(small.shape[0] * scale)))
    img = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BOX))
    return img, small_ds * small.shape[1] / size[0]


def _use_device_stage(engine: Any, stage: str) -> bool:
    """Device stage when asked, or by default when the engine is torch on CUDA."""
    if stage not in ("auto", "device", "host"):
        raise ConfigError(f"stage must be auto, device or host, got {stage!r}")
    is_torch = getattr(engine, "backend", "") == "torch" and hasattr(engine, "classify_tensor")
    if stage == "device" and not is_torch:
        raise ConfigError("the device stage runs the torch engine: use --backend torch, or stage=host")
    return stage == "device" or (stage == "auto" and is_torch and engine.device.type == "cuda")


def _run_host_stage(engine: Any, reader: Any, tiles: list, work_mpp: float, crop_px: int,
                    params: RunParams, consume: Callable, progress: Callable | None,
                    with_context: bool) -> float:
    """Detect and cut on the host (thread pool), classify in batches; seconds spent classifying."""
    from cellclf.detect.classical import detect_cells
    from cellclf.wsi.crops import cut_crops

    def detect_tile(item: tuple) -> tuple:
        tile, rgb = item
        centres = detect_cells(rgb, work_mpp)
        xy0 = tile.to_level0(centres) if len(centres) else np.zeros((0, 2))
        keep = tile.owns(xy0) if len(xy0) else np.zeros(0, bool)
        centres, xy0 = centres[keep], xy0[keep]
        crops = cut_crops(rgb, centres, crop_px)
        ctx = cut_crops(rgb, centres, REVIEW_CONTEXT_PX) if with_context else None
        return xy0, crops, ctx

    pending: list[tuple] = []
    t_classify = 0.0

    def flush() -> None:
        nonlocal pending, t_classify
        if not pending:
            return
        xy0 = np.concatenate([p[0] for p in pending])
        crops = np.concatenate([p[1] for p in pending])
        ctx = np.concatenate([p[2] for p in pending]) if with_context else None
        pending = []
        tc = time.perf_counter()
        probs = engine.classify(crops)
        t_classify += time.perf_counter() - tc
        consume(xy0, probs, lambda rows: (crops[rows], None if ctx is None else ctx[rows]))

    with ThreadPoolExecutor(max_workers=max(1, params.workers or 2)) as pool:
        for i, item in enumerate(_bounded_map(pool, detect_tile, reader.iter_tiles(tiles), 8)):
            if len(item[0]):
                pending.append(item)
            if sum(len(p[0]) for p in pending) >= params.batch:
                flush()
            if progress:
                progress(i + 1, len(tiles))
        flush()
    return t_classify


def _run_device_stage(engine: Any, reader: Any, tiles: list, work_mpp: float, crop_px: int,
                      params: RunParams, consume: Callable, progress: Callable | None,
                      timings: dict[str, float]) -> tuple[float, bool]:
    """Detect, cut and classify on the engine's device (:mod:`cellclf.pipeline.device_stage`), tiles decoded
    there too when :mod:`cellclf.wsi.device_decode` can (``params.device_decode``); review crops are cut
    on the device for gated cells only. Returns (seconds the loop waited on the stage, whether the
    tiles were decoded on the device)."""
    from contextlib import ExitStack

    from cellclf.pipeline.device_stage import DeviceStage
    from cellclf.wsi.device_decode import DeviceTileReader, device_readable
    from cellclf.wsi.tile_reader import default_workers

    done, waited = 0, 0.0
    cores = params.workers or default_workers()
    with ExitStack() as stack:
        stage = stack.enter_context(DeviceStage(engine, work_mpp, crop_px,
                                                tiles_per_batch=params.tiles_per_batch,
                                                merge_workers=max(2, cores // 2)))
        decode_here = params.device_decode == "on" or (
            params.device_decode == "auto" and stage.device.type == "cuda"
            and device_readable(reader, tiles))
        if decode_here:
            dreader = stack.enter_context(DeviceTileReader(reader, stage.device, io_workers=cores))
            outputs = stage.run_decoding(tiles, dreader)
        else:
            outputs = stage.run(reader.iter_tiles(tiles))
        while True:
            t = time.perf_counter()
            out = next(outputs, None)
            waited += time.perf_counter() - t
            if out is None:
                break

            def cut(rows: np.ndarray, out: Any = out) -> tuple[np.ndarray, np.ndarray]:
                owner, centres = out.tile_of[rows], out.centres_px[rows]
                return (stage.gather_crops(out.x, owner, centres, crop_px).cpu().numpy(),
                        stage.gather_crops(out.x, owner, centres, REVIEW_CONTEXT_PX).cpu().numpy())

            if len(out.xy0):
                consume(out.xy0, out.probs, cut)
            done += len(out.tiles)
            if progress:
                progress(done, len(tiles))
        timings.update({f"device_{k}": v for k, v in stage.timings.items()})
    return waited, decode_here


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterator, depth: int) -> Iterator:
    """Ordered ``pool.map`` that keeps at most ``depth`` tasks in flight (memory stays flat)."""
    from collections import deque

    queue: deque = deque()
    for item in items:
        queue.append(pool.submit(fn, item))
        if len(queue) >= depth:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


def _review_items(slide_id: str, slide_path: str, ids: np.ndarray, xy0: np.ndarray, probs: np.ndarray,
                  reason: np.ndarray, conf: np.ndarray, crops: np.ndarray,
                  ctx: np.ndarray | None, classes: list[str], priority: np.ndarray,
                  audit: np.ndarray | None = None, blind: np.ndarray | None = None,
                  site: str | None = None,
                  encode: Callable = lambda f, xs: [f(x) for x in xs]) -> list:
    """ReviewItems for gated cells (every row given is one; ``ids`` are their cell ids);
    ``encode(png_bytes, images)`` maps the PNG encoder (over a thread pool in ``run_slide``)."""
    from cellclf.review.store import ReviewItem

    items = []
    pred = probs.argmax(axis=1)
    crop_png = encode(png_bytes, list(crops))
    ctx_png = encode(jpeg_bytes, list(ctx)) if ctx is not None else [b""] * len(ids)
    for i in range(len(ids)):
        items.append(ReviewItem(
            slide_id=slide_id, cell_id=int(ids[i]), x=float(xy0[i, 0]), y=float(xy0[i, 1]),
            predicted=classes[pred[i]], probs={c: float(probs[i, k]) for k, c in enumerate(classes)},
            conformal_set=[c for k, c in enumerate(classes) if conf[i, k]], reason=str(reason[i]),
            priority=float(priority[i]), crop_png=crop_png[i], context_png=ctx_png[i],
            slide_path=slide_path, audit=bool(audit is not None and audit[i]),
            blind=bool(blind is not None and blind[i]), site=site))
    return items
