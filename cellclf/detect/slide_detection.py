"""A whole slide's cell candidates: tissue → tiles → detector per tile → the cells each tile owns."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cellclf.detect.classical import DetectParams, detect_cells, detect_halo_um
from cellclf.detect.learned import SHIPPED_DETECTOR, LearnedDetector
from cellclf.detect.stain import SAMPLE_TILES, level_params, sample_pixels
from cellclf.errors import EmptyTissueError
from cellclf.wsi.slide import Slide
from cellclf.wsi.tile_reader import TileReader
from cellclf.wsi.tiling import tile_grid
from cellclf.wsi.tissue import require_tissue, tissue_mask, tissue_thumbnail

log = logging.getLogger(__name__)


def _resolve_backend(backend: str) -> str:
    if backend not in ("auto", "numpy", "torch"):
        raise ValueError(f"backend must be 'auto', 'numpy' or 'torch', got {backend!r}")
    if backend != "auto":
        return backend
    try:
        import torch
    except ImportError:
        return "numpy"
    return "torch" if torch.cuda.is_available() else "numpy"


def detect_slide(
    path: str | os.PathLike[str],
    mpp: float | None = None,
    work_mpp: float = 0.5,
    workers: int = 0,
    progress: bool = True,
    backend: str = "auto",
    params: DetectParams | None = None,
    tile_um: float = 512.0,
    batch_tiles: int = 16,
    detector: str = "classical",
    detector_bundle: str | os.PathLike[str] | None = None,
    blank_fields_ok: bool = False,
) -> np.ndarray:
    """Candidate cell centres (N×2 float64, level-0 px) over the tissue of a whole slide.

    Tissue mask → tile grid with a halo of :func:`detect_halo_um` → tiles read in parallel →
    detection per tile (batches of ``batch_tiles`` on torch) → keep the candidates each tile owns
    (its core box), which removes overlap duplicates exactly. ``backend``: "auto" (torch on CUDA
    when available, numpy otherwise), "numpy", or "torch" (CUDA if present, else CPU).
    ``detector``: "classical" (default for the classifier's flows: the shipped gate was
    calibrated on its candidates) or "learned" (a detector bundle, default the shipped
    ``models/cellclf-detector-v2``; "numpy" backend = onnxruntime). ``params=None``: the classical
    detector at the slide's own nuclear H level (:func:`slide_params`, from ``SAMPLE_TILES``
    tissue tiles of ``tile_um``); given ``params`` are used as they are. A plain image (a tile)
    whose thumbnail mask is empty is searched whole when it is stained at all; with
    ``blank_fields_ok`` a blank one gives no candidates instead of EmptyTissueError (an annotated
    tile folder in training and evaluation).
    """
    if detector not in ("classical", "learned"):
        raise ValueError(f"detector must be 'classical' or 'learned', got {detector!r}")
    backend = _resolve_backend(backend)
    path = Path(path)
    with Slide(path, mpp=mpp) as slide:
        slide_mpp, width, height = slide.mpp, slide.width, slide.height
        thumb, thumb_ds = tissue_thumbnail(slide)
        try:
            tissue = require_tissue(tissue_mask(thumb, thumb_ds, slide.mpp), path,
                                    thumb if slide.is_plain_image else None)
        except EmptyTissueError:
            if not (blank_fields_ok and slide.is_plain_image):
                raise
            log.warning("%s: a blank field (no stained pixels): no candidates", path)
            return np.zeros((0, 2), dtype=np.float64)
    halo_um = detect_halo_um(params) if detector == "classical" else LEARNED_HALO_UM
    tiles = tile_grid(width, height, slide_mpp, work_mpp, tile_um, halo_um, tissue)
    found: list[np.ndarray] = []
    with TileReader(path, work_mpp, mpp=mpp, workers=workers) as reader:
        if detector == "classical" and params is None:  # the slide's own nuclear H level
            params = slide_params(reader.tissue_sample(tissue, tile_um, SAMPLE_TILES))
        detect_batch, batch_tiles = _batch_detector(detector, backend, params, detector_bundle,
                                                    batch_tiles)
        with _progress(progress, len(tiles), path.name) as advance:
            batch: list = []
            for k, item in enumerate(reader.iter_tiles(tiles)):
                batch.append(item)
                if len(batch) < batch_tiles and k + 1 < len(tiles):
                    continue
                for (tile, _), xy in zip(batch, detect_batch([b[1] for b in batch], work_mpp),
                                         strict=True):
                    found.append(tile.owned_cells(xy)[1])
                advance(len(batch))
                batch = []
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.float64)


def slide_params(sample: list[np.ndarray]) -> DetectParams:
    """The default classical detector's parameters for one slide, from its tissue sample
    (:meth:`~cellclf.wsi.tile_reader.TileReader.tissue_sample`): its nuclear H level as
    ``hem_cap`` (:func:`~cellclf.detect.stain.level_params`)."""
    return level_params(DetectParams(), sample_pixels(sample))


def _batch_detector(detector: str, backend: str, params: DetectParams | None,
                    bundle: str | os.PathLike[str] | None, batch_tiles: int):
    """``(detect_batch(rgbs, mpp) -> centres per tile, tiles per batch)`` for ``detector``."""
    if detector == "learned":
        return _learned_batch(backend, bundle), (batch_tiles if backend == "torch" else 1)
    if backend == "torch":
        from cellclf.detect.classical_torch import TorchDetector

        return TorchDetector(params).detect, batch_tiles
    return (lambda rgbs, m: [detect_cells(rgb, m, params) for rgb in rgbs]), 1


LEARNED_HALO_UM = 30.0  # the heat-map network sees ±18 µm; peaks and resampling a little more


def _learned_batch(backend: str, bundle: str | os.PathLike[str] | None):
    """``detect_batch(rgbs, mpp)`` of the learned detector: torch in batches, else onnxruntime."""

    bundle = bundle or SHIPPED_DETECTOR
    if backend == "torch":
        import torch

        from cellclf.detect.learned_net import TorchLearnedDetector

        det = TorchLearnedDetector(bundle)

        def detect_torch(rgbs: list[np.ndarray], m: float) -> list[np.ndarray]:
            if len({r.shape for r in rgbs}) > 1:  # edge tiles differ in size: one at a time
                return [det.detect(torch.from_numpy(r[None]), m)[0] for r in rgbs]
            return det.detect(torch.from_numpy(np.stack(rgbs)), m)

        return detect_torch
    onnx = LearnedDetector(bundle)
    return lambda rgbs, m: [onnx(rgb, m) for rgb in rgbs]


@contextmanager
def _progress(enabled: bool, total: int, name: str):
    """Rich progress bar over tiles; yields ``advance(n)`` (a no-op when disabled)."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("detect", "[bold]" + name, BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn()) as bar:
        task = bar.add_task("tiles", total=total)
        yield lambda n: bar.advance(task, n)
