"""``cellclf detect``: a slide's cell candidates written as QuPath GeoJSON and, given labelled truth,
scored (recall per class, precision, duplicate rate within 4 µm).

Sits beside the detect step: :func:`~cellclf.detect.slide_detection.detect_slide` finds the
candidates, this module writes them and matches them to truth with :mod:`cellclf.detect.matching`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cellclf.annotations.geojson import read_points, write_points
from cellclf.annotations.tile_folder import open_tile_set
from cellclf.detect.detectors import make_tile_detector
from cellclf.detect.matching import detection_metrics
from cellclf.detect.slide_detection import detect_slide
from cellclf.detect.tile_detection import detect_tile_set, score_tile_set, write_points_csv
from cellclf.outputs.atomic import atomic_write_json
from cellclf.wsi.slide import Slide


def detect_to_geojson(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    mpp: float | None = None,
    truth: str | os.PathLike[str] | None = None,
    metrics_json: str | os.PathLike[str] | None = None,
    workers: int = 0,
    progress: bool = True,
    backend: str = "auto",
    match_um: float = 4.0,
    detector: str = "classical",
    detector_bundle: str | os.PathLike[str] | None = None,
) -> dict | None:
    """``cellclf detect``: write a slide's candidates as GeoJSON; score them against truth if given.

    With ``truth`` (a GeoJSON of labelled points) the candidates are matched one-to-one within
    ``match_um`` µm and the metrics (recall per truth class, precision, duplicate rate) are
    written to ``metrics_json`` (default: ``<out stem>.metrics.json`` beside ``out``) and returned.
    """
    out = Path(out)
    truth_pts = read_points(truth) if truth is not None else None  # fail early on bad truth
    with Slide(path, mpp=mpp) as slide:
        slide_mpp = slide.mpp
    pts = detect_slide(path, mpp=mpp, workers=workers, progress=progress, backend=backend,
                       detector=detector, detector_bundle=detector_bundle)
    write_points(out, ((float(x), float(y), "candidate") for x, y in pts))
    if truth_pts is None:
        return None
    truth0 = np.array([(p.x, p.y) for p in truth_pts], dtype=np.float64).reshape(-1, 2)
    names = [p.name or "unclassified" for p in truth_pts]
    metrics = detection_metrics(pts, truth0, names, match_um / slide_mpp)
    metrics.update(slide=str(path), candidates=str(out), truth=str(truth), match_um=match_um,
                   mpp=slide_mpp)
    mj = Path(metrics_json) if metrics_json else out.with_name(out.stem + ".metrics.json")
    atomic_write_json(mj, metrics)
    metrics["metrics_json"] = str(mj)
    return metrics


def detect_tiles_to_csv(
    folder: str | os.PathLike[str],
    out: str | os.PathLike[str],
    mpp: float | None,
    truth: str | os.PathLike[str] | None = None,
    where: dict[str, str] | None = None,
    metrics_json: str | os.PathLike[str] | None = None,
    match_um: float = 4.0,
    detector: str = "classical",
    detector_bundle: str | os.PathLike[str] | None = None,
) -> dict | None:
    """``cellclf detect TILES``: candidates of every tile as a points CSV; scored if truth given.

    ``out`` gets ``image,x,y,class`` rows (0-based px, like the truth CSV). With ``truth`` the
    pooled recall (per truth class), precision, F1 and duplicate rate are written to
    ``metrics_json`` (default ``<out stem>.metrics.json``) and returned.
    """

    tiles = open_tile_set(folder, mpp, truth, where)
    detect = make_tile_detector(detector, tiles, detector_bundle)
    found = detect_tile_set(tiles, detect)
    out = Path(out)
    write_points_csv(out, found)
    if truth is None:
        return None
    metrics = score_tile_set(tiles, found, match_um)
    metrics.update(tiles=str(folder), candidates=str(out), truth=str(truth), where=where or {},
                   detector=detector, stain=getattr(detect, "stain_record", None),
                   hem_cap=getattr(detect, "hem_cap", None))
    mj = Path(metrics_json) if metrics_json else out.with_name(out.stem + ".metrics.json")
    atomic_write_json(mj, metrics)
    metrics["metrics_json"] = str(mj)
    return metrics
