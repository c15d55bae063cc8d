"""Crop folders in: field of view (mirror padding, share reported), 16-bit images, refused pixel
sizes, class folders the model does not know, and points CSVs that lack a coordinate column."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellclf.annotations.crop_folder import (
    fit_crop,
    list_crop_files,
    pad_mirror,
    read_crop_folder,
    read_image,
    to_uint8_rgb,
)
from cellclf.annotations.labelled_data import ClassMap, discover
from cellclf.errors import AnnotationError, ConfigError
from cellclf.model.config import auto_batch_size, auto_num_workers, load_config

CLASSES = ("eosinophil", "neutrophil", "mast_cell", "other")


def test_fit_crop_pads_by_mirroring_never_white() -> None:
    img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    out, share = fit_crop(img, 0.5, 0.5, 6)  # 4 px inside 6: 1 px mirrored on every side
    assert out.shape == (6, 6, 3) and share == pytest.approx(1 - 16 / 36)
    np.testing.assert_array_equal(out[1:5, 1:5], img)
    np.testing.assert_array_equal(out[0, 1:5], img[0])  # symmetric: the border row repeated
    np.testing.assert_array_equal(out[1:5, 5], img[:, 3])
    assert not (out == 255).all(axis=2).any()
    # downsampled 2×: 8 px at 0.25 µm/px → 4 px at 0.5, then padded to 6
    small, share2 = fit_crop(np.full((8, 8, 3), 100, np.uint8), 0.25, 0.5, 6)
    assert (small == 100).all() and share2 == pytest.approx(1 - 16 / 36)
    # bigger crop: centre-cut, no padding
    big = np.arange(10 * 10 * 3, dtype=np.uint8).reshape(10, 10, 3)
    cut, share3 = fit_crop(big, 0.5, 0.5, 6)
    np.testing.assert_array_equal(cut, big[2:8, 2:8])
    assert share3 == 0.0


def test_pad_mirror_larger_than_the_image() -> None:
    img = np.array([[[1, 1, 1], [2, 2, 2]]], np.uint8)  # 1 × 2
    out = pad_mirror(img, 2, 1, 3, 2)
    assert out.shape == (4, 7, 3)
    assert out[..., 0].tolist()[0] == [2, 2, 1, 1, 2, 2, 1]


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    grey = np.array([[0, 257 * 128, 65535]], np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(grey).save(p)
    img, mpp = read_image(p, 0.5, 0.5)
    assert img.dtype == np.uint8 and img.shape == (1, 3, 3)
    assert img[0, :, 0].tolist() == [0, 128, 255] and mpp == 0.5
    rgb16 = np.array([[[1000, 30000, 65535]]], np.uint16)
    assert to_uint8_rgb(rgb16, "x")[0, 0].tolist() == [4, 117, 255]
    with pytest.raises(AnnotationError, match="unsupported pixel data"):
        to_uint8_rgb(np.array([[1.5]], np.float32), "f.tif")


def _png(path: Path, size: int, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)


def test_small_crops_are_reported_with_their_padding_share(tmp_path: Path, caplog) -> None:
    _png(tmp_path / "eosinophil" / "a.png", 32, (200, 50, 50))
    _png(tmp_path / "lymphocyte" / "b.png", 32, (50, 50, 200))
    cm = ClassMap(CLASSES)
    with caplog.at_level(logging.WARNING):
        f = read_crop_folder(tmp_path, cm, 64, 0.5, 0.5)
    assert f.pad_share.tolist() == [0.75, 0.75]
    assert "75 % of each input" in caplog.text and "mirroring" in caplog.text
    assert f.mapped_to_other == {"lymphocyte": 1} and "lymphocyte" in caplog.text
    assert (f.crops[0] == (200, 50, 50)).all()  # padded with the crop itself, not white


@pytest.mark.parametrize("mpp", [0, -1, float("nan")])
def test_nonpositive_mpp_is_refused(tmp_path: Path, mpp: float) -> None:
    _png(tmp_path / "eosinophil" / "a.png", 64, (200, 50, 50))
    with pytest.raises(AnnotationError, match="not a pixel size"):
        read_crop_folder(tmp_path, ClassMap(CLASSES), 64, 0.5, mpp)
    with pytest.raises(ConfigError, match="crop_mpp"):
        load_config(None, [f"data.crop_mpp={mpp}"])


def test_cli_train_refuses_mpp_zero(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cellclf.cli import app

    _png(tmp_path / "crops" / "eosinophil" / "a.png", 64, (200, 50, 50))
    for mpp in ("0", "-1"):
        res = CliRunner().invoke(app, ["train", "-d", str(tmp_path / "crops"), "-o",
                                       str(tmp_path / "b"), "--mpp", mpp])
        assert res.exit_code != 0
        assert "crop_mpp (--mpp) must be the crops' µm per pixel" in str(res.exception)
        assert not (tmp_path / "b").exists()


def test_points_csv_without_y_is_not_a_manifest(tmp_path: Path) -> None:
    slide = tmp_path / "s.svs"
    slide.write_bytes(b"")
    csv = tmp_path / "points.csv"
    csv.write_text("slide,x,class\ns.svs,10,eosinophil\n")
    with pytest.raises(AnnotationError, match=r"header lacks columns \['y'\]"):
        discover(csv)


def test_unlabelled_and_labelled_files_are_listed(tmp_path: Path) -> None:
    _png(tmp_path / "loose.png", 8, (1, 2, 3))
    _png(tmp_path / "eos" / "a.jpg", 8, (1, 2, 3))
    (tmp_path / "eos" / "notes.txt").write_text("x")
    files = list_crop_files(tmp_path)
    assert [(str(f.rel), f.folder) for f in files] == [("loose.png", None), ("eos/a.jpg", "eos")]
    with pytest.raises(AnnotationError, match="not in a class folder"):
        read_crop_folder(tmp_path, ClassMap(CLASSES), 8, 0.5, 0.5)


def test_batch_size_and_workers_scale() -> None:
    assert auto_batch_size(240) == 16 and auto_batch_size(1168) == 32
    assert auto_batch_size(100_000) == 256 and auto_batch_size(240, 64) == 64
    assert auto_num_workers(-1, cpus=2) == 0 and auto_num_workers(-1, cpus=16) == 8
    assert auto_num_workers(-1, cpus=4) == 2 and auto_num_workers(3, cpus=2) == 3
