"""Pseudo-labels for the learned detector on unannotated real tissue: where detectors agree.

Sits before :mod:`cellclf.detect.learned_train`: an unannotated real image (a licence-clean slide
region) and the centres several different detectors find in it become points where enough of
them agree (within a radius, averaged) and a loss weight that is zero around every centre too
few found (the network is told nothing there); optional "no nuclei here" boxes are taught as
background, optional held-out boxes are left out::

    detector A, B, C centres ──vote_points──▶ agreed   → heat-map peaks
                                              disputed → weight 0 within the ignore radius
                                              elsewhere → background

Pure numpy/scipy apart from the detectors passed in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def vote_points(point_sets: Sequence[np.ndarray], radius_px: float,
                min_votes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(agreed, disputed) over several detectors' centres: groups of centres from different
    detectors within ``radius_px`` of the group's first centre (at most one per detector, the
    nearest; most-supported centres grouped first); the means of groups with at least
    ``min_votes`` detectors, and every centre of the other groups (both N×2 float64)."""
    from scipy.spatial import cKDTree

    sets = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in point_sets]
    xy = np.concatenate(sets) if sets else np.zeros((0, 2))
    owner = np.concatenate([np.full(len(p), k) for k, p in enumerate(sets)]) if sets else \
        np.zeros(0, int)
    if len(xy) == 0:
        return np.zeros((0, 2)), np.zeros((0, 2))
    tree = cKDTree(xy)
    near = tree.query_ball_point(xy, radius_px)
    support = np.array([len({owner[j] for j in n}) for n in near])
    taken = np.zeros(len(xy), dtype=bool)
    agreed, disputed = [], []
    for i in np.lexsort((np.arange(len(xy)), -support)):
        if taken[i]:
            continue
        group = {owner[i]: i}
        for j in sorted((j for j in near[i] if not taken[j] and j != i),
                        key=lambda j: float(np.hypot(*(xy[j] - xy[i])))):
            group.setdefault(owner[j], j)
        members = list(group.values())
        taken[members] = True
        if len(members) >= min_votes:
            agreed.append(xy[members].mean(axis=0))
        else:
            disputed.extend(xy[members])
    return (np.array(agreed).reshape(-1, 2), np.array(disputed).reshape(-1, 2))


def haematoxylin_blobs(rgb: np.ndarray, mpp: float, sigma_um: float = 2.2,
                       threshold: float = 0.15, radius_um: float = 3.0) -> np.ndarray:
    """Centres (x, y continuous px) of nucleus-sized blobs of haematoxylin: maxima of the
    scale-normalised Laplacian of Gaussian (σ ``sigma_um``) of the Ruifrok–Johnston H optical
    density above ``threshold``. A third, independent voter for pseudo-labels: it finds pale
    vesicular nuclei (dark rim, light centre) that peak detectors miss, with many false ones."""
    from scipy import ndimage

    stains = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    od = -np.log((rgb[..., :3].astype(np.float32) + 1.0) / 256.0)
    h = (od.reshape(-1, 3) @ np.linalg.inv(stains))[:, 0].reshape(rgb.shape[:2])
    s = sigma_um / mpp
    response = -ndimage.gaussian_laplace(h.astype(np.float32), s) * s * s
    r = max(1, int(round(radius_um / mpp)))
    peak = ndimage.maximum_filter(response, size=2 * r + 1, mode="nearest")
    rc = np.argwhere((response == peak) & (response > threshold))
    return (rc[:, ::-1] + 0.5).astype(np.float64)


def ignore_weight(shape: tuple[int, int], disputed_xy: np.ndarray, radius_px: float,
                  negative_boxes: Sequence[tuple[int, int, int, int]] = (),
                  ignore_boxes: Sequence[tuple[int, int, int, int]] = ()) -> np.ndarray:
    """uint8 H×W loss weight ×255: 0 within ``radius_px`` of a disputed centre (continuous px),
    255 elsewhere; inside ``negative_boxes`` (x0, y0, x1, y1) 255 and inside ``ignore_boxes``
    (held out, e.g. for a measurement) 0, whatever the centres."""
    from scipy import ndimage

    h, w = shape
    seeds = np.ones((h, w), dtype=bool)
    rc = np.floor(np.asarray(disputed_xy, dtype=np.float64).reshape(-1, 2)[:, ::-1]).astype(int)
    rc = rc[(rc >= 0).all(axis=1) & (rc[:, 0] < h) & (rc[:, 1] < w)]
    seeds[rc[:, 0], rc[:, 1]] = False
    weight = np.full((h, w), 255, np.uint8)
    if len(rc):  # (the distance transform of an image with no seed is not "infinite")
        weight[ndimage.distance_transform_edt(seeds) <= radius_px] = 0
    for boxes, value in ((negative_boxes, 255), (ignore_boxes, 0)):
        for x0, y0, x1, y1 in boxes:
            weight[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = value
    return weight


def drop_in_boxes(xy: np.ndarray, boxes: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
    """``xy`` without the points inside any (x0, y0, x1, y1) box."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    keep = np.ones(len(xy), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        keep &= ~((xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1))
    return xy[keep]
