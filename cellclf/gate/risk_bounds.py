"""Learn-then-Test statistics behind the review gate (numpy/scipy only, pure functions).

Where it sits in the flow: used by :func:`cellclf.gate.thresholds.fit_gate` on the calibration split
(trainer side); nothing here runs per slide. Every test runs at confidence 1 − δ/M, M being the
number of statements the gate certifies (see :mod:`cellclf.gate.thresholds`).

Error bound, per predicted class c (α_c = ``alpha_per_class[c]``, else α):
  * Calibration cells predicted c (argmax) with confidence (max prob) s_i and error e_i.
  * Candidate thresholds: the distinct s_i, scanned in descending order λ_1 > λ_2 > ….
  * At λ_j: n_j = #{s_i ≥ λ_j}, k_j = #{s_i ≥ λ_j, e_i = 1}. Null hypothesis H_j: the error rate
    among cells with s ≥ λ_j exceeds α_c. Reject H_j iff the one-sided Clopper–Pearson upper
    bound U(k_j, n_j; 1 − δ/M) ≤ α_c.
  * With zero errors U(0, n) = 1 − (δ/M)^(1/n), so no H_j with n_j < n_min = ⌈ln(δ/M) /
    ln(1 − α_c)⌉ (437 for α = 0.01, δ = 0.05, M = 4; 492 for M = 7) can ever be rejected. The
    sequence therefore starts at the highest λ_j with n_j ≥ n_min (which depends on the
    confidences only, never on the errors). Fewer than n_min cells predicted c: not certified.
  * Fixed sequence: continue while rejected; λ_c = the last rejected λ_j. If the first tested
    H_j is not rejected, class c is not certified: all its cells go to review.
  The grid is the calibration data's own confidences. When the error rate falls as confidence
  rises the first untrue rejection would have to occur at the first grid point below the true
  crossing, whose errors stochastically dominate Binomial(n, α), so the level is kept;
  tests/test_gate.py checks this by simulation.

Miss bound, per target class t (what a count needs: a target cell auto-accepted as ``other`` is
never counted, nor reviewed):
  * m_t(λ) = P(predicted ``other`` with confidence ≥ λ | true class t): non-increasing in the
    ``other`` threshold λ, deterministically. Among the N_t calibration cells of true class t,
    k_t(λ) = #{predicted other, s ≥ λ}; given the labels, k_t(λ) ~ Binomial(N_t, m_t(λ)).
  * Fixed sequence over λ descending, H_λ: m_t(λ) > β, rejected iff U(k_t(λ), N_t; 1 − δ/M) ≤ β.
    As k_t only grows while λ falls, the rejections form a prefix: with k_max the largest k such
    that U(k, N_t) ≤ β, every λ above the (k_max+1)-th highest confidence among the true-t cells
    predicted ``other`` is certified (λ_t = the next float above it; no floor when at most k_max
    such cells exist; not certifiable when U(0, N_t) > β). If λ_t certified an untrue H, then
    at the largest λ' with m_t(λ') > β (or a limit of such points; the scan passed it)
    k_t(λ') ≤ k_max, whose probability is ≤ P(Binomial(N_t, β) ≤ k_max) ≤ δ/M. Monotonicity
    makes this exact for any confidence distribution: no grid argument is needed.
  * ``other``'s threshold is the lowest λ its error-bound scan certifies at or above every λ_t
    (the scan stops at that floor), so both of its statements hold at once.
"""

from __future__ import annotations

import math

import numpy as np

from cellclf.gate.temperature import CalibrationError


def clopper_pearson_upper(k: np.ndarray | int, n: np.ndarray | int,
                          confidence: float) -> np.ndarray | float:
    """One-sided Clopper–Pearson upper bound on a binomial rate: Beta⁻¹(confidence; k+1, n−k).

    P(Binomial(n, U) ≤ k) = 1 − confidence at p = U. Conventions: k = n → 1; n = 0 → 1.
    Vectorised over k and n (returns a float for scalar input).
    """
    from scipy.stats import beta

    k_arr = np.asarray(k, dtype=np.float64)
    n_arr = np.asarray(n, dtype=np.float64)
    if np.any(k_arr < 0) or np.any(k_arr > n_arr):
        raise CalibrationError(f"clopper_pearson_upper: need 0 ≤ k ≤ n, got k={k}, n={n}.")
    if not 0.0 < confidence < 1.0:
        raise CalibrationError(f"clopper_pearson_upper: confidence must be in (0, 1), "
                               f"got {confidence}.")
    full = k_arr >= n_arr
    with np.errstate(all="ignore"):
        u = beta.ppf(confidence, k_arr + 1.0, np.where(full, 1.0, n_arr - k_arr))
    u = np.where(full, 1.0, u)
    return float(u) if u.ndim == 0 else u


def min_cells_zero_errors(alpha: float, delta: float, n_classes: int) -> int:
    """Smallest n with U(0, n; 1 − δ/K) = 1 − (δ/K)^(1/n) ≤ α, i.e. ⌈ln(δ/K) / ln(1 − α)⌉."""
    n = math.ceil(math.log(delta / n_classes) / math.log1p(-alpha) - 1e-9)
    while 1.0 - (delta / n_classes) ** (1.0 / n) > alpha:  # guard the ceil against rounding
        n += 1
    return n


def _upper_unique(k: np.ndarray, n: np.ndarray, confidence: float) -> np.ndarray:
    """clopper_pearson_upper evaluated once per distinct (k, n) pair (k, n int arrays)."""
    key = k.astype(np.int64) * (int(n.max(initial=0)) + 1) + n.astype(np.int64)
    uniq, inverse = np.unique(key, return_inverse=True)
    base = int(n.max(initial=0)) + 1
    u = np.atleast_1d(clopper_pearson_upper(uniq // base, uniq % base, confidence))
    return u[inverse].reshape(k.shape)


def scan_thresholds(conf: np.ndarray, wrong: np.ndarray, alpha: float, confidence: float,
                    n_min: int = 1, floor: float | np.ndarray = -np.inf) -> dict[str, np.ndarray]:
    """Fixed-sequence threshold scan for R independent rows at once (one class each).

    ``conf`` and ``wrong`` are (R, n): confidences and error flags of the calibration cells
    predicted as the class. Candidates are the distinct confidences of a row, highest first,
    whose count n_j = #{conf ≥ λ_j} is at least ``n_min``: hypotheses with fewer cells cannot be
    rejected even with zero errors, so they are left out of the sequence (they depend on the
    confidences only, never on the errors). The sequence stops at ``floor`` (scalar or (R,)):
    candidates below it are not tested. Returns per row: ``threshold`` (NaN = not certified),
    ``n_accepted``, ``n_accepted_errors`` and ``upper_bound`` (the bound at the threshold; for
    an uncertified row, at the first candidate, or 1 when there is none).
    """
    conf = np.atleast_2d(np.asarray(conf, dtype=np.float64))
    wrong = np.atleast_2d(np.asarray(wrong, dtype=bool))
    r, n = conf.shape
    out = {"threshold": np.full(r, np.nan), "n_accepted": np.zeros(r, dtype=np.int64),
           "n_accepted_errors": np.zeros(r, dtype=np.int64), "upper_bound": np.ones(r)}
    if n == 0:
        return out
    floor_col = np.broadcast_to(np.asarray(floor, dtype=np.float64), (r,))[:, None]
    order = np.argsort(-conf, axis=1, kind="stable")
    conf_s = np.take_along_axis(conf, order, axis=1)
    cum_err = np.cumsum(np.take_along_axis(wrong, order, axis=1), axis=1)
    n_j = np.broadcast_to(np.arange(1, n + 1), (r, n))
    last_of_tie = np.concatenate([conf_s[:, 1:] != conf_s[:, :-1], np.ones((r, 1), bool)], 1)
    cand = last_of_tie & (n_j >= n_min) & (conf_s >= floor_col)
    upper = np.ones((r, n))
    upper[cand] = _upper_unique(cum_err[cand], n_j[cand], confidence)
    fail = cand & (upper > alpha)
    first_fail = np.where(fail.any(axis=1), fail.argmax(axis=1), n)
    passed = cand & (upper <= alpha) & (np.arange(n)[None, :] < first_fail[:, None])
    has = passed.any(axis=1)
    j = n - 1 - passed[:, ::-1].argmax(axis=1)  # last passed position before the first failure
    rows = np.arange(r)
    out["threshold"] = np.where(has, conf_s[rows, j], np.nan)
    out["n_accepted"] = np.where(has, j + 1, 0)
    out["n_accepted_errors"] = np.where(has, cum_err[rows, j], 0)
    first_cand = np.where(cand.any(axis=1), cand.argmax(axis=1), 0)
    out["upper_bound"] = np.where(has, upper[rows, j],
                                  np.where(cand.any(axis=1), upper[rows, first_cand], 1.0))
    return out


def max_misses(n_true: int, beta: float, confidence: float) -> int:
    """Largest k with U(k, n_true; confidence) ≤ β (−1 when even k = 0 fails).

    U(k, n) > k/n, so only k ≤ ⌊β·n⌋ can pass; U grows with k, so the passing k are a prefix.
    """
    if n_true <= 0:
        return -1
    ks = np.arange(0, min(n_true, math.floor(beta * n_true)) + 1)
    u = np.atleast_1d(clopper_pearson_upper(ks, np.full(len(ks), n_true), confidence))
    return int((u <= beta).sum()) - 1


def miss_threshold(miss_conf: np.ndarray, n_true: int, beta: float,
                   confidence: float) -> tuple[float, int]:
    """Lowest ``other`` threshold that keeps the miss bound of one target class (module docstring).

    ``miss_conf``: confidences of the calibration cells of true class t predicted ``other``;
    ``n_true``: all calibration cells of true class t. Returns (λ_t, k_max): λ_t = 0.0 when at
    most k_max cells are missed at any threshold (no floor), NaN when no threshold below 1 can be
    certified (U(0, n_true) > β), else the next float above the (k_max+1)-th highest miss
    confidence, so that #{miss_conf ≥ λ_t} ≤ k_max.
    """
    k_max = max_misses(n_true, beta, confidence)
    if k_max < 0:
        return math.nan, k_max
    c = np.sort(np.asarray(miss_conf, dtype=np.float64))[::-1]
    if len(c) <= k_max:
        return 0.0, k_max
    return float(np.nextafter(c[k_max], np.inf)), k_max
