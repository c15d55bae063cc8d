"""`cellclf calibrate` and the gate half of `cellclf evaluate`, on a real (untrained) bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cellclf.cli import app


@pytest.fixture(scope="module")
def cal_data(tiny_svs, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cal")
    for f in tiny_svs:
        shutil.copyfile(f, d / f.name)
    return d


@pytest.fixture()
def bundle(random_bundle, tmp_path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(random_bundle, out)
    return out


@pytest.mark.slow
def test_calibrate_writes_gate_and_reexports(bundle, cal_data):
    from cellclf.model.engine import OnnxEngine, onnx_card

    result = CliRunner().invoke(app, ["calibrate", str(bundle), "--data", str(cal_data)])
    assert result.exit_code == 0, result.output
    card = json.loads((bundle / "card.json").read_text())
    assert card["temperature"] > 0 and card["temperature"] != 1.0
    gate = card["gate"]
    assert set(gate["thresholds"]) == set(card["classes"])
    assert sum(gate["n_cal"].values()) == card["calibration"]["n_cells"] > 100
    # a few hundred cells cannot certify α = 1 % (437 error-free cells needed per class)
    uncertified = [c for c, t in gate["thresholds"].items() if t is None]
    assert uncertified and "not certified" in result.output
    assert all(gate["n_more_needed"][c] > 0 for c in uncertified)
    assert {"conformal", "ood", "calibration"} <= set(card)
    assert "exchangeable" in gate["guarantee"]
    # count-safe by default: the miss bound β = 1 % for every target class, δ over 2K − 1 tests
    assert gate["beta"] == 0.01 and gate["n_tests"] == 7 and gate["other_class"] == "other"
    assert set(gate["miss"]) == {"eosinophil", "neutrophil", "mast_cell"}
    assert "at most β = 0.01" in gate["guarantee"]
    # model.onnx was re-exported with the new temperature, so the onnx engine accepts it
    assert onnx_card(bundle / "model.onnx")["temperature"] == pytest.approx(card["temperature"])
    OnnxEngine(bundle)


@pytest.mark.slow
def test_calibrate_options_alpha_class_and_no_miss_bound(bundle, cal_data):
    runner = CliRunner()
    bad = runner.invoke(app, ["calibrate", str(bundle), "--data", str(cal_data),
                              "--alpha-class", "other"])
    assert bad.exit_code != 0 and "CLASS=VALUE" in bad.output
    unknown = runner.invoke(app, ["calibrate", str(bundle), "--data", str(cal_data),
                                  "--alpha-class", "mast=0.1"])
    assert unknown.exit_code != 0 and "unknown classes" in str(unknown.exception)
    result = runner.invoke(app, ["calibrate", str(bundle), "--data", str(cal_data), "--beta", "0",
                                 "--alpha-class", "other=0.3", "--alpha", "0.2"])
    assert result.exit_code == 0, result.output
    gate = json.loads((bundle / "card.json").read_text())["gate"]
    assert gate["beta"] is None and gate["miss"] == {} and gate["n_tests"] == 4
    assert gate["alpha_per_class"] == {"other": 0.3} and gate["alpha"] == 0.2
    assert "other 0.3" in gate["guarantee"] and "no miss bound" in result.output


@pytest.mark.slow
def test_calibrate_refuses_training_slides(bundle, cal_data):
    from cellclf.errors import CellclfError

    card = json.loads((bundle / "card.json").read_text())
    card["training"] = {"slides": {"train": ["tiny_svs"], "val": []}}
    (bundle / "card.json").write_text(json.dumps(card))
    from cellclf.calibration.bundle_gate import calibrate_bundle

    with pytest.raises(CellclfError, match="used in training"):
        calibrate_bundle(bundle, cal_data, progress=False)


@pytest.mark.slow
def test_evaluate_reports_gate_and_calibration(random_bundle, cal_data, tmp_path):
    from cellclf.evaluation.evaluate import evaluate

    _, metrics = evaluate(random_bundle, cal_data, tmp_path / "ev", progress=False)
    for key in ("ece_before", "ece_after", "gate", "no_gate", "macro_f1"):
        assert key in metrics, key
    g, ng = metrics["gate"], metrics["no_gate"]
    assert ng["automation_rate"] == 1.0
    assert 0.0 <= g["automation_rate"] < 1.0  # mast_cell is uncertified in the fixture's gate
    mast = g["per_class"]["mast_cell"]
    assert mast["threshold"] is None and mast["automation_rate"] in (0.0, None)
    for f in ("metrics.json", "reliability.png", "risk_coverage.png", "confusion.png", "report.md"):
        assert (tmp_path / "ev" / f).stat().st_size > 0, f
