"""Calibration maths: temperature scaling, ECE, reliability bins, risk–coverage (numpy/scipy only).

Where it sits in the flow: ``classify ▶ logits ─/T─▶ calibrated probabilities ─▶ gate``. The
trainer fits the temperature T on a held-out calibration split (:func:`fit_temperature`); the
model graph then divides its logits by T before the softmax, and :mod:`cellclf.gate.thresholds` fits the
per-class review thresholds on the calibrated probabilities. Everything here is pure and
vectorised, so the deployment path needs no torch.

Notation: ``logits`` z is (N, K), ``labels`` y is (N,) integers in [0, K), ``probs`` p is (N, K)
with rows summing to 1. Confidence = max_k p_k, prediction = argmax_k p_k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellclf.errors import CellclfError


class CalibrationError(CellclfError):
    """Calibration / gate inputs are unusable (empty, wrong shape, labels out of range, NaN)."""


def check_scores(scores: np.ndarray, labels: np.ndarray | None = None, *, name: str = "probs",
                 probs: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate an (N, K) score matrix (and optional labels); return float64 / int64 copies.

    Raises :class:`CalibrationError` naming ``name`` for: not 2-D, N = 0, K < 2, non-finite
    values, labels of the wrong length or outside [0, K), and (``probs=True``) rows that are
    negative or do not sum to 1 within 1e-3.
    """
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 2:
        raise CalibrationError(f"{name}: expected an (N, K) array, got shape {arr.shape}; "
                               "pass one row per cell and one column per class.")
    if arr.shape[0] == 0:
        raise CalibrationError(f"{name}: no cells (N = 0); the calibration split is empty — "
                               "check the annotations selected for calibration.")
    if arr.shape[1] < 2:
        raise CalibrationError(f"{name}: need at least 2 classes, got K = {arr.shape[1]}.")
    if not np.all(np.isfinite(arr)):
        raise CalibrationError(f"{name}: contains NaN or infinite values; check the model output.")
    if probs and (np.any(arr < -1e-9) or np.any(np.abs(arr.sum(axis=1) - 1.0) > 1e-3)):
        raise CalibrationError(f"{name}: rows must be probabilities (≥ 0, summing to 1); "
                               "pass softmax outputs, not logits.")
    if labels is None:
        return arr, None
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] != arr.shape[0]:
        raise CalibrationError(f"labels: expected shape ({arr.shape[0]},) to match {name}, "
                               f"got {lab.shape}.")
    if lab.dtype.kind not in "iu":
        if lab.dtype.kind == "f" and np.all(np.isfinite(lab)) and np.all(lab == np.round(lab)):
            lab = lab.astype(np.int64)
        else:
            raise CalibrationError(f"labels: expected integer class indices, got dtype {lab.dtype}.")
    lab = lab.astype(np.int64)
    bad = (lab < 0) | (lab >= arr.shape[1])
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise CalibrationError(f"labels: value {int(lab[i])} at index {i} is outside [0, "
                               f"{arr.shape[1]}); labels must index the {arr.shape[1]} classes.")
    return arr, lab


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Stable log softmax of z/T along the last axis: z/T − max − log Σ exp(z/T − max)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Calibrated probabilities softmax(z / T), computed stably (rows sum to 1)."""
    if not temperature > 0:
        raise CalibrationError(f"temperature must be > 0, got {temperature}.")
    return np.exp(log_softmax(logits, temperature))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood −(1/N) Σ_i log softmax(z_i / T)[y_i]."""
    z, y = check_scores(logits, labels, name="logits", probs=False)
    return float(-log_softmax(z, temperature)[np.arange(len(y)), y].mean())


def temperature_objective(log_t: float, logits: np.ndarray,
                          labels: np.ndarray) -> tuple[float, float]:
    """NLL at T = e^s and its analytic derivative dNLL/ds (see :func:`fit_temperature`)."""
    t = float(np.exp(log_t))
    rows = np.arange(len(labels))
    logp = log_softmax(logits, t)
    value = float(-logp[rows, labels].mean())
    expected_z = (np.exp(logp) * logits).sum(axis=1)
    grad = float(((logits[rows, labels] - expected_z) / t).mean())
    return value, grad


def fit_temperature(logits: np.ndarray, labels: np.ndarray,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature T > 0 minimising the calibration NLL, by L-BFGS-B over s = log T.

    NLL(s) = (1/N) Σ_i [logsumexp(z_i / T) − z_{i,y_i} / T] with T = e^s. Its derivative is
    dNLL/ds = (1/N) Σ_i (z_{i,y_i} − Σ_k p_ik z_ik) / T, with p_i = softmax(z_i / T), which is
    passed to scipy as the analytic gradient. The problem is convex in 1/T, so the optimum is
    unique; ``bounds`` (in T) keep it finite when the data are perfectly separable.
    """
    from scipy.optimize import minimize

    z, y = check_scores(logits, labels, name="logits", probs=False)

    def objective(s: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = temperature_objective(float(s[0]), z, y)
        return value, np.array([grad])

    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    res = minimize(objective, x0=np.array([0.0]), jac=True, method="L-BFGS-B",
                   bounds=[(lo, hi)], options={"ftol": 1e-12, "gtol": 1e-9, "maxiter": 200})
    if not np.isfinite(res.x[0]):
        raise CalibrationError(f"temperature fit failed: {res.message}")
    return float(np.exp(res.x[0]))


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin reliability table (equal-width bins on confidence over (0, 1]).

    Bin b covers (lower[b], upper[b]]; ``count`` cells fall in it with mean confidence
    ``confidence`` and accuracy ``accuracy`` (NaN for empty bins).
    """

    lower: np.ndarray
    upper: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    @property
    def ece(self) -> float:
        """Σ_b (n_b / N) |acc_b − conf_b| over non-empty bins."""
        n = self.count.sum()
        used = self.count > 0
        gap = np.abs(self.accuracy[used] - self.confidence[used])
        return float((self.count[used] * gap).sum() / n)

    def to_dict(self) -> dict[str, list[float]]:
        return {k: [float(v) for v in getattr(self, k)]
                for k in ("lower", "upper", "count", "confidence", "accuracy")}


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> ReliabilityBins:
    """Bin cells by confidence c = max_k p_k into ``n_bins`` equal-width bins (b/B, (b+1)/B].

    accuracy_b = share of cells in bin b whose argmax equals the label; confidence_b = mean c.
    """
    if n_bins < 1:
        raise CalibrationError(f"n_bins must be ≥ 1, got {n_bins}.")
    p, y = check_scores(probs, labels)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return ReliabilityBins(edges[:-1], edges[1:], count, mean_conf, acc)


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error: Σ_b (n_b/N) |accuracy_b − confidence_b| (see reliability_bins)."""
    return reliability_bins(probs, labels, n_bins).ece


@dataclass(frozen=True)
class RiskCoverage:
    """Selective-classification curve: accept the m most confident cells, m = 1 … N.

    ``coverage[m-1] = m/N``, ``risk[m-1]`` = error rate among them, ``threshold[m-1]`` = the
    confidence of the m-th cell (accepting all cells with confidence ≥ it). Ties in confidence
    are collapsed to their last position, so every point is reachable by a threshold.
    """

    coverage: np.ndarray
    risk: np.ndarray
    threshold: np.ndarray

    @property
    def aurc(self) -> float:
        """Area under the risk–coverage curve (mean risk over the reachable points, step rule)."""
        cov = np.concatenate([[0.0], self.coverage])
        return float((np.diff(cov) * self.risk).sum())


def risk_coverage(probs: np.ndarray, labels: np.ndarray) -> RiskCoverage:
    """Risk–coverage curve of the max-probability selector (see :class:`RiskCoverage`)."""
    p, y = check_scores(probs, labels)
    conf = p.max(axis=1)
    wrong = (p.argmax(axis=1) != y).astype(np.float64)
    order = np.argsort(-conf, kind="stable")
    conf_s = conf[order]
    cum_err = np.cumsum(wrong[order])
    m = np.arange(1, len(conf_s) + 1)
    last_of_tie = np.r_[conf_s[1:] != conf_s[:-1], True]
    return RiskCoverage(coverage=m[last_of_tie] / len(conf_s),
                        risk=cum_err[last_of_tie] / m[last_of_tie],
                        threshold=conf_s[last_of_tie])


def calibration_report(logits: np.ndarray, labels: np.ndarray, temperature: float,
                       n_bins: int = 15) -> dict[str, float]:
    """Before/after numbers for metrics.json: NLL, ECE and accuracy at T = 1 and at T."""
    z, y = check_scores(logits, labels, name="logits", probs=False)
    before, after = softmax(z), softmax(z, temperature)
    return {
        "temperature": float(temperature),
        "n": int(len(y)),
        "accuracy": float((before.argmax(axis=1) == y).mean()),
        "nll_before": nll(z, y), "nll_after": nll(z, y, temperature),
        "ece_before": ece(before, y, n_bins), "ece_after": ece(after, y, n_bins),
    }
