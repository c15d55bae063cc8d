"""Fit and use agree: the evaluate/calibrate path (:func:`cellclf.evaluation.evaluate.evaluate`'s
cell table → the card's gate, as ``cellclf calibrate`` fits it) and the ``cellclf infer`` path
(cells.parquet, summary.json) give the same cells, probabilities, gate decisions, conformal sets
and counts on the same slide."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
from typer.testing import CliRunner

from cellclf.card import load_card
from cellclf.cli import app
from cellclf.evaluation.evaluate import evaluate
from cellclf.evaluation.gate_metrics import gated_rows
from cellclf.gate.conformal import aps_sets
from cellclf.gate.temperature import softmax
from cellclf.gate.thresholds import GateParams, apply_gate


def test_evaluate_and_infer_agree(tiny_svs, shipped_model, tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for f in tiny_svs:
        shutil.copyfile(f, data / f.name)
    card = load_card(shipped_model)
    assert card.gate and card.get("conformal"), "the shipped model carries a gate and APS sets"

    # the fit side: evaluate's cell table, the gate's inputs exactly as calibrate builds them
    table, _ = evaluate(shipped_model, data, workers=2, progress=False, backend="onnx")
    logits, _ = gated_rows(table)
    fit_probs = softmax(logits, card.temperature)
    gate = GateParams.from_dict(card.gate, classes=list(card.classes))
    fit_accept, fit_reason = apply_gate(fit_probs, gate)
    fit_sets = aps_sets(fit_probs, card.get("conformal"))
    fit_xy = np.column_stack([table.x[table.detected], table.y[table.detected]])

    # the use side: `cellclf infer`
    out = tmp_path / "results"
    res = CliRunner().invoke(app, ["infer", str(data / tiny_svs[0].name), "-m", str(shipped_model),
                                   "-o", str(out), "--backend", "onnx", "--workers", "2"])
    assert res.exit_code == 0, res.output
    cells = pq.read_table(out / tiny_svs[0].stem / "cells.parquet").to_pydict()
    summary = json.loads((out / tiny_svs[0].stem / "summary.json").read_text())
    assert summary["gate"]["ood"]["flagged"] is False  # else infer sends every cell to review
    use_xy = np.column_stack([cells["x"], cells["y"]])
    use_probs = np.column_stack([cells[f"p_{c}"] for c in card.classes])

    # the same cells: same detector, same tiles' owners → the same level-0 centres
    assert len(use_xy) == len(fit_xy) > 50
    order_fit, order_use = np.lexsort(fit_xy.T), np.lexsort(use_xy.T)
    np.testing.assert_allclose(use_xy[order_use], fit_xy[order_fit], atol=1e-3)
    fit_probs, use_probs = fit_probs[order_fit], use_probs[order_use]
    # the same crops and model: probabilities equal up to float32 rounding of the softmax
    np.testing.assert_allclose(use_probs, fit_probs, atol=1e-6)
    assert (use_probs.argmax(1) == fit_probs.argmax(1)).all()
    # the same decisions, reasons and conformal sets
    use_accept = np.array(cells["decision"])[order_use] == "accepted"
    np.testing.assert_array_equal(use_accept, fit_accept[order_fit])
    np.testing.assert_array_equal(np.array(cells["reason"])[order_use],
                                  np.asarray(fit_reason, dtype=str)[order_fit])
    fit_set_names = ["|".join(c for c, m in zip(card.classes, row, strict=True) if m)
                     for row in fit_sets[order_fit]]
    assert list(np.array(cells["conformal_set"])[order_use]) == fit_set_names
    # the same counts per class
    for k, c in enumerate(card.classes):
        pred_k = fit_probs.argmax(1) == k
        assert summary["counts"][c] == {"accepted": int((pred_k & fit_accept[order_fit]).sum()),
                                        "review": int((pred_k & ~fit_accept[order_fit]).sum()),
                                        "total": int(pred_k.sum())}
