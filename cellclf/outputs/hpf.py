"""High-power-field (HPF) maths: the peak count of a class per HPF and densities per mm².

Sits after the gate in the flow: given level-0 cell positions of one class, find the circular field of
the configured area (default 0.237 mm², a common 40× field) that holds the most cells — the "peak count
per HPF" that guidelines use (e.g. ≥ 15 eosinophils/HPF in eosinophilic oesophagitis). Pure functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_HPF_AREA_MM2 = 0.237


def hpf_radius_um(area_mm2: float = DEFAULT_HPF_AREA_MM2) -> float:
    """Radius in µm of a circular field of ``area_mm2`` (0.237 mm² → 274.7 µm)."""
    if area_mm2 <= 0:
        raise ValueError(f"HPF area must be positive, got {area_mm2} mm²")
    return math.sqrt(area_mm2 / math.pi) * 1000.0


@dataclass(frozen=True)
class PeakHPF:
    count: int
    x: float  # level-0 px of the field centre
    y: float
    radius_px: float  # level-0 px
    area_mm2: float

    def to_dict(self) -> dict:
        return {"count": self.count, "x": self.x, "y": self.y, "radius_px": self.radius_px,
                "area_mm2": self.area_mm2}


def peak_hpf(xy0: np.ndarray, mpp: float, area_mm2: float = DEFAULT_HPF_AREA_MM2,
             grid_step_fraction: float = 0.25) -> PeakHPF:
    """The circular field of ``area_mm2`` containing the most points.

    Candidate centres are every point itself plus a square grid of step ``grid_step_fraction`` × radius
    over the points' bounding box; the count at a centre is the number of points within the radius
    (inclusive). With an empty input the count is 0 at (0, 0).
    """
    radius_px = hpf_radius_um(area_mm2) / mpp
    pts = np.asarray(xy0, dtype=np.float64).reshape(-1, 2)
    if len(pts) == 0:
        return PeakHPF(0, 0.0, 0.0, radius_px, area_mm2)
    centres = field_centres(pts, radius_px, grid_step_fraction)
    counts = field_counts(centres, pts, radius_px)
    best = int(np.argmax(counts))
    return PeakHPF(int(counts[best]), float(centres[best, 0]), float(centres[best, 1]), radius_px,
                   area_mm2)


def density_per_mm2(count: int, tissue_area_mm2: float) -> float | None:
    """Cells per mm² of tissue; None when the tissue area is zero."""
    return count / tissue_area_mm2 if tissue_area_mm2 > 0 else None


def field_centres(xy0: np.ndarray, radius_px: float, grid_step_fraction: float = 0.25) -> np.ndarray:
    """Candidate HPF centres, as :func:`peak_hpf` uses them: every point plus a square grid of
    step ``grid_step_fraction`` × radius over the points' bounding box; (0, 2) for no points."""
    pts = np.asarray(xy0, dtype=np.float64).reshape(-1, 2)
    if len(pts) == 0:
        return pts
    step = max(radius_px * grid_step_fraction, 1.0)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    gx = np.arange(lo[0], hi[0] + step, step)
    gy = np.arange(lo[1], hi[1] + step, step)
    return np.concatenate([pts, np.stack(np.meshgrid(gx, gy), axis=-1).reshape(-1, 2)])


def field_counts(centres: np.ndarray, xy0: np.ndarray, radius_px: float) -> np.ndarray:
    """Number of points within ``radius_px`` (inclusive) of each centre (int64, len(centres))."""
    pts = np.asarray(xy0, dtype=np.float64).reshape(-1, 2)
    if len(pts) == 0 or len(centres) == 0:
        return np.zeros(len(centres), np.int64)
    from scipy.spatial import cKDTree

    return np.asarray(cKDTree(pts).query_ball_point(centres, r=radius_px, return_length=True),
                      dtype=np.int64)
