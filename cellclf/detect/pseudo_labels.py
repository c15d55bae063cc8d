"""Pseudo-labels for the learned detector on unannotated real tissue: where two detectors agree.

Sits before :mod:`cellclf.detect.learned_train`: an unannotated real image (a licence-clean slide
region) and the centres two different detectors find in it become a :class:`PointImage` whose
points are the centres both found (one-to-one within ``agree_um``, averaged) and whose loss weight
is zero around every centre only one of them found (the network is told nothing there) and
in optional "no nuclei here" boxes is one with no points (taught as background)::

    detector A centres ─┐                       agreed  → heat-map peaks
                        ├─ match_points ─────▶  disputed → weight 0 within ignore_um
    detector B centres ─┘                       elsewhere → background

Pure numpy/scipy apart from the detectors passed in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellclf.detect.matching import match_points


def consensus_points(a_xy: np.ndarray, b_xy: np.ndarray,
                     radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """(agreed, disputed): midpoints of the one-to-one pairs within ``radius_px``, and every
    centre of either set left unpaired (both N×2 float64)."""
    a = np.asarray(a_xy, dtype=np.float64).reshape(-1, 2)
    b = np.asarray(b_xy, dtype=np.float64).reshape(-1, 2)
    m = match_points(a, b, radius_px)
    paired = m.pred_to_truth >= 0
    agreed = (a[paired] + b[m.pred_to_truth[paired]]) / 2.0
    disputed = np.concatenate([a[~paired], b[m.truth_to_pred < 0]])
    return agreed, disputed


def ignore_weight(shape: tuple[int, int], disputed_xy: np.ndarray, radius_px: float,
                  negative_boxes: Sequence[tuple[int, int, int, int]] = ()) -> np.ndarray:
    """uint8 H×W loss weight ×255: 0 within ``radius_px`` of a disputed centre (continuous px),
    255 elsewhere — including inside ``negative_boxes`` (x0, y0, x1, y1), which win."""
    from scipy import ndimage

    h, w = shape
    seeds = np.ones((h, w), dtype=bool)
    rc = np.floor(np.asarray(disputed_xy, dtype=np.float64).reshape(-1, 2)[:, ::-1]).astype(int)
    rc = rc[(rc >= 0).all(axis=1) & (rc[:, 0] < h) & (rc[:, 1] < w)]
    seeds[rc[:, 0], rc[:, 1]] = False
    weight = np.where(ndimage.distance_transform_edt(seeds) > radius_px, 255, 0).astype(np.uint8)
    for x0, y0, x1, y1 in negative_boxes:
        weight[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = 255
    return weight


def drop_in_boxes(xy: np.ndarray, boxes: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
    """``xy`` without the points inside any (x0, y0, x1, y1) box."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    keep = np.ones(len(xy), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        keep &= ~((xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1))
    return xy[keep]
