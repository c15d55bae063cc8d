"""`cellclf export --int8` on the trained shipped model (a copy) with small synthetic slides: the
int8 graph, its own gate in card.json, and the engine refusing every fp32-gate/int8 mix-up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cellclf.cli import app
from cellclf.errors import BundleError
from cellclf.model.engine import OnnxEngine, TorchEngine, load_engine, onnx_card


def _folder(tmp_path_factory, name: str, files) -> Path:
    d = tmp_path_factory.mktemp(name)
    for f in files:
        shutil.copyfile(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def int8_bundle(shipped_model, tiny_slide, tiny_svs, tmp_path_factory) -> Path:
    """Copy of the shipped bundle exported with --int8: ranges from tiny_slide, gate on tiny_svs."""
    bundle = tmp_path_factory.mktemp("int8") / "bundle"
    shutil.copytree(shipped_model, bundle)
    quant = _folder(tmp_path_factory, "quant", tiny_slide)
    cal = _folder(tmp_path_factory, "cal", tiny_svs)
    result = CliRunner().invoke(app, ["export", str(bundle), "--int8", "--data", str(cal),
                                      "--quant-data", str(quant), "--quant-crops", "256",
                                      "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "model.int8.onnx" in result.output and "macro-F1" in result.output
    return bundle


@pytest.fixture(scope="module")
def cal_crops(tiny_svs) -> np.ndarray:
    from cellclf.detect.slide_detection import detect_slide
    from cellclf.wsi.crops import extract_crops

    cands = detect_slide(tiny_svs[0], work_mpp=0.5, progress=False)
    return extract_crops(tiny_svs[0], cands, 0.5, 64)


@pytest.mark.slow
def test_int8_section_and_graph(int8_bundle):
    import onnx

    card = json.loads((int8_bundle / "card.json").read_text())
    sec = card["int8"]
    assert sec["file"] == "model.int8.onnx" and sec["precision"] == "int8"
    assert set(sec["gate"]["thresholds"]) == set(card["classes"])
    assert sec["calibration"]["slides"] == ["tiny_svs"] and sec["quantization"]["slides"] == ["tiny"]
    assert sec["calibration"]["n_cells"] > 100 and sec["quantization"]["n_crops"] == 256
    assert sec["source_sha256"] == card["sha256"]
    from cellclf.card import file_sha256

    assert sec["sha256"] == file_sha256(int8_bundle / "model.int8.onnx")
    meta = onnx_card(int8_bundle / "model.int8.onnx")
    assert meta["onnx"]["precision"] == "int8"
    assert meta["temperature"] == pytest.approx(sec["temperature"]) and meta["gate"] == sec["gate"]
    graph = onnx.load(str(int8_bundle / "model.int8.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 50  # the convolutions run in int8 ...
    produced = {o: n for n in graph.node for o in n.output}
    soft = produced["probs"]  # ... but probabilities and logits are not quantised
    assert soft.op_type == "Softmax" and produced[soft.input[0]].op_type == "Mul"
    assert produced["logits"].op_type == "Gemm"
    assert sec["bytes"] < 0.5 * (int8_bundle / "model.onnx").stat().st_size
    # kept in fp32: the input scaling conv (fed by the Cast of the uint8 crops), head, softmax
    by_name = {n.name: n for n in graph.node}
    kept = [by_name[k] for k in sec["quantization"]["fp32_nodes"]]
    assert [n.op_type for n in kept] == ["Conv", "Gemm", "Mul", "Softmax"]
    assert produced[kept[0].input[0]].op_type == "Cast"


@pytest.mark.slow
def test_int8_engine_uses_its_own_gate(int8_bundle, cal_crops):
    card = json.loads((int8_bundle / "card.json").read_text())
    eng = load_engine(int8_bundle, backend="auto", precision="int8")
    assert eng.precision == "int8" and eng.card["precision"] == "int8"
    assert eng.card["gate"] == card["int8"]["gate"] != card["gate"]
    assert eng.card["temperature"] == card["int8"]["temperature"]
    p8 = eng.classify(cal_crops)
    p32 = TorchEngine(int8_bundle, device="cpu").classify(cal_crops)
    np.testing.assert_allclose(p8.sum(axis=1), 1.0, atol=1e-5)
    assert (p8.argmax(1) == p32.argmax(1)).mean() >= 0.98  # close to fp32 ...
    assert np.abs(p8 - p32).max() > 1e-4  # ... but not equal: hence its own gate
    # the fp32 engine keeps the fp32 card
    assert OnnxEngine(int8_bundle).card["gate"] == card["gate"]


@pytest.mark.slow
def test_int8_mixups_are_refused(int8_bundle, tmp_path):
    with pytest.raises(BundleError, match="int8 graph"):  # int8 file under the fp32 gate
        OnnxEngine(int8_bundle, onnx_file="model.int8.onnx")
    with pytest.raises(BundleError, match="fp32 graph"):  # fp32 file under the int8 gate
        OnnxEngine(int8_bundle, precision="int8", onnx_file="model.onnx")
    with pytest.raises(BundleError, match="onnxruntime only"):
        load_engine(int8_bundle, backend="torch", precision="int8")
    with pytest.raises(BundleError, match="unknown precision"):
        load_engine(int8_bundle, precision="fp16")

    def edited(change) -> Path:
        copy = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(int8_bundle, copy)
        card = json.loads((copy / "card.json").read_text())
        change(card)
        (copy / "card.json").write_text(json.dumps(card))
        return copy

    with pytest.raises(BundleError, match="own gate"):
        OnnxEngine(edited(lambda c: c["int8"].pop("gate")), precision="int8")
    with pytest.raises(BundleError, match="--int8"):
        OnnxEngine(edited(lambda c: c.pop("int8")), precision="int8")
    with pytest.raises(BundleError, match="other weights"):
        OnnxEngine(edited(lambda c: c.update(sha256="0" * 64)), precision="int8")
    with pytest.raises(BundleError, match="temperature"):
        OnnxEngine(edited(lambda c: c["int8"].update(temperature=2.5)), precision="int8")
