"""Class-conditional conformal prediction sets (APS) for the review UI (numpy only).

Where it sits in the flow: ``calibrated probs ─▶ gate ─▶ review queue``. For a cell sent to
review, :func:`aps_sets` gives the set of plausible labels shown to the reviewer. It changes no
gate decision; it is fitted on the same calibration split as the gate (:func:`fit_aps`).

Maths (adaptive prediction sets, non-randomised, class-conditional / "Mondrian"):
  * APS score of label y for a cell with probabilities p: sort the classes by p descending
    (ties by class index); s(p, y) = Σ of p over the classes ranked up to and including y.
  * For each class y, with S_1 ≤ … ≤ S_{n_y} the scores of the n_y calibration cells whose
    TRUE label is y: q_y = S_(⌈(n_y + 1)(1 − α)⌉), the finite-sample-corrected quantile; if
    that rank exceeds n_y, q_y = +∞ (stored as null: y is always in the set).
  * Set: C(p) = {y : s(p, y) ≤ q_y}. Exchangeability of class-y cells gives
    P(y ∈ C(P) | Y = y) ≥ 1 − α for every class y separately (not only on average).
  * Non-randomised (no U·p_y term), so sets are deterministic and coverage is conservative.
    By default the top-1 label is always added (``include_top1``), which only adds coverage and
    avoids empty sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellclf.gate.temperature import CalibrationError, check_scores


def aps_scores(probs: np.ndarray) -> np.ndarray:
    """(N, K) matrix s(p_i, y) of APS scores for every cell i and every label y: the probability
    of y and of every label ranked above it, computed as 1 − (mass ranked below y) / total.

    The mass below is summed from the smallest probability up, so it keeps full precision. A
    confident model's sets are decided by tails of 1e-7 (quantiles like 0.9999998), which a
    running sum from the top would round away in float32 (infer's probabilities) and float64
    (calibration's) differently.
    """
    p, _ = check_scores(probs)
    p = p.astype(np.float64)
    order = np.argsort(-p, axis=1, kind="stable")
    ascending = np.take_along_axis(p, order, axis=1)[:, ::-1]
    below = np.concatenate([np.zeros((len(p), 1)), np.cumsum(ascending, axis=1)[:, :-1]],
                           axis=1)                      # mass of the labels ranked lower
    total = np.maximum(p.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    scores = np.empty_like(p)
    np.put_along_axis(scores, order, 1.0 - below[:, ::-1] / total, axis=1)
    return scores


@dataclass(frozen=True)
class APSParams:
    """Per-class quantiles q_y (None = +∞, label always included) and calibration counts."""

    classes: tuple[str, ...]
    alpha_set: float
    quantiles: dict[str, float | None]
    n_cal: dict[str, int]  # calibration cells whose TRUE label is the class
    include_top1: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "alpha_set": self.alpha_set,
                "quantiles": dict(self.quantiles), "n_cal": dict(self.n_cal),
                "include_top1": self.include_top1, "method": "APS, class-conditional, "
                "non-randomised, finite-sample quantile ceil((n+1)(1-alpha))/n"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> APSParams:
        try:
            classes = tuple(d["classes"])
            return cls(classes=classes, alpha_set=float(d["alpha_set"]),
                       quantiles={c: (None if d["quantiles"][c] is None
                                      else float(d["quantiles"][c])) for c in classes},
                       n_cal={c: int(d["n_cal"][c]) for c in classes},
                       include_top1=bool(d.get("include_top1", True)))
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"conformal parameters are invalid ({exc!r}); refit them "
                                   "with `fit_aps`.") from exc

    def quantile_vector(self) -> np.ndarray:
        return np.array([np.inf if self.quantiles[c] is None else self.quantiles[c]
                         for c in self.classes])


def fit_aps(probs: np.ndarray, labels: np.ndarray, classes: list[str] | tuple[str, ...],
            alpha_set: float = 0.1, include_top1: bool = True) -> APSParams:
    """Per-class finite-sample APS quantiles (module docstring) from calibration cells."""
    if not 0.0 < alpha_set < 1.0:
        raise CalibrationError(f"alpha_set must be in (0, 1), got {alpha_set}.")
    p, y = check_scores(probs, labels)
    classes = tuple(classes)
    if len(classes) != p.shape[1]:
        raise CalibrationError(f"fit_aps: {len(classes)} class names for {p.shape[1]} "
                               "probability columns.")
    true_scores = aps_scores(p)[np.arange(len(y)), y]
    quantiles: dict[str, float | None] = {}
    n_cal: dict[str, int] = {}
    for i, c in enumerate(classes):
        s = np.sort(true_scores[y == i])
        n = len(s)
        rank = math.ceil((n + 1) * (1.0 - alpha_set) - 1e-9)
        quantiles[c] = float(s[rank - 1]) if rank <= n else None
        n_cal[c] = n
    return APSParams(classes, float(alpha_set), quantiles, n_cal, include_top1)


def aps_sets(probs: np.ndarray, params: APSParams | dict[str, Any]) -> np.ndarray:
    """Prediction sets as a bool (N, K) matrix: [i, y] is True when label y is in cell i's set.

    ``params`` may also be the card's ``conformal`` section (the dict from ``to_dict``).
    """
    if isinstance(params, dict):
        params = APSParams.from_dict(params)
    p, _ = check_scores(probs)
    if p.shape[1] != len(params.classes):
        raise CalibrationError(f"aps_sets: {p.shape[1]} probability columns, but the conformal "
                               f"parameters have {len(params.classes)} classes.")
    member = aps_scores(p) <= params.quantile_vector()[None, :] + 1e-12
    if params.include_top1:
        member[np.arange(len(p)), p.argmax(axis=1)] = True
    return member


def set_labels(member: np.ndarray, classes: tuple[str, ...] | list[str]) -> list[list[str]]:
    """Bool (N, K) set matrix → list of label-name lists (class order), for the review UI."""
    names = np.asarray(classes, dtype=object)
    return [list(names[row]) for row in np.asarray(member, dtype=bool)]
