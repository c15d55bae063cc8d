"""Slides as the unit: Learn-then-Test over slide-level losses (numpy/scipy only, pure functions).

Why: the cell-level gate (:mod:`cellclf.gate.risk_bounds`) treats calibration cells as independent
draws. Cells of one slide share its stain, focus, tissue and patient, so their errors move
together; a calibration set of a handful of slides then carries far less information than its cell
count suggests, and the Clopper–Pearson bound over pooled cells is too narrow (docs/gate.md, the
simulation in tests/test_gate_slides.py: it breaks its δ many times over).

Statement certified here, per predicted class c: for a **new slide** drawn like the calibration
slides, the expected error rate among its auto-accepted class-c cells is at most α_c,

    R_c(λ) = E_slide[ L_s(λ) ] ≤ α_c,   L_s(λ) = K_s(λ) / N_s(λ)   (0 when N_s(λ) = 0),

N_s(λ) the slide's cells predicted c with confidence ≥ λ and K_s(λ) the wrong ones. The slides are
the exchangeable draws; nothing is assumed about the cells within a slide nor about how slides
differ. L_s ∈ [0, 1], so the Hoeffding–Bentkus p-value of Learn-then-Test (Angelopoulos, Bates,
Candès, Jordan & Lei 2021, "Learn then Test", Prop. 4 / eq. 9) is valid for H_λ: R_c(λ) > α_c:

    p(λ) = min( exp(−S·h(min(R̂, α), α)),  e·P(Binomial(S, α) ≤ ⌈S·R̂⌉) ),
    h(a, b) = a·ln(a/b) + (1 − a)·ln((1 − a)/(1 − b)),   R̂ = mean of the S slide losses.

The thresholds are a **fixed grid** (:data:`GRID`, decided before seeing data), tested in
descending order (fixed-sequence testing): every H_λ rejected before the first failure is certified
and λ_c is the lowest of them. Fixed-sequence testing controls the family-wise error at the test
level without any monotonicity assumption. δ is split over the M statements like the cell gate.

The price: with zero observed errors p = (1 − α)^S, so no class can be certified with fewer than
S_min = ⌈ln(δ/M) / ln(1 − α)⌉ calibration slides (:func:`min_slides`): 492 slides at α = 0.01,
δ = 0.05, M = 7; 97 at α = 0.05. That is the honest cost of a promise about *new slides* that
assumes nothing about how slides vary (one slide in a hundred could be a disaster that a smaller
set never shows). :func:`slides_needed` gives the count for an observed mean loss; the running
audit (:mod:`cellclf.review.audit_stats`) accumulates slide-level evidence after deployment.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cellclf.gate.risk_bounds import min_cells_zero_errors
from cellclf.gate.temperature import CalibrationError

# Fixed, data-independent threshold grid, highest first: 1 − 10^-4 … 0.25 (K ≥ 2 classes: the max
# probability is at least 1/K), denser near 1 where the certified thresholds lie.
GRID = np.unique(np.concatenate([1.0 - np.geomspace(1e-4, 0.75, 400)]))[::-1]

GUARANTEE_SLIDES = (
    "Slide-level statement (Learn-then-Test over slide-level losses, Hoeffding–Bentkus p-values, "
    "fixed grid): for a new slide drawn like the {n_slides} calibration slides, with probability "
    "at least {conf:g} over the draw of the calibration slides, the expected error rate among its "
    "auto-accepted cells of each certified class c is at most α_c ({alphas}). Slides, not cells, "
    "are the independent draws; nothing is assumed about how slides differ.")


def _kl_bernoulli(a: float, b: float) -> float:
    """h(a, b) = KL(Bernoulli(a) ‖ Bernoulli(b)) for 0 ≤ a ≤ b < 1."""
    out = 0.0
    if a > 0:
        out += a * math.log(a / b)
    if a < 1:
        out += (1 - a) * math.log((1 - a) / (1 - b))
    return out


def hb_pvalue(mean_loss: float, n_slides: int, alpha: float) -> float:
    """Hoeffding–Bentkus p-value for H: E[loss] > α from ``n_slides`` i.i.d. losses in [0, 1]."""
    from scipy.stats import binom

    if n_slides <= 0:
        return 1.0
    if not 0.0 < alpha < 1.0:
        raise CalibrationError(f"hb_pvalue: alpha must be in (0, 1), got {alpha}")
    r = min(max(float(mean_loss), 0.0), 1.0)
    p_h = math.exp(-n_slides * _kl_bernoulli(min(r, alpha), alpha))
    p_b = math.e * float(binom.cdf(math.ceil(n_slides * r - 1e-12), n_slides, alpha))
    return min(p_h, p_b, 1.0)


def min_slides(alpha: float, delta: float, n_tests: int) -> int:
    """Fewest calibration slides that can certify a class at all (all slide losses zero)."""
    return min_cells_zero_errors(alpha, delta, n_tests)


def slides_needed(alpha: float, mean_loss: float, delta: float, n_tests: int,
                  limit: int = 1_000_000) -> int | None:
    """Fewest slides whose mean loss ``mean_loss`` passes the test at δ/M (None: not below
    ``limit``, e.g. when mean_loss ≥ α)."""
    if mean_loss >= alpha:
        return None
    level = delta / n_tests
    lo = min_slides(alpha, delta, n_tests)
    hi = lo
    while hb_pvalue(mean_loss, hi, alpha) > level:
        hi *= 2
        if hi > limit:
            return None
    while lo < hi:  # the p-value falls with S up to the Bentkus ceiling's small steps
        mid = (lo + hi) // 2
        if hb_pvalue(mean_loss, mid, alpha) <= level:
            hi = mid
        else:
            lo = mid + 1
    return lo


def slide_losses(conf: np.ndarray, wrong: np.ndarray, slide_index: np.ndarray, n_slides: int,
                 grid: np.ndarray = GRID) -> tuple[np.ndarray, np.ndarray]:
    """Per slide and grid threshold: (losses, accepted counts), each (S, G).

    ``conf``/``wrong``: the calibration cells predicted as one class; ``slide_index`` (0..S−1)
    says which slide each comes from. loss = wrong accepted / accepted (0 when none accepted).
    """
    conf = np.asarray(conf, dtype=np.float64)
    wrong = np.asarray(wrong, dtype=bool)
    idx = np.asarray(slide_index, dtype=np.int64)
    # grid column of each cell: the number of grid points ≤ its confidence, grid ascending
    asc = grid[::-1]
    col = np.searchsorted(asc, conf, side="right")  # cell counted at asc[:col]
    g = len(grid)
    n_at = np.zeros((n_slides, g + 1), np.int64)
    k_at = np.zeros((n_slides, g + 1), np.int64)
    np.add.at(n_at, (idx, col), 1)
    np.add.at(k_at, (idx, col), wrong.astype(np.int64))
    # accepted at asc[j] = cells with col > j: reverse cumulative sum
    n_acc = np.cumsum(n_at[:, ::-1], axis=1)[:, ::-1][:, 1:]
    k_acc = np.cumsum(k_at[:, ::-1], axis=1)[:, ::-1][:, 1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        loss = np.where(n_acc > 0, k_acc / np.maximum(n_acc, 1), 0.0)
    return loss[:, ::-1], n_acc[:, ::-1]  # back to grid order (highest λ first)


def scan_slide_thresholds(losses: np.ndarray, alpha: float, level: float,
                          grid: np.ndarray = GRID) -> dict[str, Any]:
    """Fixed-sequence scan over the grid (highest first) with Hoeffding–Bentkus p-values.

    ``losses``: (S, G) slide losses. Returns ``threshold`` (None: not certified), ``index`` (grid
    column, −1), ``mean_loss`` and ``p_value`` at the threshold (at the first grid point when
    nothing passed).
    """
    losses = np.asarray(losses, dtype=np.float64)
    s = losses.shape[0]
    means = losses.mean(axis=0) if s else np.zeros(losses.shape[1])
    last = -1
    for j in range(losses.shape[1]):
        if hb_pvalue(float(means[j]), s, alpha) > level:
            break
        last = j
    at = max(last, 0)
    return {"threshold": float(grid[last]) if last >= 0 else None, "index": last,
            "mean_loss": float(means[at]) if len(means) else 0.0,
            "p_value": hb_pvalue(float(means[at]), s, alpha) if len(means) else 1.0}


def fit_slide_gate(probs: np.ndarray, labels: np.ndarray, slide_ids: np.ndarray,
                   classes: list[str], alpha: float, delta: float, n_tests: int, *,
                   alpha_per_class: dict[str, float] | None = None,
                   grid: np.ndarray = GRID) -> dict[str, Any]:
    """The slide-level gate of every predicted class (the card's ``gate_slides`` section).

    ``probs`` (N, K) calibrated, ``labels`` (N,) true class indices, ``slide_ids`` (N,) the slide
    of each cell. Each class's test runs at δ/``n_tests`` (the cell gate's M).
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    uniq, slide_index = np.unique(np.asarray(slide_ids).astype(str), return_inverse=True)
    n_slides = len(uniq)
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    per_class = dict(alpha_per_class or {})
    level = delta / n_tests
    out: dict[str, Any] = {"n_slides": n_slides, "slides": [str(u) for u in uniq],
                           "alpha": alpha, "alpha_per_class": per_class, "delta": delta,
                           "n_tests": n_tests, "thresholds": {}, "mean_loss": {},
                           "p_value": {}, "automation": {}, "min_slides": {},
                           "slides_needed_at_half_alpha": {}, "notes": {}}
    for k, name in enumerate(classes):
        a = float(per_class.get(name, alpha))
        rows = pred == k
        losses, n_acc = slide_losses(conf[rows], labels[rows] != k, slide_index[rows], n_slides,
                                     grid)
        scan = scan_slide_thresholds(losses, a, level, grid)
        thr = scan["threshold"]
        out["thresholds"][name] = thr
        out["mean_loss"][name] = scan["mean_loss"]
        out["p_value"][name] = scan["p_value"]
        n_pred = int(rows.sum())
        out["automation"][name] = (float(n_acc[:, scan["index"]].sum() / n_pred)
                                   if thr is not None and n_pred else 0.0)
        out["min_slides"][name] = min_slides(a, delta, n_tests)
        out["slides_needed_at_half_alpha"][name] = slides_needed(a, a / 2, delta, n_tests)
        if thr is None:
            need = out["min_slides"][name]
            out["notes"][name] = (
                f"not certified at slide level: {n_slides} calibration slides, at least {need} "
                f"are needed at α = {a:g} even with no errors (≈ "
                f"{out['slides_needed_at_half_alpha'][name]} when the accepted error runs at "
                f"α/2)" if n_slides < need else
                f"not certified at slide level: mean slide loss {scan['mean_loss']:.4f} at the "
                f"first grid threshold fails the test at α = {a:g} with {n_slides} slides")
    alphas = ", ".join(f"{c}: {per_class.get(c, alpha):g}" for c in classes)
    out["guarantee"] = GUARANTEE_SLIDES.format(n_slides=n_slides, conf=1 - delta, alphas=alphas)
    return out


def grid_at_or_above(threshold: float, slide_threshold: float, grid: np.ndarray = GRID) -> float:
    """The lowest grid point ≥ both thresholds (every grid point from the top down to the
    slide-level threshold was certified, so this one is too)."""
    lo = max(threshold, slide_threshold)
    above = grid[grid >= lo - 1e-15]
    return float(above.min()) if len(above) else float(grid[0])
