"""The review gate: risk-controlled per-class confidence thresholds (numpy/scipy only).

Where it sits in the flow: ``classify ▶ calibrated probs ─gate─▶ accept(label) | review(reason)``.
:func:`fit_gate` runs once on the calibration split (trainer side) and its :class:`GateParams`
go into the model card's ``gate`` section; :func:`apply_gate` runs on every slide (deployment,
no torch); :func:`evaluate_gate` produces the test-split table for metrics.json.

Maths (Learn-then-Test with fixed-sequence testing, per predicted class c of K):
  * Calibration cells predicted c (argmax) with confidence (max prob) s_i and error e_i.
  * Candidate thresholds: the distinct s_i, scanned in descending order λ_1 > λ_2 > ….
  * At λ_j: n_j = #{s_i ≥ λ_j}, k_j = #{s_i ≥ λ_j, e_i = 1}. Null hypothesis H_j: the error rate
    among cells with s ≥ λ_j exceeds α. Reject H_j iff the one-sided Clopper–Pearson upper
    bound U(k_j, n_j; 1 − δ/K) ≤ α.
  * With zero errors U(0, n) = 1 − (δ/K)^(1/n), so no H_j with n_j < n_min = ⌈ln(δ/K) /
    ln(1 − α)⌉ (437 for α = 0.01, δ = 0.05, K = 4) can ever be rejected. The sequence therefore
    starts at the highest λ_j with n_j ≥ n_min (which depends on the confidences only, never on
    the errors); taken literally from λ_1 (n = 1) it would always stop at once. Fewer than n_min
    calibration cells predicted c means class c cannot be certified at all.
  * Fixed sequence: continue while rejected; λ_c = the last rejected λ_j (the lowest threshold
    reached before the first failure). If the first tested H_j is not rejected, class c is not
    certified: all its cells go to review.
  * Each class is a level-δ/K family-wise test, so by the union bound, with probability ≥ 1 − δ
    over the calibration draw, every class's error rate among auto-accepted cells is ≤ α — for
    cells exchangeable with the calibration cells.
The candidate grid is the calibration data's own confidences (as the design asks). When the
error rate falls as confidence rises (a monotone calibration curve) the first untrue rejection
would have to occur at the first grid point below the true crossing, whose errors stochastically
dominate Binomial(n, α), so the level is kept; tests/test_gate.py checks this by simulation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from cellclf.calibrate import CalibrationError, check_scores

REASONS = ("accepted", "low_confidence", "uncertified_class", "ood_slide")

GUARANTEE = ("For slides exchangeable with the calibration slides, with probability at least "
             "{conf:g} (1 − δ, δ = {delta:g}) over the draw of the calibration set, the error "
             "rate among auto-accepted cells of each predicted class is at most α = {alpha:g}. "
             "Cells below their class threshold, cells of uncertified classes and all cells of "
             "slides flagged out-of-distribution go to review.")


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
                    n_min: int = 1) -> dict[str, np.ndarray]:
    """Fixed-sequence threshold scan for R independent rows at once (one class each).

    ``conf`` and ``wrong`` are (R, n): confidences and error flags of the calibration cells
    predicted as the class. Candidates are the distinct confidences of a row, highest first,
    whose count n_j = #{conf ≥ λ_j} is at least ``n_min``: hypotheses with fewer cells cannot be
    rejected even with zero errors, so they are left out of the sequence (they depend on the
    confidences only, never on the errors). Returns per row: ``threshold`` (NaN = not
    certified), ``n_accepted``, ``n_accepted_errors`` and ``upper_bound`` (the bound at the
    threshold; for an uncertified row, at the first candidate, or 1 when there is none).
    """
    conf = np.atleast_2d(np.asarray(conf, dtype=np.float64))
    wrong = np.atleast_2d(np.asarray(wrong, dtype=bool))
    r, n = conf.shape
    out = {"threshold": np.full(r, np.nan), "n_accepted": np.zeros(r, dtype=np.int64),
           "n_accepted_errors": np.zeros(r, dtype=np.int64), "upper_bound": np.ones(r)}
    if n == 0:
        return out
    order = np.argsort(-conf, axis=1, kind="stable")
    conf_s = np.take_along_axis(conf, order, axis=1)
    cum_err = np.cumsum(np.take_along_axis(wrong, order, axis=1), axis=1)
    n_j = np.broadcast_to(np.arange(1, n + 1), (r, n))
    last_of_tie = np.concatenate([conf_s[:, 1:] != conf_s[:, :-1], np.ones((r, 1), bool)], 1)
    cand = last_of_tie & (n_j >= n_min)
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


@dataclass(frozen=True)
class GateParams:
    """Fitted gate; ``to_dict`` is the model card's ``gate`` section (JSON-ready)."""

    classes: tuple[str, ...]
    alpha: float
    delta: float
    thresholds: dict[str, float | None]
    n_cal: dict[str, int]  # calibration cells PREDICTED as the class
    n_cal_errors: dict[str, int]
    n_cal_accepted: dict[str, int]
    n_cal_accepted_errors: dict[str, int]
    upper_bound: dict[str, float]
    min_cells_zero_errors: int
    n_more_needed: dict[str, int]  # extra error-free cells needed; 0 = enough cells
    notes: dict[str, str]
    temperature: float | None = None
    date: str = ""
    guarantee: str = ""
    method: str = field(default="learn-then-test fixed-sequence, Clopper-Pearson, delta/K per class")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], classes: list[str] | None = None) -> GateParams:
        """Read a card ``gate`` section; ``classes`` (the card's, in column order) is used when
        the section does not list them itself."""
        try:
            classes = tuple(d.get("classes") or classes or ())
            if not classes:
                raise KeyError("classes")
            thresholds = {c: (None if d["thresholds"][c] is None else float(d["thresholds"][c]))
                          for c in classes}
            kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
            kw.update(classes=classes, thresholds=thresholds,
                      alpha=float(d["alpha"]), delta=float(d["delta"]))
            for key in ("n_cal", "n_cal_errors", "n_cal_accepted", "n_cal_accepted_errors",
                        "n_more_needed"):
                kw.setdefault(key, {c: 0 for c in classes})
            kw.setdefault("upper_bound", {c: 1.0 for c in classes})
            kw.setdefault("notes", {})
            kw.setdefault("min_cells_zero_errors",
                          min_cells_zero_errors(kw["alpha"], kw["delta"], len(classes)))
            return cls(**kw)
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(
                f"model card 'gate' section is invalid ({exc!r}); it needs classes, alpha, delta "
                "and thresholds for every class — refit it with `fit_gate`.") from exc


def _check_rates(alpha: float, delta: float) -> None:
    for name, v in (("alpha", alpha), ("delta", delta)):
        if not 0.0 < v < 1.0:
            raise CalibrationError(f"gate {name} must be in (0, 1), got {v}.")


def fit_gate(probs: np.ndarray, labels: np.ndarray, classes: list[str] | tuple[str, ...],
             alpha: float = 0.01, delta: float = 0.05, temperature: float | None = None,
             date: str | None = None) -> GateParams:
    """Fit per-class thresholds on calibrated calibration-split probabilities (module docstring).

    ``probs`` (N, K) are the temperature-scaled probabilities, ``labels`` (N,) the true class
    indices into ``classes``. Each predicted class is tested at level δ/K.
    """
    _check_rates(alpha, delta)
    p, y = check_scores(probs, labels)
    classes = tuple(classes)
    if len(classes) != p.shape[1]:
        raise CalibrationError(f"fit_gate: {len(classes)} class names for {p.shape[1]} "
                               "probability columns; pass the card's classes in column order.")
    k_cls = len(classes)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    wrong = pred != y
    level = 1.0 - delta / k_cls
    n_min = min_cells_zero_errors(alpha, delta, k_cls)
    scans = {}
    for i, c in enumerate(classes):
        sel = pred == i
        res = scan_thresholds(conf[sel][None, :], wrong[sel][None, :], alpha, level, n_min)
        t = float(res["threshold"][0])
        scans[c] = {"thresholds": None if np.isnan(t) else t, "n_cal": int(sel.sum()),
                    "n_cal_errors": int(wrong[sel].sum()),
                    "n_cal_accepted": int(res["n_accepted"][0]),
                    "n_cal_accepted_errors": int(res["n_accepted_errors"][0]),
                    "upper_bound": float(res["upper_bound"][0])}
    notes: dict[str, str] = {}
    more: dict[str, int] = {}
    for c, s in scans.items():
        uncertified = s["thresholds"] is None
        more[c] = max(0, n_min - s["n_cal"]) if uncertified else 0
        if uncertified and s["n_cal"] < n_min:
            notes[c] = (f"not certified: {s['n_cal']} calibration cells predicted '{c}', at "
                        f"least {n_min} are needed even with zero errors ({more[c]} more); all "
                        f"'{c}' cells go to review")
        elif uncertified:
            notes[c] = (f"not certified: the {n_min} most confident '{c}' cells already have an "
                        f"error bound {s['upper_bound']:.3g} > alpha={alpha:g}; all '{c}' cells "
                        "go to review")
    return GateParams(
        classes=classes, alpha=float(alpha), delta=float(delta),
        **{key: {c: s[key] for c, s in scans.items()}
           for key in ("thresholds", "n_cal", "n_cal_errors", "n_cal_accepted",
                       "n_cal_accepted_errors", "upper_bound")},
        min_cells_zero_errors=n_min, n_more_needed=more, notes=notes,
        temperature=None if temperature is None else float(temperature),
        date=date or datetime.now(UTC).strftime("%Y-%m-%d"),
        guarantee=GUARANTEE.format(conf=1.0 - delta, delta=delta, alpha=alpha),
    )


def _threshold_vector(gate: GateParams) -> np.ndarray:
    """Per-class thresholds as an array; NaN = uncertified."""
    return np.array([np.nan if gate.thresholds.get(c) is None else gate.thresholds[c]
                     for c in gate.classes], dtype=np.float64)


def apply_gate(probs: np.ndarray, gate: GateParams,
               ood_slide: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Gate decisions: ``accept`` bool (N,) and ``reason`` str (N,) from :data:`REASONS`.

    Precedence: ``ood_slide`` (the whole slide failed the OOD guard) > ``uncertified_class``
    (predicted class has no threshold) > ``low_confidence`` (max prob < λ_class) > ``accepted``.
    """
    p, _ = check_scores(probs)
    if p.shape[1] != len(gate.classes):
        raise CalibrationError(f"apply_gate: probabilities have {p.shape[1]} columns but the "
                               f"gate has {len(gate.classes)} classes {list(gate.classes)}.")
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    lam = _threshold_vector(gate)[pred]
    certified = ~np.isnan(lam)
    accept = certified & (conf >= np.where(certified, lam, np.inf))
    reason = np.where(accept, "accepted",
                      np.where(certified, "low_confidence", "uncertified_class")).astype("<U17")
    if ood_slide:
        accept = np.zeros_like(accept)
        reason = np.full(len(p), "ood_slide", dtype="<U17")
    return accept, reason


def review_priority(probs: np.ndarray) -> np.ndarray:
    """Review-queue priority in [0, 1], higher = review first: 1 − (p_top1 − p_top2).

    A small margin between the two most likely classes means the model is torn between two
    labels, so the reviewer's answer changes a count most often there; confident errors of an
    uncertified class still rank by their own margin.
    """
    p, _ = check_scores(probs)
    top2 = -np.partition(-p, 1, axis=1)[:, :2]
    return 1.0 - (top2[:, 0] - top2[:, 1])


def _rates(pred: np.ndarray, y: np.ndarray, accept: np.ndarray) -> dict[str, float | int | None]:
    n, n_acc = len(pred), int(accept.sum())
    n_err = int((pred[accept] != y[accept]).sum())
    return {"n": n, "n_accepted": n_acc, "automation_rate": n_acc / n if n else None,
            "accepted_error": n_err / n_acc if n_acc else None, "n_accepted_errors": n_err}


def evaluate_gate(probs: np.ndarray, labels: np.ndarray, gate: GateParams) -> dict[str, Any]:
    """Test-split table for metrics.json, with and without the gate.

    automation_rate = accepted / all cells; accepted_error = wrong among accepted (None when
    nothing is accepted); per predicted class also its threshold and n_cal; ``recall`` per TRUE
    class = share of cells of that class that end up accepted with the right label (gate) or
    predicted right (no gate). ``no_gate`` accepts everything.
    """
    p, y = check_scores(probs, labels)
    accept, _ = apply_gate(p, gate)
    pred = p.argmax(axis=1)
    everything = np.ones(len(y), dtype=bool)
    out: dict[str, Any] = {"alpha": gate.alpha, "delta": gate.delta,
                           **_rates(pred, y, accept), "per_class": {}}
    no_gate: dict[str, Any] = {**_rates(pred, y, everything), "per_class": {}}
    for i, c in enumerate(gate.classes):
        sel, true_c = pred == i, y == i
        out["per_class"][c] = {**_rates(pred[sel], y[sel], accept[sel]),
                               "threshold": gate.thresholds.get(c), "n_cal": gate.n_cal.get(c),
                               "recall": _recall(true_c, pred == y, accept)}
        no_gate["per_class"][c] = {**_rates(pred[sel], y[sel], everything[sel]),
                                   "recall": _recall(true_c, pred == y, everything)}
    out["no_gate"] = no_gate
    return out


def _recall(true_c: np.ndarray, right: np.ndarray, accept: np.ndarray) -> float | None:
    n = int(true_c.sum())
    return float((true_c & right & accept).sum() / n) if n else None
