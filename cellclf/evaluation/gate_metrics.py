"""The gate measured on a cell table with truth: ECE before/after temperature, automation and
accepted error per class, counts after review, and the EVALUATION.md gate section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cellclf.card import Card
from cellclf.gate.temperature import ece, reliability_bins, risk_coverage, softmax
from cellclf.gate.thresholds import GateParams, apply_gate, evaluate_gate, review_counts, target_classes
from cellclf.outputs.plots import plot_reliability, plot_risk_coverage


def gated_rows(table: Any) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of the detected candidates (what the gate sees at inference)."""
    det = table.detected
    return table.logits[det].astype(np.float64), table.truth[det].astype(np.int64)



def gate_metrics(table: Any, card: Card, out: Path | None = None) -> dict[str, Any]:
    """ECE before/after, gate and no-gate numbers on a cell table; plots into ``out``."""
    logits, labels = gated_rows(table)
    if len(labels) == 0:
        return {}
    t = float(card.temperature)
    before, after = softmax(logits, 1.0), softmax(logits, t)
    result: dict[str, Any] = {"ece_before": ece(before, labels), "ece_after": ece(after, labels),
                              "temperature": t}
    gate_d = card.gate
    if gate_d:
        gate = GateParams.from_dict(gate_d, classes=list(card.classes))
        ev = evaluate_gate(after, labels, gate)
        result["gate"] = {k: v for k, v in ev.items() if k != "no_gate"}
        result["no_gate"] = ev.get("no_gate")
        accept, _ = apply_gate(after, gate)
        ambiguous = table.ambiguous[table.detected]
        result["gate"]["ambiguous_share_of_review"] = (
            float(ambiguous[~accept].mean()) if (~accept).any() else None)
        result["counts_after_review"] = counts_after_review(table, gate, after.argmax(axis=1),
                                                            accept)
    if out is not None:
        plot_reliability(reliability_bins(before, labels), reliability_bins(after, labels),
                         Path(out) / "reliability.png", temperature=t)
        point = None
        if "gate" in result:
            g = result["gate"]
            point = (g["automation_rate"], g["accepted_error"] or 0.0)
        plot_risk_coverage(risk_coverage(after, labels), Path(out) / "risk_coverage.png",
                           alpha=(gate_d or {}).get("alpha"), gate_point=point)
    return result


def counts_after_review(table: Any, gate: Any, pred: np.ndarray,
                        accept: np.ndarray) -> dict[str, Any]:
    """Per-slide and pooled counts after review (a reviewer who is always right) on a cell table.

    ``pred`` and ``accept`` are for the detected cells (``table.detected``). True counts include
    the truth cells the detector missed, so detection misses show up as count errors too.
    ``mean_abs_after_review`` / ``mean_abs_auto_only``: mean over slides of |relative count error|.
    """
    det = table.detected
    y, slide = table.truth[det], table.slide[det]
    classes = list(gate.classes)

    def truth_counts(mask: np.ndarray) -> dict[str, int]:
        return {c: int((mask & (table.truth == i)).sum()) for i, c in enumerate(classes)}

    per_slide = {}
    for s in np.unique(table.slide):
        in_s = slide == s
        per_slide[str(s)] = review_counts(pred[in_s], y[in_s], accept[in_s], gate,
                                          truth_counts(table.slide == s))
    pooled = review_counts(pred, y, accept, gate, truth_counts(np.ones(len(table.truth), bool)))

    def mean_abs(key: str) -> dict[str, float | None]:
        out = {}
        for c in target_classes(gate):
            v = [abs(r[c][key]) for r in per_slide.values() if r[c][key] is not None]
            out[c] = float(np.mean(v)) if v else None
        return out

    return {"mean_abs_after_review": mean_abs("count_error_after_review"),
            "mean_abs_auto_only": mean_abs("count_error_auto_only"),
            "pooled": pooled, "per_slide": per_slide}


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def gate_report_md(metrics: dict[str, Any], gate_d: dict[str, Any]) -> str:
    """Markdown section for EVALUATION.md: the gate per class and the counts after review."""
    g, counts = metrics.get("gate"), metrics.get("counts_after_review")
    if not g or not counts:
        return ""
    beta = gate_d.get("beta")
    lines = ["## Review gate and counts after review", "",
             f"Gate: α = {gate_d['alpha']:g} per predicted class"
             + (f", miss bound β = {beta:g} per target class" if beta is not None else "")
             + f", δ = {gate_d['delta']:g}. Overall automation {_pct(g['automation_rate'])}, "
             f"error among auto-accepted cells {_pct(g['accepted_error'])}.", "",
             "| class | threshold | automation | accepted error | count error after review | "
             "auto-only count error | true cells auto-accepted as other |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in gate_d["classes"]:
        pc, thr = g["per_class"][c], gate_d["thresholds"].get(c)
        pooled = counts["pooled"].get(c, {})
        lines.append(
            f"| {c} | {'–' if thr is None else f'{thr:.4f}'} | {_pct(pc['automation_rate'])} | "
            f"{_pct(pc['accepted_error'])} | {_pct(counts['mean_abs_after_review'].get(c))} | "
            f"{_pct(counts['mean_abs_auto_only'].get(c))} | {_pct(pooled.get('miss_rate_other'))} |")
    lines += ["", "Automation and accepted error are per predicted class; count errors are the mean "
              "over slides of |counted − true| / true for the target classes, true counts "
              "including cells the detector missed; after review = auto-accepted cells plus "
              "reviewed cells labelled with the truth (a reviewer who is always right).", ""]
    return "\n".join(lines)
