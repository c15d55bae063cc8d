"""Tissue mask: thresholds on real and synthetic pictures, box fractions by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellclf.errors import EmptyTissueError
from cellclf.wsi.slide import Slide
from cellclf.wsi.tissue import (
    TissueMask,
    otsu_threshold,
    require_tissue,
    slide_tissue_mask,
    tissue_mask,
)


def test_fraction_in_box_hand_computed() -> None:
    mask = np.zeros((4, 4), bool)
    mask[0:2, 0:2] = True
    tm = TissueMask(mask, downsample=10.0)
    assert tm.fraction_in_box(0, 0, 20, 20) == 1.0
    assert tm.fraction_in_box(0, 0, 40, 40) == 0.25
    assert tm.fraction_in_box(10, 10, 30, 30) == 0.25  # one of four mask px
    assert tm.fraction_in_box(5, 5, 15, 15) == 1.0  # quarters of four tissue px
    assert tm.fraction_in_box(15, 0, 25, 10) == 0.5  # half tissue px, half glass px
    assert tm.fraction_in_box(-20, 0, 20, 20) == 0.5  # outside the mask counts as glass
    assert tm.fraction_in_box(100, 100, 200, 200) == 0.0
    assert tm.fraction_in_box(10, 10, 10, 30) == 0.0  # empty box
    assert tm.area_mm2(0.5) == pytest.approx(4 * 5.0**2 / 1e6)
    assert tm.fraction == 0.25


def test_otsu_threshold_splits_two_modes() -> None:
    values = np.r_[np.full(50, 0.1), np.full(50, 0.5)]
    t = otsu_threshold(values)
    assert 0.1 < t <= 0.5
    assert ((values > t) == (values == 0.5)).all()


def _glass(h: int, w: int, seed: int, tint=(247, 245, 246)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.array(tint) + rng.normal(0, 2, (h, w, 3))).clip(0, 255).astype(np.uint8)


def test_blank_and_faint_glass_are_empty(tmp_path: Path) -> None:
    for tint in [(247, 245, 246), (255, 255, 255), (240, 232, 238), (228, 228, 228)]:
        tm = tissue_mask(_glass(300, 400, 1, tint), downsample=8.0, mpp=0.5)
        assert not tm.mask.any(), tint
    with pytest.raises(EmptyTissueError, match="blank.svs"):
        require_tissue(tm, tmp_path / "blank.svs")


def test_pink_blob_with_holes_and_specks() -> None:
    img = _glass(300, 400, 2)
    yy, xx = np.mgrid[0:300, 0:400]
    blob = (xx - 180) ** 2 + (yy - 150) ** 2 < 100**2
    rng = np.random.default_rng(3)
    pink = (np.array([225, 150, 200]) + rng.normal(0, 12, (300, 400, 3))).clip(0, 255)
    img[blob] = pink[blob].astype(np.uint8)
    img[145:150, 175:180] = 246  # small hole (25 px · 4 µm² = 100 µm²): filled
    img[80:140, 150:210] = 246  # large hole (3600 px · 4 µm² = 14 400 µm²): kept
    img[20:23, 350:353] = (120, 60, 140)  # speck (9 px = 36 µm²): removed
    tm = tissue_mask(img, downsample=4.0, mpp=0.5)  # mask px = 2 µm
    truth = blob.copy()
    truth[80:140, 150:210] = False
    iou = (tm.mask & truth).sum() / (tm.mask | truth).sum()
    assert iou > 0.97
    assert tm.mask[147, 177] and not tm.mask[110, 180] and not tm.mask[21, 351]
    assert tm.area_mm2(0.5) == pytest.approx(truth.sum() * 4e-6, rel=0.03)
    assert require_tissue(tm, "x") is tm


def test_cmu_svs_tissue(shared_wsi: Path) -> None:
    with Slide(shared_wsi / "CMU-1-Small-Region.svs") as slide:
        tm = slide_tissue_mask(slide, max_px=1024)
    # skin strip down the middle: ~40 % of the field, glass around it
    assert 0.25 < tm.fraction < 0.6
    assert 0.4 < tm.area_mm2(slide.mpp) < 1.1  # the field is 1.11 × 1.48 mm
    h, w = tm.mask.shape
    assert not tm.mask[: h // 10, : w // 10].any()  # top-left corner is glass
    assert tm.mask[int(h * 0.8), w // 2]  # dermis in the lower middle


def test_tcga_svs_tissue_excludes_unscanned_stripes(shared_wsi: Path) -> None:
    with Slide(shared_wsi / "tcga-cr-7395-01a-01-ts1.svs", mpp=0.5) as slide:
        tm = slide_tissue_mask(slide, max_px=1024)
    assert 0.45 < tm.fraction < 0.8
    h, w = tm.mask.shape
    assert not tm.mask[:5, :5].any() and not tm.mask[-5:, :5].any()
    assert tm.mask[h // 2, w // 2]


def test_a_sparse_plain_field_is_searched_whole_and_a_blank_one_refused(tmp_path: Path) -> None:
    from PIL import Image

    from cellclf.detect.slide_detection import detect_slide

    field = _glass(120, 120, 3)
    yy, xx = np.mgrid[0:120, 0:120]
    for cx, cy in ((30, 40), (80, 90), (95, 25)):  # three small pink-purple specks of tissue
        field[(xx - cx) ** 2 + (yy - cy) ** 2 < 6**2] = (200, 120, 190)
    empty = tissue_mask(field, downsample=4.0, mpp=0.5)
    assert not empty.mask.any()  # too small for the slide rules
    whole = require_tissue(empty, tmp_path / "tile.png", field_rgb=field)
    assert whole.mask.all() and whole.downsample == 4.0
    blank = _glass(120, 120, 4)
    with pytest.raises(EmptyTissueError, match="glass.png"):
        require_tissue(tissue_mask(blank, 4.0, 0.5), tmp_path / "glass.png", field_rgb=blank)
    # a blank tile of an annotated folder: no candidates in training/evaluation, refused elsewhere
    path = tmp_path / "glass.png"
    Image.fromarray(_glass(480, 480, 5)).save(path)
    assert len(detect_slide(path, mpp=0.5, progress=False, blank_fields_ok=True)) == 0
    with pytest.raises(EmptyTissueError, match="glass.png"):
        detect_slide(path, mpp=0.5, progress=False)
