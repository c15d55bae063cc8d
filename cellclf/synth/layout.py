"""Synthetic slides, step 1: the slide-wide layout (tissue islands, epithelium, hotspots, fields).

Everything here is geometry in micrometres, independent of pixel size, drawn from the slide seed
only, and small enough to pickle to every worker. The other synth steps ask it questions at
points: "how deep inside tissue is this point?", "how much epithelium / oedema is here?",
"what is the eosinophil density here?". ``placement`` turns the densities into cells per block;
``render`` turns the fields into stroma pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_HARMONICS = 6          # island outline: cosine harmonics k = 2..7 of the radius
N_WAVES = 6              # low-frequency fields: plane waves per field
FIELD_EDEMA, FIELD_FIBRE, FIELD_INFLAM = 0, 1, 2

# Background densities per mm² of stroma, as (low, high) ranges drawn once per slide.
BASE_DENSITY_RANGES: dict[str, tuple[float, float]] = {
    "eosinophil": (20.0, 80.0),
    "neutrophil": (30.0, 110.0),
    "mast_cell": (60.0, 220.0),
    "lymphocyte": (300.0, 1100.0),
    "plasma_cell": (150.0, 550.0),
    "fibroblast": (350.0, 700.0),
    "macrophage": (20.0, 60.0),
}
EPITHELIAL_DENSITY = 20000.0  # per mm² of epithelial band (before hard-core thinning)
VESSEL_DENSITY = 14.0         # small vessels (red cell clusters) per mm² of stroma
STYLES = ("v1", "v2")         # v1: the original cartoon; v2: tissue architecture (architecture.py)


@dataclass(frozen=True)
class SlideLayout:
    """The slide-wide random layout; see :func:`make_layout`."""

    width_um: float
    height_um: float
    seed: int
    difficulty: float
    islands: np.ndarray       # (n, 3 + 2H): cx, cy, R, amplitudes (H), phases (H)
    epithelium: np.ndarray    # (n, 3): direction of the lined surface, cos threshold, band width µm
    hotspots: np.ndarray      # (m, 4): cx, cy, sigma µm, peak eosinophils per mm²
    neutro_foci: np.ndarray   # (k, 4): cx, cy, sigma µm, peak neutrophils per mm²
    waves: np.ndarray         # (3, N_WAVES, 4): kx, ky (rad/µm), phase, amplitude
    base_density: dict[str, float]
    fibre_angles: tuple[float, float]   # orientation (rad) of the two collagen textures
    ambiguous_share: float
    style: str = "v1"
    lymph_foci: np.ndarray | None = None   # v2: (k, 4) lymphoid aggregates, like neutro_foci
    stain_wave: np.ndarray | None = None   # v2: (N_WAVES, 4) uneven staining across the slide

    @property
    def v2(self) -> bool:
        return self.style == "v2"

    def field(self, which: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Low-frequency field (mean 0, std ~1) at points in µm."""
        w = self.waves[which]
        out = np.zeros(np.broadcast(x, y).shape, np.float64)
        for kx, ky, ph, amp in w:
            out += amp * np.cos(kx * x + ky * y + ph)
        return out

    def field_grid(self, which: int, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """:meth:`field` on the grid ys × xs (float32 (len(ys), len(xs))), as a rank-2N
        product of separable cosines: cos(a + b) = cos a cos b − sin a sin b."""
        return _wave_grid(self.waves[which], xs, ys)

    def stain_grid(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """v2: the uneven-staining field (mean 0, std ~1) on the grid ys × xs."""
        return _wave_grid(self.stain_wave, xs, ys)

    def depth(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Depth inside tissue in µm (positive inside, negative on glass), the island index and
        the angle of the point seen from that island's centre."""
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        isl = self.islands
        dx = x[None] - isl[:, 0].reshape(-1, *([1] * x.ndim))
        dy = y[None] - isl[:, 1].reshape(-1, *([1] * x.ndim))
        r = np.hypot(dx, dy)
        th = np.arctan2(dy, dx)
        rho = np.ones_like(r)
        for k in range(N_HARMONICS):
            amp = isl[:, 3 + k].reshape(-1, *([1] * x.ndim))
            ph = isl[:, 3 + N_HARMONICS + k].reshape(-1, *([1] * x.ndim))
            rho += amp * np.cos((k + 2) * th + ph)
        depths = rho * isl[:, 2].reshape(-1, *([1] * x.ndim)) - r
        idx = np.argmax(depths, axis=0)
        d = np.take_along_axis(depths, idx[None], 0)[0]
        theta = np.take_along_axis(th, idx[None], 0)[0]
        return d, idx, theta

    def epithelium_weight(self, d: np.ndarray, idx: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """Share of epithelial lining (0..1) at points given their depth/island/angle."""
        ep = self.epithelium[idx]
        presence = np.clip((np.cos(theta - ep[..., 0]) - ep[..., 1]) / 0.3, 0.0, 1.0)
        inner = np.clip((ep[..., 2] - d) / 3.0 + 0.5, 0.0, 1.0)
        outer = np.clip(d / 1.0 + 0.5, 0.0, 1.0)
        return presence * inner * outer

    def hot_density(self, x: np.ndarray, y: np.ndarray, foci: np.ndarray) -> np.ndarray:
        """Sum of Gaussian density bumps (per mm²) at points."""
        out = np.zeros(np.broadcast(x, y).shape, np.float64)
        for cx, cy, sig, peak in foci:
            out += peak * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2.0 * sig * sig))
        return out

    def hot_bound(self, box: tuple[float, float, float, float], foci: np.ndarray) -> float:
        """Upper bound of :meth:`hot_density` over a box (x0, y0, x1, y1) in µm."""
        x0, y0, x1, y1 = box
        total = 0.0
        for cx, cy, sig, peak in foci:
            ddx = max(x0 - cx, 0.0, cx - x1)
            ddy = max(y0 - cy, 0.0, cy - y1)
            total += peak * np.exp(-(ddx * ddx + ddy * ddy) / (2.0 * sig * sig))
        return float(total)

    def inflammation(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Multiplier (about 0.3–3) for inflammatory cell densities."""
        return np.exp(0.6 * self.field(FIELD_INFLAM, x, y))

    @property
    def inflammation_max(self) -> float:
        return float(np.exp(0.6 * np.abs(self.waves[FIELD_INFLAM, :, 3]).sum()))


def _wave_grid(w: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Sum of plane waves ``w`` (N, 4) on the grid ys × xs (float32), as a rank-2N product of
    separable cosines."""
    ax = w[:, 0][None] * np.asarray(xs, np.float64)[:, None]              # (W, N)
    by = w[:, 1][None] * np.asarray(ys, np.float64)[:, None] + w[:, 2][None]
    left = np.concatenate([np.cos(by) * w[:, 3], -np.sin(by) * w[:, 3]], axis=1)
    right = np.concatenate([np.cos(ax), np.sin(ax)], axis=1)
    # einsum's own loop, not BLAS: BLAS threads thrash when every worker process spins them
    return np.einsum("yk,xk->yx", left.astype(np.float32), right.astype(np.float32),
                     optimize=False)


def _waves(rng: np.random.Generator, n_fields: int) -> np.ndarray:
    out = np.zeros((n_fields, N_WAVES, 4))
    for f in range(n_fields):
        lam = rng.uniform(400.0, 3000.0, N_WAVES)
        ang = rng.uniform(0, np.pi, N_WAVES)
        k = 2 * np.pi / lam
        out[f, :, 0] = k * np.cos(ang)
        out[f, :, 1] = k * np.sin(ang)
        out[f, :, 2] = rng.uniform(0, 2 * np.pi, N_WAVES)
        out[f, :, 3] = np.sqrt(2.0 / N_WAVES)     # sum of N cosines with this amplitude: std 1
    return out


def _islands(rng: np.random.Generator, w: float, h: float) -> np.ndarray:
    """One large island near the centre (so every slide has tissue) and 1-3 smaller
    fragments, placed mostly apart from it."""
    n = int(rng.integers(2, 5))
    side = min(w, h)
    rows = []
    for i in range(n):
        if i == 0:
            cx, cy = rng.uniform(0.4, 0.6) * w, rng.uniform(0.4, 0.6) * h
            radius = rng.uniform(0.28, 0.36) * side
        else:
            radius = rng.uniform(0.08, 0.2) * side
            for _ in range(20):
                mx, my = min(1.15 * radius, 0.5 * w), min(1.15 * radius, 0.5 * h)
                cx, cy = rng.uniform(mx, w - mx), rng.uniform(my, h - my)
                gap = np.hypot(cx - rows[0][0], cy - rows[0][1]) - rows[0][2] - 0.5 * radius
                if gap > 0:
                    break
        amps = rng.uniform(0.0, 1.0, N_HARMONICS) * 0.16 / np.arange(2, 2 + N_HARMONICS) ** 0.8
        phases = rng.uniform(0, 2 * np.pi, N_HARMONICS)
        rows.append([cx, cy, radius, *amps, *phases])
    return np.asarray(rows, np.float64)


def _points_in_tissue(rng: np.random.Generator, layout_depth, w: float, h: float, n: int,
                      min_depth: float) -> np.ndarray:
    pts: list[tuple[float, float]] = []
    for _ in range(200):
        if len(pts) >= n:
            break
        x = rng.uniform(0, w, 64)
        y = rng.uniform(0, h, 64)
        d = layout_depth(x, y)[0]
        ok = np.flatnonzero(d > min_depth)
        pts.extend((float(x[i]), float(y[i])) for i in ok[: n - len(pts)])
    return np.asarray(pts, np.float64).reshape(-1, 2)


def make_layout(width_um: float, height_um: float, seed: int, difficulty: float,
                style: str = "v1") -> SlideLayout:
    """Draw the slide-wide layout from the seed (deterministic). ``style`` "v2" draws more
    (lymphoid aggregates, uneven staining) after everything v1 draws, so v1 is unchanged."""
    rng = np.random.default_rng([int(seed), 0x5EED])
    islands = _islands(rng, width_um, height_um)
    n = len(islands)
    epithelium = np.column_stack([
        rng.uniform(0, 2 * np.pi, n),          # direction of the lined surface
        rng.uniform(-0.6, 0.2, n),             # cos threshold: larger = less surface lined
        rng.uniform(18.0, 32.0, n),            # band width µm
    ])
    base = {k: float(rng.uniform(*v)) for k, v in BASE_DENSITY_RANGES.items()}
    waves = _waves(rng, 3)
    fibre_angles = (float(rng.uniform(0, np.pi)), float(rng.uniform(0, np.pi)))
    draft = SlideLayout(width_um, height_um, seed, difficulty, islands, epithelium,
                        np.zeros((0, 4)), np.zeros((0, 4)), waves, base, fibre_angles,
                        0.15 * difficulty)
    tissue_mm2 = float(np.sum(np.pi * islands[:, 2] ** 2)) * 1e-6
    n_hot = max(1, int(round(tissue_mm2 / 8.0)))
    centres = _points_in_tissue(rng, draft.depth, width_um, height_um, n_hot, 40.0)
    hotspots = np.column_stack([
        centres,
        rng.uniform(180.0, 420.0, len(centres)),      # sigma µm: an HPF is ~275 µm in radius
        rng.uniform(300.0, 1300.0, len(centres)),     # peak per mm² (~70-300 per HPF)
    ])
    n_neu = max(1, int(round(tissue_mm2 / 10.0)))
    centres = _points_in_tissue(rng, draft.depth, width_um, height_um, n_neu, 20.0)
    neutro = np.column_stack([
        centres,
        rng.uniform(40.0, 140.0, len(centres)),
        rng.uniform(600.0, 2500.0, len(centres)),
    ])
    lymph = stain_wave = None
    if style == "v2":
        n_ly = max(1, int(round(tissue_mm2 / 2.0)))
        centres = _points_in_tissue(rng, draft.depth, width_um, height_um, n_ly, 30.0)
        lymph = np.column_stack([centres, rng.uniform(30.0, 90.0, len(centres)),
                                 rng.uniform(4000.0, 9000.0, len(centres))])
        stain_wave = _waves(rng, 1)[0]
    return SlideLayout(width_um, height_um, seed, difficulty, islands, epithelium, hotspots,
                       neutro, waves, base, fibre_angles, 0.15 * difficulty, style, lymph,
                       stain_wave)
