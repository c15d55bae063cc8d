"""Synthetic slides: what each cell type looks like, in stain concentrations (MORPHOLOGY.md).

One function per type draws a :class:`~cellclf.synth.stamps.Group` of cells and returns the
(h, e, d, coverage) stamp channels. Concentrations are in optical-density units per stain
vector (``render`` turns them into RGB with Beer–Lambert). Ambiguous cells (``mix`` > 0) are
drawn that far towards their look-alike: a degranulated eosinophil, a two-lobed neutrophil with
pinker granules, a mast cell with an eccentric nucleus and a halo, a granular plasma cell.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .celltypes import EOS, EPI, FIB, LYM, MAC, MAST, NEU, PLA, RBC
from .stamps import Group, compose, disc_stack, ellipse_sd, lerp, outline, strand_stack

Channels = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

# Cytoplasm (h, e, d) of the two look-alike granulocytes; ambiguous cells interpolate.
EOS_CYTO = (0.05, 1.05, 0.34)
NEU_CYTO = (0.07, 0.30, 0.04)


def _chain(g: Group, n_lobes: np.ndarray, step: np.ndarray, turn: np.ndarray) -> tuple:
    """Lobe centres along a curved chain, centred on the cell: (N, 5, 2) and validity."""
    n = len(n_lobes)
    k = np.arange(5)[None]
    valid = k < n_lobes[:, None]
    heading = np.cumsum(np.where(k >= 1, turn[:, None], 0.0), axis=1)
    steps = np.where((k >= 1) & valid, step[:, None], 0.0)
    pu = np.cumsum(steps * np.cos(heading), axis=1)
    pv = np.cumsum(steps * np.sin(heading), axis=1)
    cnt = valid.sum(1, keepdims=True)
    pu -= (pu * valid).sum(1, keepdims=True) / cnt
    pv -= (pv * valid).sum(1, keepdims=True) / cnt
    out = np.zeros((n, 5, 2), np.float32)
    out[..., 0], out[..., 1] = pu, pv
    return out, valid


def _granulocyte(g: Group, t: np.ndarray, eos_like: np.ndarray, n_lobes: np.ndarray,
                 step: np.ndarray, lobe_r: np.ndarray, dark: np.ndarray) -> Channels:
    """Shared drawing of eosinophils and neutrophils; ``eos_like`` 0..1 sets the cytoplasm."""
    c = g.cells
    rad = g.col(c["diam"] / 2)
    cyto = outline(g, rad, rad * g.col(c["aspect"]), 0.04)
    u = c["u"]
    turn = np.where(u[:, 5] > 0.5, 1.0, -1.0) * (0.5 + 0.6 * u[:, 3])
    centres, valid = _chain(g, n_lobes, step, turn)
    centres[..., 1] += ((u[:, 2] - 0.5) * 1.0)[:, None]
    nuc = np.maximum(disc_stack(g, centres, valid, np.repeat(lobe_r[:, None], 5, 1), 0.85),
                     strand_stack(g, centres, valid, 0.35))
    coarse = g.texture("coarse", 0, 1)
    fine = g.texture("fine", 1, 0)
    speck = g.texture("speckle", 4, 3)
    w = g.col(eos_like)
    gran = lerp(fine, coarse, w)
    amp = lerp(0.25, 0.85, w)
    base = [lerp(NEU_CYTO[i], EOS_CYTO[i], w) for i in range(3)]
    cyto_c = (base[0], base[1] * np.maximum(1.0 + amp * (gran - 1.0), 0.0),
              base[2] * (0.5 + 0.5 * gran))
    dk = g.col(dark)
    nucleus = (dk * (0.85 + 0.15 * speck), 0.25, 0.06)
    return compose(cyto, nuc, cyto_c, nucleus)


def eosinophil(g: Group) -> Channels:
    """12–17 µm, bilobed 'spectacles' nucleus, abundant coarse bright eosin granules."""
    c = g.cells
    t = c["mix"]
    u = c["u"]
    n = np.full(len(c), 2)
    step = 4.0 + 1.5 * u[:, 0]
    lobe_r = 2.0 + 0.6 * u[:, 1]
    eos_like = 1.0 - t          # degranulated: paler, finer, towards neutrophil cytoplasm
    return _granulocyte(g, t, eos_like, n, step, lobe_r, 1.75 + 0.1 * t)


def neutrophil(g: Group) -> Channels:
    """10–12 µm, 3–5 dark lobes joined by thin strands, pale pink fine cytoplasm."""
    c = g.cells
    t = c["mix"]
    u = c["u"]
    amb = t > 0
    n = np.where(amb, 2, 3 + (u[:, 0] > 0.4) + (u[:, 0] > 0.85))
    step = np.where(amb, lerp(2.6, 4.6, t), 2.1 + 0.5 * u[:, 1])
    lobe_r = lerp(1.35 + 0.35 * u[:, 1], 2.1, t)
    return _granulocyte(g, t, t, n, step, lobe_r, lerp(1.95, 1.85, t))


def _plasma_like(g: Group, ecc_share: np.ndarray, clock: np.ndarray, halo_w: np.ndarray,
                 gran_w: np.ndarray, rn: np.ndarray) -> Channels:
    """Shared drawing of mast cells and plasma cells (the look-alike pair).

    ecc_share: nucleus offset as a share of the free room; clock: clock-face chromatin weight;
    halo_w: perinuclear halo strength; gran_w: fine grey-purple granule weight.
    """
    c = g.cells
    rad = g.col(c["diam"] / 2)
    b = rad * g.col(c["aspect"])
    cyto = outline(g, rad, b, 0.05)
    rn = g.col(rn)
    ecc = np.minimum(g.col(ecc_share) * np.maximum(rad - rn - 0.6, 0.0), 0.8 * rn)
    qu = g.u - ecc
    rq = np.sqrt(qu * qu + g.v * g.v) + 1e-6
    nuc = g.cov(ellipse_sd(qu, g.v, rn, rn * (0.85 + 0.15 * g.uni(1))))
    speck = g.texture("speckle", 2, 3)
    fine = g.texture("fine", 3, 4)
    k = np.floor(5 + 3 * g.uni(5))
    phi = np.arctan2(g.v, qu)
    spokes = np.clip(np.cos(k * phi + 6.28 * g.uni(0)), 0.0, 1.0) ** 2
    ring = np.exp(-(((rq - 0.72 * rn) / (0.17 * rn)) ** 2))
    clumps = ring * spokes + 0.8 * np.exp(-((rq / (0.22 * rn)) ** 2))
    cw = g.col(clock)
    h_n = (1 - cw) * 1.25 * (0.85 + 0.15 * speck) + cw * (1.15 + 0.9 * clumps)
    gw = g.col(gran_w)
    gran = 1.0 + 0.9 * gw * (fine - 1.0)
    hu = g.u - (ecc - rn - 0.9)
    halo = np.exp(-(hu * hu + g.v * g.v) / (1.4 ** 2)) * g.col(halo_w)
    pale = 1.0 - 0.6 * halo
    cyto_c = (lerp(0.62, 0.45, gw) * gran * pale, lerp(0.30, 0.32, gw) * gran * pale,
              lerp(0.05, 0.15, gw) * pale)
    return compose(cyto, nuc, cyto_c, (h_n, 0.2, 0.04), see_through=g.col(0.3 * gran_w))


def mast_cell(g: Group) -> Channels:
    """8–20 µm, round/oval or spindly; single central nucleus; fine dense grey-purple granules."""
    c = g.cells
    t = c["mix"]
    rn = np.minimum(2.2 + 1.0 * c["u"][:, 0], 0.6 * c["diam"] / 2 * c["aspect"] + 0.8)
    return _plasma_like(g, ecc_share=lerp(0.1 * c["u"][:, 2], 0.6, t), clock=0.8 * t,
                        halo_w=t, gran_w=1.0 - 0.9 * t, rn=rn)


def plasma_cell(g: Group) -> Channels:
    """8–15 µm oval; eccentric clock-face nucleus, perinuclear halo, basophilic cytoplasm."""
    c = g.cells
    t = c["mix"]
    rn = np.minimum(2.2 + 0.8 * c["u"][:, 0], 0.8 * c["diam"] / 2 * c["aspect"])
    return _plasma_like(g, ecc_share=lerp(0.7, 0.15, t), clock=1.0 - 0.8 * t, halo_w=1.0 - t,
                        gran_w=0.9 * t, rn=rn)


def lymphocyte(g: Group) -> Channels:
    """7–9 µm; round, very dark nucleus filling the cell; scant basophilic rim."""
    c = g.cells
    rad = g.col(c["diam"] / 2)
    cyto = outline(g, rad, rad * g.col(c["aspect"]), 0.03)
    rn = 0.78 * rad
    nuc = outline(g, rn, rn * g.col(c["aspect"]), 0.05, du=0.15 * rad * (g.uni(2) - 0.5))
    speck = g.texture("speckle", 0, 1)
    return compose(cyto, nuc, (0.28, 0.12, 0.03), (2.1 * (0.8 + 0.2 * speck), 0.2, 0.05))


def epithelial(g: Group) -> Channels:
    """Columnar cell in a sheet: oval vesicular nucleus (chromatin rim, nucleolus)."""
    c = g.cells
    a = g.col(c["diam"] / 2)
    b = a * g.col(c["aspect"])
    sd_cell = ellipse_sd(g.u, g.v, a, b)
    cyto = 0.35 * g.cov(sd_cell)
    rim = cyto - 0.35 * g.cov(sd_cell - 0.5)
    an = 3.4 + 1.4 * g.uni(0)
    bn = np.minimum(2.0 + 0.5 * g.uni(1), 0.9 * b)
    qu = g.u - (g.uni(2) - 0.5) * 1.5
    sd_n = ellipse_sd(qu, g.v, an, bn)
    nuc = g.cov(sd_n)
    n_rim = nuc - g.cov(sd_n - 0.55)
    nu = qu - (g.uni(3) - 0.5) * an * 0.7
    nucleolus = g.cov(0.55 - np.sqrt(nu * nu + g.v * g.v))
    speck = g.texture("speckle", 4, 5)
    h_n = 0.8 * (0.8 + 0.2 * speck) + 0.5 * n_rim + 0.6 * nucleolus
    return compose(cyto, nuc, (0.10, 0.36 + 0.5 * rim, 0.03), (h_n, 0.12 + 0.2 * nucleolus, 0.03))


def fibroblast(g: Group) -> Channels:
    """Spindle nucleus 10–18 µm long, 1.6–2.6 µm wide, tapered; faint spindle cytoplasm."""
    c = g.cells
    a = g.col(c["diam"] / 2)
    b = 0.8 + 0.5 * g.uni(0)
    s = np.clip(1.0 - (g.u / a) ** 2, 0.0, 1.0) ** 0.7
    nuc = g.cov(b * s - np.abs(g.v)) * (np.abs(g.u) < a)
    s2 = np.clip(1.0 - (g.u / (1.5 * a)) ** 2, 0.0, 1.0) ** 0.7
    cyto = 0.7 * g.cov(1.9 * b * s2 - np.abs(g.v))
    speck = g.texture("speckle", 1, 2)
    return compose(cyto, nuc, (0.05, 0.30, 0.03), (1.5 * (0.85 + 0.15 * speck), 0.2, 0.04))


def red_cell(g: Group) -> Channels:
    """Smooth 7–8 µm eosin disc with a paler centre; no nucleus."""
    c = g.cells
    rad = g.col(c["diam"] / 2)
    disc = outline(g, rad, rad * g.col(c["aspect"]), 0.02)
    r2 = g.u * g.u + g.v * g.v
    e = 1.05 * (0.85 + 0.3 * g.uni(0)) * (1.0 - 0.28 * np.exp(-r2 / (0.45 * rad) ** 2))
    return disc * 0.0, disc * e, disc * 0.12, disc


def macrophage(g: Group) -> Channels:
    """15–25 µm, irregular, foamy pale cytoplasm; vesicular round/kidney nucleus."""
    c = g.cells
    rad = g.col(c["diam"] / 2)
    cyto = outline(g, rad, rad * g.col(c["aspect"]), 0.08)
    foam = g.texture("foam", 0, 1)
    lace = np.clip(1.25 - 0.3 * foam, 0.35, 1.4)
    rn = 2.8 + 1.0 * g.uni(2)
    ecc = 0.22 * rad * g.uni(3)
    qu = g.u - ecc
    sd = rn - np.sqrt(qu * qu + g.v * g.v)
    notch = 0.8 * rn - np.sqrt((qu - 0.9 * rn) ** 2 + g.v * g.v)
    sd = np.minimum(sd, -notch)
    nuc = g.cov(sd)
    rim = nuc - g.cov(sd - 0.5)
    speck = g.texture("speckle", 4, 5)
    h_n = 0.75 * (0.8 + 0.2 * speck) + 0.45 * rim
    return compose(cyto, nuc, (0.10 * lace, 0.24 * lace, 0.04), (h_n, 0.15, 0.04))


DRAW: dict[int, Callable[[Group], Channels]] = {
    EOS: eosinophil, NEU: neutrophil, MAST: mast_cell, LYM: lymphocyte, PLA: plasma_cell,
    EPI: epithelial, FIB: fibroblast, RBC: red_cell, MAC: macrophage,
}
