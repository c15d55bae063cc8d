"""Slide: opening, mpp resolution, clear errors, level choice and region reads."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from cellclf.errors import ConfigError, MissingMppError, SlideOpenError
from cellclf.wsi.jpeg_tiles import array_tile_fn, write_pyramid_tiff
from cellclf.wsi.slide import (
    Slide,
    best_level,
    mpp_from_tiff_tags,
    open_slide,
    plan_read,
    rgba_to_rgb_on_white,
)


def pattern(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth pink/purple texture with some fine detail (JPEG-friendly, not flat)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 0.5 + 0.25 * np.sin(xx / 23.0) * np.cos(yy / 31.0) + 0.1 * np.sin((xx + yy) / 5.0)
    noise = rng.normal(0, 0.02, (h, w)).astype(np.float32)
    v = np.clip(base + noise, 0, 1)
    rgb = np.stack([230 - 90 * v, 200 - 160 * v, 230 - 60 * v], axis=-1)
    return rgb.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A 3-level generic TIFF, 1024×768 level 0 (integer downsamples), 0.25 µm/px."""
    rgb = pattern(768, 1024)
    path = tmp_path_factory.mktemp("slide") / "even.tif"
    write_pyramid_tiff(path, 1024, 768, array_tile_fn(rgb), 0.25, tile_px=256, min_level_px=256)
    return path, rgb


# -- pure helpers, hand-computed --------------------------------------------------------------
def test_best_level_picks_coarsest_within_tolerance() -> None:
    ds = (1.0, 2.0, 4.0)
    assert best_level(ds, 2.0) == 1
    assert best_level(ds, 1.99) == 1  # 2 ≤ 1.99·1.01 = 2.0099
    assert best_level(ds, 1.97) == 0  # 2 > 1.97·1.01 = 1.9897
    assert best_level(ds, 0.5) == 0  # upsampling reads level 0
    assert best_level(ds, 100.0) == 2
    assert best_level((1.0, 4.00012), 4.0) == 1  # Aperio-style near-integer downsample


def test_plan_read_exact_and_resampled() -> None:
    plan = plan_read((1.0, 2.0), 10, 20, 200, 100, 100, 50)
    assert (plan.level, plan.x, plan.y, plan.w, plan.h, plan.box) == (1, 5, 10, 100, 50, None)
    # 2× downscale from level 0 only: margin ceil(2) + 1 = 3 px on every side
    plan = plan_read((1.0,), 0, 0, 10, 10, 5, 5)
    assert (plan.level, plan.x, plan.y, plan.w, plan.h) == (0, -3, -3, 16, 16)
    assert plan.box == (3.0, 3.0, 13.0, 13.0)
    # odd level-0 origin at level 1: x 2.5…12.5 level px → read floor(2.5)−2 … ceil(12.5)+2
    plan = plan_read((1.0, 2.0), 5, 0, 20, 20, 10, 10)
    assert (plan.level, plan.x, plan.w) == (1, 0, 15)
    assert plan.box == (2.5, 2.0, 12.5, 12.0)
    with pytest.raises(ValueError):
        plan_read((1.0,), 0, 0, 0, 10, 5, 5)


def test_rgba_composited_on_white() -> None:
    rgba = np.array([[[100, 50, 0, 0], [100, 50, 0, 255], [100, 50, 0, 128]]], np.uint8)
    rgb = rgba_to_rgb_on_white(rgba)
    # a=128: c·128/255 + 127 → 100 → 50+127, 50 → 25+127, 0 → 127
    assert rgb.tolist() == [[[255, 255, 255], [100, 50, 0], [177, 152, 127]]]


# -- real slides ------------------------------------------------------------------------------
def test_cmu_svs_metadata(shared_wsi: Path) -> None:
    with open_slide(shared_wsi / "CMU-1-Small-Region.svs") as slide:
        assert slide.mpp == pytest.approx(0.499, abs=0.001)
        assert slide.mpp_source == "openslide"
        assert slide.vendor == "aperio"
        assert slide.objective_power == 20
        assert (slide.width, slide.height) == (2220, 2967)
        assert slide.level_downsamples == (1.0,)


def test_tcga_svs_without_mpp_needs_override(shared_wsi: Path) -> None:
    path = shared_wsi / "tcga-cr-7395-01a-01-ts1.svs"
    with pytest.raises(MissingMppError) as err:
        Slide(path)
    assert path.name in str(err.value) and "--mpp" in str(err.value)
    with Slide(path, mpp=0.5) as slide:
        assert slide.mpp == 0.5 and slide.mpp_source == "override"
        assert len(slide.level_dimensions) == 2
        # 2× needed, level 1 (ds 2.0005) is within tolerance: JPEG 2000 via OpenSlide
        rgb = slide.read_region_mpp(1000, 1000, 512, 512, 256, 256)
        assert rgb.shape == (256, 256, 3) and rgb.dtype == np.uint8
        assert rgb.std() > 5  # tissue, not blank


def test_ome_tiff_is_unsupported(shared_wsi: Path) -> None:
    with pytest.raises(SlideOpenError, match="unsupported format") as err:
        Slide(shared_wsi / "OS-1-detail.ome.tif")
    assert "OS-1-detail.ome.tif" in str(err.value) and "OME-TIFF" in str(err.value)


def test_truncated_svs(shared_wsi: Path, tmp_path: Path) -> None:
    data = (shared_wsi / "CMU-1-Small-Region.svs").read_bytes()
    bad = tmp_path / "half.svs"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideOpenError, match="truncated") as err:
        Slide(bad)
    assert "half.svs" in str(err.value)


def test_missing_and_non_slide_files(tmp_path: Path) -> None:
    with pytest.raises(SlideOpenError, match="not found"):
        Slide(tmp_path / "nope.svs")
    text = tmp_path / "notes.svs"
    text.write_text("not a slide\n")
    with pytest.raises(SlideOpenError, match="unsupported format"):
        Slide(text)
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    with pytest.raises(SlideOpenError, match="empty"):
        Slide(empty)


def test_corrupt_tile_found_at_open(pyramid, tmp_path: Path) -> None:
    import tifffile

    path, _ = pyramid
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        last = len(page.dataoffsets) - 1
        off, cnt = page.dataoffsets[last], page.databytecounts[last]
    data[off:off + cnt] = b"\0" * cnt  # level 0's last tile: checked when opening
    bad = tmp_path / "corrupt.tif"
    bad.write_bytes(bytes(data))
    with pytest.raises(SlideOpenError, match="corrupt") as err:
        Slide(bad)
    assert "corrupt.tif" in str(err.value)


def test_mpp_sources(tmp_path: Path) -> None:
    import tifffile

    rgb = pattern(512, 512)
    aperio_no_mpp = tmp_path / "ap.svs"
    tifffile.imwrite(aperio_no_mpp, rgb, tile=(256, 256), photometric="rgb", compression="jpeg",
                     compressionargs={"outcolorspace": "RGB"}, metadata=None,
                     description="Aperio Image Library v12.0.0\r\n512x512 JPEG|AppMag = 20",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with Slide(aperio_no_mpp) as slide:  # OpenSlide has no mpp for it; the TIFF tags do
        assert slide.vendor == "aperio"
        assert "openslide.mpp-x" not in slide.properties
        assert slide.mpp == pytest.approx(0.5) and slide.mpp_source == "tiff-resolution"
    inch = tmp_path / "inch.tif"
    tifffile.imwrite(inch, rgb, tile=(256, 256), photometric="rgb", compression="jpeg",
                     resolution=(25400 / 0.25, 25400 / 0.25), resolutionunit="INCH")
    assert mpp_from_tiff_tags(inch) == pytest.approx((0.25, 0.25))
    bare = tmp_path / "bare.tif"
    tifffile.imwrite(bare, rgb, tile=(256, 256), photometric="rgb", compression="jpeg")
    assert mpp_from_tiff_tags(bare) is None
    with pytest.raises(MissingMppError, match="bare.tif"):
        Slide(bare)
    with Slide(bare, mpp=0.25) as slide:
        assert slide.mpp == 0.25
    with pytest.raises(ConfigError, match="positive"):
        Slide(bare, mpp=-1.0)
    aniso = tmp_path / "aniso.tif"
    tifffile.imwrite(aniso, rgb, tile=(256, 256), photometric="rgb", compression="jpeg",
                     resolution=(1e4 / 0.25, 1e4 / 0.26), resolutionunit="CENTIMETER")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slide = Slide(aniso)
    slide.close()
    assert slide.mpp == pytest.approx(0.255)
    assert any("anisotropic" in str(w.message) for w in caught)


# -- pixels -----------------------------------------------------------------------------------
def test_read_region_matches_openslide_and_whitens_outside(pyramid) -> None:
    path, _ = pyramid
    with Slide(path) as slide:
        assert slide.level_downsamples == (1.0, 2.0, 4.0)
        direct = np.asarray(slide._osr.read_region((100, 60), 0, (300, 200)))[..., :3]
        assert np.array_equal(slide.read_region_mpp(100, 60, 300, 200, 300, 200), direct)
        level1 = np.asarray(slide._osr.read_region((200, 100), 1, (150, 120)))[..., :3]
        assert np.array_equal(slide.read_region_mpp(200, 100, 300, 240, 150, 120), level1)
        # partly outside (top-left corner): white outside, slide pixels inside
        part = slide.read_region_mpp(-50, -30, 200, 100, 200, 100)
        assert (part[:30] == 255).all() and (part[:, :50] == 255).all()
        assert np.array_equal(part[30:, 50:], direct_at(slide, 0, 0, 150, 70))
        # beyond the bottom-right edge and entirely outside
        edge = slide.read_region_mpp(1000, 700, 100, 100, 100, 100)
        assert (edge[68:] == 255).all() and (edge[:, 24:] == 255).all()
        assert (slide.read_region_mpp(5000, -900, 64, 64, 32, 32) == 255).all()


def direct_at(slide: Slide, x: int, y: int, w: int, h: int) -> np.ndarray:
    return np.asarray(slide._osr.read_region((x, y), 0, (w, h)))[..., :3]


def test_read_region_resizes_consistently(pyramid) -> None:
    path, rgb = pyramid
    with Slide(path) as slide:
        # 1.5× from level 0 (needed 1.5 < 2): bilinear of the right place and size
        out = slide.read_region_mpp(300, 150, 300, 300, 200, 200)
        assert out.shape == (200, 200, 3)
        from PIL import Image

        ref = np.asarray(Image.fromarray(direct_at(slide, 0, 0, 1024, 768)).resize(
            (200, 200), Image.Resampling.BILINEAR, box=(300, 150, 600, 450)))
        assert np.abs(out.astype(int) - ref).max() <= 1
        # a sub-window (float box) of a larger read equals the same pixels read alone
        big = slide.read_region_mpp(100, 100, 600, 600, 400, 400)
        sub = slide.read_region_mpp(100 + 30 * 1.5, 100 + 50 * 1.5, 64 * 1.5, 64 * 1.5, 64, 64)
        assert np.abs(big[50:114, 30:94].astype(int) - sub).max() <= 1


def test_thumbnail(pyramid, shared_wsi: Path) -> None:
    path, _ = pyramid
    with Slide(path) as slide:
        thumb, ds = slide.thumbnail(256)
        assert thumb.shape == (192, 256, 3) and ds == pytest.approx(4.0)
    with Slide(shared_wsi / "CMU-1-Small-Region.svs") as slide:
        thumb, ds = slide.thumbnail(1000)
        assert max(thumb.shape[:2]) == 1000 and ds == pytest.approx(2220 / thumb.shape[1])


@pytest.mark.slow
def test_info_command(shared_wsi: Path) -> None:
    from typer.testing import CliRunner

    from cellclf.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["info", str(shared_wsi / "CMU-1-Small-Region.svs"), "--json"])
    assert result.exit_code == 0, result.output
    import json

    facts = json.loads(result.output)
    assert facts["vendor"] == "aperio" and facts["mpp"] == pytest.approx(0.499)
    assert facts["levels"][0]["fast_jpeg"] is True
    assert 0.4 < facts["tissue_area_mm2"] < 1.1
    result = runner.invoke(app, ["info", str(shared_wsi / "tcga-cr-7395-01a-01-ts1.svs")])
    # no mpp: what needs none is shown, with how to pass --mpp (issue 17)
    assert result.exit_code == 0 and "not stated" in result.output and "--mpp" in result.output
    result = runner.invoke(app, ["info", str(shared_wsi / "tcga-cr-7395-01a-01-ts1.svs"),
                                 "--mpp", "0.5"])
    assert result.exit_code == 0 and "override" in result.output and "OpenSlide" in result.output


def test_half_reduction_equals_pillow_bilinear_bit_for_bit() -> None:
    """The numpy 2× reduction is Pillow's BILINEAR resize of the same box, bit for bit, for
    random pixels at any offset and size (odd, even, one output pixel) and for a smooth image."""
    from PIL import Image

    from cellclf.wsi.reduce import reduce_half_bilinear

    rng = np.random.default_rng(5)
    cases = [(2382, 2382, 1188, 1188, 3, 3), (50, 61, 20, 22, 3, 3), (40, 40, 17, 18, 1, 2),
             (9, 9, 3, 3, 2, 1), (5, 7, 1, 1, 1, 1), (64, 33, 15, 30, 2, 1)]
    for h, w, out_w, out_h, x0, y0 in cases:
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if h == 2382:  # a smooth gradient too: no luck from noise
            yy, xx = np.mgrid[0:h, 0:w]
            rgb = np.stack([(xx // 9) % 256, (yy // 7) % 256, (xx + yy) % 256], -1).astype(np.uint8)
        want = np.asarray(Image.fromarray(rgb).resize(
            (out_w, out_h), Image.Resampling.BILINEAR, box=(x0, y0, x0 + 2 * out_w, y0 + 2 * out_h)))
        np.testing.assert_array_equal(reduce_half_bilinear(rgb, x0, y0, out_w, out_h), want)


def test_finish_read_takes_the_numpy_reduction_only_where_it_is_exact() -> None:
    """finish_read's result equals Pillow's resize on every plan: exact 2× integer boxes (numpy
    route), fractional boxes, other scales and boxes touching the read's edge (Pillow route)."""
    from PIL import Image

    from cellclf.wsi.reduce import halves_exactly
    from cellclf.wsi.slide import ReadPlan, finish_read

    rng = np.random.default_rng(6)
    rgb = rng.integers(0, 256, (60, 70, 3), dtype=np.uint8)
    plans = [ReadPlan(0, 0, 0, 70, 60, (3.0, 3.0, 63.0, 53.0), 30, 25),  # exact: numpy
             ReadPlan(0, 0, 0, 70, 60, (3.5, 3.0, 63.5, 53.0), 30, 25),  # fractional
             ReadPlan(0, 0, 0, 70, 60, (3.0, 3.0, 63.0, 53.0), 20, 25),  # 3× across
             ReadPlan(0, 0, 0, 70, 60, (0.0, 0.0, 60.0, 50.0), 30, 25)]  # no pixel around
    assert [halves_exactly(rgb, p.box, p.out_w, p.out_h) for p in plans] == [True, False, False, False]
    for p in plans:
        want = np.asarray(Image.fromarray(rgb).resize((p.out_w, p.out_h),
                                                      Image.Resampling.BILINEAR, box=p.box))
        np.testing.assert_array_equal(finish_read(rgb, p), want)
