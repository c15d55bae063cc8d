"""Bad input gives a clear message and a non-zero exit, never a traceback or a wrong exit-0 result
(issue 17). Each case runs the real CLI entry point (``cellclf.cli.main``) in this process on real
files: bundles, SQLite stores, TIFF slides. Options are refused before any work starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _cli import cli

from cellclf.cli import main

REPO = Path(__file__).resolve().parents[1]




def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_card(bundle: Path, **changes: object) -> None:
    path = bundle / "card.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture()
def slide_file(tiny_slide) -> Path:
    return tiny_slide[0]


# ---------------------------------------------------------------- bundle and ONNX consistency


def test_onnx_class_order_differs_from_card(random_bundle, tmp_path, slide_file, capsys):
    """card.json lists eosinophil and neutrophil swapped against the graph: refused (exit 2), not
    counted under the wrong names; the torch backend refuses the same bundle."""
    from cellclf.errors import BundleError
    from cellclf.model.engine import OnnxEngine

    b = copy_bundle(random_bundle, tmp_path / "swapped")
    card = json.loads((b / "card.json").read_text())
    classes = list(card["classes"])
    classes[0], classes[1] = classes[1], classes[0]
    edit_card(b, classes=classes)
    with pytest.raises(BundleError, match="outputs the classes"):
        OnnxEngine(b)
    code, text = cli(capsys, "infer", slide_file, "--model", b, "--out", tmp_path / "o",
                     "--backend", "onnx")
    assert code == 2 and "outputs the classes" in text and "cellclf export" in text
    assert not (tmp_path / "o" / "manifest.csv").exists()


@pytest.mark.parametrize("damage", ["zero_sha", "no_sha", "truncated"])
def test_onnx_checksum_is_checked(random_bundle, tmp_path, damage):
    from cellclf.errors import BundleError
    from cellclf.model.engine import OnnxEngine

    b = copy_bundle(random_bundle, tmp_path / damage)
    card = json.loads((b / "card.json").read_text())
    if damage == "zero_sha":
        edit_card(b, onnx={**card["onnx"], "sha256": "0" * 64})
    elif damage == "no_sha":
        edit_card(b, onnx={k: v for k, v in card["onnx"].items() if k != "sha256"})
    else:
        data = (b / "model.onnx").read_bytes()
        (b / "model.onnx").write_bytes(data[: len(data) // 2])
    match = "records no sha256" if damage == "no_sha" else "does not match the sha256"
    with pytest.raises(BundleError, match=match):
        OnnxEngine(b)


def test_truncated_onnx_without_checksum_is_a_clear_error(random_bundle, tmp_path):
    from cellclf.errors import BundleError
    from cellclf.model.engine import onnx_card

    bad = tmp_path / "model.onnx"
    bad.write_bytes((random_bundle / "model.onnx").read_bytes()[:5000])
    with pytest.raises(BundleError, match="not a readable ONNX graph"):
        onnx_card(bad)


@pytest.mark.parametrize("content", ['{"name": "x", "classes": [', "[1, 2, 3]", "NaN-temperature"])
def test_bad_card_refused_by_infer(random_bundle, tmp_path, slide_file, capsys, content):
    """Invalid JSON, a JSON array, or a NaN temperature (which would write NaN into summary.json):
    exit 2 naming card.json; nothing is run."""
    b = copy_bundle(random_bundle, tmp_path / "b")
    if content == "NaN-temperature":
        edit_card(b, temperature=float("nan"))  # json writes the non-JSON token NaN
    else:
        (b / "card.json").write_text(content)
    for backend in ("onnx", "torch"):
        code, text = cli(capsys, "infer", slide_file, "--model", b, "--out", tmp_path / "o",
                         "--backend", backend)
        assert code == 2 and "card.json" in text, text
    assert not (tmp_path / "o" / "manifest.csv").exists()


def test_export_opset_refused_and_card_untouched(random_bundle, tmp_path, capsys):
    b = copy_bundle(random_bundle, tmp_path / "b")
    before = (b / "card.json").read_bytes(), (b / "model.onnx").read_bytes()
    for opset in ("1", "999"):
        code, text = cli(capsys, "export", b, "--opset", opset)
        assert code == 2 and f"--opset {opset} is not supported" in text
    assert ((b / "card.json").read_bytes(), (b / "model.onnx").read_bytes()) == before


def test_calibration_failure_restores_the_card(random_bundle, tmp_path, monkeypatch):
    """The card is replaced only when the re-export succeeded; the old one stays as
    card.previous.json either way."""
    import cellclf.calibration.bundle_gate as bundle_gate  # the module that calls export_onnx
    from cellclf.calibration.bundle_gate import PREVIOUS_CARD, write_calibrated_card
    from cellclf.card import bundle_paths

    b = copy_bundle(random_bundle, tmp_path / "b")
    before = (b / "card.json").read_bytes(), (b / "model.onnx").read_bytes()
    new = json.loads(before[0]) | {"temperature": 4.2}

    def fail(*_a, **_k):
        raise OSError(28, "No space left on device", str(b / "model.onnx.tmp"))

    monkeypatch.setattr(bundle_gate, "export_onnx", fail)
    with pytest.raises(OSError):
        write_calibrated_card(bundle_paths(b), new)
    assert ((b / "card.json").read_bytes(), (b / "model.onnx").read_bytes()) == before
    assert (b / PREVIOUS_CARD).read_bytes() == before[0]


# ---------------------------------------------------------------- options checked up front


@pytest.mark.parametrize("args, expect", [
    (["--backend", "foo"], "--backend 'foo' is not one of"),
    (["--device", "tpu"], "--device 'tpu' is not a device"),
    (["--workers", "-1"], "--workers"),
    (["--batch", "-4"], "--batch"),
    (["--hpf-area", "0"], "--hpf-area must be a number greater than 0"),
    (["--mpp", "1e9"], "is not a scanner pixel size"),
    (["--precision", "int4"], "--precision 'int4'"),
])
def test_infer_options_refused(slide_file, tmp_path, capsys, args, expect):
    code, text = cli(capsys, "infer", slide_file, "--out", tmp_path / "o", *args)
    assert code == 2 and expect in text, text
    assert not (tmp_path / "o").exists()


def test_device_cuda_without_gpu_refused(slide_file, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, text = cli(capsys, "infer", slide_file, "--out", tmp_path / "o", "--device", "cuda")
    assert code == 2 and "no such CUDA GPU" in text


def test_other_commands_refuse_bad_numbers(slide_file, random_bundle, tmp_path, capsys):
    code, text = cli(capsys, "info", slide_file, "--mpp", "1e9")
    assert code == 2 and "is not a scanner pixel size" in text
    code, text = cli(capsys, "evaluate", random_bundle, "--data", tmp_path, "--out",
                     tmp_path / "e", "--match-um", "0")
    assert code == 2 and "--match-um must be a number greater than 0" in text
    db = tmp_path / "r.sqlite"
    assert cli(capsys, "review", "init", "--db", db)[0] == 0
    code, text = cli(capsys, "review", "serve", "--db", db, "--port", "99999")
    assert code == 2 and "--port" in text and "65535" in text
    code, text = cli(capsys, "review", "serve", "--db", db, "--lease-s", "-5")
    assert code == 2 and "--lease-s must be more than 0" in text
    code, text = cli(capsys, "calibrate", random_bundle, "--data", tmp_path, "--alpha", "2")
    assert code == 2 and "--alpha must lie between 0 and 1" in text


# ---------------------------------------------------------------- slides and lists


def test_missing_slide_path_is_exit_2_no_slides(tmp_path, capsys):
    code, text = cli(capsys, "infer", tmp_path / "nope.svs", "--out", tmp_path / "o")
    assert code == 2 and "no slides" in text and "nope.svs" in text
    code, text = cli(capsys, "infer", str(tmp_path / "*.svs"), "--out", tmp_path / "o")
    assert code == 2 and "matches no file" in text


def test_binary_slide_list_refused(tmp_path, capsys):
    lst = tmp_path / "slides.txt"
    lst.write_bytes(bytes(range(256)) * 4)
    code, text = cli(capsys, "infer", lst, "--out", tmp_path / "o")
    assert code == 2 and "not a text list of slide paths" in text


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    from cellclf.errors import CellclfError
    from cellclf.outputs.manifest import Manifest

    for text in ("garbage\x00\x01\n", "slide_id,path,status\na,b,exploded\n",
                 "slide_id,path,status,n_cells\na,b,done,many\n"):
        (tmp_path / "manifest.csv").write_text(text)
        with pytest.raises(CellclfError, match="move it aside"):
            Manifest(tmp_path / "manifest.csv")


def test_unwritable_output_paths(slide_file, tmp_path, capsys):
    """An existing file or a folder as output: a message naming the path, exit 2."""
    file_out = tmp_path / "a_file"
    file_out.write_text("x")
    code, text = cli(capsys, "detect", slide_file, "--out", tmp_path, "--mpp", "0.25")
    assert code == 2 and str(tmp_path) in text
    code, text = cli(capsys, "synth", file_out, "--width", "512", "--height", "512")
    assert code == 2 and "a_file" in text


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_output_folder(slide_file, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, text = cli(capsys, "detect", slide_file, "--out", ro / "c.geojson", "--mpp", "0.25",
                         "--no-progress", "--workers", "1")
    finally:
        ro.chmod(0o755)
    assert code == 2 and "permission denied" in text and str(ro) in text


# ---------------------------------------------------------------- review stores


def test_mistyped_review_db_creates_nothing(tmp_path, capsys):
    db = tmp_path / "reviw.sqlite"
    for args in (["review", "add-user", "ann", "--db", db, "--password-stdin"],
                 ["review", "serve", "--db", db],
                 ["review", "export", "--db", db, "--out", tmp_path / "x"],
                 ["review", "finalize", "--db", db, "--results", tmp_path]):
        code, text = cli(capsys, *args)
        assert code == 2 and "does not exist" in text and "review init" in text, text
        assert not db.exists()


def test_review_db_that_is_a_text_file(tmp_path, capsys):
    db = tmp_path / "notes.sqlite"
    db.write_text("these are my notes, not a database\n" * 100)
    code, text = cli(capsys, "review", "init", "--db", db)
    assert code == 2 and "cannot open review store" in text


def test_finalize_with_another_runs_store_refused(tmp_path, capsys):
    results = tmp_path / "results"
    (results / "s1").mkdir(parents=True)
    summary = {"slide_id": "s1", "counts": {"eosinophil": {"accepted": 3, "review": 2, "total": 5},
                                              "other": {"accepted": 1, "review": 0, "total": 1}}}
    (results / "s1" / "summary.json").write_text(json.dumps(summary))
    db = tmp_path / "other_run.sqlite"
    assert cli(capsys, "review", "init", "--db", db)[0] == 0
    code, text = cli(capsys, "review", "finalize", "--db", db, "--results", results)
    assert code == 2 and "went to review but the store" in text
    assert "final" not in json.loads((results / "s1" / "summary.json").read_text())


# ---------------------------------------------------------------- messages and the first hour


def test_brackets_survive_in_error_messages(capsys):
    from cellclf.errors import print_error

    print_error("a position must be finite, got [nan, 1.0]; [bold]x[/bold]")
    err = capsys.readouterr().err
    assert "[nan, 1.0]" in err and "[bold]x[/bold]" in err


def test_unexpected_errors_have_no_traceback():
    """A subprocess: a slide argument that is a folder of junk with --ray nonsense still ends in
    one line, exit 2 (never a traceback)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "cellclf.cli", "export", "/nonexistent/bundle"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "not found" in proc.stderr


def test_version_and_help_at_80_columns(capsys, monkeypatch):
    from cellclf import __version__

    code, text = cli(capsys, "--version")
    assert code == 0 and __version__ in text
    monkeypatch.setenv("COLUMNS", "80")
    commands = ["", "synth", "info", "detect", "train", "evaluate", "calibrate", "export", "infer",
                "review", "review serve"]
    for cmd in commands:
        old = sys.argv
        sys.argv = ["cellclf", *cmd.split(), "--help"]
        try:
            with pytest.raises(SystemExit):
                main()
        finally:
            sys.argv = old
        out = capsys.readouterr().out
        lines = out.splitlines()
        assert max(len(line) for line in lines) <= 80, (cmd, max(lines, key=len))
        cut = [ln for ln in lines if not ln.startswith("Usage:")
               and ln.rstrip().endswith(("...", "…"))]  # click's truncated short help
        assert not cut, (cmd, cut)
        if cmd == "":
            listed = [ln.split()[0] for ln in lines[lines.index("Commands:"):] if ln.startswith("  ") and
                      not ln.strip().startswith("-") and len(ln) > 2 and ln[2] != " "]
            assert listed[:8] == ["synth", "info", "detect", "train", "evaluate", "calibrate",
                                  "export", "infer"], listed


def test_model_default_resolves_from_any_folder(tmp_path, monkeypatch, shipped_model):
    from cellclf.card import DEFAULT_MODEL, resolve_model
    from cellclf.errors import BundleError

    monkeypatch.chdir(tmp_path)
    assert resolve_model(DEFAULT_MODEL).resolve() == shipped_model.resolve()
    assert resolve_model(str(shipped_model)).resolve() == shipped_model.resolve()
    with pytest.raises(BundleError) as err:
        resolve_model("no-such-model")
    msg = str(err.value)
    assert DEFAULT_MODEL in msg and "model.onnx" in msg  # names the shipped models; torch-free ok


def test_info_without_mpp_shows_what_it_can(tmp_path, capsys):
    import numpy as np
    import tifffile

    rgb = np.full((1024, 1024, 3), 240, np.uint8)
    rgb[300:700, 300:700] = (180, 80, 160)
    path = tmp_path / "bare.tif"
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", compression="jpeg")
    code, text = cli(capsys, "info", path)
    assert code == 0 and "1024 × 1024 px" in text and "--mpp" in text
    assert "needs the pixel size" in text
    code, text = cli(capsys, "info", path, "--mpp", "0.5")
    assert code == 0 and "mm²" in text


# ---------------------------------------------------------------- annotation files


def test_points_csv_naming_a_missing_slide(random_bundle, tmp_path, capsys):
    csv_path = tmp_path / "points.csv"
    csv_path.write_text("slide,x,y,class\nmissing.svs,10,20,eosinophil\n")
    code, text = cli(capsys, "evaluate", random_bundle, "--data", csv_path, "--out", tmp_path / "e")
    assert code == 2 and "missing.svs" in text and "not found" in text


def test_utf16_csv_is_a_clear_error(random_bundle, tmp_path, capsys):
    csv_path = tmp_path / "points.csv"
    csv_path.write_bytes("slide,x,y,class\na.svs,10,20,eosinophil\n".encode("utf-16"))
    code, text = cli(capsys, "evaluate", random_bundle, "--data", csv_path, "--out", tmp_path / "e")
    assert code == 2 and "not UTF-8 text" in text and "CSV UTF-8" in text


@pytest.mark.parametrize("coords", [
    [[[1e300, 1e300], [-1e300, 1e300], [1e300, -1e300], [1e300, 1e300]]],  # overflows the area
    [[[0, 0], [1e200, 0], [1e200, 1e200], [0, 0]]],
])
def test_overflowing_polygons_refused_not_nan(tmp_path, coords):
    from cellclf.annotations.geojson import read_points
    from cellclf.errors import AnnotationError

    path = tmp_path / "t.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": coords},
         "properties": {"classification": {"name": "eosinophil"}}}]}))
    with pytest.raises(AnnotationError, match=r"feature 0: a position must be level-0 pixels"):
        read_points(path)


def test_ood_reasons_in_plain_words():
    from cellclf.gate.slide_guard import OOD_ACTION, STAT_NAMES, OODParams, SlideStats, is_ood

    params = OODParams({k: 0.0 for k in STAT_NAMES}, {k: 1.0 for k in STAT_NAMES}, 4.0, 8)
    stats = SlideStats(od_h_mean=16.1, od_e_mean=0.0, od_residual_mean=0.0, od_p99=0.0,
                       focus=1.0, n_tissue_px=1000, mpp=0.5)
    flagged, reasons = is_ood(stats, params)
    assert flagged and reasons[0].startswith("the haematoxylin (nuclear) staining is stronger")
    assert "recalibrate" in OOD_ACTION and "rescan" in OOD_ACTION and "stain" in OOD_ACTION


def test_report_never_shows_final_counts_while_cells_are_pending():
    from cellclf.outputs.report import render_report_html

    summary = {
        "slide_id": "s", "counts": {"eosinophil": {"accepted": 3, "review": 2, "total": 5}},
        "per_mm2": {"eosinophil": {"total": 1.0}},
        "peak_hpf": {"eosinophil": {"count": 2, "x": 1000.0, "y": 2000.0, "radius_px": 500.0}},
        "gate": {}, "model_card": {"classes": ["eosinophil", "other"], "other_class": "other"},
        "hpf_area_mm2": 0.237, "tissue_area_mm2": 1.0, "n_cells": 5,
        "slide": {"path": "s.svs", "width": 10, "height": 10, "mpp": 0.25},
        "timings_s": {"open_tissue_tiling": 1.0, "read_detect_classify": 5.0, "classify": 3.0,
                      "total": 6.5},
        "versions": {"cellclf": "0.1.0", "numpy": "2.0"},
        "final": {"counts": {"eosinophil": 4}, "reviewed": 1, "pending": 1, "cant_tell": 0},
    }
    html = render_report_html(summary)
    assert "pending (1 cells)" in html and "<td>4</td>" not in html
    assert "of which classify" in html and "<td>cellclf</td><td>0.1.0</td>" in html
    assert "1,000, 2,000" in html and "0.25, 0.50" in html  # hotspot centre in px and mm
    summary["final"]["pending"] = 0
    assert "<td>4</td>" in render_report_html(summary)


@pytest.mark.parametrize("err, words", [
    (PermissionError(13, "Permission denied", "/data/out/summary.json"), "permission denied"),
    (OSError(30, "Read-only file system", "/data/out/summary.json"), "read-only"),
    (IsADirectoryError(21, "Is a directory", "/data/out/summary.json"), "a folder, not a file"),
    (OSError(28, "No space left on device", "/data/out/summary.json"), "free some space"),
])
def test_os_errors_reach_the_user_as_one_line(slide_file, monkeypatch, capsys, err, words):
    """Whatever command meets an OS error (here injected into info: this test runs as root, which
    ignores permissions), the user reads the path and what to do, exit 2, no traceback."""
    import cellclf.wsi.info as info

    def fail(*_a, **_k):
        raise err

    monkeypatch.setattr(info, "slide_info", fail)
    code, text = cli(capsys, "info", slide_file)
    assert code == 2 and "/data/out/summary.json" in text and words in text


def test_a_bug_is_one_line_with_how_to_see_the_traceback(slide_file, monkeypatch, capsys):
    import cellclf.wsi.info as info

    def bug(*_a, **_k):
        raise KeyError("levels")

    monkeypatch.setattr(info, "slide_info", bug)
    code, text = cli(capsys, "info", slide_file)
    assert code == 2 and "bug in cellclf" in text and "CELLCLF_DEBUG=1" in text
