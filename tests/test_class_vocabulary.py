"""The class vocabulary comes from the model card: a bundle whose classes are
``[eosinophil, neutrophil, basophil, other]`` runs through ``cellclf infer``, the report, the review
store (queue, labels), ``review export`` and ``review finalize`` with no code change."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cellclf.annotations.geojson import read_points
from cellclf.card import Card, save_card
from cellclf.cli import app
from cellclf.errors import CellclfError
from cellclf.review.store import ReviewStore

CLASSES = ("eosinophil", "neutrophil", "basophil", "other")
TARGETS = CLASSES[:3]


@pytest.fixture(scope="module")
def basophil_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained mobilenet bundle with a basophil class, a hand-set gate and model.onnx."""
    import torch

    from cellclf.model.network import build_model, save_bundle
    from cellclf.model.onnx_export import export_onnx

    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("vocab") / "basophil-v0"
    card = Card(name="basophil-v0", classes=CLASSES, architecture={"backbone": "mobilenet_v3_small"},
                description="untrained test bundle with another vocabulary")
    model = build_model(card)
    with torch.no_grad():  # spread the random outputs so the gate accepts some cells
        model.backbone.classifier[-1].weight.mul_(40.0)
    card = save_bundle(model, card, out)
    gate = {"classes": list(CLASSES), "alpha": 0.01, "delta": 0.05,
            "thresholds": {"eosinophil": 0.5, "neutrophil": 0.5, "basophil": 0.5, "other": 0.6},
            "n_cal": {c: 1000 for c in CLASSES}}
    save_card(card.replace(gate=gate), out)
    export_onnx(out)
    return out


@pytest.mark.slow
def test_another_vocabulary_runs_end_to_end(basophil_bundle, tiny_svs, tmp_path) -> None:
    import pyarrow.parquet as pq

    runner = CliRunner()
    results = tmp_path / "results"
    res = runner.invoke(app, ["infer", str(tiny_svs[0]), "-m", str(basophil_bundle), "-o",
                              str(results), "--backend", "onnx", "--workers", "2"])
    assert res.exit_code == 0, res.output
    slide_dir = results / tiny_svs[0].stem
    # the console line names the target classes, not the catch-all
    done_line = next(line for line in res.output.splitlines() if "cells," in line)
    assert "basophil" in res.output and " other " not in done_line

    table = pq.read_table(slide_dir / "cells.parquet")
    assert [c for c in table.column_names if c.startswith("p_")] == [f"p_{c}" for c in CLASSES]
    assert set(table.column("class").to_pylist()) <= set(CLASSES)
    summary = json.loads((slide_dir / "summary.json").read_text())
    assert list(summary["counts"]) == list(CLASSES)
    assert list(summary["peak_hpf"]) == list(TARGETS)  # no hotspot for the catch-all
    assert summary["n_cells"] == table.num_rows > 0
    report = (slide_dir / "report.html").read_text()
    assert "basophil" in report and (slide_dir / "overlay.png").stat().st_size > 0
    geo = read_points(slide_dir / "cells.geojson")
    assert {p.name for p in geo} <= set(CLASSES)

    db = results / "review.sqlite"
    store = ReviewStore(f"sqlite:///{db}")
    assert store.classes == list(CLASSES)
    queued = store.progress()["total"]
    assert queued == summary["n_cells"] - sum(c["accepted"] for c in summary["counts"].values()) > 0
    first = store.claim("alice")
    assert first is not None and first.predicted in CLASSES
    with pytest.raises(CellclfError):
        store.label("alice", first.id, "mast_cell")  # not this model's vocabulary
    store.label("alice", first.id, "basophil")
    n_labelled = 1
    while (item := store.claim("alice")) is not None:
        store.label("alice", item.id, CLASSES[n_labelled % len(CLASSES)])
        n_labelled += 1
    assert n_labelled == queued and store.progress()["pending"] == 0
    store.close()

    labels = tmp_path / "labels"
    res = runner.invoke(app, ["review", "export", "--db", str(db), "--out", str(labels)])
    assert res.exit_code == 0, res.output
    exported = read_points(labels / f"{tiny_svs[0].stem}.geojson")
    assert len(exported) == queued and "basophil" in {p.name for p in exported}

    res = runner.invoke(app, ["review", "finalize", "--db", str(db), "--results", str(results)])
    assert res.exit_code == 0, res.output
    final = json.loads((slide_dir / "summary.json").read_text())["final"]
    assert set(final["counts"]) == set(CLASSES)
    assert sum(final["counts"].values()) == summary["n_cells"]
    labelled = np.bincount([CLASSES.index(p.name) for p in exported], minlength=len(CLASSES))
    for k, c in enumerate(CLASSES):
        assert final["counts"][c] == summary["counts"][c]["accepted"] + labelled[k]
    assert "after review" in (slide_dir / "report.html").read_text()


def test_results_follow_the_cards_catch_all(tmp_path) -> None:
    """A catch-all not called "other": no hotspot and no overlay dots for it, hotspots and the
    density map for the targets, in the card's order."""
    from cellclf.outputs.report import write_overlay
    from cellclf.outputs.results import SlideResult, build_summary

    classes = ["lymphocyte", "plasma_cell", "background"]
    rng = np.random.default_rng(0)
    n = 60
    probs = rng.dirichlet(np.ones(3), n).astype(np.float32)
    res = SlideResult(slide_id="s", path="s.svs", mpp=0.5, width=2000, height=2000, vendor=None,
                      classes=classes, xy0=rng.uniform(0, 2000, (n, 2)), probs=probs,
                      accept=np.ones(n, bool), reason=np.full(n, "accepted", dtype=object),
                      conformal=np.ones((n, 3), bool), tissue_area_mm2=1.0,
                      thumbnail=np.full((200, 200, 3), 230, np.uint8), thumb_downsample=10.0,
                      other_class="background")
    assert res.target_classes == ["lymphocyte", "plasma_cell"]
    card = Card(name="t", classes=tuple(classes), other_class="background")
    summary = build_summary(res, card, {}, {})
    assert list(summary["peak_hpf"]) == ["lymphocyte", "plasma_cell"]
    assert summary["model_card"]["other_class"] == "background"
    write_overlay(tmp_path / "overlay.png", res, summary)
    assert (tmp_path / "overlay.png").stat().st_size > 0
