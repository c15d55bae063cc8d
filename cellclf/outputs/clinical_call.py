"""The clinical call: per slide and per rule (``configs/clinical_rules.yaml``), ``met``, ``not met``
or ``needs review``, with an interval on the peak HPF count and the HPF it was read in.

Sits after the gate, beside :mod:`cellclf.outputs.hpf`: :func:`cellclf.outputs.results.build_summary`
puts :func:`clinical_calls` into ``summary.json`` as ``clinical_call``; the report shows it first and
the batch manifest carries it. Pure functions (numpy/scipy) apart from :func:`load_rules`.

The interval on the peak count of class c per HPF, over candidate fields f (points and a grid):
  * A_c(f): cells auto-accepted as c in f; O(f): cells auto-accepted as another class;
    P(f): cells pending review (any predicted class: the reviewer may call any of them c).
  * low(f)  = A_c(f) − q(A_c(f), α_c): the accepted c cells minus the gate's allowance of wrong
    ones, q(n, a) being the ``confidence`` quantile of Binomial(n, a);
  * high(f) = A_c(f) + P(f) + q(O(f), α_o): every pending cell could be c, and the accepted cells
    of other classes may hide true c cells at their error bound (α_o: the largest α among them).
  * The peak count lies in [max_f low(f), max_f high(f)]; the HPF reported is the field with the
    highest point estimate A_c(f) + (pending cells predicted c in f).
Status: ``met`` when low ≥ threshold (pending cells can only add to a count, and the accepted
ones are discounted by the gate's bound), ``not met`` when high < threshold (even if every pending
cell were c), else ``needs review``: never ``met``/``not met`` while pending cells could change it.
Not covered: cells the detector missed (the interval is about detected cells plus the gate's bounds;
tests/test_clinical_call.py measures coverage of the true peak on unseen synthetic slides).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellclf.errors import ConfigError
from cellclf.outputs.hpf import field_centres, field_counts, hpf_radius_um

DEFAULT_RULES_PATH = Path(__file__).resolve().parents[2] / "configs" / "clinical_rules.yaml"
CALL_CONFIDENCE = 0.99  # quantile of the per-field binomial allowance for gate errors
STATUSES = ("met", "not met", "needs review")


@dataclass(frozen=True)
class Rule:
    """One clinical criterion: ``class`` peak count per HPF ≥ ``threshold``."""

    name: str
    cls: str
    threshold: int
    source: str = ""

    @property
    def text(self) -> str:
        return f"{self.name}: peak {self.cls} per HPF >= {self.threshold}"


def load_rules(path: str | Path | None = None) -> list[Rule]:
    """Rules from YAML (``rules: [{name, class, threshold, source}]``); ConfigError naming the
    file and the entry for anything malformed."""
    import yaml

    path = Path(path) if path is not None else DEFAULT_RULES_PATH
    if not path.is_file():
        raise ConfigError(f"clinical rules {path}: file not found; give --clinical-rules FILE "
                          f"(see configs/clinical_rules.yaml for the format)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"clinical rules {path}: not valid YAML ({exc})") from None
    entries = data.get("rules") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"clinical rules {path}: expected a top-level 'rules:' list")
    rules = []
    for i, e in enumerate(entries):
        try:
            thr = e["threshold"]
            if not isinstance(thr, int) or isinstance(thr, bool) or thr < 1:
                raise ValueError(f"threshold must be a positive whole number, got {thr!r}")
            rules.append(Rule(str(e["name"]), str(e["class"]), thr, str(e.get("source", ""))))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"clinical rules {path}: rule {i + 1} is malformed ({exc}); each "
                              "needs name, class and a whole-number threshold") from None
    return rules


def _binom_allowance(n: np.ndarray, rate: float, confidence: float) -> np.ndarray:
    from scipy.stats import binom

    if rate <= 0:
        return np.zeros_like(n)
    return np.where(n > 0, binom.ppf(confidence, n, min(rate, 1.0)), 0).astype(np.int64)


def gate_alphas(gate: dict[str, Any] | None, classes: list[str]) -> dict[str, float]:
    """α_c per class from a card's ``gate`` section (1.0 for a class with no gate at all)."""
    if not gate:
        return {c: 1.0 for c in classes}
    per = gate.get("alpha_per_class") or {}
    return {c: float(per.get(c, gate["alpha"])) for c in classes}


def call_for_rule(rule: Rule, xy0: np.ndarray, pred: np.ndarray, accept: np.ndarray,
                  classes: list[str], alphas: dict[str, float], mpp: float,
                  hpf_area_mm2: float, confidence: float = CALL_CONFIDENCE,
                  reviewed: np.ndarray | None = None) -> dict[str, Any]:
    """The call of one rule on one slide (module docstring); ``rule.cls`` must be in ``classes``.

    ``reviewed``: after review, each cell's agreed class index (−1: none yet, or can't tell).
    A reviewed cell counts exactly (no allowance); can't-tell and unfinished ones stay pending.
    """
    k = classes.index(rule.cls)
    radius_px = hpf_radius_um(hpf_area_mm2) / mpp
    known = np.full(len(pred), -1) if reviewed is None else np.asarray(reviewed)
    accept = np.asarray(accept, bool) & (known < 0)
    known_c = known == k
    acc_c = accept & (pred == k)
    pending = ~accept & (known < 0)
    acc_other = accept & (pred != k)
    centres = field_centres(xy0[acc_c | pending | known_c], radius_px)
    k_c = field_counts(centres, xy0[known_c], radius_px)
    a_c = field_counts(centres, xy0[acc_c], radius_px)
    p_all = field_counts(centres, xy0[pending], radius_px)
    o = field_counts(centres, xy0[acc_other], radius_px)
    alpha_o = max((a for c, a in alphas.items() if c != rule.cls), default=0.0)
    low_f = a_c - _binom_allowance(a_c, alphas[rule.cls], confidence) + k_c
    high_f = a_c + k_c + p_all + _binom_allowance(o, alpha_o, confidence)
    # the field shown and its point estimate: the peak of the cells counted as the class, found
    # exactly as the report's hotspot (outputs.hpf.peak_hpf), so both name the same field
    counted = xy0[acc_c | known_c | (pending & (pred == k))]
    fields = field_centres(counted, radius_px)
    estimate = field_counts(fields, counted, radius_px)
    if len(centres) == 0:
        low = high = 0
    else:
        low, high = int(low_f.max()), int(high_f.max())
    if len(fields) == 0:
        hpf = {"x": None, "y": None}
        n_pending = 0
    else:
        best = int(np.argmax(estimate))
        hpf = {"x": float(fields[best, 0]), "y": float(fields[best, 1])}
        n_pending = int(field_counts(fields[best:best + 1], xy0[pending], radius_px)[0])
    thr = rule.threshold
    if low >= thr:
        status = "met"
        reason = (f"at least {low} {rule.cls} per HPF after the gate's error allowance, "
                  f">= {thr}; pending review cells can only add to it")
    elif high < thr:
        status = "not met"
        reason = (f"at most {high} {rule.cls} per HPF even if every pending review cell were "
                  f"{rule.cls}, < {thr}")
    else:
        status = "needs review"
        reason = (f"peak between {low} and {high} {rule.cls} per HPF straddles {thr}: "
                  f"{n_pending} pending review cell(s) in the densest field (and the gate's "
                  "bounds) could change the call; finish the review queue")
    return {"rule": rule.text, "name": rule.name, "class": rule.cls, "threshold": thr,
            "status": status, "interval": [low, high], "hpf": hpf, "reason": reason,
            "point_estimate": int(estimate.max()) if len(fields) else 0,
            "source": rule.source}


def clinical_calls(rules: list[Rule], xy0: np.ndarray, pred: np.ndarray, accept: np.ndarray,
                   classes: list[str], gate: dict[str, Any] | None, mpp: float,
                   hpf_area_mm2: float) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """(calls, skipped): one call per rule whose class the model has; the others are skipped."""
    alphas = gate_alphas(gate, classes)
    calls, skipped = [], []
    xy0 = np.asarray(xy0, dtype=np.float64).reshape(-1, 2)
    for rule in rules:
        if rule.cls not in classes:
            skipped.append({"rule": rule.text,
                            "reason": f"the model has no class {rule.cls!r} (classes {classes})"})
            continue
        calls.append(call_for_rule(rule, xy0, pred, accept, classes, alphas, mpp, hpf_area_mm2))
    return calls, skipped


def calls_after_review(summary: dict[str, Any], cells: dict[str, Any],
                       final_label_of: dict[int, str]) -> list[dict[str, Any]]:
    """The summary's calls recomputed with the reviewers' agreed labels (``cell_id → label``).

    ``cells``: cells.parquet as a column dict (``cell_id``, ``x``, ``y``, ``class``,
    ``decision``). The rules are the ones the summary was made with.
    """
    calls = summary.get("clinical_call") or []
    if not calls:
        return []
    card = summary.get("model_card") or {}
    classes = list(card.get("classes") or [])
    index = {c: i for i, c in enumerate(classes)}
    xy0 = np.stack([np.asarray(cells["x"], float), np.asarray(cells["y"], float)], axis=1)
    pred = np.array([index[c] for c in cells["class"]], dtype=np.int64)
    accept = np.asarray(cells["decision"]) == "accepted"
    reviewed = np.array([index.get(final_label_of.get(int(i), ""), -1)
                         for i in cells["cell_id"]], dtype=np.int64)
    rules = [Rule(c["name"], c["class"], int(c["threshold"]), c.get("source", "")) for c in calls]
    alphas = gate_alphas(card.get("gate"), classes)
    return [call_for_rule(r, xy0.reshape(-1, 2), pred, accept, classes, alphas,
                          float(summary["slide"]["mpp"]), float(summary["hpf_area_mm2"]),
                          reviewed=reviewed) for r in rules]


def manifest_text(calls: list[dict[str, Any]]) -> str:
    """The calls in one manifest cell: ``name: status [low, high]; …``."""
    return "; ".join(f"{c['name']}: {c['status']} [{c['interval'][0]}, {c['interval'][1]}]"
                     for c in calls)
