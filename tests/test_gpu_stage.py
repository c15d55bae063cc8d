"""The device stage (detect → crop → classify on a torch device) against the host stage: the same
cells, crops and probabilities on CPU; the CUDA run carries the ``gpu`` marker."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cellclf.card import load_card  # noqa: E402
from cellclf.engine import TorchEngine  # noqa: E402
from cellclf.pipeline import RunParams, run_slide  # noqa: E402


def _run(slide, engine, stage: str):
    card = load_card(engine_bundle(engine)).to_dict()
    items: list = []
    res = run_slide(slide, engine, card, slide_id="s", on_review=items.extend,
                    params=RunParams(workers=2, stage=stage, tiles_per_batch=3))
    return res, items


def engine_bundle(engine) -> str:
    return engine.bundle


@pytest.fixture(scope="module")
def cpu_engine(shipped_model):
    eng = TorchEngine(shipped_model, device="cpu", batch=256)
    eng.bundle = shipped_model
    return eng


def test_device_stage_matches_host_stage(tiny_slide, cpu_engine):
    host, host_items = _run(tiny_slide[0], cpu_engine, "host")
    dev, dev_items = _run(tiny_slide[0], cpu_engine, "device")
    assert host.extra["stage"] == "host" and dev.extra["stage"] == "device"
    assert host.n_cells > 100
    # same cells (order may differ between the two pipelines: compare sorted)
    oh, od = np.lexsort(host.xy0.T), np.lexsort(dev.xy0.T)
    np.testing.assert_allclose(dev.xy0[od], host.xy0[oh], atol=1e-3)  # float32 maps, torch vs numpy
    np.testing.assert_allclose(dev.probs[od], host.probs[oh], atol=1e-4)
    assert (dev.accept[od] == host.accept[oh]).all()
    # review items: the same gated cells with the same crops (matched by position)
    assert len(host_items) == len(dev_items) == int((~host.accept).sum()) > 0
    dxy = np.array([(i.x, i.y) for i in dev_items])
    for it in host_items[:50]:
        j = int(np.argmin(np.hypot(*(dxy - (it.x, it.y)).T)))
        assert np.hypot(dxy[j, 0] - it.x, dxy[j, 1] - it.y) < 1e-2
        assert dev_items[j].crop_png == it.crop_png and dev_items[j].context_png == it.context_png


def test_gather_crops_equals_cut_crops_with_white_outside(cpu_engine):
    from cellclf.crops import cut_crops
    from cellclf.gpu_stage import DeviceStage

    rng = np.random.default_rng(3)
    tiles = rng.integers(0, 256, (2, 90, 70, 3), dtype=np.uint8)
    centres = np.array([[35.2, 45.0], [1.0, 2.0], [69.6, 89.4], [33.0, 33.0]], np.float32)
    owner = np.array([0, 0, 1, 1])
    with DeviceStage(cpu_engine, 0.5, 64) as stage:
        got = stage.gather_crops(torch.from_numpy(tiles), owner, centres).numpy()
    for i in range(len(centres)):
        want = cut_crops(tiles[owner[i]], centres[i:i + 1], 64)[0]
        np.testing.assert_array_equal(got[i], want)


def test_device_stage_refuses_onnx_engine(tiny_slide, shipped_model):
    from cellclf.engine import OnnxEngine
    from cellclf.errors import ConfigError

    eng = OnnxEngine(shipped_model)
    card = load_card(shipped_model).to_dict()
    with pytest.raises(ConfigError, match="torch"):
        run_slide(tiny_slide[0], eng, card, slide_id="s", params=RunParams(stage="device"))


@pytest.mark.gpu
def test_device_stage_on_cuda_matches_cpu(tiny_slide, shipped_model, cpu_engine):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gpu = TorchEngine(shipped_model, device="cuda")
    gpu.bundle = shipped_model
    host, _ = _run(tiny_slide[0], cpu_engine, "host")
    dev, _ = _run(tiny_slide[0], gpu, "device")
    oh, od = np.lexsort(host.xy0.T), np.lexsort(dev.xy0.T)
    # float maths on the GPU can move a borderline peak: ≥ 99 % of cells identical
    assert abs(dev.n_cells - host.n_cells) <= 0.01 * host.n_cells
    if dev.n_cells == host.n_cells:
        np.testing.assert_allclose(dev.xy0[od], host.xy0[oh], atol=0.05)
        agree = (dev.probs[od].argmax(1) == host.probs[oh].argmax(1)).mean()
        assert agree >= 0.99
