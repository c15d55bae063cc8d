"""run_slide: one slide through the whole flow — open, tissue and tiles, a stage (read, detect,
crop, classify) yielding batches of cells, gate — returning a
:class:`~cellclf.outputs.slide_result.SlideResult`. Writes nothing itself; review items are handed to
a callback as they are produced, so memory stays flat in slide size.

The slide is opened once (one :class:`~cellclf.wsi.tile_reader.TileReader` serves the thumbnail, the
OOD sample and the tiles). The stage is :class:`~cellclf.pipeline.host_stage.HostStage` (CPU, any
engine) or :class:`~cellclf.pipeline.device_stage.DeviceStage` (torch engine on its device); both
yield :class:`~cellclf.pipeline.stage.CellBatch` es, gated here by one function.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from cellclf.card import Card
from cellclf.detect.classical import DetectParams, detect_cells, detect_halo_um
from cellclf.detect.slide_detection import slide_params
from cellclf.detect.stain import sample_stain
from cellclf.errors import ConfigError, ModelMismatchError
from cellclf.gate.audit_bound import (
    DEFAULT_AUDIT_RATE,
    DEFAULT_BLIND_SHARE,
    audit_mask,
    audit_priority,
    blind_mask,
)
from cellclf.gate.conformal import aps_sets
from cellclf.gate.slide_guard import OODParams, is_ood, reader_sample_stats
from cellclf.gate.thresholds import GateParams, apply_gate, review_priority
from cellclf.model.engine import Engine
from cellclf.outputs.slide_result import SlideResult
from cellclf.pipeline.host_stage import HostStage, ReviewWriter, review_items
from cellclf.pipeline.stage import REVIEW_CONTEXT_PX, CellBatch, Stage
from cellclf.review.types import ReviewItem
from cellclf.wsi.crops import crop_halo_um
from cellclf.wsi.tile_reader import TileReader, default_workers
from cellclf.wsi.tissue import require_tissue, tissue_mask, tissue_thumbnail


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


def run_slide(path: str | Path, engine: Engine, card: Card, *, slide_id: str,
              params: RunParams | None = None,
              on_review: Callable[[list[ReviewItem]], None] | None = None,
              progress: Callable[[int, int], None] | None = None) -> SlideResult:
    """Run one slide; ``on_review(items)`` receives ReviewItem batches for gated cells."""
    params, path, clock = params or RunParams(), Path(path), _Clock()
    work_mpp, crop_px = float(card["mpp"]), int(card["crop_px"])
    with TileReader(path, work_mpp, mpp=params.mpp_override, workers=params.workers) as reader:
        check_model_fits(reader.mpp, work_mpp, path, params.max_mpp_ratio)
        small, small_ds = tissue_thumbnail(reader)
        tissue = require_tissue(tissue_mask(small, small_ds, reader.mpp), path,
                                small if reader.is_plain_image else None)
        thumb, thumb_ds = overlay_thumbnail(reader, small, small_ds, 1600)
        halo_um = _halo_um(crop_px, work_mpp, with_review=on_review is not None)
        tiles = reader.grid(params.tile_um, halo_um, tissue, params.min_tissue_fraction)
        clock.lap("open_tissue_tiling")
        sample = reader.tissue_sample(tissue, params.tile_um, params.ood_sample_tiles)
        ood = ood_check(reader, sample, card)
        stain = sample_stain(sample)  # recorded in summary.json
        detect_params = slide_params(sample)  # the slide's nuclear H level, as detect_slide's
        clock.lap("ood_check")
        gate = SlideGate(card, ood_slide=ood["flagged"])
        cells = _Cells(len(gate.classes))
        with _stage(engine, reader, crop_px, params, on_review is not None,
                    detect_params) as stage, \
                _review_writer(on_review, reader.workers) as review:
            for batch in stage.run(tiles):
                if len(batch):
                    accept, reason, conformal = gate(batch.probs)
                    ids = cells.n + np.arange(len(batch))
                    audited = (audit_mask(slide_id, ids, accept, params.audit_rate)
                               if review is not None else np.zeros(len(batch), bool))
                    if review is not None and ((~accept) | audited).any():
                        _send_for_review(review, batch, cells.n, accept, reason, conformal,
                                         slide_id, str(path.absolute()), gate.classes, audited,
                                         params.blind_share, params.site or reader.vendor,
                                         (work_mpp, reader.mpp))
                    cells.add(batch.xy0, batch.probs, accept, reason, conformal, audited)
                if progress:
                    progress(cells.tiles_done(batch.tiles_done), len(tiles))
        clock.lap("read_detect_classify")
    timings = {**clock.laps, **stage.timings, "total": clock.total()}
    return SlideResult(
        slide_id=slide_id, path=str(path), mpp=reader.mpp, width=reader.width,
        height=reader.height, vendor=reader.vendor, classes=gate.classes, **cells.arrays(),
        tissue_area_mm2=tissue.area_mm2(reader.mpp), thumbnail=thumb, thumb_downsample=thumb_ds,
        ood=ood, timings_s=timings,
        extra={"n_tiles": len(tiles), **stage.info, "stain": stain.to_dict(),
               "detect_hem_cap": detect_params.hem_cap},
        other_class=card.other_class,
        audit_rate=params.audit_rate if on_review is not None else 0.0)


def check_model_fits(slide_mpp: float, model_mpp: float, path: Path, max_ratio: float) -> None:
    """Refuse slides scanned too coarsely for the model (the model would see upsampled pixels)."""
    if slide_mpp > model_mpp * max_ratio:
        raise ModelMismatchError(
            f"{path}: slide resolution {slide_mpp:.3f} µm/px is coarser than the model's "
            f"{model_mpp:.3f} µm/px × {max_ratio}: the model cannot see the cells' detail. Use a "
            "higher-magnification scan, or a model trained at this resolution (check --mpp if the "
            "slide's metadata is wrong).")


class SlideGate:
    """The card's gate, conformal sets and the slide's OOD verdict applied to a batch of
    probabilities: ``gate(probs) -> (accept, reason, conformal set membership)``."""

    def __init__(self, card: Card, ood_slide: bool = False) -> None:
        self.classes = list(card["classes"])
        self.params = (GateParams.from_dict(card["gate"], classes=self.classes)
                       if card.get("gate") else None)
        self.conformal = card.get("conformal")
        self.ood_slide = ood_slide

    def __call__(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.params is not None:
            accept, reason = apply_gate(probs, self.params, ood_slide=self.ood_slide)
        else:
            accept = np.zeros(len(probs), bool)
            reason = np.full(len(probs), "uncertified_class", dtype=object)
        conformal = (aps_sets(probs, self.conformal) if self.conformal
                     else probs >= probs.max(axis=1, keepdims=True))
        return accept, np.asarray(reason, dtype=object), conformal


@dataclass
class _Cells:
    """The slide's classified cells, batch by batch (cell id = row)."""

    k: int
    parts: dict[str, list[np.ndarray]] = field(default_factory=lambda: {
        "xy0": [], "probs": [], "accept": [], "reason": [], "conformal": [], "audited": []})
    n: int = 0
    tiles: int = 0

    def add(self, xy0: np.ndarray, probs: np.ndarray, accept: np.ndarray, reason: np.ndarray,
            conformal: np.ndarray, audited: np.ndarray) -> None:
        for key, value in zip(self.parts, (xy0, probs.astype(np.float32), accept, reason,
                                           conformal, audited), strict=True):
            self.parts[key].append(value)
        self.n += len(xy0)

    def tiles_done(self, more: int) -> int:
        self.tiles += more
        return self.tiles

    def arrays(self) -> dict[str, np.ndarray]:
        empty = {"xy0": ((0, 2), np.float64), "probs": ((0, self.k), np.float32),
                 "accept": ((0,), bool), "reason": ((0,), object),
                 "conformal": ((0, self.k), bool), "audited": ((0,), bool)}
        return {key: np.concatenate(xs) if xs else np.zeros(*empty[key])
                for key, xs in self.parts.items()}


class _Clock:
    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self.last = now - self.last, now

    def total(self) -> float:
        return time.perf_counter() - self.t0


def _halo_um(crop_px: int, work_mpp: float, with_review: bool) -> float:
    """The halo holds a whole cell for detection and a whole crop for every owned cell; with a
    review queue, whole context views too (no white strip at tile edges)."""
    return max(detect_halo_um(), crop_halo_um(crop_px, work_mpp),
               crop_halo_um(REVIEW_CONTEXT_PX, work_mpp) if with_review else 0.0)


def ood_check(reader: TileReader, sample: list[np.ndarray], card: Card) -> dict[str, Any]:
    """The stain/focus statistics of the slide's tissue sample (:meth:`TileReader.tissue_sample`)
    against the card's OOD envelope (when it has one)."""
    if not card.get("ood"):
        return {"flagged": False, "reasons": []}
    stats = reader_sample_stats(reader, sample)
    flagged, reasons = is_ood(stats, OODParams.from_dict(card["ood"]))
    return {"flagged": bool(flagged), "reasons": list(reasons), "stats": stats.to_dict()}


def overlay_thumbnail(reader: TileReader, small: np.ndarray, small_ds: float,
                       max_px: int) -> tuple[np.ndarray, float]:
    """The overlay's thumbnail: the tissue thumbnail shrunk when it is large enough, else a read."""
    if max(small.shape[:2]) < max_px:
        return reader.thumbnail(max_px)
    from PIL import Image

    scale = max_px / max(small.shape[:2])
    size = (max(1, round(small.shape[1] * scale)), max(1, round(small.shape[0] * scale)))
    img = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BOX))
    return img, small_ds * small.shape[1] / size[0]


def use_device_stage(engine: Engine, stage: str) -> bool:
    """Device stage when asked, or by default when the engine is torch on CUDA."""
    if stage not in ("auto", "device", "host"):
        raise ConfigError(f"stage must be auto, device or host, got {stage!r}")
    is_torch = getattr(engine, "backend", "") == "torch" and hasattr(engine, "classify_tensor")
    if stage == "device" and not is_torch:
        raise ConfigError("the device stage runs the torch engine: use --backend torch, or stage=host")
    return stage == "device" or (stage == "auto" and is_torch and engine.device.type == "cuda")


def _stage(engine: Engine, reader: TileReader, crop_px: int, params: RunParams,
           with_review: bool, detect_params: DetectParams) -> Stage:
    if use_device_stage(engine, params.stage):
        from cellclf.pipeline.device_stage import DeviceStage  # torch: imported only when used

        cores = params.workers or default_workers()
        return DeviceStage(engine, reader.work_mpp, crop_px, reader=reader,
                           device_decode=params.device_decode, io_workers=cores,
                           tiles_per_batch=params.tiles_per_batch, merge_workers=max(2, cores // 2),
                           params=detect_params)
    return HostStage(engine, reader, crop_px, batch_cells=params.batch, workers=params.workers,
                     with_context=with_review, detect=partial(detect_cells, params=detect_params))


def _review_writer(on_review: Callable[[list[ReviewItem]], None] | None,
                   workers: int) -> AbstractContextManager[ReviewWriter | None]:
    return ReviewWriter(on_review, workers) if on_review is not None else nullcontext(None)


def _send_for_review(review: ReviewWriter, batch: CellBatch, first_id: int, accept: np.ndarray,
                     reason: np.ndarray, conformal: np.ndarray, slide_id: str, slide_path: str,
                     classes: list[str], audited: np.ndarray, blind_share: float,
                     site: str | None, mpps: tuple[float, float]) -> None:
    """Queue the gated cells and the audit sample of a batch (cell ids continue from
    ``first_id``) for review. Audit cells look like any other queued cell: a queue reason, a
    priority spread uniformly (their own confidence would serve them last), blind. ``mpps``:
    (µm/px of the review images, the slide's level-0 µm/px)."""
    rows = np.flatnonzero((~accept) | audited)
    crops, ctx = batch.review_images(rows)
    probs = batch.probs[rows]
    ids = first_id + rows
    audit = audited[rows]
    shown_reason = np.where(audit, "low_confidence", reason[rows])
    priority = np.where(audit, audit_priority(slide_id, ids), review_priority(probs))
    blind = audit | blind_mask(slide_id, ids, blind_share)
    args = (slide_id, slide_path, ids, batch.xy0[rows], probs, shown_reason,
            conformal[rows], crops, ctx, classes, priority)
    review.submit(lambda encode: review_items(*args, encode=encode, audit=audit, blind=blind,
                                              site=site, image_mpp=mpps[0], slide_mpp=mpps[1]))
