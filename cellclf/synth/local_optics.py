"""Hybrid slides: how a real background was stained and scanned, measured locally (pure maths).

Used by ``hybrid`` to render synthetic cells into real tissue in the tissue's own optics:

- :func:`macenko_stains` — the background's haematoxylin and eosin OD vectors (Macenko et al.,
  ISBI 2009: the plane of the two largest OD eigenvectors, the extreme angles in it);
- :func:`concentrations` — H, E (and residual) amounts of every pixel for a stain matrix;
- :func:`edge_blur_px` — focus blur as a Gaussian sigma in pixels, from how much the strongest
  edges weaken under a known extra blur (for a blurred step edge the peak gradient is
  ∝ 1/√(σ₀² + σ²), so two measurements give σ₀);
- :func:`noise_std` — sensor/JPEG noise from the median absolute Laplacian;
- :func:`local_conditions` — all of it per window of a grid (stain scales relative to the
  synthetic renderer's reference amounts, blur, noise, tissue share).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .render import STAIN_D, STAIN_E, STAIN_H

OD_TISSUE_MIN = 0.15      # summed OD below this is glass (or nearly)
# The synthetic renderer's reference amounts: a dark (lymphocyte-like) nucleus and dense stroma.
REF_NUCLEUS_OD = 1.8       # |OD| of a dark synthetic nucleus (h ≈ 1.75, e ≈ 0.25)
REF_STROMA_E = 0.40
SIGMA_A, SIGMA_B, EDGE_PERCENTILE = 0.7, 2.0, 99.0    # focus estimate (see edge_blur_px)
NOISE_P25 = 0.3186 * np.sqrt(20.0)   # lower quartile of |N(0, 20σ²)| per unit σ


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def reference_stains() -> np.ndarray:
    """(3, 3) Ruifrok–Johnston H, E, residual vectors (rows, unit length)."""
    return np.stack([_unit(STAIN_H), _unit(STAIN_E), _unit(STAIN_D)])


def glass_intensity(rgb: np.ndarray) -> np.ndarray:
    """(3,) brightness of empty glass: the 99.5th percentile per channel, at least 200."""
    flat = rgb.reshape(-1, 3)[:: max(1, rgb.shape[0] * rgb.shape[1] // 400_000)]
    return np.clip(np.percentile(flat, 99.5, axis=0), 200.0, 255.0).astype(np.float64)


def optical_density(rgb: np.ndarray, i0: np.ndarray) -> np.ndarray:
    """(..., 3) OD = −ln(I / I0), float32, clipped at 0."""
    od = -np.log(np.clip(rgb.astype(np.float32), 1.0, None) / i0.astype(np.float32))
    return np.maximum(od, 0.0)


def macenko_stains(od: np.ndarray, alpha: float = 1.0, max_pixels: int = 200_000
                   ) -> np.ndarray:
    """(3, 3) unit stain vectors (H, E, residual) of tissue pixels; the reference ones where
    there is too little tissue to tell."""
    px = od.reshape(-1, 3)
    px = px[px.sum(1) > OD_TISSUE_MIN]
    if len(px) < 500:
        return reference_stains()
    px = px[:: max(1, len(px) // max_pixels)].astype(np.float64)
    _, vecs = np.linalg.eigh(np.cov(px.T))
    plane = vecs[:, 1:3]                                   # two largest eigenvectors
    plane = plane * np.where(plane.sum(0) < 0, -1.0, 1.0)  # point into positive OD
    proj = px @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100.0 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    v1, v2 = np.abs(v1), np.abs(v2)
    h, e = (v1, v2) if v1[0] > v2[0] else (v2, v1)         # haematoxylin absorbs more red
    h, e = _unit(h), _unit(e)
    ref = reference_stains()
    if float(h @ ref[0]) < 0.8 or float(e @ ref[1]) < 0.8:  # not H&E-like: keep the reference
        return ref
    d = np.abs(np.cross(h, e))
    return np.stack([h, e, _unit(d)])


def concentrations(od: np.ndarray, stains: np.ndarray) -> np.ndarray:
    """(..., 3) stain amounts (H, E, residual) solving OD = c · stains."""
    return (od.reshape(-1, 3) @ np.linalg.pinv(stains)).reshape(od.shape).astype(np.float32)


def _blur_from_peaks(pa: float, pb: float, sigma_a: float, sigma_b: float) -> float:
    if pa <= 1e-9:
        return 0.0
    r2 = min((pb / pa) ** 2, 0.98)
    s2 = (r2 * sigma_b ** 2 - sigma_a ** 2) / (1.0 - r2)
    return float(np.sqrt(max(s2, 0.0)))


def edge_blur_px(grey: np.ndarray, sigma_a: float = SIGMA_A, sigma_b: float = SIGMA_B,
                 top: float = EDGE_PERCENTILE) -> float:
    """Focus blur (Gaussian sigma, px) from the strongest edges of a float image.

    Peak gradients after smoothing with sigma_a and sigma_b give
    r² = (σ₀² + σa²)/(σ₀² + σb²), so σ₀² = (r²σb² − σa²)/(1 − r²) (0 for a sharp image).
    """
    if min(grey.shape) < 8 or float(np.ptp(grey)) < 1e-3:
        return 0.0
    ga = ndimage.gaussian_gradient_magnitude(grey, sigma_a)
    gb = ndimage.gaussian_gradient_magnitude(grey, sigma_b)
    return _blur_from_peaks(float(np.percentile(ga, top)), float(np.percentile(gb, top)),
                            sigma_a, sigma_b)


def noise_std(grey: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Noise std from the lower quartile of the absolute Laplacian (a pure-noise Laplacian is
    Gaussian with std √20·σ; the lower quartile is least inflated by real texture), over
    ``mask`` (e.g. tissue: saturated glass shows no noise) when given."""
    lap = np.abs(ndimage.laplace(grey.astype(np.float32)))
    vals = lap[mask] if mask is not None and mask.sum() > 100 else lap
    return float(np.percentile(vals, 25)) / NOISE_P25


@dataclass(frozen=True)
class LocalConditions:
    """Per window of ``window_px``: stain scales, blur (px), noise (grey levels), tissue share."""

    window_px: int
    stains: np.ndarray        # (3, 3) slide-wide unit vectors
    i0: np.ndarray            # (3,) glass
    nucleus_dir: np.ndarray   # (gy, gx, 3) unit OD colour of the window's dark nuclei
    scale_h: np.ndarray       # (gy, gx) multiplier of the synthetic haematoxylin amounts
    scale_e: np.ndarray
    blur_px: np.ndarray
    noise: np.ndarray
    tissue: np.ndarray        # share of tissue pixels

    def at(self, x_px: np.ndarray, y_px: np.ndarray) -> np.ndarray:
        """Window index (row · gx + col) of points in background px."""
        gy, gx = self.scale_h.shape
        col = np.clip((np.asarray(x_px) // self.window_px).astype(np.int64), 0, gx - 1)
        row = np.clip((np.asarray(y_px) // self.window_px).astype(np.int64), 0, gy - 1)
        return row * gx + col


def local_conditions(rgb: np.ndarray, window_px: int) -> LocalConditions:
    """Measure :class:`LocalConditions` of an RGB background on a grid of square windows.

    The haematoxylin of synthetic cells takes the colour and strength of the window's dark
    nuclei (median OD of its pixels above the 97th percentile of H: real nuclei carry some eosin
    too, which makes them purple rather than blue), and eosin the stroma's strength (median E)
    relative to the renderer's reference amounts, so a synthetic cell drawn with its usual
    amounts comes out as dark, as purple and as pink as the real tissue around it. Windows with
    little tissue borrow the slide-wide median.
    """
    i0 = glass_intensity(rgb)
    od = optical_density(rgb, i0)
    stains = macenko_stains(od)
    conc = concentrations(od, stains)
    grey = od.sum(-1)
    tissue = grey > OD_TISSUE_MIN
    ga = ndimage.gaussian_gradient_magnitude(grey, SIGMA_A)
    gb = ndimage.gaussian_gradient_magnitude(grey, SIGMA_B)
    lap = np.abs(ndimage.laplace(rgb.mean(-1, dtype=np.float32)))
    h, w = grey.shape
    gy, gx = max(1, -(-h // window_px)), max(1, -(-w // window_px))
    out = {k: np.full((gy, gx), np.nan) for k in ("h", "e", "blur", "noise", "tissue")}
    nuc_dir = np.full((gy, gx, 3), np.nan)
    for r in range(gy):
        for c in range(gx):
            sl = (slice(r * window_px, (r + 1) * window_px),
                  slice(c * window_px, (c + 1) * window_px))
            tis = tissue[sl]
            out["tissue"][r, c] = float(tis.mean())
            if tis.sum() < 200:
                continue
            a, b = ga[sl][tis], gb[sl][tis]
            out["blur"][r, c] = _blur_from_peaks(float(np.percentile(a, EDGE_PERCENTILE)),
                                                 float(np.percentile(b, EDGE_PERCENTILE)),
                                                 SIGMA_A, SIGMA_B)
            out["noise"][r, c] = float(np.percentile(lap[sl][tis], 25)) / NOISE_P25
            cw = conc[sl][tis]
            dark = cw[:, 0] >= np.percentile(cw[:, 0], 97)
            nuc = np.median(od[sl][tis][dark], axis=0)
            out["h"][r, c] = float(np.linalg.norm(nuc)) / REF_NUCLEUS_OD
            nuc_dir[r, c] = nuc / max(float(np.linalg.norm(nuc)), 1e-6)
            out["e"][r, c] = np.median(cw[:, 1]) / REF_STROMA_E
    for k in ("h", "e", "blur", "noise"):
        fill = np.nanmedian(out[k]) if np.isfinite(out[k]).any() else 1.0
        out[k] = np.where(np.isfinite(out[k]), out[k], fill)
    if np.isfinite(nuc_dir).all(-1).any():
        fill_dir = np.nanmedian(nuc_dir.reshape(-1, 3), axis=0)
    else:
        fill_dir = stains[0]
    nuc_dir = np.where(np.isfinite(nuc_dir), nuc_dir, fill_dir / np.linalg.norm(fill_dir))
    return LocalConditions(int(window_px), stains, i0, nuc_dir, np.clip(out["h"], 0.4, 2.5),
                           np.clip(out["e"], 0.4, 2.5), np.clip(out["blur"], 0.0, 4.0),
                           np.clip(out["noise"], 0.0, 12.0), out["tissue"])
