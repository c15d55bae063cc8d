"""Which cells to label next: cheap appearance features, spreading a batch over the pool,
uncertainty.

Pure numpy (no files, no model). The method:

- **features** of a candidate (:func:`cell_features`): histograms of the haematoxylin and eosin
  optical densities (colour deconvolution, :func:`cellclf.gate.slide_guard.stain_concentrations`)
  inside the central disc of its crop, the share of dark-nucleus pixels (a size measure) and the
  mean RGB; z-scored over the pool, plus a one-hot of the slide so that a batch also spreads over
  slides.
- **spreading** a batch of k over a set of candidates: ``kmeans`` (default) — k-means with a
  k-means++ start, then the candidate nearest each centre (:func:`kmeans_medoids`): one
  representative per mode of the pool, rare modes included (k-means++ favours far points);
  ``kcenter`` — k-center greedy (Sener & Savarese 2018, :func:`k_center_greedy`): each pick the
  candidate farthest from all picks and queued cells. k-center covers the space but picks its
  outliers; on the label-efficiency benchmark (docs/benchmarks.md) it lost to random selection
  at 20 labels, while k-means medoids matched or beat random at every budget.
- **first batch** (no model yet): spread over all candidates.
- **later batches**: the ``pool_factor × k`` most uncertain unlabelled candidates by the current
  model's margin (1 − (p₁ − p₂)), spread: uncertain *and* diverse (no batch of near-duplicates).
- **held-aside cells**: a share of each batch drawn uniformly at random from the unlabelled
  candidates; their labels never train, so accuracy estimated on them (and a gate calibrated on
  them) describes the candidate population, not the cells active selection found hard.
"""

from __future__ import annotations

import numpy as np

from cellclf.gate.slide_guard import optical_density, stain_concentrations

HIST_BINS = 8
OD_MAX = 2.0  # optical densities above are clipped into the last bin
NUCLEUS_OD = 0.6  # haematoxylin OD above this counts as nucleus


def _central_disc(crop_px: int, radius_frac: float = 0.35) -> np.ndarray:
    yy, xx = np.mgrid[:crop_px, :crop_px] + 0.5 - crop_px / 2
    return (xx**2 + yy**2) <= (radius_frac * crop_px) ** 2


def cell_features(crops: np.ndarray) -> np.ndarray:
    """(N, 2·HIST_BINS + 4) float32 appearance features of N×S×S×3 uint8 crops (not z-scored)."""
    crops = np.asarray(crops)
    n, s = len(crops), crops.shape[1] if len(crops) else 0
    out = np.zeros((n, 2 * HIST_BINS + 4), np.float32)
    if n == 0:
        return out
    disc = _central_disc(s)
    edges = np.linspace(0.0, OD_MAX, HIST_BINS + 1)
    for i in range(n):
        rgb = crops[i][disc]  # (P, 3)
        conc = stain_concentrations(optical_density(rgb[None]))[0]  # (P, 2+): H, E, …
        h = np.clip(conc[:, 0], 0, OD_MAX - 1e-6)
        e = np.clip(conc[:, 1], 0, OD_MAX - 1e-6)
        out[i, :HIST_BINS] = np.histogram(h, edges)[0] / len(h)
        out[i, HIST_BINS:2 * HIST_BINS] = np.histogram(e, edges)[0] / len(e)
        out[i, 2 * HIST_BINS] = float((conc[:, 0] > NUCLEUS_OD).mean())
        out[i, 2 * HIST_BINS + 1:] = rgb.mean(axis=0) / 255.0
    return out


def pool_features(features: np.ndarray, slide_index: np.ndarray, n_slides: int) -> np.ndarray:
    """Z-scored features with a one-hot of the slide appended (one unit per slide)."""
    f = np.asarray(features, np.float64)
    sd = f.std(axis=0)
    z = (f - f.mean(axis=0)) / np.where(sd > 1e-9, sd, 1.0)
    onehot = np.eye(max(n_slides, 1))[np.asarray(slide_index, int)] * np.sqrt(z.shape[1] / 4)
    return np.hstack([z, onehot]).astype(np.float32)


def k_center_greedy(features: np.ndarray, k: int, candidates: np.ndarray,
                    centres: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """``k`` indices from ``candidates`` (indices into ``features``), each the candidate farthest
    from the ``centres`` (indices) and the picks so far; the first pick is random when there are
    no centres. Deterministic for a seed."""
    cand = np.asarray(candidates, np.int64)
    k = min(int(k), len(cand))
    if k <= 0:
        return np.zeros(0, np.int64)
    x = np.asarray(features, np.float32)[cand]
    dist = np.full(len(cand), np.inf, np.float32)
    for c in np.asarray(centres if centres is not None else [], np.int64):
        dist = np.minimum(dist, ((x - features[c]) ** 2).sum(axis=1))
    picks: list[int] = []
    for _ in range(k):
        j = (int(np.random.default_rng(seed).integers(len(cand))) if not np.isfinite(dist).any()
             else int(np.argmax(dist)))
        picks.append(j)
        dist = np.minimum(dist, ((x - x[j]) ** 2).sum(axis=1))
        dist[j] = -1.0  # never picked twice
    return cand[np.asarray(picks, np.int64)]


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.maximum((x**2).sum(1)[:, None] - 2 * x @ c.T + (c**2).sum(1)[None], 0.0)


def kmeans_medoids(features: np.ndarray, k: int, candidates: np.ndarray, seed: int = 0,
                   iters: int = 20) -> np.ndarray:
    """``k`` indices from ``candidates``: k-means (k-means++ start, Lloyd iterations) over their
    features, then the candidate nearest each centre, largest clusters first: the central cell
    of every mode of the pool (k-center greedy picks the modes' edges). Deterministic for a
    seed."""
    cand = np.asarray(candidates, np.int64)
    k = min(int(k), len(cand))
    if k <= 0:
        return np.zeros(0, np.int64)
    x = np.asarray(features, np.float64)[cand]
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    d2 = _sq_dist(x, centres[0][None])[:, 0]
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1.0 / len(x))
        centres.append(x[rng.choice(len(x), p=p)])
        d2 = np.minimum(d2, _sq_dist(x, centres[-1][None])[:, 0])
    c = np.array(centres)
    for _ in range(iters):
        assign = _sq_dist(x, c).argmin(axis=1)
        for j in range(k):
            if (assign == j).any():
                c[j] = x[assign == j].mean(axis=0)
    d = _sq_dist(x, c)
    sizes = np.bincount(d.argmin(axis=1), minlength=k)
    taken: set[int] = set()
    for j in np.argsort(-sizes, kind="stable"):
        taken.add(next(int(i) for i in np.argsort(d[:, j], kind="stable") if int(i) not in taken))
    return cand[np.array(sorted(taken), np.int64)]


def uncertainty(probs: np.ndarray) -> np.ndarray:
    """1 − margin between the two most probable classes (1 = a coin toss, 0 = certain)."""
    p = np.sort(np.asarray(probs, np.float64), axis=1)
    return 1.0 - (p[:, -1] - p[:, -2]) if p.shape[1] > 1 else np.zeros(len(p))


SELECTION_METHODS = ("kmeans", "kcenter")


def select_batch(features: np.ndarray, k: int, queued: np.ndarray,
                 probs: np.ndarray | None = None, pool_factor: int = 5,
                 seed: int = 0, method: str = "kmeans") -> np.ndarray:
    """``k`` unqueued candidates to label, spread by ``method`` (``kmeans``: k-means medoids;
    ``kcenter``: k-center greedy counting distances from the queued cells too) over all of them
    (``probs`` None) or over the ``pool_factor·k`` most uncertain by ``probs`` (N×K over all
    candidates). ``queued``: bool mask of candidates already queued (labelled or waiting)."""
    if method not in SELECTION_METHODS:
        raise ValueError(f"selection method must be one of {SELECTION_METHODS}, got {method!r}")
    free = np.flatnonzero(~np.asarray(queued, bool))
    if probs is not None and len(free) > pool_factor * k:
        u = uncertainty(np.asarray(probs)[free])
        free = free[np.argsort(-u, kind="stable")[:pool_factor * k]]
    if method == "kmeans":
        return kmeans_medoids(features, k, free, seed=seed)
    return k_center_greedy(features, k, free, centres=np.flatnonzero(queued), seed=seed)


def random_batch(k: int, queued: np.ndarray, seed: int) -> np.ndarray:
    """``k`` unqueued candidates drawn uniformly at random (the held-aside share of a batch)."""
    free = np.flatnonzero(~np.asarray(queued, bool))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(free, size=min(int(k), len(free)), replace=False))
