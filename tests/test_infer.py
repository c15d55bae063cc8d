"""Batch inference end to end: outputs, manifest, bad slides, reruns, and kill-and-resume."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cellclf.card import DEFAULT_MODEL
from cellclf.pipeline.batch import expand_slides, run_batch


@pytest.fixture(scope="module")
def slides(tiny_slide, tiny_svs, tmp_path_factory) -> list[Path]:
    """Two good synthetic slides and one truncated file."""
    d = tmp_path_factory.mktemp("batch")
    bad = d / "broken.svs"
    bad.write_bytes(tiny_svs[0].read_bytes()[:5000])
    return [tiny_slide[0], tiny_svs[0], bad]


@pytest.fixture(scope="module")
def batch_out(slides, shipped_model, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("infer")
    report = run_batch([str(s) for s in slides], shipped_model, out, backend="onnx", workers=2)
    return out, report


def _store_rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return sorted(con.execute("SELECT slide_id, cell_id, predicted, reason FROM items"))


def test_outputs_and_manifest(batch_out, tiny_slide):
    out, report = batch_out
    assert (report.done, report.failed, report.exit_code) == (2, 1, 1)
    rows = (out / "manifest.csv").read_text().splitlines()
    assert rows[0].startswith("slide_id,path,status,reason")
    failed = [r for r in rows if ",failed," in r]
    assert len(failed) == 1 and "broken" in failed[0]
    d = out / "tiny"
    for name in ("cells.parquet", "cells.geojson", "summary.json", "overlay.png", "report.html"):
        assert (d / name).is_file(), name
    summary = json.loads((d / "summary.json").read_text())
    cells = pq.read_table(d / "cells.parquet").to_pydict()
    n = len(cells["x"])
    assert summary["n_cells"] == n > 100
    # counts are the cells table grouped by class and decision
    for c, v in summary["counts"].items():
        is_c = np.array(cells["class"]) == c
        acc = np.array(cells["decision"]) == "accepted"
        assert v == {"accepted": int((is_c & acc).sum()), "review": int((is_c & ~acc).sum()),
                     "total": int(is_c.sum())}
    assert set(cells["reason"]) <= {"accepted", "low_confidence", "uncertified_class", "ood_slide"}
    assert summary["model_card"]["name"] == DEFAULT_MODEL
    assert summary["peak_hpf"]["eosinophil"]["count"] >= 1
    assert summary["tissue_area_mm2"] > 0 and "total" in summary["timings_s"]
    stain = summary["extra"]["stain"]  # the slide's own stain estimate (cellclf.detect.stain)
    assert len(stain["haematoxylin"]) == len(stain["glass"]) == 3 and stain["source"]
    assert 0.8 <= summary["extra"]["detect_hem_cap"] <= 2.0  # the slide's nuclear H level
    geo = json.loads((d / "cells.geojson").read_text())
    assert len(geo["features"]) == n
    f0 = geo["features"][0]
    assert f0["properties"]["objectType"] == "detection"
    assert f0["properties"]["classification"]["name"] in summary["counts"]
    html = (d / "report.html").read_text()
    assert "Peak per HPF" in html or "peak per HPF" in html


def test_detections_match_truth(batch_out, tiny_slide):
    """The pipeline's cells find the truth's target cells (4 µm) and classify most right."""
    from cellclf.annotations.geojson import read_points
    from cellclf.detect.matching import match_points

    out, _ = batch_out
    cells = pq.read_table(out / "tiny" / "cells.parquet").to_pydict()
    pred = np.stack([cells["x"], cells["y"]], 1)
    truth = read_points(tiny_slide[1])
    t_xy = np.array([[p.x, p.y] for p in truth])
    t_cls = np.array([p.name for p in truth])
    m = match_points(pred, t_xy, 4 / 0.25)
    target = np.isin(t_cls, ["eosinophil", "neutrophil", "mast_cell"])
    found = m.truth_to_pred[target] >= 0
    assert found.mean() >= 0.95
    right = np.array(cells["class"])[m.truth_to_pred[target][found]] == t_cls[target][found]
    assert right.mean() >= 0.85


def test_review_store_holds_exactly_the_gated_cells(batch_out):
    out, _ = batch_out
    rows = _store_rows(out / "review.sqlite")
    expected = []
    for sid in ("tiny", "tiny_svs"):
        cells = pq.read_table(out / sid / "cells.parquet").to_pydict()
        for cid, dec, cls, reason, audit in zip(cells["cell_id"], cells["decision"],
                                                cells["class"], cells["reason"], cells["audit"],
                                                strict=True):
            if dec == "review":
                expected.append((sid, cid, cls, reason))
            elif audit:  # the running audit: an accepted cell queued like any other
                expected.append((sid, cid, cls, "low_confidence"))
    assert rows == sorted(expected) and len(rows) > 0


def test_rerun_skips_finished_and_retries_failed(batch_out, slides, shipped_model):
    out, _ = batch_out
    before = (out / "tiny" / "summary.json").stat().st_mtime_ns
    n_items = len(_store_rows(out / "review.sqlite"))
    report = run_batch([str(s) for s in slides], shipped_model, out, backend="onnx")
    assert (report.skipped, report.failed) == (2, 1)
    assert (out / "tiny" / "summary.json").stat().st_mtime_ns == before
    assert len(_store_rows(out / "review.sqlite")) == n_items


def test_expand_slides(tmp_path, tiny_slide):
    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "b.txt").write_text(f"# list\n{tiny_slide[0]}\na.svs\n")
    got = expand_slides([str(tmp_path / "b.txt"), str(tmp_path), str(tmp_path / "*.svs")])
    assert got == [tiny_slide[0], tmp_path / "a.svs"]
    (tmp_path / "preview.jpg").write_bytes(b"x")  # a slide folder's picture is not a slide...
    assert expand_slides([str(tmp_path)]) == [tmp_path / "a.svs"]
    # ...unless the run reads plain image tiles (`infer --mpp`)
    assert expand_slides([str(tmp_path)], plain_images=True) == [tmp_path / "a.svs",
                                                                 tmp_path / "preview.jpg"]


def _cli(args: list[str], fault: str | None = None) -> int:
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", ORT_DISABLE_TELEMETRY="1")
    env.pop("CELLCLF_FAULT", None)
    if fault:
        env["CELLCLF_FAULT"] = fault
    proc = subprocess.run([sys.executable, "-m", "cellclf.cli", *args], env=env,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode


def _snapshot(out: Path) -> dict:
    snap = {"store": _store_rows(out / "review.sqlite")}
    for sid in ("tiny", "tiny_svs"):
        snap[sid] = pq.read_table(out / sid / "cells.parquet").to_pydict()
        s = json.loads((out / sid / "summary.json").read_text())
        snap[sid + "_counts"] = s["counts"]
    return snap


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_results(tiny_slide, tiny_svs, shipped_model, tmp_path):
    """SIGKILL mid-review-insert, before results, before the manifest row: the final outputs and
    the review store equal an uninterrupted run (no lost or duplicated cells)."""
    args = [str(tiny_slide[0]), str(tiny_svs[0]), "--model", str(shipped_model),
            "--backend", "onnx", "--batch", "64", "--workers", "2"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _cli(["infer", *args, "--out", str(ref)]) == 0
    for fault in ("mid_review:0", "before_results:0", "mid_review:1", "before_manifest:1"):
        assert _cli(["infer", *args, "--out", str(run)], fault) == -9, fault
    assert _cli(["infer", *args, "--out", str(run)]) == 0
    assert _snapshot(run) == _snapshot(ref)
    rows = _snapshot(run)["store"]
    assert len({(r[0], r[1]) for r in rows}) == len(rows)
    manifest = (run / "manifest.csv").read_text()
    assert manifest.count(",done,") == 2 and not list(run.glob(".tmp-*"))


def test_infer_int8_uses_the_int8_gate(tiny_slide, shipped_model, tmp_path):
    """`cellclf infer --precision int8`: the shipped model.int8.onnx, gated by its own thresholds."""
    card = json.loads((shipped_model / "card.json").read_text())
    if "int8" not in card:
        pytest.skip("the shipped bundle has no model.int8.onnx (cellclf export --int8)")
    report = run_batch([str(tiny_slide[0])], shipped_model, tmp_path / "out", backend="onnx",
                       precision="int8")
    assert report.exit_code == 0
    summary = json.loads((tmp_path / "out" / "tiny" / "summary.json").read_text())
    assert summary["parameters"]["precision"] == "int8"
    assert summary["model_card"]["gate"]["thresholds"] == card["int8"]["gate"]["thresholds"]
    assert summary["n_cells"] > 100


def test_bad_gpu_decode_value_is_refused_before_any_slide(tiny_slide, shipped_model, tmp_path):
    from cellclf.errors import CellclfError

    with pytest.raises(CellclfError, match="gpu-decode"):
        run_batch([str(tiny_slide[0])], shipped_model, tmp_path / "o", device_decode="yes")
    assert not (tmp_path / "o" / "manifest.csv").exists()
