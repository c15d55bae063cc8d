"""classify-cells: classify cells that already exist (QuPath detections, points or polygons) on
one slide, without detecting them again — ``cellclf classify-cells``.

The same steps as :func:`cellclf.pipeline.run_slide.run_slide` after detection, from the same
pieces: tissue mask, OOD verdict (:func:`cellclf.pipeline.run_slide.ood_check`), crops at the
given centres (:func:`cellclf.wsi.crops.extract_crops`, equal to infer's tile-cut crops), the
engine, the gate (:class:`cellclf.pipeline.run_slide.SlideGate`), review items
(:func:`cellclf.pipeline.host_stage.review_items`) and the per-slide outputs
(:func:`cellclf.outputs.results.write_slide_results`). Cell ``i`` of the outputs is the ``i``-th
input cell (GeoJSON order; a MultiPoint gives one cell per position; QuPath annotation objects
beside detections are not cells).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cellclf.annotations.geojson import read_points
from cellclf.errors import AnnotationError
from cellclf.gate.thresholds import review_priority
from cellclf.model.engine import load_engine
from cellclf.outputs.manifest import slide_id_for
from cellclf.outputs.results import count_table, write_slide_results
from cellclf.outputs.slide_result import SlideResult
from cellclf.pipeline.host_stage import review_items
from cellclf.pipeline.run_slide import (
    RunParams,
    SlideGate,
    check_model_fits,
    ood_check,
    overlay_thumbnail,
)
from cellclf.pipeline.slide_job import open_store
from cellclf.pipeline.stage import REVIEW_CONTEXT_PX
from cellclf.versions import software_versions
from cellclf.wsi.crops import extract_crops
from cellclf.wsi.tile_reader import TileReader
from cellclf.wsi.tissue import require_tissue, tissue_mask, tissue_thumbnail

CELL_OBJECT_TYPES = ("detection", "cell", "tile")  # QuPath's objectType of detection objects


def read_cell_centres(cells: str | Path) -> np.ndarray:
    """Level-0 centres (N×2, input order) of a GeoJSON of cells: points, or polygon centroids.
    When the export marks its objects (QuPath's ``objectType``) and holds detections, the other
    objects (e.g. the tissue annotation drawn around them) are not cells and are left out."""
    points = read_points(cells)
    kinds = [str(p.properties.get("objectType", "")) for p in points]
    if any(k in CELL_OBJECT_TYPES for k in kinds):
        points = [p for p, k in zip(points, kinds, strict=True) if k in CELL_OBJECT_TYPES or not k]
    if not points:
        raise AnnotationError(f"{cells}: no cells (points or polygons) in this GeoJSON; export "
                              "the detections from QuPath (File > Export objects as GeoJSON)")
    return np.array([(p.x, p.y) for p in points], dtype=np.float64)


def classify_cells_on_slide(path: str | Path, xy0: np.ndarray, engine: Any, card: dict, *,
                            slide_id: str, params: RunParams | None = None,
                            on_review: Callable[[list], None] | None = None) -> SlideResult:
    """Classify and gate the cells centred on level-0 ``xy0`` (N×2) of one slide, in that order."""
    params = params or RunParams()
    path = Path(path)
    t0 = time.perf_counter()
    work_mpp, crop_px = float(card["mpp"]), int(card["crop_px"])
    timings: dict[str, float] = {}
    with TileReader(path, work_mpp, mpp=params.mpp_override, workers=params.workers) as reader:
        check_model_fits(reader.mpp, work_mpp, path, params.max_mpp_ratio)
        _check_inside(xy0, reader.width, reader.height, path)
        small, small_ds = tissue_thumbnail(reader)
        tissue = require_tissue(tissue_mask(small, small_ds, reader.mpp), path,
                                small if reader.is_plain_image else None)
        thumb, thumb_ds = overlay_thumbnail(reader, small, small_ds, 1600)
        sample = (reader.tissue_sample(tissue, params.tile_um, params.ood_sample_tiles)
                  if card.get("ood") else [])
        ood = ood_check(reader, sample, card)
        gate = SlideGate(card, ood_slide=ood["flagged"])
        t1 = time.perf_counter()
        timings["open_tissue_ood"] = t1 - t0
        crops = extract_crops(path, xy0, work_mpp, crop_px, tile_um=params.tile_um, reader=reader)
        t2 = time.perf_counter()
        timings["crop"] = t2 - t1
        probs = np.concatenate([engine.classify(crops[s:s + params.batch])
                                for s in range(0, len(crops), params.batch)]).astype(np.float32)
        timings["classify"] = time.perf_counter() - t2
        accept, reason, conf = gate(probs)
        if on_review is not None and (~accept).any():
            rows = np.flatnonzero(~accept)
            ctx = extract_crops(path, xy0[rows], work_mpp, REVIEW_CONTEXT_PX,
                                tile_um=params.tile_um, reader=reader)
            on_review(review_items(slide_id, str(path), rows, xy0[rows], probs[rows], reason[rows],
                                   conf[rows], crops[rows], ctx, gate.classes,
                                   review_priority(probs[rows])))
    timings["total"] = time.perf_counter() - t0
    return SlideResult(
        slide_id=slide_id, path=str(path), mpp=reader.mpp, width=reader.width,
        height=reader.height, vendor=reader.vendor, classes=gate.classes, xy0=xy0, probs=probs,
        accept=accept, reason=reason, conformal=conf, tissue_area_mm2=tissue.area_mm2(reader.mpp),
        thumbnail=thumb, thumb_downsample=thumb_ds, ood=ood, timings_s=timings,
        extra={"cells_from": "input", "stage": "host"})


def _check_inside(xy0: np.ndarray, width: int, height: int, path: Path) -> None:
    outside = (xy0[:, 0] < 0) | (xy0[:, 1] < 0) | (xy0[:, 0] >= width) | (xy0[:, 1] >= height)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise AnnotationError(
            f"{path}: {int(outside.sum())} of {len(xy0)} cells lie outside the slide "
            f"({width}×{height} level-0 px), e.g. cell {i} at ({xy0[i, 0]:.1f}, {xy0[i, 1]:.1f}); "
            "export the detections of this slide in level-0 pixel coordinates")


def run_classify_cells(slide: str | Path, cells: str | Path, model: str | Path,
                       out_dir: str | Path, *, backend: str = "auto", device: str = "auto",
                       workers: int = 0, review_db: str | None = None, mpp: float | None = None,
                       hpf_area_mm2: float = 0.237, batch: int | None = None,
                       precision: str = "fp32") -> tuple[Path, dict[str, dict[str, int]], int]:
    """``cellclf classify-cells``: classify the cells of ``cells`` on ``slide`` and write
    ``out_dir/<slide_id>/`` as ``infer`` does; gated cells go to the review store (default
    ``out_dir/review.sqlite``). Returns (slide folder, counts by class, cells sent to review)."""
    slide, out_dir = Path(slide), Path(out_dir)
    if not slide.exists():
        raise AnnotationError(f"{slide}: slide not found; check the path")
    xy0 = read_cell_centres(cells)
    engine = load_engine(model, backend=backend, device=device, batch=batch, precision=precision)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(review_db or f"sqlite:///{out_dir.resolve() / 'review.sqlite'}",
                       engine.card)
    try:
        params = RunParams(workers=workers, mpp_override=mpp,
                           batch=batch or getattr(engine, "batch", 512))
        slide_id = slide_id_for(slide, set())
        result = classify_cells_on_slide(slide, xy0, engine, engine.card, slide_id=slide_id,
                                         params=params, on_review=store.add_items)
    finally:
        store.close()
    run_params = params.to_dict() | {"backend": engine.backend, "device": device,
                                     "precision": precision, "model": str(model),
                                     "hpf_area_mm2": hpf_area_mm2, "cells": str(cells)}
    folder = write_slide_results(out_dir, result, engine.card, run_params, software_versions(),
                                 hpf_area_mm2)
    return folder, count_table(result), int((~result.accept).sum())
