"""Slide-level out-of-distribution guard: stain and focus statistics (numpy/scipy only).

Where it sits in the flow: ``read ▶ RGB tiles ─stats─▶ SlideStats ─is_ood─▶ gate``. The gate's
guarantee holds only for slides exchangeable with the calibration slides; this guard checks the
two things that most often break that on real slides — staining and focus. :func:`fit_ood` runs
on the calibration slides' statistics (stored in the card); :func:`is_ood` runs per slide, and a
flagged slide sends every cell to review with reason ``ood_slide``.

Statistics (:func:`slide_stats`, over tissue pixels of tiles read at a known mpp):
  * Optical density per channel OD = −log10((I + 1) / 256) for 8-bit I (0 for white glass).
    Tissue pixels: OD summed over R, G, B > ``TISSUE_OD`` (0.25).
  * Ruifrok–Johnston colour deconvolution with their H&E vectors (H = 0.65, 0.70, 0.29;
    E = 0.07, 0.99, 0.11, both normalised; residual = H × E). OD = C · M, so C = OD · M⁻¹:
    ``od_h_mean``, ``od_e_mean``, ``od_residual_mean`` are the mean concentrations over tissue
    (the residual is large when colours are not H&E-like, e.g. a blue or green cast).
  * ``od_p99``: 99th percentile of the summed OD over tissue (streamed histogram, bin 0.004).
  * ``focus``: variance over tissue of the scale-normalised Laplacian of Gaussian σ²∇²G_σ of the
    grey image (luminance in [0, 1]) at σ = 1 µm, i.e. σ = 1/mpp px. Fixing σ in µm and
    multiplying by σ² makes the number comparable across scan resolutions; blur lowers it.

Rule (:func:`fit_ood` / :func:`is_ood`): per statistic (focus on a log scale) the calibration
median m and scale s = max(1.4826·MAD, floor); a slide is out of distribution if any robust
z = |x − m| / s exceeds ``z_max`` = 4. Floors keep the rule sane with few calibration slides
(with one slide MAD = 0): stain statistics s ≥ max(0.02 OD, 10 % of |m|), log-focus s ≥ 0.25
(so with one slide, focus must drop or rise by more than e¹ ≈ 2.7× to be flagged).

A calibration set may hold several kinds of slide (the shipped model's: synthetic slides and real
tissue from three sources), and then the median sits between them and real slides of a kind it
was calibrated on fall in its tails. So a slide the median rule flags still passes when it is
*close to one calibration slide* in every statistic at once: |x − c| ≤ z_max · floor(c) for some
calibration slide c (floor(c) as above, taken at c's own values). The fitted parameters keep the
calibration slides' statistics (``reference``) for this; parameters fitted before (no
``reference``) use the median rule alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellclf.gate.temperature import CalibrationError
from cellclf.wsi.tile_reader import TileReader
from cellclf.wsi.tissue import TissueMask, slide_tissue_mask

TISSUE_OD = 0.25
FOCUS_SIGMA_UM = 1.0
_OD_MAX = 3.0 * np.log10(256.0)
_HIST_BINS = 2048

_H = np.array([0.65, 0.70, 0.29])
_E = np.array([0.07, 0.99, 0.11])
_H /= np.linalg.norm(_H)
_E /= np.linalg.norm(_E)
_R = np.cross(_H, _E)
_R /= np.linalg.norm(_R)
STAIN_MATRIX = np.stack([_H, _E, _R])  # rows: H, E, residual (OD = C @ STAIN_MATRIX)
_UNMIX = np.linalg.inv(STAIN_MATRIX)

STAT_NAMES = ("od_h_mean", "od_e_mean", "od_residual_mean", "od_p99", "focus")


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Per-channel optical density −log10((I + 1) / 256) of 8-bit RGB, float32 (…, 3)."""
    return -np.log10((np.asarray(rgb, dtype=np.float32) + 1.0) / 256.0)


def stain_concentrations(od: np.ndarray) -> np.ndarray:
    """Ruifrok–Johnston unmixing: (…, 3) OD → (…, 3) concentrations (H, E, residual)."""
    return od @ _UNMIX.astype(np.float32)


@dataclass(frozen=True)
class SlideStats:
    """Stain and focus statistics of one slide (see module docstring); JSON-ready via to_dict."""

    od_h_mean: float
    od_e_mean: float
    od_residual_mean: float
    od_p99: float
    focus: float
    n_tissue_px: int
    mpp: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SlideStats:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def _tile_sums(arr: np.ndarray, k: int, sigma_px: float, source: str) -> tuple:
    """One tile's additive statistics: (tissue px, concentration sum, OD histogram, Σlap, Σlap²)."""
    from scipy.ndimage import gaussian_laplace

    if arr.ndim != 3 or arr.shape[2] < 3 or arr.dtype != np.uint8:
        raise CalibrationError(f"{source}: tile {k} must be (H, W, 3) uint8 RGB, got "
                               f"shape {arr.shape} dtype {arr.dtype}.")
    rgb = arr[..., :3]
    od = optical_density(rgb)
    od_sum = od.sum(axis=2)
    tissue = od_sum > TISSUE_OD
    m = int(tissue.sum())
    if m == 0:
        return 0, np.zeros(3), np.zeros(_HIST_BINS, np.int64), 0.0, 0.0
    # unmixing is linear, so the mean concentration is the unmixed mean OD
    conc = od[tissue].sum(axis=0, dtype=np.float64) @ _UNMIX
    hist = np.histogram(od_sum[tissue], bins=_HIST_BINS, range=(0.0, _OD_MAX))[0]
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32) / 255.0
    grey = rgb.astype(np.float32) @ luma
    lap = gaussian_laplace(grey, sigma_px, mode="reflect")[tissue] * sigma_px**2
    return (m, conc, hist, float(lap.sum(dtype=np.float64)),
            float(np.square(lap, dtype=np.float64).sum()))


def slide_stats(tiles_rgb: Iterable[np.ndarray], mpp: float, min_tissue_px: int = 1000,
                source: str = "slide", workers: int = 1) -> SlideStats:
    """Stream tiles (H, W, 3) uint8 RGB read at ``mpp`` µm/px into :class:`SlideStats`.

    Pass all tissue tiles of a slide, or a random sample of them (a few dozen 512² tiles are
    plenty; each costs ~0.1 s on one core); a single image works too (pass ``[img]``).
    ``workers`` > 1 computes the tiles' sums in threads (numpy and scipy release the GIL); the
    statistics are sums, so the result does not depend on it.
    Raises :class:`CalibrationError` (naming ``source``) when fewer than ``min_tissue_px``
    tissue pixels are seen.
    """
    if not mpp > 0:
        raise CalibrationError(f"{source}: mpp must be > 0 for focus statistics, got {mpp}.")
    sigma_px = FOCUS_SIGMA_UM / mpp
    tiles = enumerate(np.asarray(t) for t in tiles_rgb)
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(lambda kt: _tile_sums(kt[1], kt[0], sigma_px, source), tiles))
    else:
        parts = (_tile_sums(arr, k, sigma_px, source) for k, arr in tiles)
    n = 0
    conc_sum = np.zeros(3)
    lap_sum = lap_sq = 0.0
    hist = np.zeros(_HIST_BINS, dtype=np.int64)
    for m, conc, h, ls, lq in parts:
        n += m
        conc_sum += conc
        hist += h
        lap_sum += ls
        lap_sq += lq
    if n < min_tissue_px:
        raise CalibrationError(f"{source}: only {n} tissue pixels in the tiles given (need "
                               f"≥ {min_tissue_px}); pass tissue tiles, not blank glass.")
    cdf = np.cumsum(hist) / n
    edges = np.linspace(0.0, _OD_MAX, _HIST_BINS + 1)
    p99 = float(edges[1:][np.searchsorted(cdf, 0.99)])
    mean_c = conc_sum / n
    focus = max(lap_sq / n - (lap_sum / n) ** 2, 0.0)
    return SlideStats(float(mean_c[0]), float(mean_c[1]), float(mean_c[2]), p99, focus, n,
                      float(mpp))


def _vector(s: SlideStats) -> np.ndarray:
    v = np.array([getattr(s, k) for k in STAT_NAMES], dtype=np.float64)
    v[-1] = np.log(max(v[-1], 1e-12))  # focus on a log scale
    return v


DEFAULT_FLOORS = (0.02, 0.10, 0.25)  # smallest scales: stain OD, stain relative, log focus


@dataclass(frozen=True)
class OODParams:
    """Calibration medians and robust scales per statistic (focus as log) and the z limit."""

    median: dict[str, float]
    scale: dict[str, float]
    z_max: float
    n_slides: int
    reference: tuple[tuple[float, ...], ...] = ()   # each calibration slide's _vector
    floors: tuple[float, float, float] = DEFAULT_FLOORS

    def to_dict(self) -> dict[str, Any]:
        d = {**asdict(self), "reference": [list(r) for r in self.reference],
             "floors": list(self.floors),
             "rule": "robust z = |x - median| / max(1.4826*MAD, floor) > z_max on any statistic; "
                     "focus compared as log(focus)"}
        if self.reference:
            d["rule"] += ("; unless within z_max floors of one calibration slide in every "
                          "statistic (reference, in STAT_NAMES order, focus as log)")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OODParams:
        try:
            reference = tuple(tuple(float(v) for v in r) for r in d.get("reference") or ())
            if any(len(r) != len(STAT_NAMES) for r in reference):
                raise ValueError(f"each reference row needs {len(STAT_NAMES)} statistics")
            floors = tuple(float(v) for v in d.get("floors") or DEFAULT_FLOORS)
            if len(floors) != len(DEFAULT_FLOORS):
                raise ValueError("floors needs 3 numbers: stain OD, stain relative, log focus")
            return cls({k: float(d["median"][k]) for k in STAT_NAMES},
                       {k: float(d["scale"][k]) for k in STAT_NAMES},
                       float(d["z_max"]), int(d["n_slides"]), reference, floors)
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"OOD parameters are invalid ({exc!r}); refit them with "
                                   "`fit_ood` on the calibration slides.") from exc


def fit_ood(stats: list[SlideStats], z_max: float = 4.0,
            stain_floor_od: float = DEFAULT_FLOORS[0],
            stain_floor_rel: float = DEFAULT_FLOORS[1],
            focus_floor_log: float = DEFAULT_FLOORS[2]) -> OODParams:
    """Medians and floored robust scales over the calibration slides (module docstring rule)."""
    if not stats:
        raise CalibrationError("fit_ood: no calibration slide statistics given; compute "
                               "slide_stats for at least one calibration slide.")
    x = np.stack([_vector(s) for s in stats])
    med = np.median(x, axis=0)
    mad = 1.4826 * np.median(np.abs(x - med), axis=0)
    floors = (float(stain_floor_od), float(stain_floor_rel), float(focus_floor_log))
    scale = np.maximum(mad, _floor(med, floors))
    return OODParams(dict(zip(STAT_NAMES, med.tolist(), strict=True)),
                     dict(zip(STAT_NAMES, scale.tolist(), strict=True)), float(z_max), len(stats),
                     tuple(tuple(row) for row in x.tolist()), floors)


def _floor(values: np.ndarray, floors: tuple[float, float, float]) -> np.ndarray:
    """Smallest scale per statistic at ``values`` (…, len(STAT_NAMES)): stain max(OD floor,
    relative floor × |value|), log focus its own floor."""
    floor = np.maximum(floors[0], floors[1] * np.abs(values))
    floor[..., -1] = floors[2]
    return floor


def nearest_reference_z(stats: SlideStats, params: OODParams) -> float:
    """Over the calibration slides, the smallest largest-statistic distance in floors
    (inf without reference slides): ≤ z_max means close to one calibration slide throughout."""
    if not params.reference:
        return float("inf")
    ref = np.asarray(params.reference, dtype=np.float64)
    z = np.abs(_vector(stats) - ref) / _floor(ref, params.floors)
    return float(z.max(axis=1).min())


def ood_scores(stats: SlideStats, params: OODParams) -> dict[str, float]:
    """Signed robust z-score per statistic (focus on log scale)."""
    x = _vector(stats)
    return {k: float((x[i] - params.median[k]) / params.scale[k])
            for i, k in enumerate(STAT_NAMES)}


def is_ood(stats: SlideStats, params: OODParams) -> tuple[bool, list[str]]:
    """(flagged, reasons): one human-readable reason per statistic with |z| > z_max, none when
    the slide is close to one calibration slide (module docstring)."""
    reasons: list[str] = []
    for k, z in ood_scores(stats, params).items():
        if abs(z) > params.z_max:
            words = PLAIN_REASONS.get(k, (f"{k} is higher", f"{k} is lower"))[0 if z > 0 else 1]
            reasons.append(f"{words} than on the calibration slides ({k} {abs(z):.1f} robust SD "
                           f"{'above' if z > 0 else 'below'} them; limit {params.z_max:g})")
    if reasons and nearest_reference_z(stats, params) <= params.z_max:
        return False, []
    return bool(reasons), reasons


# what each statistic means to a pathologist: (when above the calibration slides, when below)
PLAIN_REASONS = {
    "od_h_mean": ("the haematoxylin (nuclear) staining is stronger",
                  "the haematoxylin (nuclear) staining is weaker"),
    "od_e_mean": ("the eosin staining is stronger", "the eosin staining is weaker"),
    "od_residual_mean": ("the colours fit H&E less well (another stain, or scanner colour profile)",
                         "the colours fit H&E more closely (a cleaner or simpler stain?)"),
    "od_p99": ("the darkest areas are darker (thick section, folds or pigment?)",
               "the darkest areas are paler (faded or thin section?)"),
    "focus": ("the image is sharper (or noisier)", "the image is blurrier (out of focus?)"),
}
OOD_ACTION = ("every cell of this slide was sent to review. Check the staining and the scan "
              "(rescan a blurred slide); if this lab's slides simply look different from the "
              "calibration slides, recalibrate the model on slides of this lab (cellclf calibrate)")


OOD_SAMPLE_TILES = 12


def tissue_sample_stats(reader: TileReader, tissue: TissueMask, tile_um: float = 512.0,
                        k: int = OOD_SAMPLE_TILES) -> SlideStats:
    """Stain and focus statistics of ``k`` tissue tile cores (no halo) spread over the slide: the
    one sample both calibration and inference measure, so their statistics are comparable."""
    return reader_sample_stats(reader, reader.tissue_sample(tissue, tile_um, k))


def reader_sample_stats(reader: TileReader, sample: list[np.ndarray]) -> SlideStats:
    """:func:`slide_stats` of a sample read by ``reader`` (:meth:`TileReader.tissue_sample`)."""
    return slide_stats(sample, reader.work_mpp, source=str(reader.path), workers=reader.workers)


def slide_ood_stats(path: str | Path, work_mpp: float, mpp: float | None = None,
                    tile_um: float = 512.0, workers: int = 0) -> SlideStats:
    """:func:`tissue_sample_stats` of a slide file (calibration slides)."""
    with TileReader(path, work_mpp, mpp=mpp, workers=workers) as reader:
        return tissue_sample_stats(reader, slide_tissue_mask(reader), tile_um)
