"""Evaluation: metric maths on hand-computed cases, the per-cell table join, and an end-to-end
``cellclf evaluate`` on real TIFF slides writing metrics.json, confusion.png, report.md."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cellclf.evaluation.evaluate import (
    classification_metrics,
    count_errors,
    metrics_from_confusion,
    pool_detection,
    slide_table,
)

CLASSES = ("eosinophil", "neutrophil", "mast_cell", "other")


def test_metrics_from_confusion_hand_computed() -> None:
    # rows truth, cols predicted: eos 8 right 2 → neu; neu 5 right; mast none; other 1 → eos, 9 ok
    cm = np.array([[8, 2, 0, 0], [0, 5, 0, 0], [0, 0, 0, 0], [1, 0, 0, 9]])
    m = metrics_from_confusion(cm, CLASSES)
    eos, neu = m["per_class"]["eosinophil"], m["per_class"]["neutrophil"]
    assert eos["precision"] == pytest.approx(8 / 9) and eos["recall"] == pytest.approx(0.8)
    assert eos["f1"] == pytest.approx(16 / 19) and eos["support"] == 10
    assert neu["precision"] == pytest.approx(5 / 7) and neu["f1"] == pytest.approx(10 / 12)
    assert m["per_class"]["mast_cell"] == {"precision": None, "recall": None, "f1": None,
                                           "support": 0}
    assert m["macro_f1"] == pytest.approx((16 / 19 + 10 / 12) / 2)  # mast cell left out
    assert m["balanced_accuracy"] == pytest.approx((0.8 + 1 + 0.9) / 3)
    assert m["accuracy"] == pytest.approx(22 / 25) and m["n"] == 25
    same = classification_metrics(np.array([0] * 10 + [1] * 5 + [3] * 10),
                                  np.array([0] * 8 + [1] * 2 + [1] * 5 + [0] + [3] * 9), CLASSES)
    assert same["confusion"] == cm.tolist()


def test_count_errors_hand_computed() -> None:
    truth = {"a": {"eosinophil": 10, "other": 0}, "b": {"eosinophil": 4, "other": 2}}
    pred = {"a": {"eosinophil": 12, "other": 3}, "b": {"eosinophil": 3, "other": 2}}
    ce = count_errors(truth, pred, ["eosinophil", "other"])
    assert ce["per_slide"]["a"] == {"eosinophil": pytest.approx(0.2), "other": None}
    assert ce["per_slide"]["b"]["eosinophil"] == pytest.approx(-0.25)
    assert ce["mean_abs"] == {"eosinophil": pytest.approx(0.225), "other": pytest.approx(0.0)}


def test_slide_table_join_hand_computed() -> None:
    cands = np.array([[10.0, 10.0], [50.0, 50.0], [90.0, 10.0]])
    logits = np.array([[3.0, 0, 0, 0], [0, 0, 0, 2.0], [0, 0, 1.0, 0]], np.float32)
    truth = np.array([[11.0, 10.0], [200.0, 200.0], [90.0, 12.0]])
    truth_idx = np.array([0, 1, 3])
    t = slide_table("s", cands, logits, truth, truth_idx, np.array([False, True, False]),
                    CLASSES, other=3, radius_px=4.0)
    # rows: 3 candidates then the missed neutrophil at (200, 200)
    np.testing.assert_array_equal(t.truth, [0, 3, 3, 1])
    np.testing.assert_array_equal(t.pred, [0, 3, 2, 3])
    np.testing.assert_array_equal(t.detected, [True, True, True, False])
    np.testing.assert_array_equal(t.matched, [True, False, True, False])
    np.testing.assert_array_equal(t.ambiguous, [False, False, False, True])
    assert np.isnan(t.probs[3]).all() and np.isnan(t.logits[3]).all()
    np.testing.assert_allclose(t.probs[:3].sum(1), 1, rtol=1e-6)
    assert t.probs[0, 0] == pytest.approx(np.exp(3) / (np.exp(3) + 3))
    t2 = slide_table("s", cands, logits, truth, truth_idx, np.zeros(3, bool), CLASSES, 3, 4.0,
                     temperature=2.0)
    assert t2.probs[0, 0] == pytest.approx(np.exp(1.5) / (np.exp(1.5) + 3))
    assert t.x[3] == 200 and t.y[3] == 200 and list(t.slide) == ["s"] * 4


def test_pool_detection_sums_counts() -> None:
    a = {"n_truth": {"eosinophil": 4}, "n_found": {"eosinophil": 3}, "n_pred": 10,
         "n_matched": 3, "n_duplicates": 1}
    b = {"n_truth": {"eosinophil": 1, "other": 5}, "n_found": {"eosinophil": 1, "other": 4},
         "n_pred": 6, "n_matched": 5, "n_duplicates": 0}
    d = pool_detection([a, b])
    assert d["recall"] == {"eosinophil": 0.8, "other": 0.8} and d["recall_all"] == 0.8
    assert d["precision"] == 0.5 and d["duplicate_rate"] == 1 / 16


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained (seeded) bundle: evaluation mechanics do not need a good model."""
    import torch

    from cellclf.card import Card
    from cellclf.model.network import CellClassifier, save_bundle

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("bundle")
    model = CellClassifier("mobilenet_v3_small", 4, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    save_bundle(model.eval(), Card(name="untrained", classes=CLASSES, crop_px=32), out)
    return out


@pytest.mark.slow
def test_evaluate_writes_all_outputs(tmp_path: Path, bundle: Path) -> None:
    from test_dataset import write_slide
    from typer.testing import CliRunner

    from cellclf.cli import app

    for i in range(2):
        write_slide(tmp_path / "data" / f"s{i}.tiff", seed=i)
    out = tmp_path / "eval"
    res = CliRunner().invoke(app, ["evaluate", str(bundle), "--data", str(tmp_path / "data"),
                                   "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "macro-F1" in res.output
    m = json.loads((out / "metrics.json").read_text())
    for key in ("macro_f1", "balanced_accuracy", "per_class", "count_error", "detection",
                "confusion"):
        assert key in m
    assert set(m["per_class"]) == set(CLASSES)
    assert set(m["count_error"]["per_slide"]) == {"s0", "s1"}
    # per slide truth: 2 eos, 1 neu, 1 mast (stroma point, never detected), 1 lymphocyte
    assert m["counts"]["truth"]["s0"] == {"eosinophil": 2, "neutrophil": 1, "mast_cell": 1,
                                          "other": 1}
    assert m["detection"]["recall"]["mast_cell"] == 0.0
    assert m["detection"]["recall"]["eosinophil"] == 1.0
    # 5 candidates + 1 missed truth cell per slide; the missed mast cell is "predicted other"
    assert m["n"] == 12 and sum(m["confusion"][2]) == 2 and m["confusion"][2][3] == 2
    table = pq.read_table(out / "cells.parquet").to_pydict()
    assert len(table["slide"]) == 12 and sum(not d for d in table["detected"]) == 2
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "macro-F1" in report and "| mast_cell |" in report


@pytest.mark.slow
def test_evaluate_int8_uses_the_int8_calibration(tmp_path: Path, shipped_model, tiny_svs) -> None:
    """`cellclf evaluate --precision int8`: the int8 graph's logits, gated with its own temperature
    and thresholds (never the fp32 ones)."""
    from cellclf.evaluation.evaluate import evaluate

    card = json.loads((shipped_model / "card.json").read_text())
    if "int8" not in card:
        pytest.skip("the shipped bundle has no model.int8.onnx (cellclf export --int8)")
    data = tmp_path / "data"
    data.mkdir()
    for f in tiny_svs:
        (data / f.name).symlink_to(f)
    _, m8 = evaluate(shipped_model, data, tmp_path / "e8", progress=False, precision="int8")
    _, m32 = evaluate(shipped_model, data, tmp_path / "e32", progress=False, backend="onnx")
    assert m8["temperature"] == card["int8"]["temperature"] != m32["temperature"]
    def thresholds(m: dict) -> dict:
        return {c: v["threshold"] for c, v in m["gate"]["per_class"].items()}

    assert thresholds(m8) == card["int8"]["gate"]["thresholds"]
    assert thresholds(m32) == card["gate"]["thresholds"] != thresholds(m8)
    assert m8["macro_f1"] is not None and abs(m8["macro_f1"] - m32["macro_f1"]) < 0.1
