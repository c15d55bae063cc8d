"""A slide's own stain: haematoxylin and eosin OD vectors, glass level and nuclear H level.

Sits in front of the classical detector: pixels sampled from a slide's tissue (or a tile set)
→ :func:`estimate_stain` → :func:`adapt_params` puts the estimate into
:class:`~cellclf.detect.classical.DetectParams`, so detection runs in that slide's stain space
instead of the fixed Ruifrok–Johnston vectors and glass 245. Pure numpy.

The maths (Macenko et al., ISBI 2009, with a glass estimate in front):

1. glass: the per-channel median of bright, grey pixels (min channel ≥ ``glass_min``, spread
   ≤ ``glass_spread``) when at least ``glass_share`` of the sample is such; otherwise the default
   (a tile set filled with tissue shows no glass);
2. optical density ``OD = -log(max(I, 1) / glass)``; pixels with ‖OD‖ < ``od_min`` (glass, pale
   background) are left out;
3. the plane of the two largest principal directions of the OD vectors (no centring), each pixel's
   angle in it, and the angles' ``alpha`` and ``100 - alpha`` percentiles → two stain vectors;
   haematoxylin is the one that absorbs red more (larger R component).

The estimate is refused (the default returned, ``source="default"``) when there are too few
stained pixels or the two vectors come out nearly parallel or far from H&E (a blank or
single-colour sample); the reason is kept in ``note``.

The nuclear level (:func:`nuclear_level`, :func:`level_params`) is what the default classical
detector takes from a slide: the haematoxylin OD its darkest tissue reaches (the
``NUCLEAR_QUANTILE`` percentile of H over tissue pixels, in the detector's own stain space) becomes
``DetectParams.hem_cap``, the H amount counted as "fully nuclear", never below the 0.8 tuned on
synthetic slides. On a darkly stained slide, dense cytoplasm and keratin then stop saturating
the nuclear map the way nuclei do. Measured (docs/benchmarks.md, "Classical detector at the
slide's nuclear level"): cpm15 40x and bm_graz F1 up by about 0.06 and 0.05, crchisto and cpm15
20x unchanged, synthetic candidates unchanged within 0.2 %.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from cellclf.detect.classical import RJ_HE, DetectParams, stain_projection

DEFAULT_GLASS = 245.0
NUCLEAR_QUANTILE = 90.0  # percentile of tissue H taken as the slide's nuclear H level
HEM_CAP_RANGE = (0.8, 2.0)  # hem_cap bounds: never below the default tuned on synthetic slides
TISSUE_OD = 0.3  # summed RGB optical density above which a pixel is tissue
SAMPLE_TILES = 12  # tissue tiles a slide's sample holds (as the slide guard's)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


RJ_H = tuple(float(x) for x in _unit(RJ_HE[0]))
RJ_E = tuple(float(x) for x in _unit(RJ_HE[1]))


@dataclass(frozen=True)
class StainEstimate:
    """Unit OD vectors of haematoxylin and eosin (r, g, b) and the glass intensity per channel."""

    haematoxylin: tuple[float, float, float] = RJ_H
    eosin: tuple[float, float, float] = RJ_E
    glass: tuple[float, float, float] = (DEFAULT_GLASS,) * 3
    source: str = "default"  # "macenko" | "default"
    n_pixels: int = 0  # stained pixels the vectors were fitted on
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def estimate_glass(rgb: np.ndarray, glass_min: float = 205.0, glass_spread: float = 18.0,
                   glass_share: float = 0.005) -> tuple[float, float, float] | None:
    """Per-channel glass intensity from bright grey pixels (N×3 uint8), or None if too few."""
    px = np.asarray(rgb).reshape(-1, 3)
    lo, hi = px.min(axis=1), px.max(axis=1)
    grey = (lo >= glass_min) & (hi.astype(np.int16) - lo <= glass_spread)
    if grey.sum() < max(50, glass_share * len(px)):
        return None
    g = np.median(px[grey].astype(np.float64), axis=0)
    return (float(g[0]), float(g[1]), float(g[2]))


def estimate_stain(rgb: np.ndarray, od_min: float = 0.15, alpha: float = 1.0,
                   min_pixels: int = 2000) -> StainEstimate:
    """Macenko stain vectors and glass level of RGB pixels (any shape ending in 3, uint8)."""
    px = np.asarray(rgb, dtype=np.uint8).reshape(-1, 3)
    glass = estimate_glass(px)
    glass_note = "" if glass is not None else "no glass in the sample: glass 245 assumed; "
    g = np.asarray(glass if glass is not None else (DEFAULT_GLASS,) * 3)
    od = -np.log(np.maximum(px.astype(np.float64), 1.0) / g)
    od = od[(np.linalg.norm(od, axis=1) >= od_min) & (od.min(axis=1) > -0.05)]
    default = StainEstimate(glass=tuple(float(x) for x in g), n_pixels=len(od))
    if len(od) < min_pixels:
        return replace(default, note=f"{glass_note}only {len(od)} stained pixels "
                                     f"(< {min_pixels}): Ruifrok-Johnston vectors kept")
    _, _, vt = np.linalg.svd(od, full_matrices=False)
    plane = vt[:2]
    plane[0] *= np.sign(plane[0].sum()) or 1.0  # first direction points into positive OD
    proj = od @ plane.T
    angle = np.arctan2(proj[:, 1], proj[:, 0])
    a_lo, a_hi = np.percentile(angle, [alpha, 100.0 - alpha])
    v1 = _unit(np.cos(a_lo) * plane[0] + np.sin(a_lo) * plane[1])
    v2 = _unit(np.cos(a_hi) * plane[0] + np.sin(a_hi) * plane[1])
    h, e = (v1, v2) if v1[0] > v2[0] else (v2, v1)
    cos_he = float(h @ e)
    close_to_he = float(h @ np.asarray(RJ_H)) > 0.8 and float(e @ np.asarray(RJ_E)) > 0.8
    if cos_he > 0.95 or not close_to_he or (h < -0.2).any() or (e < -0.2).any():
        return replace(default, note=f"{glass_note}Macenko vectors H {np.round(h, 3).tolist()} "
                                     f"E {np.round(e, 3).tolist()} are not H&E-like: "
                                     "Ruifrok-Johnston vectors kept")
    return StainEstimate(tuple(float(x) for x in h), tuple(float(x) for x in e),
                         tuple(float(x) for x in g), "macenko", len(od), glass_note.strip("; "))


def sample_pixels(tiles: list[np.ndarray], max_pixels: int = 400_000, seed: int = 0) -> np.ndarray:
    """Up to ``max_pixels`` RGB pixels (N×3 uint8) drawn evenly from a list of tiles."""
    rng = np.random.default_rng(seed)
    per = max(1, max_pixels // max(1, len(tiles)))
    out = []
    for t in tiles:
        px = np.asarray(t).reshape(-1, 3)
        out.append(px if len(px) <= per else px[rng.choice(len(px), per, replace=False)])
    return np.concatenate(out) if out else np.zeros((0, 3), np.uint8)


def adapt_params(params: DetectParams, stain: StainEstimate) -> DetectParams:
    """``params`` detecting in ``stain``'s space (its vectors and glass)."""
    return replace(params, stain_he=(stain.haematoxylin, stain.eosin), glass_rgb=stain.glass)


def sample_stain(sample: list[np.ndarray]) -> StainEstimate:
    """The stain estimate of tiles already read: ``run_slide`` passes the slide guard's tissue
    sample (:meth:`~cellclf.wsi.tile_reader.TileReader.tissue_sample`), read once."""
    if not sample:
        return StainEstimate(note="no tissue tiles: Ruifrok-Johnston vectors and glass 245")
    return estimate_stain(sample_pixels(sample))


def nuclear_level(rgb: np.ndarray, params: DetectParams, quantile: float = NUCLEAR_QUANTILE,
                  min_pixels: int = 2000) -> float | None:
    """Haematoxylin OD a sample's nuclei reach: the ``quantile`` percentile of H over its tissue
    pixels (summed OD > ``TISSUE_OD``), in ``params``' stain space (vectors and glass); None when
    fewer than ``min_pixels`` pixels are tissue."""
    px = np.asarray(rgb, dtype=np.uint8).reshape(-1, 3).astype(np.float32)
    glass = np.asarray(params.glass_per_channel(), dtype=np.float32)
    od = np.clip(-np.log(np.maximum(px, 1.0) / glass), 0.0, None)
    tissue = od.sum(axis=1) > TISSUE_OD
    if tissue.sum() < min_pixels:
        return None
    hv, _ = stain_projection(params)
    return float(np.percentile(od[tissue] @ hv, quantile))


def level_params(params: DetectParams, rgb: np.ndarray) -> DetectParams:
    """``params`` with ``hem_cap`` set to the nuclear level of the pixels ``rgb`` (clipped to
    ``HEM_CAP_RANGE``); unchanged when the sample holds too little tissue."""
    level = nuclear_level(rgb, params)
    if level is None:
        return params
    return replace(params, hem_cap=float(np.clip(level, *HEM_CAP_RANGE)))
