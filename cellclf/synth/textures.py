"""Synthetic slides: periodic texture tiles (collagen fibres, granules, chromatin, foam).

Built once per (slide seed, pixel size) in each worker and sampled by global pixel position
(stroma) or at a random offset per cell (granules), so rendering a tile never generates noise
from scratch. Textures are defined in µm (dot sizes, fibre widths) and rendered at the requested
pixel size: at coarse pyramid levels granules average out as they would in a downsampled scan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage


def _dots(rng: np.random.Generator, size: int, px_um: float, density_per_um2: float,
          sigma_um: float) -> np.ndarray:
    """Poisson dots of Gaussian profile, normalised to mean 1 (periodic, float32)."""
    counts = rng.poisson(density_per_um2 * px_um * px_um, (size, size)).astype(np.float32)
    sig_px = float(np.hypot(sigma_um / px_um, 0.35))
    img = ndimage.gaussian_filter(counts, sig_px, mode="wrap")
    return (img / max(float(img.mean()), 1e-6)).astype(np.float32)


def _fibres(rng: np.random.Generator, size: int, px_um: float, angle: float) -> np.ndarray:
    """Oriented band-limited noise (collagen bundles along ``angle``), zero mean, unit std."""
    noise = rng.standard_normal((size, size))
    fy = np.fft.fftfreq(size, d=px_um)[:, None]       # cycles per µm
    fx = np.fft.rfftfreq(size, d=px_um)[None, :]
    ca, sa = np.cos(angle), np.sin(angle)
    along = fx * ca + fy * sa                          # frequency along the fibres (slow)
    across = -fx * sa + fy * ca                        # frequency across the fibres
    filt = np.exp(-0.5 * (along / 0.035) ** 2) * np.exp(
        -0.5 * ((np.abs(across) - 0.10) / 0.07) ** 2)
    img = np.fft.irfft2(np.fft.rfft2(noise) * filt, s=(size, size))
    img -= img.mean()
    img /= max(float(img.std()), 1e-9)
    return img.astype(np.float32)


@dataclass
class TextureBank:
    """All textures for one slide at one pixel size (µm per pixel)."""

    seed: int
    px_um: float
    fibre_angles: tuple[float, float]
    blur_um: float = 0.0
    style: str = "v1"
    granule_size: int = 256
    tex: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rng = np.random.default_rng([int(self.seed), 0x7E7, int(round(self.px_um * 1e4))])
        g = self.granule_size
        p = self.px_um
        self.tex["fibre1"] = _fibres(rng, 1024, p, self.fibre_angles[0])
        self.tex["fibre2"] = _fibres(rng, 768, p, self.fibre_angles[1])
        self.tex["coarse"] = _dots(rng, g, p, 1.1, 0.32)     # eosinophil granules ~0.7-0.9 µm
        self.tex["fine"] = _dots(rng, g, p, 4.0, 0.16)       # mast / neutrophil granules
        self.tex["speckle"] = _dots(rng, g, p, 2.0, 0.22)    # chromatin
        self.tex["foam"] = _dots(rng, g, p, 0.25, 0.55)      # macrophage vacuoles
        if self.style == "v2":                               # out-of-plane nuclei in stroma
            ghost = _dots(rng, 1024, p, 0.0025, 1.6)
            self.tex["ghost"] = ghost / max(float(np.percentile(ghost, 99.9)), 1e-6)
        sigma_px = self.blur_um / p
        if sigma_px >= 0.2:                                   # focus blur, applied once here
            for name, t in self.tex.items():
                self.tex[name] = ndimage.gaussian_filter(t, sigma_px, mode="wrap")

    def sample_global(self, name: str, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Texture at global pixel rows y0..y0+h, columns x0..x0+w (wrapping)."""
        t = self.tex[name]
        rows = np.arange(y0, y0 + h) % t.shape[0]
        cols = np.arange(x0, x0 + w) % t.shape[1]
        return t.take(rows, axis=0).take(cols, axis=1)

    def sample_cells(self, name: str, offsets: np.ndarray, size: int) -> np.ndarray:
        """(N, size, size) windows at per-cell offsets in [0, 1)² (wrapping)."""
        t = self.tex[name]
        m = t.shape[0]
        oy = (offsets[:, 0] * m).astype(np.int64)
        ox = (offsets[:, 1] * m).astype(np.int64)
        ar = np.arange(size)
        iy = (oy[:, None] + ar[None]) % m
        ix = (ox[:, None] + ar[None]) % m
        return t[iy[:, :, None], ix[:, None, :]]


_BANKS: dict[tuple, TextureBank] = {}


def texture_bank(seed: int, px_um: float, fibre_angles: tuple[float, float],
                 blur_um: float = 0.0, style: str = "v1") -> TextureBank:
    """Cached :class:`TextureBank` (one per process per seed, pixel size, blur and style)."""
    key = (int(seed), round(float(px_um), 6), fibre_angles, round(float(blur_um), 6), style)
    bank = _BANKS.get(key)
    if bank is None:
        if len(_BANKS) > 8:
            _BANKS.clear()
        bank = _BANKS[key] = TextureBank(int(seed), float(px_um), fibre_angles, float(blur_um),
                                             style)
    return bank
