"""Plain images (a PNG/JPEG tile, a strip TIFF) go through ``cellclf infer`` like slides, with
``--mpp``; without it, or damaged, they are refused with a message that names the file."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cellclf.errors import MissingMppError, SlideOpenError
from cellclf.wsi.slide import Slide
from tests._cli import cli


@pytest.fixture(scope="module")
def png_of_svs(tiny_svs, tmp_path_factory):
    """The synthetic SVS's level 0, decoded, saved losslessly as PNG (same pixels)."""
    svs, _ = tiny_svs
    with Slide(svs) as s:
        rgb, _ = s.read_level(0, 0, 0, s.width, s.height)
    path = tmp_path_factory.mktemp("png") / "tile.png"
    Image.fromarray(rgb).save(path)
    return svs, path, rgb


def test_plain_image_opens_as_one_level_slide(png_of_svs):
    _, png, rgb = png_of_svs
    with Slide(png, mpp=0.5) as s:
        assert (s.width, s.height, len(s.level_dimensions)) == (rgb.shape[1], rgb.shape[0], 1)
        box = s.read_region_mpp(100, 200, 64, 48, 64, 48)
        assert np.array_equal(box, rgb[200:248, 100:164])
    with pytest.raises(MissingMppError, match="--mpp"):
        Slide(png)


def test_damaged_image_is_refused_by_name(tmp_path):
    bad = tmp_path / "cut.png"
    data = (tmp_path / "ok.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(data)
    bad.write_bytes(data.read_bytes()[:40])
    with pytest.raises(SlideOpenError, match="cut.png"):
        Slide(bad, mpp=0.5)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(SlideOpenError, match="notes.jpg"):
        Slide(text, mpp=0.5)


@pytest.mark.slow
def test_infer_on_a_png_finds_the_cells_it_finds_on_the_slide(png_of_svs, shipped_model, tmp_path,
                                                                capsys):
    svs, png, _ = png_of_svs
    code, text = cli(capsys, "infer", png, "--model", shipped_model, "-o", tmp_path / "png")
    assert code == 1 and "--mpp" in text, text  # no pixel size: the slide fails, named
    code, text = cli(capsys, "infer", png, "--model", shipped_model, "--mpp", 0.5, "-o",
                     tmp_path / "png")
    assert code == 0, text
    code, text = cli(capsys, "infer", svs, "--model", shipped_model, "-o", tmp_path / "svs")
    assert code == 0, text
    a = pq.read_table(tmp_path / "png" / "tile" / "cells.parquet")
    b = pq.read_table(tmp_path / "svs" / svs.stem / "cells.parquet")
    assert b.num_rows > 50
    assert abs(a.num_rows - b.num_rows) <= 0.02 * b.num_rows
    summary = json.loads((tmp_path / "png" / "tile" / "summary.json").read_text())
    assert summary["slide"]["mpp"] == 0.5 and summary["n_cells"] == a.num_rows
