"""Calibrating a bundle and reporting its gate: ``cellclf calibrate`` and the gate half of
``cellclf evaluate``.

Sits after training: classify the candidates of calibration slides that training never saw
(:func:`cellclf.evaluation.evaluate.evaluate` gives the cell table), then fit — with the pure maths
of :mod:`cellclf.gate.temperature`, :mod:`cellclf.gate.thresholds`, :mod:`cellclf.gate.conformal`,
:mod:`cellclf.gate.slide_guard` — the temperature, the per-class certified thresholds, the
reviewer's conformal sets and the slide-level OOD guard, and write them into card.json. The
guarantee holds for slides exchangeable with the calibration slides; the OOD guard watches that
assumption. By default the gate also certifies the miss bound (β = :data:`DEFAULT_BETA`: at most
1 % of each target class auto-accepted as ``other``), so that counts after review stay right;
:func:`counts_after_review` measures that on test slides.

Slides as the unit (:mod:`cellclf.gate.slide_bound`): the cell-level statements treat calibration
cells as independent draws. The slide-level gate (Learn-then-Test over slide losses) is always fitted
and written as the card's ``gate_slides`` section, with the slides it used; ``unit`` decides which
thresholds deployment applies: ``slides`` (every threshold raised to a certified slide-level grid
point; classes without one go to review), ``cells`` (the cell-level gate, with the slide-level
statement marked as not established), or ``auto`` (slides when there are enough calibration slides
for the smallest α, else cells).
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cellclf.annotations.labelled_data import discover
from cellclf.card import Card, bundle_paths, load_card
from cellclf.errors import CellclfError
from cellclf.evaluation.crops import (
    OOD_BATCH,
    card_class_map,
    crop_table,
    fit_crop_ood,
    folder_truth,
    read_batch,
)
from cellclf.evaluation.evaluate import evaluate
from cellclf.evaluation.gate_metrics import gated_rows
from cellclf.gate.audit_bound import refit_from_audit
from cellclf.gate.conformal import fit_aps
from cellclf.gate.slide_bound import fit_slide_gate, grid_at_or_above
from cellclf.gate.slide_guard import fit_ood, slide_ood_stats
from cellclf.gate.temperature import ece, fit_temperature, softmax
from cellclf.gate.thresholds import fit_gate
from cellclf.model.dataset import crop_group
from cellclf.model.onnx_export import export_onnx
from cellclf.outputs.atomic import atomic_write_bytes, atomic_write_json

DEFAULT_BETA = 0.01  # miss bound per target class: share auto-accepted as `other`
GATE_UNITS = ("auto", "cells", "slides")


def slide_level_gate(gate: Any, slide_gate: dict[str, Any], unit: str) -> tuple[Any, str]:
    """The gate deployment applies, and the unit chosen (pure).

    ``slides``: each class's threshold is the lowest certified slide-level grid point at or above its
    cell-level threshold (so both statements hold); a class without both goes to review.
    """
    if unit not in GATE_UNITS:
        raise CellclfError(f"gate unit {unit!r}: use one of {GATE_UNITS}")
    if unit == "auto":
        enough = slide_gate["n_slides"] >= min(slide_gate["min_slides"].values())
        unit = "slides" if enough else "cells"
    if unit == "cells":
        return gate, unit
    thresholds: dict[str, float | None] = {}
    notes = dict(gate.notes)
    for c in gate.classes:
        cell_t, slide_t = gate.thresholds.get(c), slide_gate["thresholds"].get(c)
        if cell_t is None or slide_t is None:
            thresholds[c] = None
            if slide_t is None:
                notes[c] = slide_gate["notes"].get(c, "not certified at slide level")
        else:
            thresholds[c] = grid_at_or_above(cell_t, slide_t)
    guarantee = (f"{gate.guarantee} {slide_gate['guarantee']} Both hold at once with "
                 f"probability at least {1 - 2 * gate.delta:g}.")
    return dataclasses.replace(gate, thresholds=thresholds, notes=notes, guarantee=guarantee,
                               method=gate.method + "; thresholds raised to the slide-level "
                               "Learn-then-Test (Hoeffding-Bentkus) grid"), unit


def training_slide_ids(card: Card) -> set[str]:
    slides = (card.training or {}).get("slides") or {}
    out: set[str] = set()
    for ids in slides.values():
        if isinstance(ids, list):
            out.update(map(str, ids))
        elif isinstance(ids, dict):
            out.update(map(str, ids.get("ids", ids.get("first", []))))
    return out


def calibrate_bundle(bundle: str | Path, data: str | Path, *, alpha: float = 0.01,
                     delta: float = 0.05, alpha_set: float = 0.1, workers: int = 0,
                     progress: bool = True, out: str | Path | None = None,
                     beta: float | None = DEFAULT_BETA,
                     alpha_per_class: dict[str, float] | None = None,
                     unit: str = "auto", crop_mpp: float | None = None,
                     class_map: dict[str, str] | None = None) -> dict[str, Any]:
    """Fit temperature, gate, conformal sets and OOD guard on DATA; write them into card.json.

    ``beta`` is the gate's miss bound (None = off), ``alpha_per_class`` overrides α per class
    (see :func:`cellclf.gate.thresholds.fit_gate`); ``unit`` which statement the thresholds
    carry (module docstring). DATA may be a crop folder (``DIR/<class>/*.png`` at ``crop_mpp``
    µm/px; see :func:`calibrate_crops`: every image is one cell, so the cell-level gate)."""
    paths = bundle_paths(bundle)
    card = load_card(paths.root)
    unknown = sorted(set(alpha_per_class or {}) - set(card.classes))
    if unknown:
        raise CellclfError(f"per-class alpha names unknown classes {unknown}; {paths.root} has "
                           f"the classes {list(card.classes)}.")
    source = discover(data, mpp=crop_mpp)
    if source.kind == "crops":
        return calibrate_crops(paths.root, card, data, crop_mpp=crop_mpp, class_map=class_map,
                               alpha=alpha, delta=delta, alpha_set=alpha_set, out=out,
                               beta=beta, alpha_per_class=alpha_per_class)
    overlap = sorted(training_slide_ids(card) & {e.slide_id for e in source.entries})
    if overlap:
        raise CellclfError(
            f"calibration slides {overlap[:5]} were used in training {paths.root}: the gate's "
            "guarantee needs calibration slides the model never saw. Use other slides.")
    table, _ = evaluate(paths.root, data, None, workers=workers, progress=progress)
    logits, labels = gated_rows(table)
    slide_of_cell = table.slide[table.detected].astype(str)
    if len(labels) == 0:
        raise CellclfError(f"{data}: no detected cells to calibrate on; {paths.root} is unchanged")
    stats = [slide_ood_stats(e.slide, card.mpp, mpp=e.mpp, workers=workers)
             for e in source.entries]
    provenance = {
        "data": str(data), "slides": [e.slide_id for e in source.entries],
        "assumption": "the guarantee holds for slides exchangeable with these calibration "
                      "slides (same lab, stain, scanner, tissue); the OOD guard sends slides "
                      "whose stain or focus falls far outside them to review"}
    return write_calibration(paths.root, logits, labels, fit_ood(stats).to_dict(), provenance, alpha=alpha,
                             delta=delta, alpha_set=alpha_set, beta=beta,
                             alpha_per_class=alpha_per_class, out=out,
                             slide_of_cell=slide_of_cell, unit=unit)


def write_calibration(bundle: str | Path, logits: Any, labels: Any, ood: dict[str, Any],
                      provenance: dict, *, alpha: float = 0.01, delta: float = 0.05,
                      alpha_set: float = 0.1, beta: float | None = DEFAULT_BETA,
                      alpha_per_class: dict[str, float] | None = None,
                      out: str | Path | None = None, slide_of_cell: Any = None,
                      unit: str = "auto") -> dict[str, Any]:
    """Fit temperature, gate and conformal sets on calibration ``logits``/``labels`` and write
    them with the fitted OOD guard ``ood`` into the bundle's card.json; ``provenance`` (data,
    slides, assumption) goes into its ``calibration`` section. Shared by :func:`calibrate_bundle`,
    :func:`calibrate_crops` and ``cellclf label --calibrate`` (held-aside labelled cells).
    ``slide_of_cell`` names each cell's slide for the slide-level bound (None for crop folders:
    no slides, no slide-level statement)."""
    paths = bundle_paths(bundle)
    card = load_card(paths.root)
    classes = list(card.classes)
    check_usable_labels(labels, classes, card.other_class, provenance.get("data"), paths.root)
    temperature = fit_temperature(logits, labels)
    probs = softmax(logits, temperature)
    gate = fit_gate(probs, labels, classes, alpha=alpha, delta=delta, temperature=temperature,
                    alpha_per_class=alpha_per_class, beta=beta, other_class=card.other_class)
    slide_gate = None
    if slide_of_cell is not None:
        gate, slide_gate, unit = _with_slide_gate(gate, probs, labels, slide_of_cell, classes,
                                                  alpha, delta, alpha_per_class, unit)
    aps = fit_aps(probs, labels, classes, alpha_set=alpha_set)
    card_d = json.loads(paths.card.read_text())
    card_d.update(temperature=float(temperature), gate=gate.to_dict(), conformal=aps.to_dict(),
                  ood=ood)
    card_d["calibration"] = {
        **provenance,
        "n_cells": int(len(labels)), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "ece_before": ece(softmax(logits, 1.0), labels), "ece_after": ece(probs, labels),
        "alpha_set": alpha_set}
    summary = {"temperature": temperature, "ece_before": card_d["calibration"]["ece_before"],
               "ece_after": card_d["calibration"]["ece_after"], "gate": gate.to_dict(),
               "n_cells": int(len(labels))}
    if slide_gate is not None:
        card_d["gate_slides"] = slide_gate
        card_d["calibration"]["gate_unit"] = unit
        summary.update(gate_slides=slide_gate, slides=list(provenance.get("slides", [])))
    write_calibrated_card(paths, card_d)
    if out is not None:
        atomic_write_json(Path(out) / "calibration.json", summary)
    return summary


def _with_slide_gate(gate: Any, probs: Any, labels: Any, slide_of_cell: Any,
                     classes: list[str], alpha: float, delta: float,
                     alpha_per_class: dict[str, float] | None,
                     unit: str) -> tuple[Any, dict[str, Any], str]:
    """The slide-level bound beside the cell-level gate (:func:`slide_level_gate` picks which
    statement the thresholds carry); the gate's guarantee says when it is not established."""
    slide_gate = fit_slide_gate(probs, labels, slide_of_cell, classes, alpha, delta,
                                gate.n_tests or len(classes), alpha_per_class=alpha_per_class)
    gate, unit = slide_level_gate(gate, slide_gate, unit)
    slide_gate["unit"] = unit
    slide_gate["established"] = unit == "slides"
    if unit == "cells":
        need = min(slide_gate["min_slides"].values())
        slide_gate["statement"] = (
            f"slide-level guarantee not established: {slide_gate['n_slides']} calibration "
            f"slides, at least {need} are needed (α = {alpha:g}, δ = {delta:g} over "
            f"{slide_gate['n_tests']} statements) even with no errors. The thresholds carry the "
            "cell-level statement, which treats cells as independent draws and is optimistic "
            "when slides differ (docs/gate.md, 'Slides as the unit').")
        gate = dataclasses.replace(gate, guarantee=f"{gate.guarantee} Note: the "
                                   f"{slide_gate['statement']}")
    else:
        slide_gate["statement"] = slide_gate["guarantee"]
    return gate, slide_gate, unit


PREVIOUS_CARD = "card.previous.json"


def check_usable_labels(labels: Any, classes: list[str], other_class: str | None, data: Any,
                        root: Path) -> None:
    """Refuse truth without any labelled cell of a target class (e.g. annotations that matched no
    candidate, or class names the model does not know): it would uncertify every class."""
    import numpy as np

    labels = np.asarray(labels)
    targets = [i for i, c in enumerate(classes) if c != other_class]
    if not np.isin(labels, targets).any():
        raise CellclfError(f"{data}: none of the {len(labels)} detected cells matches an annotated "
                           f"cell of the classes {[classes[i] for i in targets]} (check that the "
                           "annotations lie on these slides, use level-0 pixel coordinates and "
                           f"these class names); {root} is unchanged")


def write_calibrated_card(paths: Any, card_d: dict[str, Any]) -> None:
    """Write the new card, then re-export model.onnx (its graph bakes in the temperature). The old
    card is kept as card.previous.json; if anything fails the old card is put back, so a working
    bundle is never left half-calibrated."""
    import shutil

    previous = paths.root / PREVIOUS_CARD
    old_bytes = paths.card.read_bytes()
    atomic_write_bytes(previous, old_bytes)
    shutil.copymode(paths.card, previous)
    try:
        atomic_write_json(paths.card, card_d)
        load_card(paths.root)  # validate what we wrote
        if paths.onnx.is_file():
            prev = card_d.get("onnx", {})
            export_onnx(paths.root, opset=int(prev.get("opset", 18)))
    except BaseException:
        atomic_write_bytes(paths.card, old_bytes)  # model.onnx is replaced only on success
        raise
def refit_from_review(bundle: str | Path, review_npz: str | Path) -> dict[str, Any]:
    """Raise the bundle's thresholds where the running audit shows they do not keep α.

    ``review_npz``: ``cellclf audit --export-calibration`` output (stored calibrated probs,
    agreed labels, slides, audit flags). Uses the card's α, δ and number of statements; each
    class's threshold can only rise (:func:`cellclf.gate.audit_bound.refit_from_audit`). The
    result is stored in the card's ``gate`` (``thresholds`` and ``refit_from_audit``).
    """
    import numpy as np

    paths = bundle_paths(bundle)
    card = load_card(paths.root)
    if not card.gate:
        raise CellclfError(f"{paths.root}: no calibrated gate to refit; run `cellclf calibrate "
                           "--data SLIDES` first")
    try:
        data = np.load(review_npz)
        probs, labels, slides, audit = (data["probs"], data["labels"], data["slides"],
                                        data["audit"])
        classes = [str(c) for c in data["classes"]]
    except (OSError, KeyError, ValueError) as exc:
        raise CellclfError(f"{review_npz}: not a `cellclf audit --export-calibration` file "
                           f"({exc})") from None
    if classes != list(card.classes):
        raise CellclfError(f"{review_npz} holds classes {classes}, the model {list(card.classes)}:"
                           " export the review store this model filled")
    gate_d = dict(card.gate)
    refit = refit_from_audit(probs, labels, slides, audit, classes, gate_d["thresholds"],
                             float(gate_d["alpha"]), float(gate_d["delta"]),
                             int(gate_d.get("n_tests") or len(classes)),
                             gate_d.get("alpha_per_class") or {})
    refit["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    refit["source"] = str(review_npz)
    refit["previous_thresholds"] = dict(gate_d["thresholds"])
    card_d = json.loads(paths.card.read_text())
    card_d["gate"]["thresholds"] = refit["thresholds"]
    card_d["gate"]["refit_from_audit"] = refit
    write_calibrated_card(paths, card_d)  # the card also travels in model.onnx's metadata
    return refit


def calibrate_crops(root: Path, card: Any, data: str | Path, *, crop_mpp: float | None,
                    class_map: dict[str, str] | None, alpha: float, delta: float,
                    alpha_set: float, out: str | Path | None, beta: float | None,
                    alpha_per_class: dict[str, float] | None) -> dict[str, Any]:
    """The crop-folder branch of :func:`calibrate_bundle`: every image is one calibration cell;
    the stain/focus guard is fitted on random batches of the crops
    (:func:`cellclf.evaluation.crops.fit_crop_ood`)."""
    card, batch = read_batch(root, data, crop_mpp, backend="torch")
    overlap = sorted(training_slide_ids(card) & {crop_group(batch.root / f.rel)
                                                 for f in batch.files})
    if overlap:
        raise CellclfError(
            f"{data}: {len(overlap)} calibration crops (e.g. {overlap[:3]}) were used to train "
            f"{root}: the gate's guarantee needs crops the model never saw. Use others.")
    truth = folder_truth(batch.files, card_class_map(card, class_map), batch.root)
    table = crop_table(batch, truth, card)
    ood, n_batches = fit_crop_ood(batch.crops, card.mpp, str(batch.root))
    logits, labels = gated_rows(table)
    if len(labels) == 0:
        raise CellclfError(f"{data}: no cells to calibrate on")
    ood_d = ood.to_dict() | {"unit": "crop batch", "batch_crops": OOD_BATCH,
                             "n_batches": n_batches}
    provenance = {
        "data": str(data), "kind": "crops", "crop_mpp": crop_mpp, "n_images": len(batch.files),
        "assumption": "the guarantee holds for cells exchangeable with these calibration cells "
                      "(same lab, stain, scanner, cell population); the stain/focus guard sends "
                      "batches whose stain or focus falls far outside them to review"}
    return write_calibration(root, logits, labels, ood_d, provenance, alpha=alpha, delta=delta,
                             alpha_set=alpha_set, out=out, beta=beta,
                             alpha_per_class=alpha_per_class)
