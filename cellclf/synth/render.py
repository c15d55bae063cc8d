"""Synthetic slides, step 3: pixels of one region, rendered in optical density.

Input: the slide layout, the per-slide optics (stain vectors, blur, noise, JPEG quality) and the
cells near the region (from ``placement``). Output: RGB uint8 of any region at any pixel size.
Stain amounts are accumulated per structure (stroma texture, epithelial band, cell stamps), then
Beer–Lambert with (perturbed) Ruifrok–Johnston vectors gives intensity
``I = I0 · exp(−(c_H·h + c_E·e + c_D·d))``; focus blur and sensor noise follow. Everything is a
function of global coordinates, so adjacent regions rendered separately join without seams.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .architecture import gland_stains, jittered_stain, optics_v2
from .cells import DRAW
from .celltypes import MAX_RADIUS_UM
from .layout import FIELD_EDEMA, FIELD_FIBRE, SlideLayout
from .stamps import make_group
from .textures import texture_bank

# Ruifrok & Johnston stain vectors (normalised OD per RGB channel).
STAIN_H = (0.65, 0.70, 0.29)
STAIN_E = (0.07, 0.99, 0.11)
STAIN_D = (0.27, 0.57, 0.78)


@dataclass(frozen=True)
class Optics:
    """How one slide was stained and scanned (drawn from the seed, spread set by difficulty)."""

    stain: np.ndarray          # (3 stains, 3 RGB channels): vector × concentration scale
    i0: np.ndarray             # (3,) glass brightness per channel
    blur_um: float             # Gaussian focus blur, sigma in µm
    noise: float               # sensor noise std, grey levels at level 0
    jpeg_quality: int


def make_optics(seed: int, difficulty: float, style: str = "v1") -> Optics:
    """Per-slide stain/scanner variation; difficulty 0 gives the reference lab and a clean scan
    (style v1) or a draw from the real-world range (v2, see ``architecture.optics_v2``)."""
    if style == "v2":
        return Optics(*optics_v2(seed, difficulty, STAIN_H, STAIN_E, STAIN_D))
    d = float(difficulty)
    rng = np.random.default_rng([int(seed), 0x0971C5])
    stain = jittered_stain(rng, (STAIN_H, STAIN_E, STAIN_D), (0.06, 0.05, 0.05), 0.2, d)
    i0 = np.clip(245.0 + d * (rng.uniform(-6.0, 5.0) + rng.normal(0.0, 2.0, 3)), 236.0, 252.0)
    blur = 0.08 + 0.7 * d * float(rng.uniform(0.5, 1.0))
    return Optics(stain.astype(np.float32), i0.astype(np.float32), blur, 0.8 + 4.0 * d,
                  int(round(92 - 12 * d)))


def _resize(grid: np.ndarray, gx0: float, gy0: float, step: float, xs_um: np.ndarray,
            ys_um: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of a coarse grid (nodes at gx0 + i·step) to pixel centres."""
    px = float(xs_um[1] - xs_um[0]) if len(xs_um) > 1 else step
    box = ((xs_um[0] - px / 2 - gx0) / step + 0.5, (ys_um[0] - px / 2 - gy0) / step + 0.5,
           (xs_um[-1] + px / 2 - gx0) / step + 0.5, (ys_um[-1] + px / 2 - gy0) / step + 0.5)
    img = Image.fromarray(np.ascontiguousarray(grid, np.float32))
    return np.asarray(img.resize((len(xs_um), len(ys_um)), Image.BILINEAR, box=box))


def _tissue_fields(layout: SlideLayout, xs_um: np.ndarray, ys_um: np.ndarray,
                   aa_um: float) -> tuple[np.ndarray | float, np.ndarray | float]:
    """Tissue coverage (0..1) and epithelial share at the pixel centres (arrays, or scalars
    where the whole region is glass / deep tissue), from a coarse grid of depths."""
    step = max(4.0, float(xs_um[1] - xs_um[0]) if len(xs_um) > 1 else 4.0)
    gx = np.arange(np.floor(xs_um[0] / step) - 1, np.ceil(xs_um[-1] / step) + 2) * step
    gy = np.arange(np.floor(ys_um[0] / step) - 1, np.ceil(ys_um[-1] / step) + 2) * step
    mx, my = np.meshgrid(gx, gy)
    d, idx, th = layout.depth(mx, my)
    if d.max() < -2.0 * aa_um - step:
        return 0.0, 0.0
    band = layout.epithelium_weight(d, idx, th)
    if d.min() > 2.0 * aa_um + step and band.max() == 0.0:
        return 1.0, 0.0
    depth = _resize(np.clip(d, -50.0, 50.0), gx[0], gy[0], step, xs_um, ys_um)
    tissue = np.clip(depth * (1.0 / aa_um) + 0.5, 0.0, 1.0)
    band_px = _resize(band, gx[0], gy[0], step, xs_um, ys_um) if band.max() > 0 else 0.0
    return tissue, band_px


def _stroma(layout: SlideLayout, bank, tissue, band, xs_um, ys_um, y0: int, x0: int
            ) -> np.ndarray:
    """(3, H, W) stain amounts of tissue without cells: collagen, oedema, epithelial band."""
    h, w = len(ys_um), len(xs_um)
    edema = np.clip(0.5 + 0.35 * layout.field_grid(FIELD_EDEMA, xs_um, ys_um), 0.0, 1.0)
    blend = np.clip(0.5 + 0.8 * layout.field_grid(FIELD_FIBRE, xs_um, ys_um), 0.0, 1.0)
    f1 = bank.sample_global("fibre1", y0, x0, h, w)
    f2 = bank.sample_global("fibre2", y0, x0, h, w)
    fib = f2 + blend * (f1 - f2)
    dense_e = np.maximum(0.42 + 0.12 * fib, 0.08)
    loose_e = 0.07 + 0.25 * np.clip(fib - 0.5, 0.0, None)
    e = dense_e + (loose_e - dense_e) * edema
    hh = 0.05 + 0.012 * fib - 0.025 * edema
    if not np.isscalar(band):
        e += (0.34 * (1.0 + 0.06 * fib) - e) * band
        hh += (0.10 - hh) * band
    if layout.v2:
        e = e * np.clip((fib + 1.5) / 0.5, 0.2, 1.0)          # clefts between bundles
        hh, e = _stroma_v2(layout, bank, hh, e, xs_um, ys_um, y0, x0)
    d = 0.02 + 0.15 * e                  # real eosin also absorbs some blue
    if np.isscalar(tissue):
        return np.stack([hh, e, d])
    return np.stack([hh * tissue, e * tissue, d * tissue])


def _stroma_v2(layout: SlideLayout, bank, hh, e, xs_um, ys_um, y0: int, x0: int):
    """v2 stroma: ghost nuclei, uneven staining and glands (``architecture``)."""
    h, w = len(ys_um), len(xs_um)
    hh = hh + 0.55 * bank.sample_global("ghost", y0, x0, h, w)
    uneven = np.exp(0.12 * layout.stain_grid(xs_um, ys_um))
    hh, e = hh * uneven, e * uneven
    px = float(xs_um[1] - xs_um[0]) if len(xs_um) > 1 else 1.0
    glands = gland_stains(layout, xs_um, ys_um, max(px, 0.5))
    if glands is not None:
        replace, gh, ge = glands
        keep = 1.0 - replace
        hh, e = hh * keep + gh, e * keep + ge
    return hh, e


def add_cells(canvas: np.ndarray, cells: np.ndarray, px_um: float, x0_um: float, y0_um: float,
               bank, aa_um: float) -> None:
    """Draw cells (any types) into the (4, H, W) canvas: h, e, d, coverage."""
    _, hh, ww = canvas.shape
    for code in np.unique(cells["type"]):
        group_cells = cells[cells["type"] == code]
        g = make_group(group_cells, px_um, x0_um, y0_um, bank, aa_um)
        stack = np.stack(DRAW[int(code)](g))           # (4, N, S, S)
        s = g.size
        for i in range(len(group_cells)):
            ya, xa = int(g.oy[i]), int(g.ox[i])
            yb, xb = ya + s, xa + s
            sy, sx = max(0, -ya), max(0, -xa)
            ey, ex = s - max(0, yb - hh), s - max(0, xb - ww)
            if ey <= sy or ex <= sx:
                continue
            canvas[:, ya + sy:ya + ey, xa + sx:xa + ex] += stack[:, i, sy:ey, sx:ex]


def _noise(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Uniform sensor noise of the given std (cheap: one random byte per sample)."""
    raw = np.frombuffer(rng.bytes(int(np.prod(shape))), np.int8).reshape(shape)
    return raw * np.float32(std / 73.9)


def render_region(layout: SlideLayout, optics: Optics, cells: np.ndarray, x0: int, y0: int,
                  w: int, h: int, px_um: float, noise_scale: float = 1.0) -> np.ndarray:
    """RGB uint8 (h, w, 3) of the region whose top-left pixel is (x0, y0) on a grid of
    ``px_um`` µm pixels. ``cells`` must include every cell within MAX_RADIUS_UM of it.

    Focus blur is part of the drawing (pre-blurred textures, edges softened to match), so
    regions need no margin and join exactly.
    """
    aa_um = max(px_um, float(np.hypot(0.25, 3.0 * optics.blur_um)))
    xs = (np.arange(x0, x0 + w) + 0.5) * px_um
    ys = (np.arange(y0, y0 + h) + 0.5) * px_um
    x0_um, y0_um = x0 * px_um, y0 * px_um
    near = np.zeros(0, bool)
    if len(cells):
        reach = MAX_RADIUS_UM + 2 * aa_um
        near = ((cells["x"] > x0_um - reach) & (cells["x"] < x0_um + w * px_um + reach)
                & (cells["y"] > y0_um - reach) & (cells["y"] < y0_um + h * px_um + reach))
    tissue, band = _tissue_fields(layout, xs, ys, aa_um)
    rng = np.random.default_rng([int(layout.seed), 0x401CE, int(round(px_um * 1e4)), x0, y0])
    noise = optics.noise * noise_scale
    out = np.empty((h, w, 3), np.uint8)
    if np.isscalar(tissue) and tissue == 0.0 and not near.any():       # blank glass
        for c in range(3):
            val = np.full((h, w), optics.i0[c] + 0.5, np.float32)
            if noise > 0:
                val += _noise(rng, (h, w), noise)
            out[..., c] = np.clip(val, 0.0, 255.0)
        return out
    bank = texture_bank(layout.seed, px_um, layout.fibre_angles, optics.blur_um, layout.style)
    conc = _stroma(layout, bank, tissue, band, xs, ys, y0, x0)
    if near.any():
        canvas = np.zeros((4, h, w), np.float32)
        add_cells(canvas, cells[near], px_um, x0_um, y0_um, bank, aa_um)
        keep = 1.0 - np.minimum(canvas[3], 1.0)
        conc *= keep[None]
        conc += canvas[:3]
    st = optics.stain
    for c in range(3):
        od = conc[0] * (-st[0, c])
        od += conc[1] * (-st[1, c])
        od += conc[2] * (-st[2, c])
        np.exp(od, out=od)
        od *= optics.i0[c]
        od += 0.5
        if noise > 0:
            od += _noise(rng, (h, w), noise)
        np.clip(od, 0.0, 255.0, out=od)
        out[..., c] = od
    return out
