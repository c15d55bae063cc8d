"""Closing the loop: infer → review (labels from the ground truth) → finalize → export → train."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cellclf.cli import app

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_infer_review_export_retrain(tiny_svs, tiny_slide, shipped_model, tmp_path):
    from cellclf.annotations.geojson import read_points
    from cellclf.detect.matching import match_points
    from cellclf.model.network import load_bundle
    from cellclf.pipeline.batch import run_batch
    from cellclf.review.finalize import finalize_results
    from cellclf.review.label_export import export_labels
    from cellclf.review.store import ReviewStore

    slide, truth = tiny_svs
    results = tmp_path / "results"
    run_batch([str(slide)], shipped_model, results, backend="onnx")
    store = ReviewStore(f"sqlite:///{results / 'review.sqlite'}")
    queued = store.progress()["total"]
    assert queued > 0

    # a "pathologist" answers every queued cell with the truth within 4 µm (else other)
    pts = read_points(truth)
    t_xy = np.array([[p.x, p.y] for p in pts])
    t_name = [p.name if p.name in ("eosinophil", "neutrophil", "mast_cell") else "other"
              for p in pts]
    first = store.queue()[0]  # what the review app needs for native views and scale bars
    assert (first.image_mpp, first.slide_mpp) == (0.5, 0.5)  # the model's; this SVS's own
    assert first.slide_path == str(slide.absolute())
    n = 0
    while (item := store.claim("alice")) is not None:
        m = match_points(np.array([[item.x, item.y]]), t_xy, 4 / 0.5)
        j = m.pred_to_truth[0]
        store.label("alice", item.id, t_name[j] if j >= 0 else "other")
        n += 1
    assert n == queued and store.progress()["pending"] == 0

    final = finalize_results(store, results)["tiny_svs"]
    summary = json.loads((results / "tiny_svs" / "summary.json").read_text())
    for c, v in summary["counts"].items():
        reviewed_as = final.get("reviewed_as", {}).get(c, 0)
        assert final["counts"][c] == v["accepted"] + reviewed_as
    assert "after review" in (results / "tiny_svs" / "report.html").read_text()

    labels = tmp_path / "labels"
    export_labels(store, labels)
    exported = read_points(labels / "tiny_svs.geojson")
    assert len(exported) == queued

    # retrain on the reviewed cells (only they carry labels, so no detector-made `other`)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(slide, data / slide.name)
    shutil.copyfile(tiny_slide[0], data / tiny_slide[0].name)
    (data / "manifest.csv").write_text(
        "slide,annotations,split\n"
        f"{slide.name},{labels / 'tiny_svs.geojson'},train\n"
        f"{tiny_slide[0].name},{tiny_slide[1]},val\n")
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--config", str(REPO / "configs" / "train-tiny.yaml"), "--data",
                                   str(data / "manifest.csv"), "--out", str(out),
                                   "data.use_detector=false", "train.epochs=1"])
    assert res.exit_code == 0, res.output
    model, card = load_bundle(out)
    assert card.training["counts"]["train"]["other"] + sum(
        card.training["counts"]["train"][c] for c in card.target_classes) == len(exported)
