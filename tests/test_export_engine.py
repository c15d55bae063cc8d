"""ONNX export and the two engines: parity with torch, metadata, and identical gate decisions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cellclf.model.engine import OnnxEngine, TorchEngine, load_engine, onnx_card


@pytest.fixture(scope="module")
def real_crops(tiny_slide) -> np.ndarray:
    """Crops of real detector candidates on a synthetic slide."""
    from cellclf.detect.slide_detection import detect_slide
    from cellclf.wsi.crops import extract_crops

    slide, _ = tiny_slide
    cands = detect_slide(slide, work_mpp=0.5, progress=False)
    assert len(cands) > 50
    return extract_crops(slide, cands[:300], 0.5, 64)


def test_onnx_file_carries_the_card(random_bundle):
    card = json.loads((random_bundle / "card.json").read_text())
    meta = onnx_card(random_bundle / "model.onnx")
    assert meta["classes"] == card["classes"] and meta["crop_px"] == 64
    assert meta["gate"]["thresholds"]["eosinophil"] == 0.5
    from cellclf.card import file_sha256

    assert card["onnx"]["sha256"] == file_sha256(random_bundle / "model.onnx")
    assert not list(random_bundle.glob("*.data"))  # one file, no external data


@pytest.mark.slow
def test_shipped_onnx_matches_its_weights(shipped_model, real_crops):
    p_t = TorchEngine(shipped_model, device="cpu").classify(real_crops)
    p_o = OnnxEngine(shipped_model).classify(real_crops)
    assert np.abs(p_t - p_o).max() <= 1e-4


@pytest.mark.slow
def test_fp32_parity_random_and_real_crops(random_bundle, real_crops):
    torch_engine, onnx_engine = TorchEngine(random_bundle, device="cpu"), OnnxEngine(random_bundle)
    rng = np.random.default_rng(0)
    random_crops = rng.integers(0, 256, (64, 64, 64, 3), dtype=np.uint8)
    for crops in (random_crops, real_crops):
        p_t, p_o = torch_engine.classify(crops), onnx_engine.classify(crops)
        assert p_t.shape == p_o.shape == (len(crops), 4)
        assert np.abs(p_t - p_o).max() <= 1e-4
        np.testing.assert_allclose(p_o.sum(axis=1), 1.0, atol=1e-5)
    # the network must not be degenerate, or parity would prove nothing
    assert p_t.max(axis=1).std() > 0.01


@pytest.mark.slow
def test_gate_decisions_identical_in_fp32(random_bundle, real_crops):
    from cellclf.gate.thresholds import GateParams, apply_gate

    card = json.loads((random_bundle / "card.json").read_text())
    gate = GateParams.from_dict(card["gate"], classes=card["classes"])
    a_t, r_t = apply_gate(TorchEngine(random_bundle, device="cpu").classify(real_crops), gate)
    a_o, r_o = apply_gate(OnnxEngine(random_bundle).classify(real_crops), gate)
    assert (a_t == a_o).all() and (r_t == r_o).all()
    assert 0 < a_t.sum() < len(a_t)  # both decisions occur


@pytest.mark.slow
def test_fp16_export_parity(shipped_model, real_crops, tmp_path):
    """fp16 on the trained shipped model (a random net's huge logits are not representative)."""
    from cellclf.model.onnx_export import export_onnx

    out = export_onnx(shipped_model, out=tmp_path / "model.fp16.onnx", fp16=True)
    p16 = OnnxEngine(shipped_model, onnx_file=str(out)).classify(real_crops)
    p32 = TorchEngine(shipped_model, device="cpu").classify(real_crops)
    assert np.abs(p16 - p32).max() <= 2e-3
    assert (p16.argmax(1) == p32.argmax(1)).mean() >= 0.999


def test_stale_onnx_temperature_is_refused(random_bundle, tmp_path):
    import shutil

    from cellclf.errors import BundleError

    copy = tmp_path / "b"
    shutil.copytree(random_bundle, copy)
    card = json.loads((copy / "card.json").read_text())
    card["temperature"] = 1.7
    (copy / "card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="cellclf export"):
        OnnxEngine(copy)


def test_load_engine_choices(random_bundle, tmp_path):
    from cellclf.errors import BundleError

    assert load_engine(random_bundle, backend="onnx").backend == "onnx"
    assert load_engine(random_bundle, backend="torch", device="cpu").backend == "torch"
    with pytest.raises(BundleError, match="unknown backend"):
        load_engine(random_bundle, backend="tensorflow")
    with pytest.raises(BundleError, match="not found"):
        load_engine(tmp_path / "missing")


@pytest.mark.slow
def test_fresh_export_is_the_fast_graph_and_exact(shipped_model, real_crops, tmp_path):
    """A fresh export of the shipped RegNet: grouped convolutions 16 wide (onnxruntime's NCHWc
    kernels take them), no batch norm, no Gather chain in the SE pooling; fp32 parity ≤ 1e-4."""
    import onnx

    from cellclf.model.onnx_export import export_onnx

    out = export_onnx(shipped_model, out=tmp_path / "fresh.onnx")
    graph = onnx.load(str(out)).graph
    inits = {i.name: list(i.dims) for i in graph.initializer}
    ops = [n.op_type for n in graph.node]
    assert "BatchNormalization" not in ops and "Gather" not in ops
    widths = set()
    for n in graph.node:
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if n.op_type == "Conv" and group > 1 and inits[n.input[1]][1] > 1:
            widths.add(inits[n.input[1]][1])  # input channels per group
    assert widths == {16}
    meta = onnx_card(out)
    assert meta["onnx"]["precision"] == "fp32" and meta["onnx"]["group_block"] == 16
    p_t = TorchEngine(shipped_model, device="cpu").classify(real_crops)
    p_o = OnnxEngine(shipped_model, onnx_file=str(out)).classify(real_crops)
    assert np.abs(p_t - p_o).max() <= 1e-4
