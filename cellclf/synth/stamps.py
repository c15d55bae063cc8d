"""Synthetic slides: the stamp machinery shared by all cell drawings.

A group of N cells of one type is drawn at once into an (N, S, S) stack of small local patches
("stamps") around their centres, in stain concentrations (haematoxylin, eosin, residual) plus a
coverage channel; ``render`` adds the stamps into the tile canvas. All shape parameters are in µm
so the same cell looks the same at any pixel size; edges are anti-aliased over one pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .textures import TextureBank


@dataclass
class Group:
    """Local coordinates of a stamp stack: u along each cell's long axis, v across (µm)."""

    cells: np.ndarray          # structured CELL_DTYPE rows
    u: np.ndarray              # (N, S, S) float32
    v: np.ndarray
    px_um: float
    bank: TextureBank
    size: int
    oy: np.ndarray             # (N,) stamp top-left row in the canvas
    ox: np.ndarray
    aa: float                  # edge width in µm: one pixel, or wider to show focus blur

    def col(self, values) -> np.ndarray:
        """Per-cell values shaped (N, 1, 1) for broadcasting over the stamp."""
        return np.asarray(values, np.float32).reshape(-1, 1, 1)

    def uni(self, k: int) -> np.ndarray:
        """The k-th per-cell uniform in [0, 1), shaped (N, 1, 1)."""
        return self.col(self.cells["u"][:, k])

    def cov(self, sd: np.ndarray) -> np.ndarray:
        """Coverage 0..1 from a signed distance in µm (positive inside)."""
        return np.clip(sd * (1.0 / self.aa) + 0.5, 0.0, 1.0)

    def texture(self, name: str, k1: int, k2: int) -> np.ndarray:
        """Per-cell window into a granule texture, offsets from uniforms k1, k2."""
        offs = np.column_stack([self.cells["u"][:, k1], self.cells["u"][:, k2]])
        return self.bank.sample_cells(name, offs, self.size)


def make_group(cells: np.ndarray, px_um: float, x0_um: float, y0_um: float,
               bank: TextureBank, aa_um: float) -> Group:
    """Stamp coordinates for cells; canvas pixel (0, 0) has its top-left corner at (x0, y0) µm."""
    diam = float(cells["diam"].max())
    size = int(np.ceil((diam * 1.15 + aa_um) / px_um)) + 4
    cx = (cells["x"] - x0_um) / px_um
    cy = (cells["y"] - y0_um) / px_um
    ox = np.floor(cx).astype(np.int64) - size // 2
    oy = np.floor(cy).astype(np.int64) - size // 2
    ar = np.arange(size, dtype=np.float64) + 0.5
    gx = ((ox[:, None] + ar[None] - cx[:, None]) * px_um).astype(np.float32)[:, None, :]
    gy = ((oy[:, None] + ar[None] - cy[:, None]) * px_um).astype(np.float32)[:, :, None]
    ang = cells["angle"].astype(np.float32)
    ca = np.cos(ang)[:, None, None]
    sa = np.sin(ang)[:, None, None]
    u = gx * ca + gy * sa
    v = -gx * sa + gy * ca
    return Group(cells, u, v, px_um, bank, size, oy, ox, aa_um)


def ellipse_sd(u: np.ndarray, v: np.ndarray, a, b) -> np.ndarray:
    """Approximate signed distance (µm, positive inside) to an ellipse with half-axes a, b."""
    ua = u / a
    vb = v / b
    k = np.sqrt(ua * ua + vb * vb) + 1e-6
    grad = np.sqrt((ua / a) ** 2 + (vb / b) ** 2) / k + 1e-6
    return (1.0 - k) / grad


def wobble(g: Group, u: np.ndarray, v: np.ndarray, amp: float, k1: int, k2: int) -> np.ndarray:
    """Radial irregularity factor 1 + a2·cos(2φ+·) + a3·cos(3φ+·) of an outline."""
    r = np.sqrt(u * u + v * v) + 1e-6
    c, s = u / r, v / r
    c2, s2 = c * c - s * s, 2 * c * s
    c3, s3 = c2 * c - s2 * s, s2 * c + c2 * s
    p2 = g.uni(k1) * (2 * np.pi)
    p3 = g.uni(k2) * (2 * np.pi)
    return 1.0 + amp * (c2 * np.cos(p2) + s2 * np.sin(p2)) + 0.7 * amp * (
        c3 * np.cos(p3) + s3 * np.sin(p3))


def outline(g: Group, a, b, amp: float = 0.04, du=0.0, dv=0.0) -> np.ndarray:
    """Coverage of a slightly irregular ellipse (half-axes a along u, b along v)."""
    u = g.u - du
    v = g.v - dv
    w = wobble(g, u, v, amp, 6, 7)
    return g.cov(ellipse_sd(u / w, v / w, a, b))


def disc_stack(g: Group, centres: np.ndarray, valid: np.ndarray, radius: np.ndarray,
               aspect: float = 1.0) -> np.ndarray:
    """Union (max) of discs per cell: centres (N, L, 2) in (u, v) µm, radius (N, L)."""
    du = g.u[:, None] - centres[:, :, 0, None, None]
    dv = (g.v[:, None] - centres[:, :, 1, None, None]) / aspect
    sd = radius[:, :, None, None] - np.sqrt(du * du + dv * dv)
    sd = np.where(valid[:, :, None, None], sd, -1e3)
    return g.cov(sd.max(axis=1))


def strand_stack(g: Group, centres: np.ndarray, valid: np.ndarray, width: float) -> np.ndarray:
    """Union of thin segments joining consecutive valid centres (N, L, 2); width = radius µm."""
    a = centres[:, :-1]
    b = centres[:, 1:]
    ok = valid[:, :-1] & valid[:, 1:]
    ab = b - a
    len2 = (ab ** 2).sum(-1) + 1e-6
    pu = g.u[:, None] - a[:, :, 0, None, None]
    pv = g.v[:, None] - a[:, :, 1, None, None]
    t = np.clip((pu * ab[:, :, 0, None, None] + pv * ab[:, :, 1, None, None])
                / len2[:, :, None, None], 0.0, 1.0)
    du = pu - t * ab[:, :, 0, None, None]
    dv = pv - t * ab[:, :, 1, None, None]
    sd = width - np.sqrt(du * du + dv * dv)
    sd = np.where(ok[:, :, None, None], sd, -1e3)
    return g.cov(sd.max(axis=1))


def lerp(a, b, t):
    """a + (b - a)·t."""
    return a + (b - a) * t


def compose(cyto_cov: np.ndarray, nuc: np.ndarray, cyto: tuple, nucleus: tuple,
            see_through: float = 0.0) -> tuple[np.ndarray, ...]:
    """Stamp channels (h, e, d, coverage) of a cell: nucleus over cytoplasm.

    ``see_through`` is the share of cytoplasm (e.g. granules) still seen on top of the nucleus.
    """
    keep = cyto_cov * (1.0 - nuc * (1.0 - see_through))
    h = keep * cyto[0] + nuc * nucleus[0]
    e = keep * cyto[1] + nuc * nucleus[1]
    d = keep * cyto[2] + nuc * nucleus[2]
    return h, e, d, np.maximum(cyto_cov, nuc)
