"""Tissue mask from a low-resolution thumbnail: the stage between ``open`` and ``tiling``.

H&E tissue is coloured (haematoxylin purple, eosin pink); glass is white or a faint grey/cream
with near-zero saturation. A pixel is tissue when

* its HSV saturation is above an Otsu threshold computed on the thumbnail, clipped to
  ``[min_saturation, max_saturation]`` (the floor keeps blank glass and faint background out when
  the slide is nearly empty; the ceiling keeps pale stroma in when tissue dominates), and
* its mean optical density is above ``min_od`` (faint tinted glass is coloured but barely absorbs),
* and it is not black (max channel < 25: pen, dust, scanner borders).

The raw mask is closed (gaps of ~``close_um``), holes smaller than ``max_hole_um2`` are filled,
and connected specks smaller than ``min_object_um2`` are removed. Sizes are physical (µm), so the
result does not depend on the thumbnail size.

:class:`TissueMask` answers the questions tiling and results ask: tissue area in mm² and the
tissue fraction of any level-0 box (area-weighted, exact for partial mask pixels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from cellclf.errors import EmptyTissueError

DEFAULT_MPP = 0.5  # assumed µm per level-0 px when tissue_mask() is not told


@dataclass(frozen=True)
class TissueMask:
    """Boolean tissue mask; mask pixel (i, j) covers level-0 [j·ds, (j+1)·ds) × [i·ds, (i+1)·ds)."""

    mask: np.ndarray  # bool (h, w)
    downsample: float  # level-0 px per mask px

    @property
    def fraction(self) -> float:
        """Share of the mask that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def area_mm2(self, mpp: float) -> float:
        """Tissue area in mm² for a slide of ``mpp`` µm per level-0 px."""
        px_um = self.downsample * mpp
        return float(self.mask.sum()) * px_um * px_um / 1e6

    def fraction_in_box(self, x0: float, y0: float, x1: float, y1: float) -> float:
        """Tissue share of the level-0 box [x0, x1) × [y0, y1); area outside the mask counts as
        glass. Partly covered mask pixels count by their covered area."""
        if x1 <= x0 or y1 <= y0:
            return 0.0
        ds = self.downsample
        h, w = self.mask.shape
        wx, cx0, cx1 = _coverage(x0 / ds, x1 / ds, w)
        wy, cy0, cy1 = _coverage(y0 / ds, y1 / ds, h)
        if wx.size == 0 or wy.size == 0:
            return 0.0
        covered = wy @ self.mask[cy0:cy1, cx0:cx1].astype(np.float64) @ wx
        return float(covered / ((x1 - x0) / ds * (y1 - y0) / ds))


def _coverage(a: float, b: float, n: int) -> tuple[np.ndarray, int, int]:
    """Overlap of [a, b) with each mask pixel [i, i+1), for i in [0, n): (weights, i0, i1)."""
    i0, i1 = max(math.floor(a), 0), min(math.ceil(b), n)
    if i1 <= i0:
        return np.zeros(0), 0, 0
    idx = np.arange(i0, i1, dtype=np.float64)
    weights = np.minimum(idx + 1.0, b) - np.maximum(idx, a)
    return weights, i0, i1


def otsu_threshold(values: np.ndarray, bins: int = 256, value_range: tuple[float, float] = (0, 1)
                   ) -> float:
    """Otsu's threshold of ``values`` (maximises the between-class variance of the histogram)."""
    hist, edges = np.histogram(values, bins=bins, range=value_range)
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total == 0:
        return float(value_range[0])
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * centres)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return xx * xx + yy * yy <= radius * radius


def _saturation_od(rgb_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel: HSV-style saturation, mean optical density (log10) and the brightest channel."""
    rgb = rgb_u8[..., :3].astype(np.float32)
    hi, lo = rgb.max(axis=2), rgb.min(axis=2)
    return (hi - lo) / np.maximum(hi, 1.0), -np.log10((rgb + 1.0) / 256.0).mean(axis=2), hi


def tissue_mask(thumb_rgb: np.ndarray, downsample: float, mpp: float | None = None, *,
                min_saturation: float = 0.07, max_saturation: float = 0.2, min_od: float = 0.05,
                close_um: float = 20.0, max_hole_um2: float = 10_000.0,
                min_object_um2: float = 5_000.0) -> TissueMask:
    """Tissue mask of an RGB uint8 thumbnail whose pixels are ``downsample`` level-0 px wide.

    ``mpp`` (µm per level-0 px) converts the µm sizes to mask px; it defaults to 0.5 (20×).
    """
    from scipy import ndimage

    if thumb_rgb.ndim != 3 or thumb_rgb.shape[2] < 3 or thumb_rgb.dtype != np.uint8:
        raise ValueError(f"thumbnail must be RGB uint8 (h, w, 3), got {thumb_rgb.dtype} "
                         f"{thumb_rgb.shape}")
    saturation, od, hi = _saturation_od(thumb_rgb)
    not_black = hi >= 25
    threshold = min(max(otsu_threshold(saturation[not_black]), min_saturation), max_saturation)
    mask = (saturation > threshold) & (od > min_od) & not_black

    px_um = downsample * (mpp if mpp is not None else DEFAULT_MPP)
    radius = int(round(close_um / px_um / 2))
    if radius >= 1 and mask.any():
        mask = ndimage.binary_closing(mask, structure=_disk(radius), border_value=0)
    px_area = px_um * px_um
    holes = ndimage.binary_fill_holes(mask) & ~mask
    if holes.any():
        labels, n = ndimage.label(holes)
        sizes = np.bincount(labels.ravel(), minlength=n + 1) * px_area
        small = sizes < max_hole_um2
        small[0] = False
        mask |= small[labels]
    if mask.any():
        labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
        sizes = np.bincount(labels.ravel(), minlength=n + 1) * px_area
        keep = sizes >= min_object_um2
        keep[0] = False
        mask = keep[labels]
    return TissueMask(mask=mask, downsample=float(downsample))


TISSUE_UM_PER_PX = 4.0  # finest resolution worth computing a tissue mask at


def tissue_thumbnail_px(width: int, height: int, mpp: float, max_px: int = 2048) -> int:
    """Longest thumbnail side for the tissue mask: about 4 µm per px, at most ``max_px``.

    A finer "thumbnail" (a small slide read at full resolution) adds nothing to the mask and makes
    its morphology slow.
    """
    side_um = max(width, height) * mpp
    return int(min(max_px, max(64, math.ceil(side_um / TISSUE_UM_PER_PX))))


class ThumbnailSource(Protocol):
    """A slide seen whole: :class:`~cellclf.wsi.slide.Slide` (OpenSlide) or
    :class:`~cellclf.wsi.tile_reader.TileReader` (the fast path; the same pixels, tested)."""

    width: int
    height: int
    mpp: float

    def thumbnail(self, max_px: int = 2048) -> tuple[np.ndarray, float]: ...


def tissue_thumbnail(source: ThumbnailSource) -> tuple[np.ndarray, float]:
    """The thumbnail the tissue mask is computed on (about 4 µm per px, at most 2048 px)."""
    return source.thumbnail(tissue_thumbnail_px(source.width, source.height, source.mpp))


def slide_tissue_mask(source: ThumbnailSource, max_px: int | None = None,
                      **params: float) -> TissueMask:
    """Tissue mask of a slide from its thumbnail (longest side ``max_px``; by default
    :func:`tissue_thumbnail`'s)."""
    if max_px is None:
        thumb, downsample = tissue_thumbnail(source)
    else:
        thumb, downsample = source.thumbnail(max_px)
    return tissue_mask(thumb, downsample, source.mpp, **params)


def require_tissue(tissue: TissueMask, path: str | Path,
                   field_rgb: np.ndarray | None = None, min_stained_share: float = 0.01,
                   min_saturation: float = 0.07, min_od: float = 0.05) -> TissueMask:
    """Return ``tissue`` or raise :class:`EmptyTissueError` naming the slide when it is empty.

    ``field_rgb``: the thumbnail of a plain image (a field someone chose, such as an annotated
    tile of pale fat or loose stroma, too small or sparse for the slide mask's size rules); when
    the mask is empty but at least ``min_stained_share`` of its pixels are stained, the whole
    image is the tissue. A blank plain image is still refused."""
    if not tissue.mask.any() and field_rgb is not None and tissue.mask.size:
        saturation, od, _ = _saturation_od(field_rgb)
        stained = (saturation > min_saturation) & (od > min_od)
        if stained.mean() >= min_stained_share:
            return TissueMask(np.ones_like(tissue.mask, dtype=bool), tissue.downsample)
    if not tissue.mask.any():
        raise EmptyTissueError(
            f"{path}: no tissue found on the slide thumbnail (blank glass, or stain too faint "
            "for the saturation threshold); check the slide with `cellclf info`, or lower the "
            "tissue threshold (min_saturation) for very pale stains")
    return tissue
