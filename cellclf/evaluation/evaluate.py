"""Evaluation of a bundle on slides with truth: per-cell table, metrics.json, confusion.png, report.md.

Sits beside the inference flow as its yardstick: for each slide, detector candidates
(``detect.detect_slide``) are cropped (``crops.extract_crops``) and classified (``model.py``),
then matched to the truth cells within ``match_um`` (``match.match_points``). Every candidate and
every truth cell becomes one row of the cell table: unmatched candidates have truth ``other``,
missed truth cells are predicted ``other`` (no probabilities). The table is what the gate is later
fitted and tested on. The metric maths here is pure numpy (also used during training).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellclf.annotations.labelled_data import ClassMap, discover, load_points
from cellclf.card import DEFAULT_OTHER_CLASS, load_card
from cellclf.detect.matching import detection_metrics, match_points
from cellclf.detect.slide_detection import detect_slide
from cellclf.errors import AnnotationError
from cellclf.evaluation.gate_metrics import gate_metrics
from cellclf.gate.temperature import softmax
from cellclf.model.engine import load_engine
from cellclf.outputs.atomic import atomic_write_text
from cellclf.wsi.crops import extract_crops
from cellclf.wsi.slide import Slide

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- pure metric maths


def confusion(truth: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """K×K counts, rows = truth, columns = prediction."""
    truth, pred = np.asarray(truth, np.int64), np.asarray(pred, np.int64)
    return np.bincount(truth * k + pred, minlength=k * k).reshape(k, k)


def _div(a: float, b: float) -> float | None:
    return float(a / b) if b > 0 else None


def metrics_from_confusion(cm: np.ndarray, classes: Sequence[str],
                           other_class: str = DEFAULT_OTHER_CLASS) -> dict[str, Any]:
    """Per-class precision/recall/F1/support, macro-F1 over the target classes (all classes but
    ``other_class``; a target with neither support nor predictions is left out), balanced
    accuracy (mean recall over classes with support) and accuracy. Undefined values are None."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support, predicted = cm.sum(1), cm.sum(0)
    per_class: dict[str, dict[str, Any]] = {}
    for i, c in enumerate(classes):
        p, r = _div(tp[i], predicted[i]), _div(tp[i], support[i])
        f1 = _div(2 * tp[i], support[i] + predicted[i])
        per_class[c] = {"precision": p, "recall": r, "f1": f1, "support": int(support[i])}
    target_f1 = [per_class[c]["f1"] for c in classes if c != other_class
                 and per_class[c]["f1"] is not None]
    recalls = [per_class[c]["recall"] for c in classes if per_class[c]["recall"] is not None]
    return {
        "macro_f1": float(np.mean(target_f1)) if target_f1 else None,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "accuracy": _div(tp.sum(), cm.sum()),
        "per_class": per_class,
        "confusion": cm.astype(np.int64).tolist(),
        "n": int(cm.sum()),
    }


def classification_metrics(truth: np.ndarray, pred: np.ndarray, classes: Sequence[str],
                           other_class: str = DEFAULT_OTHER_CLASS) -> dict[str, Any]:
    return metrics_from_confusion(confusion(truth, pred, len(classes)), classes, other_class)


def count_errors(truth_counts: dict[str, dict[str, int]], pred_counts: dict[str, dict[str, int]],
                 classes: Sequence[str]) -> dict[str, Any]:
    """Relative count error ``(predicted − true) / true`` per slide and class; ``mean`` is the mean
    of absolute relative errors over slides with a non-zero true count (None when there is none)."""
    per_slide = {s: {c: _div(pred_counts[s].get(c, 0) - truth_counts[s].get(c, 0),
                             truth_counts[s].get(c, 0)) for c in classes} for s in truth_counts}
    mean = {}
    for c in classes:
        vals = [abs(v[c]) for v in per_slide.values() if v[c] is not None]
        mean[c] = float(np.mean(vals)) if vals else None
    return {"mean_abs": mean, "per_slide": per_slide}


def pool_detection(per_slide: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sum per-slide :func:`cellclf.detect.matching.detection_metrics` counts into pooled rates."""
    n_truth: dict[str, int] = {}
    n_found: dict[str, int] = {}
    tot = {"n_pred": 0, "n_matched": 0, "n_duplicates": 0}
    for d in per_slide:
        for c, n in d["n_truth"].items():
            n_truth[c] = n_truth.get(c, 0) + n
            n_found[c] = n_found.get(c, 0) + d["n_found"][c]
        for k in tot:
            tot[k] += d[k]
    return {"recall": {c: _div(n_found[c], n_truth[c]) for c in n_truth},
            "n_truth": n_truth, "n_found": n_found,
            "recall_all": _div(sum(n_found.values()), sum(n_truth.values())),
            "precision": _div(tot["n_matched"], tot["n_pred"]),
            "duplicate_rate": _div(tot["n_duplicates"], tot["n_pred"]), **tot}


# ---------------------------------------------------------------- the cell table


@dataclass
class CellTable:
    """One row per candidate or missed truth cell (see the module docstring)."""

    classes: tuple[str, ...]
    slide: np.ndarray  # (N,) str
    x: np.ndarray  # (N,) level-0 px
    y: np.ndarray
    truth: np.ndarray  # (N,) int class index
    pred: np.ndarray  # (N,) int class index
    probs: np.ndarray  # (N, K) float32 (NaN for missed cells)
    logits: np.ndarray  # (N, K) float32 (NaN for missed cells)
    detected: np.ndarray  # (N,) bool: a candidate (False: missed truth cell)
    matched: np.ndarray  # (N,) bool: candidate matched to a truth cell
    ambiguous: np.ndarray  # (N,) bool: truth marked ambiguous

    def __len__(self) -> int:
        return len(self.truth)

    def to_arrow(self) -> Any:
        import pyarrow as pa

        cols: dict[str, Any] = {
            "slide": pa.array(self.slide.astype(str)), "x": self.x, "y": self.y,
            "truth": pa.array([self.classes[i] for i in self.truth], pa.string()),
            "pred": pa.array([self.classes[i] for i in self.pred], pa.string()),
            "detected": self.detected, "matched": self.matched, "ambiguous": self.ambiguous}
        for k, c in enumerate(self.classes):
            cols[f"prob_{c}"] = self.probs[:, k]
            cols[f"logit_{c}"] = self.logits[:, k]
        return pa.table(cols)

    @staticmethod
    def concat(parts: Sequence[CellTable], classes: tuple[str, ...]) -> CellTable:
        k = len(classes)
        if not parts:
            z = np.zeros(0)
            return CellTable(classes, z.astype(str), z, z, z.astype(int), z.astype(int),
                             np.zeros((0, k), np.float32), np.zeros((0, k), np.float32),
                             z.astype(bool), z.astype(bool), z.astype(bool))
        names = ("slide", "x", "y", "truth", "pred", "probs", "logits", "detected", "matched",
                 "ambiguous")
        return CellTable(classes, *(np.concatenate([getattr(p, n) for p in parts])
                                    for n in names))


def slide_table(slide_id: str, cands0: np.ndarray, logits: np.ndarray, truth0: np.ndarray,
                truth_idx: np.ndarray, truth_amb: np.ndarray, classes: tuple[str, ...],
                other: int, radius_px: float, temperature: float = 1.0) -> CellTable:
    """Join one slide's classified candidates with its truth (pure; see the module docstring)."""
    m = match_points(cands0, truth0, radius_px)
    k, n_c = len(classes), len(cands0)
    missed = np.flatnonzero(m.truth_to_pred < 0)
    ok = m.pred_to_truth >= 0
    truth_c = np.full(n_c, other, np.int64)
    truth_c[ok] = truth_idx[m.pred_to_truth[ok]]
    amb_c = np.zeros(n_c, bool)
    amb_c[ok] = truth_amb[m.pred_to_truth[ok]]
    probs = softmax(logits, temperature) if n_c else np.zeros((0, k), np.float32)
    nan = np.full((len(missed), k), np.nan, np.float32)
    return CellTable(
        classes, np.full(n_c + len(missed), slide_id, dtype=object),
        np.concatenate([cands0[:, 0], truth0[missed, 0]]),
        np.concatenate([cands0[:, 1], truth0[missed, 1]]),
        np.concatenate([truth_c, truth_idx[missed]]),
        np.concatenate([logits.argmax(1) if n_c else np.zeros(0, np.int64),
                        np.full(len(missed), other, np.int64)]),
        np.concatenate([probs, nan]), np.concatenate([logits.astype(np.float32), nan]),
        np.concatenate([np.ones(n_c, bool), np.zeros(len(missed), bool)]),
        np.concatenate([ok, np.zeros(len(missed), bool)]),
        np.concatenate([amb_c, truth_amb[missed]]))


def table_metrics(table: CellTable, other_class: str, truth_counts: dict[str, dict[str, int]],
                  detection: dict[str, Any]) -> dict[str, Any]:
    """metrics.json content for a cell table (see :func:`metrics_from_confusion`)."""
    classes = list(table.classes)
    out = classification_metrics(table.truth, table.pred, classes, other_class)
    pred_counts = {s: {c: int(((table.slide == s) & table.detected
                               & (table.pred == i)).sum()) for i, c in enumerate(classes)}
                   for s in truth_counts}
    out["count_error"] = count_errors(truth_counts, pred_counts, classes)
    out["counts"] = {"truth": truth_counts, "predicted": pred_counts}
    out["detection"] = detection
    out["n_slides"] = len(truth_counts)
    amb = table.ambiguous
    if amb.any() and (~amb).any():
        out["unambiguous"] = classification_metrics(table.truth[~amb], table.pred[~amb], classes,
                                                    other_class)
    return out


# ---------------------------------------------------------------- evaluate a bundle


def evaluate(bundle: str | Path, data: str | Path, out: str | Path | None = None,
             match_um: float = 4.0, workers: int = 0, progress: bool = True,
             unknown_class: str = "other", class_map: dict[str, str] | None = None,
             coords: str = "px", backend: str = "auto",
             precision: str = "fp32", mpp: float | None = None) -> tuple[CellTable, dict[str, Any]]:
    """Evaluate a bundle on slides with truth → (cell table, metrics); writes OUT if given:
    ``metrics.json``, ``confusion.png``, ``report.md``, ``cells.parquet``. ``precision="int8"``
    evaluates ``model.int8.onnx`` with its own temperature, gate and conformal sets."""
    source = discover(data, mpp=mpp)
    if source.kind == "crops":
        raise AnnotationError(f"{data}: evaluation needs slides with truth (not a crop folder)")
    card = load_card(bundle)
    engine = load_engine(bundle, backend=backend, precision=precision)
    if precision != "fp32":  # that model's own calibration, never the fp32 one
        card = card.replace(temperature=float(engine.card["temperature"]), gate=engine.card["gate"],
                            extra={**card.extra, "conformal": engine.card.get("conformal")})
    classes = tuple(card.classes)
    cmap = ClassMap(classes, card.other_class, dict(class_map or {}), unknown_class)
    other = classes.index(card.other_class)
    tables, truth_counts = [], {}
    per_slide_det: list[dict[str, Any]] = []
    for e in source.entries:
        pts = load_points(e, coords)
        with Slide(e.slide, mpp=e.mpp) as s:
            slide_mpp = s.mpp
        truth0 = pts.level0(slide_mpp)
        truth_idx = cmap.indices(pts.names, str(pts.source))
        cands = detect_slide(e.slide, mpp=e.mpp, work_mpp=card.mpp, workers=workers,
                             progress=progress, blank_fields_ok=True)
        crops = extract_crops(e.slide, cands, card.mpp, card.crop_px, mpp=e.mpp, workers=workers)
        logits = engine.logits(crops) if len(cands) else np.zeros((0, len(classes)), np.float32)
        radius = match_um / slide_mpp
        tables.append(slide_table(e.slide_id, cands, logits, truth0, truth_idx, pts.ambiguous,
                                  classes, other, radius, card.temperature))
        truth_counts[e.slide_id] = {c: int((truth_idx == i).sum()) for i, c in enumerate(classes)}
        per_slide_det.append(detection_metrics(cands, truth0, [classes[i] for i in truth_idx],
                                               radius))
    targets = [c for c in classes if c != card.other_class]
    if not any(n[c] for n in truth_counts.values() for c in targets):
        raise AnnotationError(f"{data}: the truth holds no annotated cell of the classes {targets}, "
                              "so there is nothing to measure or calibrate against; check that "
                              "the annotation files belong to these slides and use these class "
                              "names (nothing was written)")
    detection = pool_detection(per_slide_det)
    table = CellTable.concat(tables, classes)
    metrics = table_metrics(table, card.other_class, truth_counts, detection)
    metrics.update({"bundle": str(bundle), "model": card.name, "data": str(data),
                    "match_um": match_um, "temperature": card.temperature,
                    "backend": engine.backend})
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
    metrics.update(gate_metrics(table, card, Path(out) if out is not None else None))
    if out is not None:
        write_outputs(Path(out), table, metrics, card.other_class)
    return table, metrics


def write_outputs(out: Path, table: CellTable, metrics: dict[str, Any], other_class: str) -> None:
    """metrics.json, confusion.png (matplotlib Agg), report.md and cells.parquet in ``out``."""
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False))
    pq.write_table(table.to_arrow(), out / "cells.parquet")
    plot_confusion(np.asarray(metrics["confusion"]), list(table.classes), out / "confusion.png")
    atomic_write_text(out / "report.md", report_md(metrics, list(table.classes), other_class))


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2, 1.1 * len(classes) + 1.5), dpi=120)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{cm[i, j]}\n{frac[i, j]:.0%}", ha="center", va="center",
                    color="white" if frac[i, j] > 0.6 else "black", fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title("confusion (rows: truth; % of row)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(v: Any) -> str:
    return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def report_md(metrics: dict[str, Any], classes: list[str], other_class: str) -> str:
    det = metrics.get("detection", {})
    lines = [
        f"# Evaluation of {metrics.get('model', 'model')}", "",
        f"Data: `{metrics.get('data')}` ({metrics.get('n_slides')} slides, {metrics['n']} cells "
        f"incl. missed truth cells and false detections); matching radius "
        f"{metrics.get('match_um')} µm.", "",
        f"- macro-F1 over {', '.join(c for c in classes if c != other_class)}: "
        f"**{_fmt(metrics['macro_f1'])}**",
        f"- balanced accuracy: {_fmt(metrics['balanced_accuracy'])}; accuracy "
        f"{_fmt(metrics['accuracy'])}",
        f"- detection recall {_fmt(det.get('recall_all'))}, precision {_fmt(det.get('precision'))}",
        "", "| class | precision | recall | F1 | support | mean abs. count error |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in classes:
        pc = metrics["per_class"][c]
        ce = metrics["count_error"]["mean_abs"].get(c)
        lines.append(f"| {c} | {_fmt(pc['precision'])} | {_fmt(pc['recall'])} | {_fmt(pc['f1'])} "
                     f"| {pc['support']} | {_fmt(ce)} |")
    lines += ["", "Ungated: every candidate is counted. Missed truth cells count as predicted "
              f"`{other_class}`; unmatched candidates as truth `{other_class}`.",
              "", "![confusion](confusion.png)", ""]
    return "\n".join(lines)
