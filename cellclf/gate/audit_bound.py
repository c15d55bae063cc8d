"""The running audit's statistics (pure functions): the promise checked on deployed slides.

Where it sits: ``cellclf infer --audit-rate R`` sends a reproducible random share R of each slide's
auto-accepted cells to the review queue, looking like any other item (:func:`audit_mask`);
``cellclf audit`` (:mod:`cellclf.commands.audit`) reads their review outcome from the store and
calls :func:`audit_report` and :func:`agreement_report`.

Why the bound is valid: every auto-accepted cell is audited independently with probability R
(a hash of slide id and cell id, so a rerun picks the same cells), so the audited cells of class c
are a simple random sample of the cells the gate accepted as c on the audited slides. Their error
count is then hypergeometric (binomial in the limit) around the accepted error e_c of those slides,
and the one-sided Clopper–Pearson bounds hold for e_c without any assumption about how slides or
cells vary: this is the promise *as used*, on this lab's slides.

States per class (and per site): ``alarm`` when the lower bound exceeds α_c (evidence at the
stated confidence that more than α_c of the accepted cells are wrong: recalibrate), ``ok`` when
the upper bound is at most α_c (the promise is confirmed on these slides), ``watch`` in between
(not enough audited cells to tell). A bound that is above α only because few cells were audited
is not an alarm: it would ring for every class in the first weeks of use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np

from cellclf.gate.risk_bounds import clopper_pearson_upper, min_cells_zero_errors, scan_thresholds
from cellclf.gate.slide_bound import GRID, scan_slide_thresholds, slide_losses

AUDIT_CONFIDENCE = 0.95
DEFAULT_AUDIT_RATE = 0.02
DEFAULT_BLIND_SHARE = 0.1  # ordinary (gated) cells also shown blind, so blind ≠ audit to a reviewer


def _uniform(slide_id: str, cell_ids: np.ndarray, salt: str) -> np.ndarray:
    """A reproducible uniform [0, 1) number per (slide, cell): blake2b of the slide id and salt
    seeds a generator, whose stream is indexed by cell id (cell ids follow the tile order)."""
    ids = np.asarray(cell_ids, dtype=np.int64)
    if len(ids) == 0:
        return np.zeros(0)
    seed = int.from_bytes(hashlib.blake2b(f"{salt}:{slide_id}".encode(), digest_size=8).digest(),
                          "little")
    # splitmix64 of (seed + id): independent of batch boundaries, vectorised
    with np.errstate(over="ignore"):
        z = (np.uint64(seed) + ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def audit_mask(slide_id: str, cell_ids: np.ndarray, accept: np.ndarray, rate: float) -> np.ndarray:
    """Which auto-accepted cells go to the audit: each with probability ``rate``, reproducibly."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"audit rate must be in [0, 1], got {rate}")
    return np.asarray(accept, bool) & (_uniform(slide_id, cell_ids, "audit") < rate)


def blind_mask(slide_id: str, cell_ids: np.ndarray, share: float) -> np.ndarray:
    """Gated cells shown blind as well (a reproducible random ``share``)."""
    return _uniform(slide_id, cell_ids, "blind") < share


def audit_priority(slide_id: str, cell_ids: np.ndarray) -> np.ndarray:
    """Queue priority of audit items: uniform, so they are spread through the queue rather than
    all served last (their own confidence would put them at the end and give them away)."""
    return _uniform(slide_id, cell_ids, "priority")


def clopper_pearson_lower(k: int, n: int, confidence: float) -> float:
    """One-sided Clopper–Pearson lower bound Beta⁻¹(1 − confidence; k, n − k + 1) (0 for k = 0)."""
    from scipy.stats import beta

    if k <= 0 or n <= 0:
        return 0.0
    return float(beta.ppf(1.0 - confidence, k, n - k + 1))


def audit_state(n_errors: int, n_labelled: int, alpha: float,
                confidence: float = AUDIT_CONFIDENCE) -> dict[str, Any]:
    """Bounds and state (``alarm`` | ``watch`` | ``ok``) of one group of audited cells."""
    upper = float(clopper_pearson_upper(n_errors, n_labelled, confidence)) if n_labelled else 1.0
    lower = clopper_pearson_lower(n_errors, n_labelled, confidence)
    state = "alarm" if lower > alpha else ("ok" if upper <= alpha else "watch")
    return {"n_labelled": n_labelled, "n_errors": n_errors,
            "error_rate": n_errors / n_labelled if n_labelled else None,
            "upper_bound": upper, "lower_bound": lower, "alpha": alpha, "state": state}


def audit_report(cells: Iterable[dict[str, Any]], alphas: dict[str, float], cant_tell: str,
                 confidence: float = AUDIT_CONFIDENCE) -> dict[str, Any]:
    """Per predicted class, and per site × class: audited, labelled, errors, bounds and state.

    ``cells``: dicts with ``predicted``, ``label`` (None while pending), ``status``, ``site``.
    Cells labelled ``cant_tell`` and pending or disputed ones are counted but not scored.
    """
    groups: dict[tuple[str, str], dict[str, int]] = {}
    for c in cells:
        for site in ("all", c.get("site") or "unknown"):
            g = groups.setdefault((site, c["predicted"]),
                                  {"n_audited": 0, "pending": 0, "cant_tell": 0, "k": 0, "n": 0})
            g["n_audited"] += 1
            if c["status"] != "done":
                g["pending"] += 1
            elif c["label"] == cant_tell:
                g["cant_tell"] += 1
            else:
                g["n"] += 1
                g["k"] += int(c["label"] != c["predicted"])
    out: dict[str, Any] = {"confidence": confidence, "per_class": {}, "per_site": {}}
    for (site, cls), g in sorted(groups.items()):
        alpha = float(alphas.get(cls, min(alphas.values()) if alphas else 0.01))
        entry = {"n_audited": g["n_audited"], "pending": g["pending"],
                 "cant_tell": g["cant_tell"], **audit_state(g["k"], g["n"], alpha, confidence)}
        if site == "all":
            out["per_class"][cls] = entry
        else:
            out["per_site"].setdefault(site, {})[cls] = entry
    states = [e["state"] for e in out["per_class"].values()]
    out["alarm"] = "alarm" in states or any(e["state"] == "alarm" for s in out["per_site"].values()
                                           for e in s.values())
    return out


def agreement_report(answers: Iterable[dict[str, Any]], cant_tell: str) -> dict[str, Any]:
    """Per reviewer: agreement with the model's label when they could see it vs when they could
    not (their first answer per cell), on ordinary queue cells (blind ones drawn at random, so the
    two groups are alike) and on audit cells (always blind). ``gap`` = seen − blind on ordinary
    cells: a positive gap is automation bias (or the model's answer helping)."""
    per: dict[str, dict[str, list[int]]] = {}
    for a in answers:
        if a["label"] is None or a["label"] == cant_tell or a["blind"] is None:
            continue
        kind = "audit" if a["audit"] else ("blind" if a["blind"] else "seen")
        per.setdefault(a["reviewer"], {}).setdefault(kind, []).append(
            int(a["label"] == a["predicted"]))
    out: dict[str, Any] = {}
    for reviewer, kinds in sorted(per.items()):
        row: dict[str, Any] = {}
        for kind in ("seen", "blind", "audit"):
            xs = kinds.get(kind, [])
            row[kind] = {"n": len(xs), "agreement": float(np.mean(xs)) if xs else None}
        s, b = row["seen"]["agreement"], row["blind"]["agreement"]
        row["gap"] = None if s is None or b is None else s - b
        out[reviewer] = row
    return out


def refit_from_audit(probs: np.ndarray, labels: np.ndarray, slide_ids: np.ndarray,
                     audit: np.ndarray, classes: list[str],
                     old_thresholds: dict[str, float | None], alpha: float, delta: float,
                     n_tests: int, alpha_per_class: dict[str, float] | None = None
                     ) -> dict[str, Any]:
    """New thresholds from the audited cells: each class's threshold can only rise.

    The audit cells predicted c are a simple random sample of the cells the old gate accepted as
    c (confidence ≥ λ_old), so the cell-level fixed-sequence scan of
    :func:`cellclf.gate.risk_bounds.scan_thresholds` over them, stopped at λ_old, certifies the
    error among accepted cells of the audited slides at any λ ≥ λ_old it reaches (the same
    Clopper–Pearson argument as calibration, with the audited slides as calibration slides). A
    class whose first test fails gets no threshold: all its cells go to review until it is
    recalibrated. Reviewed gated cells (below λ_old) cannot lower a threshold here: their weight
    against the audit sample (1/R) makes the bound a weighted one, not done yet. The slide-level
    scan over the same cells (:mod:`cellclf.gate.slide_bound`) is reported beside it.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    audit = np.asarray(audit, dtype=bool)
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    uniq, slide_index = np.unique(np.asarray(slide_ids).astype(str), return_inverse=True)
    level = delta / n_tests
    out: dict[str, Any] = {"n_audit_cells": int(audit.sum()), "n_slides": len(uniq),
                           "thresholds": {}, "n_audited": {}, "n_errors": {},
                           "upper_bound": {}, "slide_threshold": {}, "notes": {}}
    for k, name in enumerate(classes):
        a = float((alpha_per_class or {}).get(name, alpha))
        old = old_thresholds.get(name)
        rows = audit & (pred == k)
        out["n_audited"][name] = int(rows.sum())
        out["n_errors"][name] = int((labels[rows] != k).sum())
        if old is None:
            out["thresholds"][name] = None
            out["notes"][name] = "not certified before: no accepted cells were audited"
            continue
        n_min = min_cells_zero_errors(a, delta, n_tests)
        if rows.sum() < n_min:
            out["thresholds"][name] = float(old)
            out["notes"][name] = (f"kept: {rows.sum()} audited cells, {n_min} are needed before "
                                  "the audit can certify a threshold")
            continue
        scan = scan_thresholds(conf[rows][None, :], (labels[rows] != k)[None, :], a, 1 - level,
                               n_min=n_min, floor=old)
        thr = scan["threshold"][0]
        out["thresholds"][name] = None if np.isnan(thr) else max(float(thr), float(old))
        out["upper_bound"][name] = float(scan["upper_bound"][0])
        if np.isnan(thr):
            out["notes"][name] = (f"{rows.sum()} audited cells with {out['n_errors'][name]} "
                                  f"errors do not certify α = {a:g} at any threshold ≥ {old:.4f}: "
                                  "all its cells go to review until recalibrated")
        grid = GRID[old <= GRID]
        losses, _ = slide_losses(conf[rows], labels[rows] != k, slide_index[rows], len(uniq), grid)
        out["slide_threshold"][name] = scan_slide_thresholds(losses, a, level, grid)["threshold"]
    return out
