"""Synthetic slides, step 2: which cells exist, block by block (a local, deterministic rule).

The plane is cut into square blocks of :data:`BLOCK_UM`. The candidates of a block come from an
RNG seeded by (slide seed, block row, block column) and the slide layout (densities per mm²,
thinned by position). A candidate survives unless a conflicting candidate (centres closer than
``f·(r_i + r_j)``) of higher priority exists in its own or a neighbouring block (a Matérn type II
hard-core rule). So the cells of any block — and hence of any tile — are known from its 3×3
neighbourhood alone: no pass over the whole slide, identical for any number of workers.
Output: one structured array (:data:`CELL_DTYPE`) per block row, used by the truth writer and
by the tile renderer.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from .architecture import (
    EXCLUSION_FACTOR_V2,
    VESSEL_DENSITY_FACTOR_V2,
    VESSEL_RADIUS_V2_UM,
    block_glands,
    gland_cells,
    gland_level,
    glands_near,
)
from .celltypes import (
    AMBIGUOUS_WITH,
    ASPECT,
    CELL_TYPES,
    DIAMETER_UM,
    EOS,
    EPI,
    EXCLUSION_FACTOR,
    EXCLUSION_RADIUS_UM,
    FIB,
    MAST,
    NEU,
    NO_TYPE,
    PLA,
    RBC,
)
from .layout import EPITHELIAL_DENSITY, FIELD_FIBRE, VESSEL_DENSITY, SlideLayout

BLOCK_UM = 256.0
STRAY_UM = 16.0       # cells of a vessel may lie this far outside their block
N_UNIFORMS = 8
CELL_DTYPE = np.dtype([
    ("x", "f8"), ("y", "f8"),            # centre, µm
    ("type", "u1"), ("amb_with", "u1"),  # type code; type an ambiguous cell leans to (or 255)
    ("diam", "f4"), ("angle", "f4"), ("aspect", "f4"),
    ("mix", "f4"),                       # 0 = typical; 0.3-0.8 = that far towards amb_with
    ("ex", "f4"), ("prio", "f4"),        # exclusion radius µm, hard-core priority
    ("u", "f4", (N_UNIFORMS,)),          # per-cell uniforms for shape details
])
STROMA_TYPES = ("eosinophil", "neutrophil", "mast_cell", "lymphocyte", "plasma_cell",
                "fibroblast", "macrophage")
INFLAMMATORY = {"eosinophil", "neutrophil", "lymphocyte", "plasma_cell"}


def n_blocks(layout: SlideLayout) -> tuple[int, int]:
    """(rows, cols) of blocks covering the slide."""
    return (int(np.ceil(layout.height_um / BLOCK_UM)), int(np.ceil(layout.width_um / BLOCK_UM)))


def _block_box(layout: SlideLayout, by: int, bx: int) -> tuple[float, float, float, float]:
    return (bx * BLOCK_UM, by * BLOCK_UM, min((bx + 1) * BLOCK_UM, layout.width_um),
            min((by + 1) * BLOCK_UM, layout.height_um))


def _stroma_density(layout: SlideLayout, name: str, x: np.ndarray, y: np.ndarray,
                    edema: np.ndarray) -> np.ndarray:
    lam = np.full(x.shape, layout.base_density[name])
    if name in INFLAMMATORY:
        lam = lam * layout.inflammation(x, y)
    if name == "lymphocyte" and layout.v2:
        lam = lam + layout.hot_density(x, y, layout.lymph_foci)
    if name == "eosinophil":
        lam = lam + layout.hot_density(x, y, layout.hotspots)
    elif name == "neutrophil":
        lam = lam + layout.hot_density(x, y, layout.neutro_foci)
    elif name == "fibroblast":
        lam = lam * (1.0 - 0.6 * edema)
    return lam


def _stroma_bound(layout: SlideLayout, name: str, box) -> float:
    lam = layout.base_density[name]
    if name in INFLAMMATORY:
        lam *= layout.inflammation_max
    if name == "lymphocyte" and layout.v2:
        lam += layout.hot_bound(box, layout.lymph_foci)
    if name == "eosinophil":
        lam += layout.hot_bound(box, layout.hotspots)
    elif name == "neutrophil":
        lam += layout.hot_bound(box, layout.neutro_foci)
    return lam


def _empty() -> np.ndarray:
    return np.zeros(0, CELL_DTYPE)


def new_cells(rng: np.random.Generator, code: int, x: np.ndarray, y: np.ndarray,
               angle: np.ndarray | None = None, diam: np.ndarray | None = None) -> np.ndarray:
    n = len(x)
    c = np.zeros(n, CELL_DTYPE)
    c["x"], c["y"], c["type"] = x, y, code
    lo, mode, hi = DIAMETER_UM[code]
    c["diam"] = rng.triangular(lo, mode, hi, n) if diam is None else diam
    c["angle"] = rng.uniform(0, 2 * np.pi, n) if angle is None else angle
    c["aspect"] = rng.uniform(*ASPECT[code], n)
    c["prio"] = rng.random(n)
    c["u"] = rng.random((n, N_UNIFORMS))
    c["amb_with"] = NO_TYPE
    return c


def _vessels(rng: np.random.Generator, layout: SlideLayout, box, area_mm2: float) -> list:
    """Small vessels: a cluster of red cells in a lumen lined by flat endothelial nuclei."""
    density = VESSEL_DENSITY * (VESSEL_DENSITY_FACTOR_V2 if layout.v2 else 1.0)
    n = rng.poisson(density * area_mm2)
    vx = rng.uniform(box[0], box[2], n)
    vy = rng.uniform(box[1], box[3], n)
    rv = rng.uniform(*(VESSEL_RADIUS_V2_UM if layout.v2 else (5.0, 14.0)), n)
    d, idx, th = layout.depth(vx, vy)
    ok = (d > 30.0) & (layout.epithelium_weight(d, idx, th) < 0.05)
    out = []
    for cx, cy, r in zip(vx[ok], vy[ok], rv[ok], strict=True):
        k = max(1, int(round(rng.uniform(0.4, 0.9) * r * r / 3.5 ** 2)))
        rad = (r - 3.2) * np.sqrt(rng.random(k))
        phi = rng.uniform(0, 2 * np.pi, k)
        out.append(new_cells(rng, RBC, cx + rad * np.cos(phi), cy + rad * np.sin(phi)))
        m = max(3, int(round(2 * np.pi * r / 12.0)))
        phi = rng.uniform(0, 2 * np.pi) + np.arange(m) * 2 * np.pi / m
        ring = r + 1.6
        endo = new_cells(rng, FIB, cx + ring * np.cos(phi), cy + ring * np.sin(phi),
                          angle=phi + np.pi / 2, diam=rng.uniform(8.0, 12.0, m))
        out.append(endo)
    return out


def block_candidates(layout: SlideLayout, by: int, bx: int) -> np.ndarray:
    """All candidate cells of one block, before the hard-core rule (deterministic)."""
    box = _block_box(layout, by, bx)
    if box[2] <= box[0] or box[3] <= box[1]:
        return _empty()
    rng = np.random.default_rng([int(layout.seed), 0xB10C, int(by), int(bx)])
    area_mm2 = (box[2] - box[0]) * (box[3] - box[1]) * 1e-6
    parts: list[np.ndarray] = []
    # density-driven types: Poisson at the block's bound, then thinning by the local density
    names = (*STROMA_TYPES, "epithelial")
    bounds = [(_stroma_bound(layout, n, box) if n != "epithelial" else EPITHELIAL_DENSITY)
              for n in names]
    counts = rng.poisson(np.asarray(bounds) * area_mm2)
    xs = rng.uniform(box[0], box[2], counts.sum())
    ys = rng.uniform(box[1], box[3], counts.sum())
    keep_u = rng.random(counts.sum())
    d, idx, th = layout.depth(xs, ys)
    epi_w = layout.epithelium_weight(d, idx, th)
    edema = np.clip(0.5 + 0.35 * layout.field(0, xs, ys), 0.0, 1.0)
    start = 0
    for name, bound, cnt in zip(names, bounds, counts, strict=True):
        sl = slice(start, start + cnt)
        start += cnt
        if cnt == 0:
            continue
        x, y = xs[sl], ys[sl]
        if name == "epithelial":
            lam = EPITHELIAL_DENSITY * epi_w[sl] * (d[sl] > 6.0)
        else:
            lam = _stroma_density(layout, name, x, y, edema[sl])
            lam = lam * (1.0 - epi_w[sl]) * (d[sl] > 4.0)
        ok = keep_u[sl] * bound < lam
        if not ok.any():
            continue
        code = CELL_TYPES.index(name)
        if code == EPI:
            angle = th[sl][ok]                                   # long axis normal to the surface
        elif code == FIB:
            f = layout.field(FIELD_FIBRE, x[ok], y[ok])
            angle = np.where(f > 0, *layout.fibre_angles) + rng.normal(0, 0.2, ok.sum())
        else:
            angle = None
        parts.append(new_cells(rng, code, x[ok], y[ok], angle=angle))
    parts.extend(_vessels(rng, layout, box, area_mm2))
    if layout.v2:
        parts = _with_glands(rng, layout, box, by, bx, parts)
    if not parts:
        return _empty()
    c = np.concatenate(parts)
    finish_cells(rng, layout.ambiguous_share, c)
    inside = (c["x"] >= 0) & (c["x"] < layout.width_um) & (c["y"] >= 0) & (
        c["y"] < layout.height_um)
    return c[inside]


def _with_glands(rng, layout: SlideLayout, box, by: int, bx: int, parts: list) -> list:
    """v2: stroma cells of the block leave the glands that reach it; its own glands add their
    epithelium."""
    near = glands_near(layout, *box)
    if len(near) and parts:
        parts = [p[gland_level(near, p["x"], p["y"]) > 1.05] for p in parts]
    return parts + gland_cells(rng, block_glands(layout, by, bx), new_cells)


def finish_cells(rng: np.random.Generator, share: float, c: np.ndarray) -> None:
    """Ambiguity flags (a ``share`` of look-alike-able cells drawn towards their look-alike
    type) and exclusion radii, in place."""
    amb_u = rng.random(len(c))
    mix = rng.uniform(0.3, 0.8, len(c))
    for code, other in AMBIGUOUS_WITH.items():
        sel = (c["type"] == code) & (amb_u < share)
        c["amb_with"][sel] = other
        c["mix"][sel] = mix[sel]
    # an ambiguous cell's size moves towards its look-alike's typical size
    for code, target in ((EOS, 12.0), (NEU, 12.8), (MAST, 11.0), (PLA, 12.0)):
        sel = (c["type"] == code) & (c["amb_with"] != NO_TYPE)
        c["diam"][sel] += (target - c["diam"][sel]) * c["mix"][sel]
    ex = 0.5 * c["diam"] * np.sqrt(c["aspect"])
    for code, fixed in EXCLUSION_RADIUS_UM.items():
        if fixed is not None:
            ex[c["type"] == code] = fixed
    c["ex"] = ex


def hard_core(cands: np.ndarray, factors: dict[int, float] | None = None) -> np.ndarray:
    """Matérn II rule: bool mask of candidates with no higher-priority conflicting neighbour
    (``factors`` per type code; default :data:`EXCLUSION_FACTOR`)."""
    n = len(cands)
    keep = np.ones(n, bool)
    if n < 2:
        return keep
    xy = np.column_stack([cands["x"], cands["y"]])
    table = EXCLUSION_FACTOR if factors is None else factors
    factor = np.asarray([table[int(t)] for t in range(len(CELL_TYPES))], np.float32)
    f = factor[cands["type"]]
    ex = cands["ex"]
    pairs = cKDTree(xy).query_pairs(float(f.max() * 2 * ex.max()), output_type="ndarray")
    if len(pairs) == 0:
        return keep
    i, j = pairs[:, 0], pairs[:, 1]
    dist = np.hypot(xy[i, 0] - xy[j, 0], xy[i, 1] - xy[j, 1])
    clash = dist < np.minimum(f[i], f[j]) * (ex[i] + ex[j])
    i, j = i[clash], j[clash]
    loser = np.where(cands["prio"][i] < cands["prio"][j], i, j)
    keep[loser] = False
    return keep


def block_row_cells(layout: SlideLayout, by: int) -> np.ndarray:
    """Surviving cells of block row ``by``, ordered by block column then candidate order."""
    rows, cols = n_blocks(layout)
    strip: list[np.ndarray] = []
    own: list[np.ndarray] = []
    for r in range(by - 1, by + 2):
        if r < 0 or r >= rows:
            continue
        for bxx in range(cols):
            cand = block_candidates(layout, r, bxx)
            strip.append(cand)
            own.append(np.full(len(cand), r == by))
    if not strip:
        return _empty()
    cands = np.concatenate(strip)
    mine = np.concatenate(own)
    keep = hard_core(cands, EXCLUSION_FACTOR_V2 if layout.v2 else None)
    return cands[keep & mine]
