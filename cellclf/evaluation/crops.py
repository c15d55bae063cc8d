"""Crop folders with a bundle: ``cellclf evaluate``, ``calibrate`` and ``classify`` on
``DIR/<class>/*.png`` (or unlabelled ``DIR/*.png``) instead of slides.

Sits beside :mod:`cellclf.evaluation.evaluate`: each image is one cell (no detector, no matching),
read at the model's field of view by :mod:`cellclf.annotations.crop_folder` and classified by the
bundle's engine. The cell table is the slides' :class:`~cellclf.evaluation.evaluate.CellTable`
(one "slide" = the folder), so the metric, gate and calibration maths are the slides' own.

The stain/focus guard runs on a batch of crops as on a slide: :func:`batch_stats` computes
:func:`~cellclf.gate.slide_guard.slide_stats` over the crops as the model sees them. Calibration
cuts its crops into random batches of :data:`OOD_BATCH` (:func:`fit_crop_ood`), so the guard's
spread is that of a batch of crops; a classify batch outside it sends every cell to review with
reason ``ood_batch``. The statistics describe the batch's stain and sharpness, so a batch of one
cell type only (e.g. all basophils, which stain darker) can read as different from the mixed
calibration batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellclf.annotations.crop_folder import (
    CropFile,
    check_crop_mpp,
    list_crop_files,
    read_crops,
    warn_padding,
)
from cellclf.annotations.labelled_data import ClassMap, normalise_name
from cellclf.card import load_card
from cellclf.errors import AnnotationError
from cellclf.evaluation.evaluate import CellTable, classification_metrics, plot_confusion
from cellclf.evaluation.gate_metrics import gate_metrics
from cellclf.gate.slide_guard import OODParams, SlideStats, fit_ood, is_ood, ood_scores, slide_stats
from cellclf.gate.temperature import softmax
from cellclf.gate.thresholds import GateParams, apply_gate
from cellclf.model.engine import load_engine
from cellclf.outputs.atomic import atomic_write_text

log = logging.getLogger(__name__)

OOD_BATCH = 50  # crops per calibration batch for the stain/focus guard
# The slide guard's floors on the robust spread (0.02 OD, 10 % of the median, 0.25 log focus) keep
# it sane with 1-3 calibration slides. A calibration crop folder gives dozens of batches whose
# spread is measured, so the floors are quartered: on PBC smears the unfloored spread of 50-crop
# batches lay below even these, a held-out test batch stayed within |z| < 0.4 of them, and a
# mild stain + focus shift that cut balanced accuracy from 0.75 to 0.32 was flagged (docs/crops.md).
CROP_OOD_FLOORS = {"stain_floor_od": 0.005, "stain_floor_rel": 0.025, "focus_floor_log": 0.0625}
OOD_MAX_CROPS = 400  # a classify batch's statistics use at most this many crops (evenly spread)
REASON_OOD_BATCH = "ood_batch"


@dataclass
class CropBatch:
    """A crop folder read for a bundle: files, crops at the model's field and the logits."""

    root: Path
    files: list[CropFile]
    crops: np.ndarray
    pad_share: np.ndarray
    logits: np.ndarray
    backend: str


def card_class_map(card: Any, extra: dict[str, str] | None = None) -> ClassMap:
    """Folder name → model class: the mapping the bundle was trained with, plus ``extra``;
    a folder that maps to none of the model's classes is an error (never silently 'other')."""
    trained = (((card.training or {}).get("config") or {}).get("data") or {}).get("class_map") \
        or {}
    return ClassMap(tuple(card.classes), card.other_class, {**trained, **(extra or {})}, "error")


def folder_truth(files: list[CropFile], cmap: ClassMap, root: Path) -> np.ndarray:
    """Class index per labelled image; AnnotationError listing every folder the model does not
    know (and how to map it)."""
    loose = [f for f in files if f.folder is None]
    if loose:
        raise AnnotationError(f"{root}: {len(loose)} images (e.g. {loose[0].rel}) are not in a "
                              "class folder; evaluation and calibration need DIR/<class>/*.png")
    unknown = {}
    for name in sorted({f.folder for f in files if f.folder is not None}):
        try:
            cmap.label(name, where=str(root / name))
        except AnnotationError:
            unknown[name] = sum(f.folder == name for f in files)
    if unknown:
        listing = ", ".join(f"{k} ({v} images)" for k, v in unknown.items())
        example = next(iter(unknown))
        raise AnnotationError(
            f"{root}: class folders unknown to the model: {listing}. The model's classes are "
            f"{list(cmap.classes)}; map each with --class-map {example}={cmap.other_class} (or "
            "another class), or remove the folder.")
    return np.array([cmap.index(f.folder, str(root)) for f in files], dtype=np.int64)


def read_batch(bundle: str | Path, data: str | Path, crop_mpp: float | None,
               backend: str = "auto", precision: str = "fp32") -> tuple[Any, CropBatch]:
    """Load the engine and card, read DATA at the model's field and classify it."""

    root = Path(data)
    card = load_card(bundle)
    mpp = check_crop_mpp(crop_mpp, root, card.mpp)
    files = list_crop_files(root)
    crops, pad, _ = read_crops(root, files, mpp, card.mpp, card.crop_px)
    warn_padding(root, pad, card.crop_px, card.mpp)
    engine = load_engine(bundle, backend=backend, precision=precision)
    if precision != "fp32":  # that model's own calibration
        card = card.replace(temperature=float(engine.card["temperature"]),
                            gate=engine.card["gate"],
                            extra={**card.extra, "conformal": engine.card.get("conformal")})
    logits = engine.logits(crops).astype(np.float32)
    return card, CropBatch(root, files, crops, pad, logits, engine.backend)


def crop_table(batch: CropBatch, truth: np.ndarray, card: Any) -> CellTable:
    """One row per image: the slides' cell table with the folder as the slide."""

    n = len(batch.files)
    nan = np.full(n, np.nan)
    return CellTable(tuple(card.classes), np.full(n, batch.root.name, dtype=object), nan, nan,
                     truth, batch.logits.argmax(1), softmax(batch.logits, card.temperature)
                     .astype(np.float32), batch.logits, np.ones(n, bool), np.ones(n, bool),
                     np.zeros(n, bool))


# ---------------------------------------------------------------- the stain/focus guard


def batch_stats(crops: np.ndarray, mpp: float, source: str,
                max_crops: int = OOD_MAX_CROPS) -> SlideStats:
    """Stain and focus statistics of a batch of crops (at most ``max_crops``, evenly spread)."""
    idx = np.linspace(0, len(crops) - 1, min(len(crops), max_crops)).round().astype(int)
    return slide_stats(list(crops[idx]), mpp, min_tissue_px=200, source=source)


def fit_crop_ood(crops: np.ndarray, mpp: float, source: str, seed: int = 0,
                 batch: int = OOD_BATCH) -> tuple[OODParams, int]:
    """The guard fitted on random batches of ``batch`` calibration crops → (params, batches)."""
    order = np.random.default_rng(seed).permutation(len(crops))
    n = max(1, len(crops) // batch)
    stats = [batch_stats(crops[np.sort(part)], mpp, source) for part in np.array_split(order, n)]
    return fit_ood(stats, **CROP_OOD_FLOORS), n


def check_batch_ood(crops: np.ndarray, card: Any, source: str) -> dict[str, Any]:
    """Run the card's guard on a batch of crops → {flagged, reasons, scores, message}."""

    ood_d = card.get("ood")
    if not ood_d:
        return {"checked": False, "flagged": False, "reasons": [],
                "message": "the bundle has no stain/focus guard (calibrate it first)"}
    params = OODParams.from_dict(ood_d)
    stats = batch_stats(crops, card.mpp, source)
    flagged, reasons = is_ood(stats, params)
    unit = "calibration crop batches" if ood_d.get("unit") == "crop batch" \
        else "calibration slides"
    reasons = [r.replace("the calibration slides", f"the {unit}") for r in reasons]
    msg = (f"these {len(crops)} crops look unlike the {unit} in stain or focus "
           f"({'; '.join(reasons)}): the gate's guarantee does not hold for them, so every cell "
           "goes to review. Calibrate the model on crops from this lab/scanner to automate them."
           if flagged else f"stain and focus within the range of the {unit}")
    return {"checked": True, "flagged": flagged, "reasons": reasons, "message": msg,
            "scores": ood_scores(stats, params), "stats": stats.to_dict()}


# ---------------------------------------------------------------- evaluate


def evaluate_crops(bundle: str | Path, data: str | Path, out: str | Path | None, *,
                   crop_mpp: float | None, class_map: dict[str, str] | None = None,
                   backend: str = "auto", precision: str = "fp32",
                   ) -> tuple[CellTable, dict[str, Any]]:
    """Metrics of a bundle on a labelled crop folder (metrics.json keys as for slides where they
    apply: macro_f1, balanced_accuracy, per_class, confusion, ece_before/after, gate, no_gate)."""

    card, batch = read_batch(bundle, data, crop_mpp, backend, precision)
    truth = folder_truth(batch.files, card_class_map(card, class_map), batch.root)
    table = crop_table(batch, truth, card)
    metrics = classification_metrics(table.truth, table.pred, list(card.classes),
                                     card.other_class)
    ood = check_batch_ood(batch.crops, card, str(batch.root))
    metrics.update({"bundle": str(bundle), "model": card.name, "data": str(data),
                    "data_kind": "crops", "n_images": len(batch.files),
                    "crop_mpp": crop_mpp, "field_um": round(card.crop_px * card.mpp, 3),
                    "padding_share_mean": float(batch.pad_share.mean()),
                    "temperature": card.temperature, "backend": batch.backend,
                    "ood": {k: v for k, v in ood.items() if k != "stats"}})
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
    metrics.update(gate_metrics(table, card, Path(out) if out is not None else None))
    metrics.pop("counts_after_review", None)  # counts per slide: not a crop-folder notion
    if out is not None:
        write_crop_outputs(Path(out), table, metrics, card)
    return table, metrics


def write_crop_outputs(out: Path, table: CellTable, metrics: dict[str, Any], card: Any) -> None:
    import json


    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False))
    plot_confusion(np.asarray(metrics["confusion"]), list(table.classes), out / "confusion.png")
    atomic_write_text(out / "report.md", crop_report_md(metrics, card))


def _f(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.1f} %" if pct else (f"{v:.3f}" if isinstance(v, float) else str(v))


def crop_report_md(metrics: dict[str, Any], card: Any) -> str:
    classes = list(card.classes)
    g = metrics.get("gate") or {}
    lines = [f"# Evaluation of {metrics['model']} on crops", "",
             f"Data: `{metrics['data']}` ({metrics['n_images']} images at {metrics['crop_mpp']} "
             f"µm/px, field of view {metrics['field_um']} µm, mean padding "
             f"{_f(metrics['padding_share_mean'], True)}).", "",
             f"- balanced accuracy **{_f(metrics['balanced_accuracy'])}**, macro-F1 over the "
             f"target classes {_f(metrics['macro_f1'])}, accuracy {_f(metrics['accuracy'])}",
             f"- ECE {_f(metrics.get('ece_before'))} → {_f(metrics.get('ece_after'))} after "
             f"temperature {metrics['temperature']:.3f}",
             f"- stain/focus guard: {metrics['ood']['message']}"]
    if g:
        lines.append(f"- gate: automation {_f(g.get('automation_rate'), True)}, error among "
                     f"auto-accepted {_f(g.get('accepted_error'), True)}")
    lines += ["", "| class | precision | recall | F1 | support | gate automation | "
              "accepted error |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in classes:
        pc, gc = metrics["per_class"][c], (g.get("per_class") or {}).get(c, {})
        lines.append(f"| {c} | {_f(pc['precision'])} | {_f(pc['recall'])} | {_f(pc['f1'])} | "
                     f"{pc['support']} | {_f(gc.get('automation_rate'), True)} | "
                     f"{_f(gc.get('accepted_error'), True)} |")
    lines += ["", "![confusion](confusion.png)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- classify


def classify_crops(bundle: str | Path, data: str | Path, out: str | Path, *,
                   crop_mpp: float | None, backend: str = "auto") -> dict[str, Any]:
    """Classify every image of DATA and gate it → ``OUT/classified.csv`` (image, class,
    decision, reason, prob_<class>…) and ``OUT/summary.json``; returns the summary."""
    import csv
    import json


    card, batch = read_batch(bundle, data, crop_mpp, backend)
    classes = list(card.classes)
    probs = softmax(batch.logits, card.temperature)
    pred = probs.argmax(1)
    ood = check_batch_ood(batch.crops, card, str(batch.root))
    if card.gate:
        accept, reason = apply_gate(probs, GateParams.from_dict(card.gate, classes=classes),
                                    ood_slide=ood["flagged"])
        reason = np.where(reason == "ood_slide", REASON_OOD_BATCH, reason).astype(object)
    else:
        accept = np.zeros(len(pred), bool)
        reason = np.full(len(pred), "uncalibrated", dtype=object)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    known = {normalise_name(c) for c in classes}
    folders = sorted({f.folder for f in batch.files if f.folder is not None})
    unknown = [f for f in folders if normalise_name(f) not in known]
    tmp = out / ".classified.csv.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "class", "decision", "reason", *[f"prob_{c}" for c in classes]])
        for i, f in enumerate(batch.files):
            w.writerow([f.rel.as_posix(), classes[pred[i]],
                        "accepted" if accept[i] else "review", reason[i],
                        *[f"{p:.6f}" for p in probs[i]]])
    tmp.replace(out / "classified.csv")
    summary = {
        "data": str(data), "bundle": str(bundle), "model": card.name, "n_images": len(pred),
        "crop_mpp": crop_mpp, "field_um": round(card.crop_px * card.mpp, 3),
        "padding_share_mean": float(batch.pad_share.mean()) if len(pred) else 0.0,
        "predicted": {c: int((pred == i).sum()) for i, c in enumerate(classes)},
        "accepted": {c: int(((pred == i) & accept).sum()) for i, c in enumerate(classes)},
        "review": int((~accept).sum()), "automation_rate": float(accept.mean()),
        "reasons": {str(r): int((reason == r).sum()) for r in sorted(set(reason.tolist()))},
        "gate": bool(card.gate), "ood": {k: v for k, v in ood.items() if k != "stats"},
        "folders_not_model_classes": {f: sum(x.folder == f for x in batch.files)
                                      for f in unknown},
        "backend": batch.backend,
    }
    if not card.gate:
        summary["note"] = ("the bundle is not calibrated: every cell goes to review; run "
                           "`cellclf calibrate` on labelled crops first")
    if unknown:
        summary["note_folders"] = (f"sub-folders {unknown} are not classes of the model "
                                   f"{classes}; their images were classified like any other "
                                   "and the folder name was not used")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, allow_nan=False))
    return summary

