"""The device stage (detect → crop → classify on a torch device) against the host stage: the same
cells, crops and probabilities on CPU; the CUDA run carries the ``gpu`` marker."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cellclf.card import load_card  # noqa: E402
from cellclf.model.engine import TorchEngine  # noqa: E402
from cellclf.pipeline.run_slide import RunParams, run_slide  # noqa: E402


def _run(slide, engine, stage: str, decode: str = "off", review: bool = True):
    card = load_card(engine_bundle(engine))
    items: list = []
    res = run_slide(slide, engine, card, slide_id="s", on_review=items.extend if review else None,
                    params=RunParams(workers=2, stage=stage, tiles_per_batch=3,
                                     device_decode=decode))
    return res, items


def engine_bundle(engine) -> str:
    return engine.bundle


@pytest.fixture(scope="module")
def cpu_engine(shipped_model):
    eng = TorchEngine(shipped_model, device="cpu", batch=256)
    eng.bundle = shipped_model
    return eng


@pytest.fixture(scope="module")
def host_run(tiny_slide, cpu_engine):
    return _run(tiny_slide[0], cpu_engine, "host")


@pytest.mark.parametrize("decode", ["off", "on"])
@pytest.mark.slow
def test_device_stage_matches_host_stage(tiny_slide, cpu_engine, host_run, decode):
    """Tiles decoded on the host or by torchvision on the device (libjpeg-turbo on CPU, so the
    same pixels): the same cells, probabilities, gate decisions and review crops."""
    host, host_items = host_run
    dev, dev_items = _run(tiny_slide[0], cpu_engine, "device", decode)
    assert host.extra["stage"] == "host" and dev.extra["stage"] == "device"
    assert dev.extra["decode"] == ("device" if decode == "on" else "host")
    assert host.n_cells > 100
    # same cells (order may differ between the two pipelines: compare sorted)
    oh, od = np.lexsort(host.xy0.T), np.lexsort(dev.xy0.T)
    np.testing.assert_allclose(dev.xy0[od], host.xy0[oh], atol=1e-3)  # float32 maps, torch vs numpy
    np.testing.assert_allclose(dev.probs[od], host.probs[oh], atol=1e-4)
    assert (dev.accept[od] == host.accept[oh]).all()
    # review items: the same gated cells, plus the same audited auto-accepted ones, with the same
    # crops (matched by position)
    n_audited = int(host.audited.sum()) if host.audited is not None else 0
    assert len(host_items) == len(dev_items) == int((~host.accept).sum()) + n_audited > 0
    assert sum(i.audit for i in host_items) == n_audited
    dxy = np.array([(i.x, i.y) for i in dev_items])
    for it in host_items[:50]:
        j = int(np.argmin(np.hypot(*(dxy - (it.x, it.y)).T)))
        assert np.hypot(dxy[j, 0] - it.x, dxy[j, 1] - it.y) < 1e-2
        assert dev_items[j].crop_png == it.crop_png and dev_items[j].context_image == it.context_image


def test_gather_crops_equals_cut_crops_with_white_outside(cpu_engine):
    from cellclf.pipeline.device_stage import DeviceStage
    from cellclf.wsi.crops import cut_crops

    rng = np.random.default_rng(3)
    tiles = rng.integers(0, 256, (2, 90, 70, 3), dtype=np.uint8)
    centres = np.array([[35.2, 45.0], [1.0, 2.0], [69.6, 89.4], [33.0, 33.0]], np.float32)
    owner = np.array([0, 0, 1, 1])
    with DeviceStage(cpu_engine, 0.5, 64) as stage:
        got = stage.gather_crops(torch.from_numpy(tiles), owner, centres, 64).numpy()
    for i in range(len(centres)):
        want = cut_crops(tiles[owner[i]], centres[i:i + 1], 64)[0]
        np.testing.assert_array_equal(got[i], want)


def test_device_stage_refuses_onnx_engine(tiny_slide, shipped_model):
    from cellclf.errors import ConfigError
    from cellclf.model.engine import OnnxEngine

    eng = OnnxEngine(shipped_model)
    card = load_card(shipped_model)
    with pytest.raises(ConfigError, match="torch"):
        run_slide(tiny_slide[0], eng, card, slide_id="s", params=RunParams(stage="device"))


@pytest.mark.gpu
def test_device_stage_on_cuda_matches_cpu(tiny_slide, shipped_model, cpu_engine):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gpu = TorchEngine(shipped_model, device="cuda")
    gpu.bundle = shipped_model
    host, _ = _run(tiny_slide[0], cpu_engine, "host", review=False)
    dev, _ = _run(tiny_slide[0], gpu, "device", "on", review=False)
    assert dev.extra["decode"] == "device"
    oh, od = np.lexsort(host.xy0.T), np.lexsort(dev.xy0.T)
    # float maths on the GPU can move a borderline peak: ≥ 99 % of cells identical
    assert abs(dev.n_cells - host.n_cells) <= 0.01 * host.n_cells
    if dev.n_cells == host.n_cells:
        np.testing.assert_allclose(dev.xy0[od], host.xy0[oh], atol=0.05)
        agree = (dev.probs[od].argmax(1) == host.probs[oh].argmax(1)).mean()
        assert agree >= 0.99


@pytest.mark.gpu
def test_cuda_engine_pinned_path_equals_tensor_path(shipped_model, cpu_engine):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gpu = TorchEngine(shipped_model, device="cuda", batch=512)
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 256, (1300, 64, 64, 3), dtype=np.uint8)
    a = gpu.classify(crops)  # pinned double-buffered copies
    b = gpu.classify_tensor(torch.from_numpy(crops).cuda())
    np.testing.assert_allclose(a, b, atol=1e-6)
    c = cpu_engine.classify(crops[:300])
    assert (a[:300].argmax(1) == c.argmax(1)).mean() >= 0.98


def test_reduce_half_is_pillows_bilinear_reduction():
    """The device reduction equals Pillow's bilinear 2× resize from an integer box, bit for bit."""
    from PIL import Image

    from cellclf.wsi.device_decode import reduce_half

    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (46, 58, 3), dtype=np.uint8)
    out_w, out_h, bx, by = 26, 20, 3, 2
    want = np.asarray(Image.fromarray(img).resize(
        (out_w, out_h), Image.Resampling.BILINEAR, box=(bx, by, bx + 2 * out_w, by + 2 * out_h)))
    got = reduce_half(torch.from_numpy(img)[None], bx, by, out_w, out_h)[0].numpy()
    np.testing.assert_array_equal(got, want)


def test_device_readable_refuses_rgb_coded_jpeg(tmp_path):
    """Aperio-style RGB-coded JPEG levels stay with the host reader (nvJPEG assumes YCbCr);
    YCbCr-coded ones at an exact 2× reduction go to the device."""
    from cellclf.wsi.device_decode import device_readable
    from cellclf.wsi.jpeg_tiles import array_tile_fn, write_pyramid_tiff
    from cellclf.wsi.tile_reader import TileReader

    rgb = np.random.default_rng(2).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    for photometric, expected in (("rgb", False), ("ycbcr", True)):
        path = write_pyramid_tiff(tmp_path / f"{photometric}.tif", 1024, 1024, array_tile_fn(rgb),
                                  0.25, photometric=photometric, min_level_px=2048)
        with TileReader(path, 0.5, workers=1) as reader:
            assert reader.fast_levels, photometric
            assert device_readable(reader, reader.grid(128.0, 30.0)) is expected, photometric


def test_bucket_sizes_are_few_and_cover_the_batch():
    from cellclf.model.engine import bucket_size

    assert [bucket_size(n, 4096) for n in (1, 255, 256, 257, 3000, 4095, 4096, 9000)] == [
        256, 256, 256, 512, 4096, 4096, 4096, 4096]
    assert len({bucket_size(n, 4096) for n in range(1, 5000)}) == 5
    assert bucket_size(100, 128) == 128


def test_png_bytes_round_trips_losslessly():
    import io

    from PIL import Image

    from cellclf.pipeline.host_stage import png_bytes

    rng = np.random.default_rng(0)
    for shape in ((160, 160, 3), (1, 1, 3), (7, 33, 3), (64, 64, 4)):
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        back = np.asarray(Image.open(io.BytesIO(png_bytes(img))).convert("RGB"))
        np.testing.assert_array_equal(back, img[..., :3])
