"""The review gate: risk-controlled per-class confidence thresholds (numpy/scipy only).

Where it sits in the flow: ``classify ▶ calibrated probs ─gate─▶ accept(label) | review(reason)``.
:func:`fit_gate` runs once on the calibration split (trainer side) and its :class:`GateParams`
go into the model card's ``gate`` section; :func:`apply_gate` runs on every slide (deployment,
no torch); :func:`evaluate_gate` produces the test-split table for metrics.json.

What is certified (Learn-then-Test, fixed-sequence testing, Clopper–Pearson bounds; the two
scans and why each keeps its level are in :mod:`cellclf.gate.risk_bounds`), M statements at once:
  (a) error bound, per predicted class c: the error rate among auto-accepted cells of class c is
      at most α_c (``alpha_per_class[c]``, else α) — K statements, ``other`` included;
  (b) miss bound (when β is set), per target class t (every class but ``other``): the share of
      true-t cells auto-accepted as ``other`` is at most β — K − 1 statements. Such a cell is
      neither counted nor reviewed, so this is what a count needs; it floors ``other``'s threshold.
δ is split evenly (Bonferroni) over the M = K (no β) or 2K − 1 statements: each test runs at
confidence 1 − δ/M.
Union bound: with probability ≥ 1 − δ over the calibration draw, all M statements hold at once —
for cells exchangeable with the calibration cells. For counts, with a reviewer who is always
right, a target class t's count over detected cells is then off on average by at most
+α_t·A_t/N_t (false cells accepted as t) and −(β + Σ_{c ≠ t, other} α_c·A_c/N_t) (true t cells
accepted as another class), A_c being the cells auto-accepted as c.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from cellclf.card import DEFAULT_OTHER_CLASS
from cellclf.gate import risk_bounds
from cellclf.gate.risk_bounds import min_cells_zero_errors, miss_threshold, scan_thresholds
from cellclf.gate.temperature import CalibrationError, check_scores

__all__ = ["GUARANTEE", "GUARANTEE_MISS", "REASONS", "GateParams", "apply_gate", "catch_all",
           "evaluate_gate", "fit_gate", "min_cells_zero_errors",
           "miss_threshold", "review_counts", "review_priority", "scan_thresholds", "target_classes"]

REASONS = ("accepted", "low_confidence", "uncertified_class", "ood_slide")

GUARANTEE = ("For slides exchangeable with the calibration slides, with probability at least {conf:g} (1 − "
             "δ, δ = {delta:g}) over the draw of the calibration set, the error rate among auto-accepted "
             "cells of each predicted class is at most α = {alpha:g}. Cells below their class threshold, "
             "cells of uncertified classes and all cells of slides flagged out-of-distribution go to "
             "review.")

GUARANTEE_MISS = ("For slides exchangeable with the calibration slides, with probability at least {conf:g} "
                  "(1 − δ, δ = {delta:g}, split evenly over the {m} statements) over the draw of the "
                  "calibration set, all of these hold at once: (a) for each predicted class c, the error "
                  "rate among auto-accepted cells of class c is at most α_c ({alphas}); (b) for each target "
                  "class t ({targets}), the share of true-t cells auto-accepted as '{other}' is at most β = "
                  "{beta:g}. So, with every reviewed cell labelled right, a target class's count over "
                  "detected cells is off on average by at most α_t·A_t/N_t upwards and β + Σ α_c·A_c/N_t (c "
                  "another target class) downwards, where A_c is the number of cells auto-accepted as c and "
                  "N_t the true number of t. Cells below their class threshold, cells of uncertified "
                  "classes and all cells of slides flagged out-of-distribution go to review; cells the "
                  "detector misses are not covered.")


@dataclass(frozen=True)
class GateParams:
    """Fitted gate; ``to_dict`` is the model card's ``gate`` section (JSON-ready).

    Cards written before the miss bound lack ``alpha_per_class``, ``beta``, ``other_class``,
    ``n_tests`` and ``miss``; they read as α for every class, no miss bound and δ/K per class.
    """

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
    alpha_per_class: dict[str, float] = field(default_factory=dict)  # overrides of alpha
    beta: float | None = None  # miss bound per target class; None = none (old cards)
    other_class: str | None = None
    n_tests: int = 0  # statements δ is split over; 0 (old cards) = one per class
    miss: dict[str, dict[str, Any]] = field(default_factory=dict)  # per target class

    def alpha_for(self, cls_name: str) -> float:
        """The error bound α_c of a class (its override, else α)."""
        return float(self.alpha_per_class.get(cls_name, self.alpha))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], classes: list[str] | None = None) -> GateParams:
        """Read a card ``gate`` section; ``classes`` (the card's, in column order) is used when
        the section does not list them itself. Missing newer keys keep the old behaviour."""
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
            kw["alpha_per_class"] = {c: float(v) for c, v in (kw.get("alpha_per_class") or {}).items()}
            if kw.get("beta") is not None:
                kw["beta"] = float(kw["beta"])
            kw.setdefault("min_cells_zero_errors", min_cells_zero_errors(
                kw["alpha"], kw["delta"], int(kw.get("n_tests") or len(classes))))
            return cls(**kw)
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(
                f"model card 'gate' section is invalid ({exc!r}); it needs classes, alpha, delta "
                "and thresholds for every class — refit it with `fit_gate`.") from exc


def _check_rates(alpha: float, delta: float, alpha_per_class: dict[str, float],
                 beta: float | None, classes: tuple[str, ...], other_class: str) -> None:
    rates = [("alpha", alpha), ("delta", delta)]
    rates += [(f"alpha for '{c}'", v) for c, v in alpha_per_class.items()]
    rates += [("beta (miss bound)", beta)] if beta is not None else []
    for name, v in rates:
        if not 0.0 < v < 1.0:
            raise CalibrationError(f"gate {name} must be in (0, 1), got {v}.")
    unknown = sorted(set(alpha_per_class) - set(classes))
    if unknown:
        raise CalibrationError(f"per-class alpha names unknown classes {unknown}; the classes "
                               f"are {list(classes)}.")
    if beta is not None and other_class not in classes:
        raise CalibrationError(f"the miss bound (beta) needs the catch-all class '{other_class}' "
                               f"among the classes {list(classes)}; name it with other_class.")


def _fit_miss(conf: np.ndarray, pred: np.ndarray, y: np.ndarray, classes: tuple[str, ...],
              other_class: str, beta: float, delta: float,
              n_tests: int) -> dict[str, dict[str, Any]]:
    """Per target class: the floor λ_t its miss bound puts on ``other``'s threshold."""
    o = classes.index(other_class)
    level, n_min = 1.0 - delta / n_tests, min_cells_zero_errors(beta, delta, n_tests)
    out: dict[str, dict[str, Any]] = {}
    for i, t in enumerate(classes):
        if i == o:
            continue
        n_true = int((y == i).sum())
        lam, k_max = miss_threshold(conf[(pred == o) & (y == i)], n_true, beta, level)
        out[t] = {"n_true": n_true, "max_missed": k_max,
                  "threshold": None if math.isnan(lam) else lam,
                  "n_more_needed": max(0, n_min - n_true)}
    return out


def fit_gate(probs: np.ndarray, labels: np.ndarray, classes: list[str] | tuple[str, ...],
             alpha: float = 0.01, delta: float = 0.05, temperature: float | None = None,
             date: str | None = None, *, alpha_per_class: dict[str, float] | None = None,
             beta: float | None = None, other_class: str = DEFAULT_OTHER_CLASS) -> GateParams:
    """Fit per-class thresholds on calibrated calibration-split probabilities (module docstring).

    ``probs`` (N, K) are the temperature-scaled probabilities, ``labels`` (N,) the true class
    indices into ``classes``. ``alpha_per_class`` overrides α for the classes it names;
    ``beta`` (None = off) adds the miss bound for every class but ``other_class``.
    """
    p, y = check_scores(probs, labels)
    classes = tuple(classes)
    a_over = {c: float(v) for c, v in (alpha_per_class or {}).items()}
    _check_rates(alpha, delta, a_over, beta, classes, other_class)
    if len(classes) != p.shape[1]:
        raise CalibrationError(f"fit_gate: {len(classes)} class names for {p.shape[1]} "
                               "probability columns; pass the card's classes in column order.")
    k_cls = len(classes)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    wrong = pred != y
    n_tests = k_cls + (k_cls - 1 if beta is not None else 0)
    level = 1.0 - delta / n_tests
    miss = ({} if beta is None
            else _fit_miss(conf, pred, y, classes, other_class, beta, delta, n_tests))
    floors = [m["threshold"] for m in miss.values()]
    floor = math.nan if None in floors else max(floors, default=-math.inf)
    scans, notes, more = {}, {}, {}
    for i, c in enumerate(classes):
        sel = pred == i
        a_c = a_over.get(c, alpha)
        n_min = min_cells_zero_errors(a_c, delta, n_tests)
        args = (conf[sel][None, :], wrong[sel][None, :], a_c, level, n_min)
        res = scan_thresholds(*args)
        t_err = float(res["threshold"][0])
        if c == other_class and miss:
            res = scan_thresholds(*args, floor=np.inf if math.isnan(floor) else floor)
        t = float(res["threshold"][0])
        scans[c] = {"thresholds": None if np.isnan(t) else t, "n_cal": int(sel.sum()),
                    "n_cal_errors": int(wrong[sel].sum()),
                    "n_cal_accepted": int(res["n_accepted"][0]),
                    "n_cal_accepted_errors": int(res["n_accepted_errors"][0]),
                    "upper_bound": float(res["upper_bound"][0])}
        n_c = scans[c]["n_cal"]
        more[c] = max(0, n_min - n_c) if np.isnan(t) else 0
        if np.isnan(t_err) and n_c < n_min:
            notes[c] = (f"not certified: {n_c} calibration cells predicted '{c}', at least "
                        f"{n_min} are needed even with zero errors ({more[c]} more); all '{c}' "
                        "cells go to review")
        elif np.isnan(t_err):
            notes[c] = (f"not certified: the {n_min} most confident '{c}' cells already have an "
                        f"error bound {scans[c]['upper_bound']:.3g} > alpha={a_c:g}; all '{c}' "
                        "cells go to review")
        elif c == other_class and miss:
            notes[c] = _miss_note(c, t_err, t, floor, miss, beta, delta, n_tests)
            if np.isnan(t):
                more[c] = max(m.get("n_more_needed", 0) for m in miss.values())
    lam_o = scans.get(other_class, {}).get("thresholds")
    for i, t_name in enumerate(classes):
        if t_name not in miss:
            continue
        hit = (pred == classes.index(other_class)) & (y == i)
        k = int((conf[hit] >= lam_o).sum()) if lam_o is not None else 0
        m = miss[t_name]
        m.update(n_missed=k, upper_bound=float(risk_bounds.clopper_pearson_upper(k, m["n_true"], level)))
    return GateParams(
        classes=classes, alpha=float(alpha), delta=float(delta),
        **{key: {c: s[key] for c, s in scans.items()}
           for key in ("thresholds", "n_cal", "n_cal_errors", "n_cal_accepted",
                       "n_cal_accepted_errors", "upper_bound")},
        min_cells_zero_errors=min_cells_zero_errors(alpha, delta, n_tests), n_more_needed=more,
        notes=notes, temperature=None if temperature is None else float(temperature),
        date=date or datetime.now(UTC).strftime("%Y-%m-%d"),
        guarantee=_guarantee(classes, alpha, delta, a_over, beta, other_class, n_tests),
        method=("learn-then-test fixed-sequence, Clopper-Pearson; per-class error bound"
                + (" and per-target miss-as-other bound" if beta is not None else "")
                + f"; delta/{n_tests} per statement"),
        alpha_per_class=a_over, beta=None if beta is None else float(beta),
        other_class=other_class if other_class in classes else None, n_tests=n_tests, miss=miss)


def _miss_note(other: str, t_err: float, t: float, floor: float, miss: dict[str, dict[str, Any]],
               beta: float, delta: float, n_tests: int) -> str:
    if math.isnan(floor):
        few = [f"'{c}' ({m['n_true']} cells)" for c, m in miss.items() if m["threshold"] is None]
        n_min = min_cells_zero_errors(beta, delta, n_tests)
        return (f"not certified: the miss bound beta={beta:g} needs at least {n_min} "
                f"calibration cells of each target class, {', '.join(few)} have fewer; all "
                f"'{other}' cells go to review (add calibration cells or turn the miss bound off)")
    binding = max(miss, key=lambda c: miss[c]["threshold"])
    if math.isnan(t):
        return (f"not certified: the miss bound for '{binding}' needs a threshold ≥ {floor:.4g}, "
                f"above the highest threshold the error bound could test; all '{other}' cells "
                "go to review")
    if t > t_err:
        return (f"threshold raised from {t_err:.4g} (error bound alone) to {t:.4g} by the miss "
                f"bound beta={beta:g} for '{binding}'")
    return f"the miss bound beta={beta:g} does not bind (error bound alone: {t_err:.4g})"


def _guarantee(classes: tuple[str, ...], alpha: float, delta: float, a_over: dict[str, float],
               beta: float | None, other_class: str, n_tests: int) -> str:
    if beta is None and not a_over:
        return GUARANTEE.format(conf=1.0 - delta, delta=delta, alpha=alpha)
    if beta is None:
        alphas = ", ".join(f"{c} {a_over.get(c, alpha):g}" for c in classes)
        return GUARANTEE.format(conf=1.0 - delta, delta=delta, alpha=alpha).replace(
            f"at most α = {alpha:g}", f"at most α_c ({alphas})")
    return GUARANTEE_MISS.format(
        conf=1.0 - delta, delta=delta, m=n_tests, beta=beta, other=other_class,
        alphas=", ".join(f"{c} {a_over.get(c, alpha):g}" for c in classes),
        targets=", ".join(c for c in classes if c != other_class))


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
    out: dict[str, Any] = {"alpha": gate.alpha, "delta": gate.delta, "beta": gate.beta,
                           **_rates(pred, y, accept), "per_class": {}}
    no_gate: dict[str, Any] = {**_rates(pred, y, everything), "per_class": {}}
    for i, c in enumerate(gate.classes):
        sel, true_c = pred == i, y == i
        out["per_class"][c] = {**_rates(pred[sel], y[sel], accept[sel]),
                               "threshold": gate.thresholds.get(c), "n_cal": gate.n_cal.get(c),
                               "recall": _recall(true_c, pred == y, accept)}
        no_gate["per_class"][c] = {**_rates(pred[sel], y[sel], everything[sel]),
                                   "recall": _recall(true_c, pred == y, everything)}
    out["counts"] = review_counts(pred, y, accept, gate)
    out["no_gate"] = no_gate
    return out


def catch_all(gate: GateParams) -> str | None:
    """The gate's catch-all class (gates fitted before ``other_class`` was kept: the default)."""
    return gate.other_class or (DEFAULT_OTHER_CLASS if DEFAULT_OTHER_CLASS in gate.classes else None)


def target_classes(gate: GateParams) -> list[str]:
    """The classes whose counts matter: all but the catch-all."""
    return [c for c in gate.classes if c != catch_all(gate)]


def review_counts(pred: np.ndarray, labels: np.ndarray, accept: np.ndarray, gate: GateParams,
                  n_true: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """Per target class, counts after review with a reviewer who is always right (pure).

    ``pred``, ``labels``, ``accept`` (N,) describe the detected cells. ``final`` = cells
    auto-accepted as t + reviewed cells of true class t; ``auto_only`` = the auto-accepted cells
    alone. Errors are relative to ``n_true`` (per class; default: detected cells of true class t,
    pass the truth's counts to include cells the detector missed). ``missed_as_other`` /
    ``miss_rate_other``: true-t cells auto-accepted as ``other`` (the miss bound's quantity);
    ``missed_any``: auto-accepted with any wrong label; ``false_accepted``: auto-accepted as t
    but of another class. None where a class has no true cells.
    """
    y = np.asarray(labels)
    o = gate.classes.index(catch_all(gate)) if catch_all(gate) is not None else -1
    out: dict[str, dict[str, Any]] = {}
    for c in target_classes(gate):
        i = gate.classes.index(c)
        true_c = y == i
        n_det = int(true_c.sum())
        n = int(n_true[c]) if n_true is not None else n_det
        auto = int((accept & (pred == i)).sum())
        final = auto + int((~accept & true_c).sum())
        as_other = int((accept & (pred == o) & true_c).sum())
        out[c] = {"n_true": n, "auto_only": auto, "final": final,
                  "false_accepted": int((accept & (pred == i) & ~true_c).sum()),
                  "missed_as_other": as_other, "missed_any": int((accept & (pred != i) & true_c).sum()),
                  "miss_rate_other": as_other / n_det if n_det else None,
                  "count_error_after_review": (final - n) / n if n else None,
                  "count_error_auto_only": (auto - n) / n if n else None}
    return out


def _recall(true_c: np.ndarray, right: np.ndarray, accept: np.ndarray) -> float | None:
    n = int(true_c.sum())
    return float((true_c & right & accept).sum() / n) if n else None
