"""Bad input inside a real ``cellclf infer`` / ``calibrate`` / ``evaluate`` run (issue 17): a slide
without tissue is recorded with its real reason, outputs are readable by colleagues under umask
022, a full disk (simulated ENOSPC) leaves no partial output and an intact manifest, a corrupt
manifest on rerun is a clear refusal, and calibration on unusable truth leaves the bundle as it was.
Real slides (synthetic TIFFs), real onnxruntime, real SQLite."""

from __future__ import annotations

import csv
import errno
import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from _cli import cli


def blank_slide(path: Path, mpp: float = 0.25) -> Path:
    """A generic TIFF that OpenSlide opens (mpp in the resolution tags) showing only glass."""
    import tifffile

    rgb = np.full((1024, 1024, 3), 246, np.uint8)
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", compression="jpeg",
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return path


def read_manifest(out: Path) -> dict[str, dict[str, str]]:
    with (out / "manifest.csv").open(newline="") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def umask_run(tmp_path_factory, tiny_slide, random_bundle):
    """One infer run under umask 022 over a good slide and a slide of blank glass."""
    out = tmp_path_factory.mktemp("umask") / "results"
    blank = blank_slide(out.parent / "glass.tif")
    old = os.umask(0o022)
    try:
        from cellclf.pipeline.batch import run_batch

        report = run_batch([str(tiny_slide[0]), str(blank)], random_bundle, out, backend="onnx",
                           workers=2)
    finally:
        os.umask(old)
    return out, report


@pytest.mark.slow
def test_no_tissue_slide_recorded_with_its_reason(umask_run):
    out, report = umask_run
    assert (report.done, report.failed, report.exit_code) == (1, 1, 1)
    row = read_manifest(out)["glass"]
    assert row["status"] == "failed"
    assert "no tissue found" in row["reason"] and "UnboundLocalError" not in row["reason"]


@pytest.mark.slow
def test_outputs_readable_by_group_and_others_under_umask_022(umask_run):
    out, _ = umask_run
    files = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith("review.sqlite")]
    names = {p.name for p in files}
    assert {"manifest.csv", "cells.geojson", "report.html", "summary.json"} <= names
    for p in files:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o044 == 0o044, f"{p} has mode {oct(mode)}"
    for d in [p for p in out.rglob("*") if p.is_dir()]:
        assert stat.S_IMODE(d.stat().st_mode) & 0o055 == 0o055, d


@pytest.mark.slow
def test_info_and_report_agree_on_tissue_area(umask_run, tiny_slide):
    from cellclf.wsi.info import slide_info

    out, _ = umask_run
    summary = json.loads((out / "tiny" / "summary.json").read_text())
    assert slide_info(tiny_slide[0])["tissue_area_mm2"] == pytest.approx(
        summary["tissue_area_mm2"], rel=1e-3)
    html = (out / "tiny" / "report.html").read_text()
    for needle in ("Hotspots", "<h3>Versions</h3>", "<b>total</b>", "&#9679;"):
        assert needle in html


@pytest.mark.slow
def test_corrupt_manifest_on_rerun_is_refused(umask_run, random_bundle, tiny_slide, capsys):
    out, _ = umask_run
    good = (out / "manifest.csv").read_bytes()
    try:
        (out / "manifest.csv").write_bytes(b"\xff\xfe\x00garbage\x00\n")
        code, text = cli(capsys, "infer", tiny_slide[0], "--model", random_bundle, "--out", out,
                         "--backend", "onnx")
        assert code == 2 and "manifest.csv is not a readable cellclf manifest" in text
        assert "move it aside" in text
    finally:
        (out / "manifest.csv").write_bytes(good)


@pytest.mark.slow
def test_disk_full_leaves_no_partial_output(tmp_path, tiny_slide, random_bundle, monkeypatch,
                                            capsys):
    """ENOSPC while a slide's outputs are written: the slide is failed with a clear reason and no
    half-written folder; ENOSPC while the manifest is rewritten: the old manifest stays intact and
    the CLI says what happened (exit 2, no traceback)."""
    import cellclf.outputs.manifest as manifest_mod
    import cellclf.outputs.results as report_mod  # the module that calls write_report

    out = tmp_path / "results"
    out.mkdir()
    before = "slide_id,path,status,reason,n_cells,n_review,seconds,finished_at\n" \
             "earlier,/x/earlier.svs,done,,5,1,1.0,2026-12-01T00:00:00+00:00\n"
    (out / "manifest.csv").write_text(before)

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "tiny" / "report.html"))

    monkeypatch.setattr(report_mod, "write_report", full)
    code, text = cli(capsys, "infer", tiny_slide[0], "--model", random_bundle, "--out", out,
                     "--backend", "onnx", "--workers", "2")
    assert code == 1 and "no space left on the device" in text
    rows = read_manifest(out)
    assert rows["tiny"]["status"] == "failed" and "no space left" in rows["tiny"]["reason"]
    assert rows["earlier"]["status"] == "done"
    assert not (out / "tiny").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files or folders

    monkeypatch.undo()
    good = (out / "manifest.csv").read_bytes()
    monkeypatch.setattr(report_mod, "write_report", full)

    def full_manifest(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(manifest_mod, "atomic_write_text", full_manifest)
    code, text = cli(capsys, "infer", tiny_slide[0], "--model", random_bundle, "--out", out,
                     "--backend", "onnx", "--workers", "2")
    assert code == 2 and "no space left on the device" in text and "manifest.csv" in text
    assert (out / "manifest.csv").read_bytes() == good


def test_atomic_write_leaves_old_file_on_enospc(tmp_path, monkeypatch):
    import cellclf.outputs.atomic as atomic

    target = tmp_path / "summary.json"
    atomic.atomic_write_json(target, {"v": 1})

    def no_space(_fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", no_space)
    with pytest.raises(OSError):
        atomic.atomic_write_json(target, {"v": 2, "big": "x" * 100_000})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_json_outputs_never_hold_nan(tmp_path):
    from cellclf.outputs.atomic import atomic_write_json

    atomic_write_json(tmp_path / "s.json", {"t": float("nan"), "x": [np.float32("inf"), 1.5]})
    assert json.loads((tmp_path / "s.json").read_text()) == {"t": None, "x": [None, 1.5]}


@pytest.mark.slow
def test_calibrate_on_truth_without_annotations_keeps_the_bundle(tmp_path, tiny_slide,
                                                                  random_bundle, capsys):
    """Truth with no labelled cell: calibrate and evaluate refuse (exit 2); card.json and
    model.onnx are byte-identical afterwards (no lost calibration, no re-export)."""
    import shutil

    b = tmp_path / "bundle"
    shutil.copytree(random_bundle, b)
    before = (b / "card.json").read_bytes(), (b / "model.onnx").read_bytes()
    data = tmp_path / "cal"
    data.mkdir()
    (data / "tiny.tif").symlink_to(tiny_slide[0])
    (data / "tiny.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    code, text = cli(capsys, "calibrate", b, "--data", data, "--workers", "2")
    assert code == 2 and "no annotated cell of the classes" in text
    assert ((b / "card.json").read_bytes(), (b / "model.onnx").read_bytes()) == before
    assert not (b / "card.previous.json").exists()
    code, text = cli(capsys, "evaluate", b, "--data", data, "--out", tmp_path / "ev",
                     "--workers", "2", "--no-progress")
    assert code == 2 and "nothing to measure" in text
    assert not (tmp_path / "ev" / "metrics.json").exists()


@pytest.mark.slow
def test_infer_with_the_default_model_from_another_folder(tmp_path, tiny_svs, shipped_model):
    """The first hour: `cellclf infer SLIDE` with no --model, run from an unrelated folder, finds
    the shipped model (not "models/… not found") and finishes (exit 0)."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo))
    proc = subprocess.run([sys.executable, "-m", "cellclf.cli", "infer", str(tiny_svs[0]),
                           "--out", "res", "--workers", "2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert read_manifest(tmp_path / "res")["tiny_svs"]["status"] == "done"
