"""run_slide: one slide through the whole flow — open, tissue, tiles, read, detect, crop, classify,
gate — returning a :class:`cellclf.results.SlideResult`. Writes nothing itself; review items are
handed to a callback as they are produced, so memory stays flat in slide size.

Stages overlap: tiles are read and decoded by the reader's worker threads, detection and crop cutting
run in a second thread pool, classification runs in large batches on the engine's device (GPU when
present), and the gate is pure maths on the probabilities.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellclf.errors import ModelMismatchError

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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Acc:
    xy0: list[np.ndarray] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)
    accept: list[np.ndarray] = field(default_factory=list)
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
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def run_slide(path: str | Path, engine: Any, card: dict, *, slide_id: str,
              params: RunParams | None = None,
              on_review: Callable[[list], None] | None = None,
              progress: Callable[[int, int], None] | None = None) -> Any:
    """Run one slide; ``on_review(items)`` receives ReviewItem batches for gated cells."""
    from cellclf.calibration import sample_tiles
    from cellclf.conformal import aps_sets
    from cellclf.crops import crop_halo_um, cut_crops
    from cellclf.detect import detect_cells, detect_halo_um
    from cellclf.gate import GateParams, apply_gate, review_priority
    from cellclf.ood import OODParams, is_ood, slide_stats
    from cellclf.reader import TileReader
    from cellclf.results import SlideResult
    from cellclf.slide import Slide
    from cellclf.tiling import tile_grid
    from cellclf.tissue import require_tissue, slide_tissue_mask

    params = params or RunParams()
    path = Path(path)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    work_mpp, crop_px = float(card["mpp"]), int(card["crop_px"])
    classes = list(card["classes"])
    with Slide(path, mpp=params.mpp_override) as slide:
        check_model_fits(slide.mpp, work_mpp, path, params.max_mpp_ratio)
        tissue = slide_tissue_mask(slide)
        thumb, ds = slide.thumbnail(1600)
        mpp, width, height, vendor = slide.mpp, slide.width, slide.height, slide.vendor
    require_tissue(tissue, path)
    tissue_mm2 = tissue.area_mm2(mpp)
    # the halo holds a whole cell for detection and a whole crop for every owned cell
    halo_um = max(detect_halo_um(), crop_halo_um(crop_px, work_mpp))
    tiles = tile_grid(width, height, mpp, work_mpp, params.tile_um, halo_um, tissue,
                      params.min_tissue_fraction)
    timings["open_tissue_tiling"] = time.perf_counter() - t0
    reader = TileReader(path, work_mpp, mpp=params.mpp_override, workers=params.workers)

    gate = (GateParams.from_dict(card["gate"], classes=classes) if card.get("gate") else None)
    aps = card.get("conformal")
    ood_info: dict[str, Any] = {"flagged": False, "reasons": []}
    t1 = time.perf_counter()
    if card.get("ood"):
        sample = [rgb for _, rgb in reader.iter_tiles(sample_tiles(tiles, params.ood_sample_tiles))]
        stats = slide_stats(sample, work_mpp)
        flagged, reasons = is_ood(stats, OODParams.from_dict(card["ood"]))
        ood_info = {"flagged": bool(flagged), "reasons": list(reasons), "stats": stats.to_dict()}
    timings["ood_check"] = time.perf_counter() - t1

    def detect_tile(item: tuple) -> tuple:
        tile, rgb = item
        centres = detect_cells(rgb, work_mpp)
        xy0 = tile.to_level0(centres) if len(centres) else np.zeros((0, 2))
        keep = tile.owns(xy0) if len(xy0) else np.zeros(0, bool)
        centres, xy0 = centres[keep], xy0[keep]
        crops = cut_crops(rgb, centres, crop_px)
        ctx = cut_crops(rgb, centres, REVIEW_CONTEXT_PX) if on_review else None
        return xy0, crops, ctx

    acc = _Acc()
    pending: list[tuple] = []
    n_pending = 0
    t_classify = 0.0

    def flush() -> None:
        nonlocal pending, n_pending, t_classify
        if not pending:
            return
        xy0 = np.concatenate([p[0] for p in pending])
        crops = np.concatenate([p[1] for p in pending])
        ctx = np.concatenate([p[2] for p in pending]) if on_review else None
        pending, n_pending = [], 0
        tc = time.perf_counter()
        probs = engine.classify(crops)
        t_classify += time.perf_counter() - tc
        if gate is not None:
            accept, reason = apply_gate(probs, gate, ood_slide=ood_info["flagged"])
        else:
            accept = np.zeros(len(probs), bool)
            reason = np.full(len(probs), "uncertified_class", dtype=object)
        conf = aps_sets(probs, aps) if aps else probs >= probs.max(axis=1, keepdims=True)
        if on_review is not None and (~accept).any():
            on_review(_review_items(slide_id, str(path), acc.n, xy0, probs, accept, reason, conf,
                                    crops, ctx, classes, review_priority(probs)))
        acc.xy0.append(xy0)
        acc.probs.append(probs.astype(np.float32))
        acc.accept.append(accept)
        acc.reason.append(np.asarray(reason, dtype=object))
        acc.conformal.append(conf)
        acc.n += len(xy0)

    t2 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, params.workers or 2)) as pool:
        for i, (xy0, crops, ctx) in enumerate(_bounded_map(pool, detect_tile,
                                                           reader.iter_tiles(tiles), 8)):
            if len(xy0):
                pending.append((xy0, crops, ctx))
                n_pending += len(xy0)
            if n_pending >= params.batch:
                flush()
            if progress:
                progress(i + 1, len(tiles))
        flush()
    timings["read_detect_classify"] = time.perf_counter() - t2
    timings["classify"] = t_classify
    timings["total"] = time.perf_counter() - t0
    k = len(classes)
    cat = (lambda xs, shape, dt: np.concatenate(xs) if xs else np.zeros(shape, dt))  # noqa: E731
    return SlideResult(
        slide_id=slide_id, path=str(path), mpp=mpp, width=width, height=height, vendor=vendor,
        classes=classes, xy0=cat(acc.xy0, (0, 2), np.float64), probs=cat(acc.probs, (0, k), np.float32),
        accept=cat(acc.accept, (0,), bool), reason=cat(acc.reason, (0,), object),
        conformal=cat(acc.conformal, (0, k), bool), tissue_area_mm2=tissue_mm2,
        thumbnail=thumb, thumb_downsample=ds, ood=ood_info, timings_s=timings,
        extra={"n_tiles": len(tiles)})


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


def _review_items(slide_id: str, slide_path: str, first_id: int, xy0: np.ndarray, probs: np.ndarray,
                  accept: np.ndarray, reason: np.ndarray, conf: np.ndarray, crops: np.ndarray,
                  ctx: np.ndarray | None, classes: list[str], priority: np.ndarray) -> list:
    from cellclf.review.store import ReviewItem

    items = []
    pred = probs.argmax(axis=1)
    for i in np.flatnonzero(~accept):
        items.append(ReviewItem(
            slide_id=slide_id, cell_id=int(first_id + i), x=float(xy0[i, 0]), y=float(xy0[i, 1]),
            predicted=classes[pred[i]], probs={c: float(probs[i, k]) for k, c in enumerate(classes)},
            conformal_set=[c for k, c in enumerate(classes) if conf[i, k]], reason=str(reason[i]),
            priority=float(priority[i]), crop_png=png_bytes(crops[i]),
            context_png=png_bytes(ctx[i]) if ctx is not None else b"", slide_path=slide_path))
    return items
