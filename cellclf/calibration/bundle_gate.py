"""Calibrating a bundle and reporting its gate: ``cellclf calibrate`` and the gate half of
``cellclf evaluate``.

Sits after training: classify the candidates of calibration slides that training never saw
(:func:`cellclf.evaluation.evaluate.evaluate` gives the cell table), then fit — with the pure maths of
:mod:`cellclf.gate.temperature`, :mod:`cellclf.gate.thresholds`, :mod:`cellclf.gate.conformal`,
:mod:`cellclf.gate.slide_guard` — the temperature, the per-class certified thresholds, the
reviewer's conformal sets and the slide-level OOD guard, and write them into card.json. The
guarantee holds for slides exchangeable with the calibration slides; the OOD guard watches that
assumption. By default the gate also certifies the
miss bound (β = :data:`DEFAULT_BETA`: at most 1 % of each target class auto-accepted as ``other``),
so that counts after review stay right; :func:`counts_after_review` measures that on test slides.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cellclf.annotations.labelled_data import discover
from cellclf.card import Card, bundle_paths, load_card
from cellclf.errors import CellclfError
from cellclf.evaluation.evaluate import evaluate
from cellclf.evaluation.gate_metrics import gated_rows
from cellclf.gate.conformal import fit_aps
from cellclf.gate.slide_guard import fit_ood, slide_ood_stats
from cellclf.gate.temperature import ece, fit_temperature, softmax
from cellclf.gate.thresholds import fit_gate
from cellclf.model.onnx_export import export_onnx
from cellclf.outputs.atomic import atomic_write_bytes, atomic_write_json

DEFAULT_BETA = 0.01  # miss bound per target class: share auto-accepted as `other`


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
                     alpha_per_class: dict[str, float] | None = None) -> dict[str, Any]:
    """Fit temperature, gate, conformal sets and OOD guard on DATA; write them into card.json.

    ``beta`` is the gate's miss bound (None = off), ``alpha_per_class`` overrides α per class
    (see :func:`cellclf.gate.thresholds.fit_gate`)."""
    paths = bundle_paths(bundle)
    card = load_card(paths.root)
    unknown = sorted(set(alpha_per_class or {}) - set(card.classes))
    if unknown:
        raise CellclfError(f"per-class alpha names unknown classes {unknown}; {paths.root} has "
                           f"the classes {list(card.classes)}.")
    source = discover(data)
    overlap = sorted(training_slide_ids(card) & {e.slide_id for e in source.entries})
    if overlap:
        raise CellclfError(
            f"calibration slides {overlap[:5]} were used in training {paths.root}: the gate's "
            "guarantee needs calibration slides the model never saw. Use other slides.")
    table, _ = evaluate(paths.root, data, None, workers=workers, progress=progress)
    logits, labels = gated_rows(table)
    if len(labels) == 0:
        raise CellclfError(f"{data}: no detected cells to calibrate on; {paths.root} is unchanged")
    classes = list(card.classes)
    check_usable_labels(labels, classes, card.other_class, data, paths.root)
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
    write_calibrated_card(paths, card_d)
    summary = {"temperature": temperature, "ece_before": card_d["calibration"]["ece_before"],
               "ece_after": card_d["calibration"]["ece_after"], "gate": gate.to_dict(),
               "n_cells": int(len(labels))}
    if out is not None:
        atomic_write_json(Path(out) / "calibration.json", summary)
    return summary


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
