"""Calibrating a bundle and reporting its gate: ``cellclf calibrate`` and the gate half of
``cellclf evaluate``.

Sits after training: classify the candidates of calibration slides that training never saw
(:func:`cellclf.evaluate.evaluate` gives the cell table), then fit — with the pure maths of
:mod:`cellclf.calibrate`, :mod:`cellclf.gate`, :mod:`cellclf.conformal`, :mod:`cellclf.ood` — the
temperature, the per-class certified thresholds, the reviewer's conformal sets and the slide-level
OOD guard, and write them into card.json. The guarantee holds for slides exchangeable with the
calibration slides; the OOD guard watches that assumption. By default the gate also certifies the
miss bound (β = :data:`DEFAULT_BETA`: at most 1 % of each target class auto-accepted as ``other``),
so that counts after review stay right; :func:`counts_after_review` measures that on test slides.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cellclf.errors import CellclfError

OOD_SAMPLE_TILES = 12
DEFAULT_BETA = 0.01  # miss bound per target class: share auto-accepted as `other`


def sample_tiles(tiles: list, k: int = OOD_SAMPLE_TILES) -> list:
    """``k`` tiles spread evenly over the list (all of them when there are fewer)."""
    if len(tiles) <= k:
        return list(tiles)
    idx = np.linspace(0, len(tiles) - 1, k).round().astype(int)
    return [tiles[i] for i in idx]


def slide_ood_stats(path: str | Path, work_mpp: float, mpp: float | None = None,
                    tile_um: float = 512.0, workers: int = 0) -> Any:
    """Stain and focus statistics of a slide from a sample of its tissue tiles."""
    from cellclf.ood import slide_stats
    from cellclf.reader import TileReader
    from cellclf.slide import Slide
    from cellclf.tiling import tile_grid
    from cellclf.tissue import require_tissue, slide_tissue_mask

    with Slide(path, mpp=mpp) as slide:
        tissue = require_tissue(slide_tissue_mask(slide), path)
        tiles = tile_grid(slide.width, slide.height, slide.mpp, work_mpp, tile_um, 0.0, tissue)
    reader = TileReader(path, work_mpp, mpp=mpp, workers=workers)
    return slide_stats((rgb for _, rgb in reader.iter_tiles(sample_tiles(tiles))), work_mpp,
                       source=str(path))


def _training_slides(card: Any) -> set[str]:
    slides = (card.training or {}).get("slides") or {}
    out: set[str] = set()
    for ids in slides.values():
        if isinstance(ids, list):
            out.update(map(str, ids))
        elif isinstance(ids, dict):
            out.update(map(str, ids.get("ids", ids.get("first", []))))
    return out


def gated_rows(table: Any) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of the detected candidates (what the gate sees at inference)."""
    det = table.detected
    return table.logits[det].astype(np.float64), table.truth[det].astype(np.int64)


def calibrate_bundle(bundle: str | Path, data: str | Path, *, alpha: float = 0.01,
                     delta: float = 0.05, alpha_set: float = 0.1, workers: int = 0,
                     progress: bool = True, out: str | Path | None = None,
                     beta: float | None = DEFAULT_BETA,
                     alpha_per_class: dict[str, float] | None = None) -> dict[str, Any]:
    """Fit temperature, gate, conformal sets and OOD guard on DATA; write them into card.json.

    ``beta`` is the gate's miss bound (None = off), ``alpha_per_class`` overrides α per class
    (see :func:`cellclf.gate.fit_gate`)."""
    from cellclf.annotations import discover
    from cellclf.atomic import atomic_write_json
    from cellclf.calibrate import ece, fit_temperature, softmax
    from cellclf.card import bundle_paths, load_card
    from cellclf.conformal import fit_aps
    from cellclf.evaluate import evaluate
    from cellclf.gate import fit_gate
    from cellclf.ood import fit_ood

    paths = bundle_paths(bundle)
    card = load_card(paths.root)
    unknown = sorted(set(alpha_per_class or {}) - set(card.classes))
    if unknown:
        raise CellclfError(f"per-class alpha names unknown classes {unknown}; {paths.root} has "
                           f"the classes {list(card.classes)}.")
    source = discover(data)
    overlap = sorted(_training_slides(card) & {e.slide_id for e in source.entries})
    if overlap:
        raise CellclfError(
            f"calibration slides {overlap[:5]} were used in training {paths.root}: the gate's "
            "guarantee needs calibration slides the model never saw. Use other slides.")
    table, _ = evaluate(paths.root, data, None, workers=workers, progress=progress)
    logits, labels = gated_rows(table)
    if len(labels) == 0:
        raise CellclfError(f"{data}: no detected cells to calibrate on")
    classes = list(card.classes)
    temperature = fit_temperature(logits, labels)
    probs = softmax(logits, temperature)
    gate = fit_gate(probs, labels, classes, alpha=alpha, delta=delta, temperature=temperature,
                    alpha_per_class=alpha_per_class, beta=beta, other_class=card.other_class)
    aps = fit_aps(probs, labels, classes, alpha_set=alpha_set)
    stats = [slide_ood_stats(e.slide, card.mpp, mpp=e.mpp, workers=workers)
             for e in source.entries]
    ood = fit_ood(stats)
    card_d = json.loads(paths.card.read_text())
    card_d["temperature"] = float(temperature)
    card_d["gate"] = gate.to_dict()
    card_d["conformal"] = aps.to_dict()
    card_d["ood"] = ood.to_dict()
    card_d["calibration"] = {
        "data": str(data), "slides": [e.slide_id for e in source.entries],
        "n_cells": int(len(labels)), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "ece_before": ece(softmax(logits, 1.0), labels), "ece_after": ece(probs, labels),
        "alpha_set": alpha_set,
        "assumption": "the guarantee holds for slides exchangeable with these calibration "
                      "slides (same lab, stain, scanner, tissue); the OOD guard sends slides "
                      "whose stain or focus falls far outside them to review"}
    atomic_write_json(paths.card, card_d)
    load_card(paths.root)  # validate what we wrote
    if paths.onnx.is_file():  # the graph bakes in the temperature: keep it in step
        from cellclf.export import export_onnx

        prev = card_d.get("onnx", {})
        export_onnx(paths.root, opset=int(prev.get("opset", 18)))
    summary = {"temperature": temperature, "ece_before": card_d["calibration"]["ece_before"],
               "ece_after": card_d["calibration"]["ece_after"], "gate": gate.to_dict(),
               "n_cells": int(len(labels))}
    if out is not None:
        atomic_write_json(Path(out) / "calibration.json", summary)
    return summary


def gate_metrics(table: Any, card: Any, out: Path | None = None) -> dict[str, Any]:
    """ECE before/after, gate and no-gate numbers on a cell table; plots into ``out``."""
    from cellclf.calibrate import ece, reliability_bins, risk_coverage, softmax
    from cellclf.gate import GateParams, apply_gate, evaluate_gate

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
        from cellclf.plots import plot_reliability, plot_risk_coverage

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
    from cellclf.gate import review_counts, target_classes

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
