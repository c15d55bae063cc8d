"""Dataset: splits by slide (hand-computed), labels from cached names, candidate-centred crops from
a real tiled TIFF read by OpenSlide, and the crop cache (second run reads no slide)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellclf.annotations.labelled_data import ClassMap, SlideEntry, discover
from cellclf.errors import AnnotationError
from cellclf.model.config import load_config
from cellclf.model.dataset import (
    KIND_ANNOTATION,
    KIND_CANDIDATE,
    KIND_FALSE_DETECTION,
    build_datasets,
    crop_group,
    label_slide,
    slide_crops,
    split_entries,
)

CLASSES = ("eosinophil", "neutrophil", "mast_cell", "other")

# (x, y, truth name or None for an unannotated nucleus) in level-0 px of a 0.5 µm/px slide
CELLS = [(200, 200, "eosinophil"), (600, 300, "lymphocyte"), (400, 700, "neutrophil"),
         (800, 800, "eosinophil"), (300, 900, None)]
STROMA_POINT = (900.0, 150.0, "mast_cell")  # annotated where the detector finds nothing


def write_slide(path: Path, cells=CELLS, size: int = 1024, mpp: float = 0.5, seed: int = 0,
                truth_extra=(STROMA_POINT,)) -> tuple[Path, Path]:
    """A JPEG-tiled TIFF (OpenSlide 'generic-tiff') with dark nuclei on pink stroma + truth."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), (215, 140, 180), np.float64)
    yy, xx = np.mgrid[:size, :size]
    for x, y, name in cells:
        r = 3 / mpp * (1.5 if name == "eosinophil" else 1)
        d = (xx - x) ** 2 + (yy - y) ** 2
        img[d < (2 * r) ** 2] = (230, 120, 100) if name == "eosinophil" else (220, 180, 200)
        img[d < r * r] = (80, 50, 130)
    img += rng.normal(0, 4, img.shape)
    res = 1e4 / mpp
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, img.clip(0, 255).astype(np.uint8), tile=(256, 256), photometric="rgb",
                     compression="jpeg", resolution=(res, res), resolutionunit="CENTIMETER")
    feats = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [x + 1.5, y - 1.0]},
              "properties": {"classification": {"name": n}, "ambiguous": n == "neutrophil"}}
             for x, y, n in [*cells, *truth_extra] if n is not None]
    truth = path.with_suffix(".geojson")
    truth.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path, truth


def test_split_entries_hand_computed() -> None:
    e = [SlideEntry(Path(f"s{i}.svs"), None) for i in range(5)]
    parts = split_entries(e, 0.2, 0.2, seed=0)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [3, 1, 1]
    names = [x.slide.name for s in parts.values() for x in s]
    assert sorted(names) == sorted(x.slide.name for x in e)  # each slide exactly once
    assert split_entries(e, 0.2, 0.2, seed=0) == parts  # seeded
    assert split_entries(e[:1], 0.5, 0.5, seed=0) == {"train": e[:1], "val": [], "test": []}
    assert [len(v) for v in split_entries(e[:2], 0.1, 0.0, 0).values()] == [1, 1, 0]
    fixed = [SlideEntry(Path("a.svs"), None, "test"), SlideEntry(Path("b.svs"), None, "val"),
             *e[:4]]
    parts = split_entries(fixed, 0.25, 0.0, seed=3)
    assert parts["test"] == fixed[:1] and parts["val"][0] == fixed[1]
    assert len(parts["val"]) == 2 and len(parts["train"]) == 3


def test_crop_group() -> None:
    assert crop_group(Path("slideA__123_456.png")) == "slideA"
    assert crop_group(Path("x.png")) == "x"


def test_label_slide_maps_names_and_caps_false_detections() -> None:
    arrays = {"crops": np.zeros((5, 4, 4, 3), np.uint8), "xy0": np.arange(10.0).reshape(5, 2),
              "name_idx": np.array([0, 1, -1, -1, 2], np.int32),
              "kind": np.array([0, 1, 2, 2, 0], np.int8), "ambiguous": np.zeros(5, bool)}
    cm = ClassMap(CLASSES)
    cs = label_slide(arrays, ["eosinophil", "lymphocyte", "Mast cell"], cm, "s", "f")
    np.testing.assert_array_equal(cs.labels, [0, 3, 3, 3, 2])
    assert cs.counts(CLASSES) == {"eosinophil": 1, "neutrophil": 0, "mast_cell": 1, "other": 3}
    capped = label_slide(arrays, ["eosinophil", "lymphocyte", "Mast cell"], cm, "s", "f",
                         max_other_ratio=0.5)
    # 2 target crops × 0.5 = 1 "other" kept of 3; the targets all stay
    np.testing.assert_array_equal(np.sort(capped.labels), [0, 2, 3])
    with pytest.raises(AnnotationError, match="f: class name 'basophil'"):
        label_slide(arrays, ["eosinophil", "basophil", "x"], ClassMap(CLASSES, unknown="error"),
                    "s", "f")


def test_slide_crops_centre_on_candidates_and_cache(tmp_path: Path, monkeypatch) -> None:
    slide, truth = write_slide(tmp_path / "s1.tiff")
    entry = SlideEntry(slide, truth)
    cache = tmp_path / "cache"
    kw = {"work_mpp": 0.5, "crop_px": 32, "cache_dir": cache}
    arrays, names, hit = slide_crops(entry, **kw)
    assert not hit
    kind, xy = np.asarray(arrays["kind"]), np.asarray(arrays["xy0"])
    # 4 annotated nuclei found by the detector, the stroma point not, 1 unannotated nucleus
    assert sorted(kind.tolist()) == [KIND_CANDIDATE] * 4 + [KIND_ANNOTATION, KIND_FALSE_DETECTION]
    got = {names[i] if i >= 0 else None for i in arrays["name_idx"]}
    assert got == {"eosinophil", "lymphocyte", "neutrophil", "mast_cell", None}
    # candidate-centred: matched cells sit at the detected nucleus, not the (offset) annotation
    eos = xy[(kind == KIND_CANDIDATE)]
    assert np.abs(eos - np.round(eos / 100) * 100).max() < 1.5
    np.testing.assert_allclose(xy[kind == KIND_ANNOTATION], [[901.5, 149.0]])
    np.testing.assert_allclose(xy[kind == KIND_FALSE_DETECTION], [[300, 900]], atol=1.5)
    crops = np.asarray(arrays["crops"])
    assert crops.shape == (6, 32, 32, 3) and crops.dtype == np.uint8
    c = crops[kind == KIND_CANDIDATE][0]
    assert c[16, 16].sum() < c[0, 0].sum()  # a dark nucleus at the centre
    assert np.asarray(arrays["ambiguous"]).sum() == 1
    assert len(list(cache.iterdir())) == 1

    # second run: no slide is read (reading would raise), same arrays from the cache
    def no_reads(*a, **k):
        raise AssertionError("the slide was read again")

    monkeypatch.setattr("cellclf.model.dataset.extract_crops", no_reads)
    monkeypatch.setattr("cellclf.model.dataset.detect_slide", no_reads)
    again, names2, hit = slide_crops(entry, **kw)
    assert hit and names2 == names
    np.testing.assert_array_equal(again["crops"], crops)
    # a changed annotation file is a different key: it must read the slide
    truth.write_text(truth.read_text().replace("lymphocyte", "plasma_cell"))
    with pytest.raises(AssertionError, match="read again"):
        slide_crops(entry, **kw)


def test_annotations_outside_the_slide_are_refused(tmp_path: Path) -> None:
    slide, truth = write_slide(tmp_path / "s.tiff", cells=CELLS[:1],
                               truth_extra=[(5000.0, 10.0, "eosinophil")])
    with pytest.raises(AnnotationError, match=r"s\.geojson: annotation 1 .*outside.*data.coords=um"):
        slide_crops(SlideEntry(slide, truth), work_mpp=0.5, crop_px=32, use_detector=False)


def test_build_datasets_splits_by_slide(tmp_path: Path) -> None:
    for i in range(3):
        write_slide(tmp_path / "data" / f"s{i}.tiff", seed=i)
    src = discover(tmp_path / "data")
    cfg = load_config(None, ["data.crop_px=32", "data.val_fraction=0.34", "data.split_seed=1"])
    ds = build_datasets(src, cfg, cache_dir=tmp_path / "cache")
    assert ds.cache_misses == 3 and ds.cache_hits == 0
    slides = ds.slides
    assert len(slides["train"]) == 2 and len(slides["val"]) == 1 and slides["test"] == []
    assert set(slides["train"]).isdisjoint(slides["val"])
    assert set(ds.splits["val"].slide_ids) == set(slides["val"])
    # per slide: 2 eosinophils, 1 neutrophil, 1 mast cell, 2 other (lymphocyte + false detection)
    assert ds.splits["train"].counts(CLASSES) == {"eosinophil": 4, "neutrophil": 2,
                                                  "mast_cell": 2, "other": 4}
    again = build_datasets(src, cfg, cache_dir=tmp_path / "cache")
    assert again.cache_hits == 3 and again.cache_misses == 0
    np.testing.assert_array_equal(again.splits["train"].labels, ds.splits["train"].labels)
    # a different class map reuses the cache (names are cached, not labels)
    cfg2 = load_config(None, ["data.crop_px=32", "data.val_fraction=0.34", "data.split_seed=1",
                              "data.classes=[eosinophil, other]"])
    ds2 = build_datasets(src, cfg2, cache_dir=tmp_path / "cache")
    assert ds2.cache_hits == 3 and ds2.splits["train"].counts(("eosinophil", "other")) == \
        {"eosinophil": 4, "other": 8}
    assert ds.summary()["counts"]["val"]["eosinophil"] == 2
