"""Hybrid slides: synthetic target cells rendered into real tissue (``cellclf synth-hybrid``).

Data flow: ``backgrounds`` (real RGB + its real nuclei) → ``local_optics`` (stain vectors, and
per window of :data:`WINDOW_UM`: stain amounts, focus blur, noise) → :func:`place_cells`
(eosinophils, neutrophils, mast cells and their ambiguous forms, plus plasma cells leaning to
mast cells, at a density per mm² of tissue; they may overlap real nuclei, which then partly hide
behind them) → :func:`blend` (the cells drawn by the synthetic renderer's own ``cells`` stamps,
in the window's stain vectors and amounts, blurred to its focus, with its noise, mixed into the
background in optical density) → pyramidal JPEG TIFF/SVS + QuPath GeoJSON truth. Every real
nucleus is labelled with the model's catch-all class; ``nucleus_source`` says whether it came
from point annotations or from the classical detector. Deterministic per seed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from cellclf.annotations.geojson import write_points
from cellclf.errors import ConfigError
from cellclf.model.config import DataConfig
from cellclf.wsi.jpeg_tiles import array_tile_fn, write_pyramid_tiff

from .backgrounds import Background, load_background
from .celltypes import CELL_TYPES, EOS, MAST, MAX_RADIUS_UM, NEU, NO_TYPE, PLA
from .local_optics import LocalConditions, local_conditions, optical_density
from .placement import finish_cells, hard_core, new_cells
from .render import add_cells
from .textures import texture_bank

WINDOW_UM = 128.0           # stain / focus / noise are measured per window of this size
TILE_PX = 512               # blending tile
OCCLUSION = 0.9             # share of the tissue OD a synthetic cell replaces under itself
HIDE_SHARE = 0.6            # real nuclei closer than this × target radius are hidden (dropped)
MIN_TISSUE = 0.85           # tissue share a target's disc must have
PLACE_OD_MIN = 0.3          # summed OD of tissue a cell may sit in (not fat, lumen or glass)
# Synthetic cells per mm² of tissue by type (ambiguous look-alike plasma cells included).
DEFAULT_SHARES: dict[int, float] = {EOS: 0.35, NEU: 0.3, MAST: 0.25, PLA: 0.1}
REAL_NUCLEUS_CLASS = DataConfig.other_class


@dataclass(frozen=True)
class HybridResult:
    slide: Path
    truth: Path
    n_synthetic: int
    n_real: int
    n_hidden: int
    nucleus_source: str


def _tissue_mask(rgb: np.ndarray, cond: LocalConditions, radius_px: float) -> np.ndarray:
    """Share of tissue within about ``radius_px`` of each pixel (float32)."""
    od = optical_density(rgb, cond.i0).sum(-1)
    return ndimage.uniform_filter((od > PLACE_OD_MIN).astype(np.float32),
                                  max(3, int(2 * radius_px)))


def place_cells(bg: Background, cond: LocalConditions, seed: int, difficulty: float,
                per_mm2: float) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic cells (CELL_DTYPE, µm) on tissue, and a bool mask of real nuclei they hide."""
    rng = np.random.default_rng([int(seed), 0x4B1D])
    px = bg.mpp
    h, w = bg.rgb.shape[:2]
    tissue = _tissue_mask(bg.rgb, cond, 6.0 / px)
    area_mm2 = float(tissue.mean()) * h * w * (px * 1e-3) ** 2
    parts = []
    for code, share in DEFAULT_SHARES.items():
        n = int(rng.poisson(per_mm2 * share * area_mm2 * 3.0))      # oversampled, thinned below
        x = rng.uniform(0, w * px, n)
        y = rng.uniform(0, h * px, n)
        parts.append(new_cells(rng, code, x, y))
    cells = np.concatenate(parts)
    finish_cells(rng, 0.15 * float(difficulty) + 0.05, cells)
    cells["amb_with"][cells["type"] == PLA] = MAST            # plasma cells: mast look-alikes
    cells["mix"][cells["type"] == PLA] = rng.uniform(0.3, 0.8, int((cells["type"] == PLA).sum()))
    ix = np.clip((cells["x"] / px).astype(np.int64), 0, w - 1)
    iy = np.clip((cells["y"] / px).astype(np.int64), 0, h - 1)
    ok = tissue[iy, ix] >= MIN_TISSUE
    rad = cells["diam"] / 2
    if len(bg.nuclei_xy):
        tree = cKDTree(bg.nuclei_xy * px)
        dist, _ = tree.query(np.column_stack([cells["x"], cells["y"]]))
        ok &= dist >= HIDE_SHARE * rad * 0.8                  # no real nucleus at the very centre
    cells = cells[ok]
    cells = cells[hard_core(cells)]
    keep_n = rng.permutation(len(cells))[: int(rng.poisson(per_mm2 * area_mm2))]
    cells = cells[np.sort(keep_n)]
    hidden = np.zeros(len(bg.nuclei_xy), bool)
    if len(cells) and len(bg.nuclei_xy):
        tree = cKDTree(np.column_stack([cells["x"], cells["y"]]))
        for i, idx in enumerate(tree.query_ball_point(bg.nuclei_xy * px,
                                                      HIDE_SHARE * MAX_RADIUS_UM)):
            for j in idx:
                d = np.hypot(*(bg.nuclei_xy[i] * px - (cells["x"][j], cells["y"][j])))
                if d < HIDE_SHARE * cells["diam"][j] / 2:
                    hidden[i] = True
    return cells, hidden


def _blend_tile(bg: Background, cond: LocalConditions, cells: np.ndarray, bank, x0: int,
                y0: int, tw: int, th: int, rng: np.random.Generator) -> np.ndarray:
    px = bg.mpp
    tile = bg.rgb[y0:y0 + th, x0:x0 + tw]
    blur_max = float(cond.blur_px.max())
    margin = int(np.ceil(3 * blur_max)) + 2
    reach = MAX_RADIUS_UM + (margin + 1) * px
    near = ((cells["x"] > x0 * px - reach) & (cells["x"] < (x0 + tw) * px + reach)
            & (cells["y"] > y0 * px - reach) & (cells["y"] < (y0 + th) * px + reach))
    if not near.any():
        return tile
    sub = cells[near]
    win = cond.at(sub["x"] / px, sub["y"] / px)
    od_cells = np.zeros((3, th, tw), np.float32)
    cov = np.zeros((th, tw), np.float32)
    noise = np.zeros((th, tw), np.float32)
    gx = cond.scale_h.shape[1]
    for k in np.unique(win):
        r, c = divmod(int(k), gx)
        canvas = np.zeros((4, th + 2 * margin, tw + 2 * margin), np.float32)
        add_cells(canvas, sub[win == k], px, (x0 - margin) * px, (y0 - margin) * px, bank, px)
        sigma = float(cond.blur_px[r, c])
        if sigma >= 0.3:
            canvas = ndimage.gaussian_filter(canvas, (0, sigma, sigma), mode="constant")
        canvas = canvas[:, margin:margin + th, margin:margin + tw]
        stains = np.stack([cond.nucleus_dir[r, c] * cond.scale_h[r, c],
                           cond.stains[1] * cond.scale_e[r, c], cond.stains[2]])
        od_cells += np.einsum("shw,sc->chw", canvas[:3], stains.astype(np.float32))
        c_cov = np.minimum(canvas[3], 1.0)
        cov += c_cov
        noise = np.maximum(noise, c_cov * float(cond.noise[r, c]))
    cov = np.minimum(cov, 1.0)
    od_bg = optical_density(tile, cond.i0).transpose(2, 0, 1)
    od = od_bg * (1.0 - OCCLUSION * cov)[None] + od_cells
    out = cond.i0[:, None, None].astype(np.float32) * np.exp(-od)
    out += rng.standard_normal(out.shape).astype(np.float32) * noise[None]
    blended = np.clip(out + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return np.where(cov[..., None] > 0.0, blended, tile)


def blend(bg: Background, cond: LocalConditions, cells: np.ndarray, seed: int) -> np.ndarray:
    """The background with the cells drawn in (RGB uint8, same shape), tile by tile."""
    h, w = bg.rgb.shape[:2]
    bank = texture_bank(int(seed), bg.mpp, (0.0, 0.0), 0.0)
    out = np.empty_like(bg.rgb)
    for y0 in range(0, h, TILE_PX):
        for x0 in range(0, w, TILE_PX):
            th, tw = min(TILE_PX, h - y0), min(TILE_PX, w - x0)
            rng = np.random.default_rng([int(seed), 0xB1E4D, y0, x0])
            out[y0:y0 + th, x0:x0 + tw] = _blend_tile(bg, cond, cells, bank, x0, y0, tw, th,
                                                      rng)
    return out


def _truth_items(bg: Background, cells: np.ndarray, hidden: np.ndarray):
    mpp = bg.mpp
    for c in cells:
        name = CELL_TYPES[int(c["type"])]
        amb = int(c["amb_with"])
        yield (float(c["x"]) / mpp, float(c["y"]) / mpp, name, {
            "ambiguous": amb != NO_TYPE, "ambiguous_with": CELL_TYPES[amb] if amb != NO_TYPE
            else None, "diameter_um": round(float(c["diam"]), 2), "synthetic": True,
            "nucleus_source": "synthetic"})
    for (x, y), cls, hide in zip(bg.nuclei_xy, bg.nuclei_class, hidden, strict=True):
        if hide:
            continue
        yield (float(x), float(y), REAL_NUCLEUS_CLASS, {
            "ambiguous": False, "ambiguous_with": None, "diameter_um": None, "synthetic": False,
            "nucleus_source": bg.nucleus_source, "source_class": cls or None})


def render_hybrid(out_dir, background, seed: int = 0, difficulty: float = 0.3,
                  mpp: float | None = None, background_mpp: float | None = None,
                  per_mm2: float = 300.0, fmt: str = "tiff", name: str | None = None,
                  region: tuple[int, int, int, int] | None = None,
                  max_tiles: int | None = None, quality: int = 90) -> HybridResult:
    """Render a hybrid slide into ``out_dir``; see the module docstring."""
    if not (isinstance(seed, int) and seed >= 0):
        raise ConfigError(f"hybrid slide seed must be a whole number ≥ 0, got {seed!r}")
    if not 0.0 <= float(difficulty) <= 1.0:
        raise ConfigError(f"hybrid slide difficulty must be between 0 and 1, got {difficulty!r}")
    if not 0.0 < float(per_mm2) <= 5000.0:
        raise ConfigError(f"--cells-per-mm2 must be in (0, 5000], got {per_mm2!r}; real "
                          "hotspots reach ~1000 eosinophils per mm²")
    if fmt not in ("tiff", "svs"):
        raise ConfigError(f"unknown hybrid slide format {fmt!r}; use tiff or svs")
    if name is not None and not re.fullmatch(r"[\w.\-]+", name):
        raise ConfigError(f"hybrid slide name {name!r} must be a plain file name")
    if mpp is not None and not 0.1 <= float(mpp) <= 2.0:
        raise ConfigError(f"hybrid slide mpp must be between 0.1 and 2 µm/px, got {mpp!r}")
    bg = load_background(background, mpp, background_mpp, region, max_tiles)
    cond = local_conditions(bg.rgb, max(32, round(WINDOW_UM / bg.mpp)))
    cells, hidden = place_cells(bg, cond, seed, difficulty, per_mm2)
    rgb = blend(bg, cond, cells, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = name or f"hybrid_{bg.name}_s{seed}_d{difficulty:g}"
    slide = out / f"{name}.{'svs' if fmt == 'svs' else 'tif'}"
    truth = out / f"{name}.geojson"
    h, w = rgb.shape[:2]
    tmp = slide.with_name(slide.name + ".part")
    write_pyramid_tiff(tmp, w, h, array_tile_fn(rgb), bg.mpp, quality=int(quality),
                       aperio=fmt == "svs", photometric="rgb")   # (its "ycbcr" path
    # stores RGB samples under a YCbCr tag on this tifffile: colours come back wrong)
    write_points(truth, _truth_items(bg, cells, hidden))
    tmp.replace(slide)
    return HybridResult(slide, truth, len(cells), int((~hidden).sum()), int(hidden.sum()),
                        bg.nucleus_source)
