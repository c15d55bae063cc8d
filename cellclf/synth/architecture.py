"""Synthetic slides, style v2: tissue architecture and real-range optics on top of v1.

What v2 adds (``cellclf synth --style v2``; v1 stays the default and renders byte-identical):

- **glands**: elliptical crypts/acini in deep stroma, a crowded ring of columnar epithelial cells
  (long axis radial, overlapping) around a lumen, with an eosinophilic apical band; stroma cells
  are kept out of them. Drawn per 256 µm block from their own seed stream, so ``placement``
  (cells) and ``render`` (lumen and band) agree without passing anything around;
- **crowding**: lymphoid aggregates (thousands per mm²) and a looser hard-core rule for
  non-target cells, so nuclei touch and overlap as in real inflamed stroma;
- **larger vessels** full of red cells;
- **stroma texture**: clefts between collagen bundles, out-of-plane "ghost" nuclei (faint
  haematoxylin smudges) and uneven staining across the slide;
- **optics**: stain vectors, concentration scales, glass, blur, noise and JPEG quality spread
  over the range seen between labs and scanners even at difficulty 0.
"""

from __future__ import annotations

import numpy as np

from .celltypes import EPI, EXCLUSION_FACTOR, FIB, LYM, MAC, PLA

BLOCK_UM = 256.0                   # must match placement.BLOCK_UM
GLAND_DENSITY = 16.0               # glands per mm² of deep stroma
GLAND_RADIUS_UM = (28.0, 65.0)     # outer half-axis
GLAND_REACH_UM = 70.0              # no gland reaches further from its centre
EPI_LAYER = (0.62, 1.0)            # epithelial layer between these shares of the outer radius
CELL_SPACING_UM = 4.2              # columnar nuclei along the ring (they overlap)
VESSEL_RADIUS_V2_UM = (5.0, 28.0)
VESSEL_DENSITY_FACTOR_V2 = 1.6
# Looser hard core (crowding) for non-target cells; pairs use the smaller factor of the two.
EXCLUSION_FACTOR_V2: dict[int, float] = {**EXCLUSION_FACTOR, LYM: 0.55, PLA: 0.7, EPI: 0.55,
                                         FIB: 0.55, MAC: 0.7}
GLAND_DTYPE = np.dtype([("x", "f8"), ("y", "f8"), ("a", "f4"), ("b", "f4"), ("angle", "f4")])


def block_glands(layout, by: int, bx: int) -> np.ndarray:
    """Glands whose centre lies in block (by, bx) (GLAND_DTYPE; deterministic per block)."""
    rng = np.random.default_rng([int(layout.seed), 0x61A4D, int(by), int(bx)])
    x0, y0 = bx * BLOCK_UM, by * BLOCK_UM
    n = int(rng.poisson(GLAND_DENSITY * (BLOCK_UM * 1e-3) ** 2))
    g = np.zeros(n, GLAND_DTYPE)
    g["x"] = rng.uniform(x0, x0 + BLOCK_UM, n)
    g["y"] = rng.uniform(y0, y0 + BLOCK_UM, n)
    g["a"] = rng.uniform(*GLAND_RADIUS_UM, n)
    g["b"] = g["a"] * rng.uniform(0.55, 1.0, n)
    g["angle"] = rng.uniform(0, np.pi, n)
    if n == 0:
        return g
    d, idx, th = layout.depth(g["x"], g["y"])
    ok = (d > g["a"] + 10.0) & (layout.epithelium_weight(d, idx, th) < 0.05)
    return g[ok]


def glands_near(layout, x0_um: float, y0_um: float, x1_um: float, y1_um: float) -> np.ndarray:
    """All glands that may reach into the box (µm)."""
    r = GLAND_REACH_UM
    rows = range(max(0, int((y0_um - r) // BLOCK_UM)), int((y1_um + r) // BLOCK_UM) + 1)
    cols = range(max(0, int((x0_um - r) // BLOCK_UM)), int((x1_um + r) // BLOCK_UM) + 1)
    parts = [block_glands(layout, by, bx) for by in rows for bx in cols]
    return np.concatenate(parts) if parts else np.zeros(0, GLAND_DTYPE)


def gland_level(glands: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smallest normalised elliptical radius (1 = a gland's outer edge) at points."""
    out = np.full(np.broadcast(x, y).shape, np.inf)
    for g in glands:
        ca, sa = np.cos(g["angle"]), np.sin(g["angle"])
        dx, dy = x - g["x"], y - g["y"]
        u = (dx * ca + dy * sa) / g["a"]
        v = (-dx * sa + dy * ca) / g["b"]
        out = np.minimum(out, np.sqrt(u * u + v * v))
    return out


def gland_cells(rng: np.random.Generator, glands: np.ndarray, new_cells) -> list[np.ndarray]:
    """Columnar epithelial cells around each gland, long axis radial (``new_cells`` from
    placement builds the rows)."""
    out = []
    mid = 0.5 * (EPI_LAYER[0] + EPI_LAYER[1])
    for g in glands:
        a, b = float(g["a"]) * mid, float(g["b"]) * mid
        perim = np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b)))
        n = max(6, int(perim / CELL_SPACING_UM))
        t = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
        t = t + rng.normal(0, 0.25 * 2 * np.pi / n, n)
        jitter = 1.0 + rng.normal(0, 0.04, n)
        ca, sa = np.cos(g["angle"]), np.sin(g["angle"])
        lu, lv = a * np.cos(t) * jitter, b * np.sin(t) * jitter
        x = g["x"] + lu * ca - lv * sa
        y = g["y"] + lu * sa + lv * ca
        normal = np.arctan2(a * np.sin(t), b * np.cos(t)) + g["angle"]
        out.append(new_cells(rng, EPI, x, y, angle=normal + rng.normal(0, 0.12, n)))
    return out


def _gland_level_grid(glands: np.ndarray, xs_um: np.ndarray, ys_um: np.ndarray,
                      margin_um: float) -> np.ndarray:
    """:func:`gland_level` on the grid ys × xs (float32), evaluated only inside each gland's
    bounding box grown by ``margin_um`` (inf elsewhere: no gland there)."""
    out = np.full((len(ys_um), len(xs_um)), np.inf, np.float32)
    for g in glands:
        reach = float(g["a"]) * 1.05 + margin_um
        c0, c1 = np.searchsorted(xs_um, [g["x"] - reach, g["x"] + reach])
        r0, r1 = np.searchsorted(ys_um, [g["y"] - reach, g["y"] + reach])
        if c1 <= c0 or r1 <= r0:
            continue
        sub = gland_level(g[None], xs_um[None, c0:c1], ys_um[r0:r1, None])
        np.minimum(out[r0:r1, c0:c1], sub, out=out[r0:r1, c0:c1])
    return out


def gland_stains(layout, xs_um: np.ndarray, ys_um: np.ndarray, aa_um: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(replace, h, e) on the pixel grid: the share of stroma a gland replaces, and the
    haematoxylin / eosin it puts there (epithelial cytoplasm, apical band, lumen secretion);
    None where no gland reaches the region."""
    glands = glands_near(layout, xs_um[0], ys_um[0], xs_um[-1], ys_um[-1])
    if len(glands) == 0:
        return None
    level = _gland_level_grid(glands, np.asarray(xs_um), np.asarray(ys_um), 2.0 * aa_um + 2.0)
    if not np.isfinite(level).any() or level.min() > 1.05:
        return None
    scale = float(np.mean(glands["b"]))
    inside = np.clip((1.0 - level) * scale / aa_um + 0.5, 0.0, 1.0)
    lumen = np.clip((EPI_LAYER[0] - level) * scale / aa_um + 0.5, 0.0, 1.0)
    band = np.exp(-(((level - EPI_LAYER[0] - 0.03) * scale / 1.5) ** 2))
    epi = inside - lumen
    h = 0.10 * epi
    e = 0.30 * epi + 0.25 * band * inside + 0.04 * lumen
    return inside.astype(np.float32), h.astype(np.float32), e.astype(np.float32)


def jittered_stain(rng: np.random.Generator, vectors, spreads, scale_sd: float,
                   d: float) -> np.ndarray:
    """Stain matrix (3×3 OD rows): each unit vector jittered by ``spread·d`` and renormalised,
    then scaled by ``exp(N(0, scale_sd·d))``; the draw order is fixed (slides stay deterministic)."""
    rows = []
    for vec, spread in zip(vectors, spreads, strict=True):
        v = np.asarray(vec, np.float64) / np.linalg.norm(vec)
        v = np.clip(v + rng.normal(0.0, spread * d, 3), 0.01, None)
        rows.append(v / np.linalg.norm(v))
    scale = np.exp(rng.normal(0.0, scale_sd * d, 3))
    return np.asarray(rows) * scale[:, None]


def optics_v2(seed: int, difficulty: float, stain_h, stain_e, stain_d):
    """Stain vectors × scales, glass, blur µm, noise, JPEG quality over a real-world range."""
    d = 0.4 + 0.6 * float(difficulty)
    rng = np.random.default_rng([int(seed), 0x0971C6])
    stain = jittered_stain(rng, (stain_h, stain_e, stain_d), (0.12, 0.10, 0.06), 0.28, d)
    i0 = np.clip(242.0 + d * (rng.uniform(-12.0, 8.0) + rng.normal(0.0, 3.0, 3)), 222.0, 254.0)
    blur = 0.12 + 0.9 * d * float(rng.uniform(0.3, 1.0))
    noise = 1.2 + 4.0 * d * float(rng.uniform(0.5, 1.0))
    quality = int(round(92 - 22 * d * float(rng.uniform(0.3, 1.0))))
    return stain.astype(np.float32), i0.astype(np.float32), blur, noise, quality
