"""``cellclf label`` end to end on unlabelled synthetic slides: a project, rounds of simulated
labels (a labeller who answers with the truth GeoJSON, through the review store's claim/label
API), training, held-aside estimates, and a calibrated bundle at the end."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _cli import cli as run_cli
from scipy.spatial import cKDTree

from cellclf.annotations.geojson import read_points
from cellclf.card import DEFAULT_MODEL, resolve_model
from cellclf.errors import ConfigError
from cellclf.labelling.project import Project, ProjectConfig
from cellclf.labelling.rounds import read_labels
from cellclf.review.store import NOT_A_CELL, ReviewStore

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("eosinophil", "neutrophil", "mast_cell")


def cli(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "cellclf.cli", *args], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def answer_with_truth(db: Path, truth: dict[str, Path], mpp: float, reviewer: str,
                      limit: int | None = None) -> int:
    """Label queued cells as the truth says (nearest truth cell within 4 µm; non-target kinds
    are `other`; no truth cell near = not a cell); returns how many were labelled."""
    st = ReviewStore(str(db))
    trees = {}
    for sid, path in truth.items():
        pts = read_points(path)
        trees[sid] = (cKDTree([(p.x, p.y) for p in pts]),
                      [p.name if p.name in TARGETS else "other" for p in pts])
    n = 0
    while limit is None or n < limit:
        item = st.claim(reviewer)
        if item is None:
            break
        tree, names = trees[item.slide_id]
        d, j = tree.query([item.x, item.y])
        st.label(reviewer, item.id, names[j] if d * mpp <= 4.0 else NOT_A_CELL)
        n += 1
    st.close()
    return n


@pytest.fixture(scope="module")
def lab_slides(tmp_path_factory) -> tuple[list[Path], dict[str, Path]]:
    from cellclf.synth import render_slide

    d = tmp_path_factory.mktemp("lab")
    pairs = [render_slide(d, 2048, 2048, mpp=0.25, seed=s, difficulty=0.3, fmt="tiff",
                          name=f"lab{s}", workers=2) for s in (21, 22)]
    return [p[0] for p in pairs], {p[0].stem: p[1] for p in pairs}


@pytest.mark.slow
def test_label_rounds_to_a_calibrated_bundle(lab_slides, tmp_path):
    slides, truth = lab_slides
    proj = tmp_path / "project"
    cli("label", *map(str, slides), "--out", str(proj), "--batch", "60", "--holdout", "0.3",
        "--config", str(REPO / "configs" / "train-tiny.yaml"), "--workers", "2")
    p = Project(proj)
    cfg = p.load_config()
    pool = p.load_pool()
    assert [s.slide_id for s in cfg.slides] == ["lab21", "lab22"]
    db = proj / "review.sqlite"
    st = ReviewStore(str(db))
    assert st.mode == "labelling" and NOT_A_CELL in st.labels
    first = st.item_keys()
    assert len(first) == 60
    assert {k[0] for k in first} == {"lab21", "lab22"}  # the first batch covers both slides
    assert sum(k[2] == "held_aside" for k in first) == 18
    st.close()

    # two reviewers at once: every queued cell labelled once, none lost
    assert answer_with_truth(db, truth, 0.25, "ana", limit=25) == 25
    assert answer_with_truth(db, truth, 0.25, "ben") == 35
    reports = []
    for _ in range(2):
        cli("label", "--next", str(proj))
        reports.append(json.loads((p.round_dir(len(reports) + 1) / "report.json").read_text()))
        answer_with_truth(db, truth, 0.25, "ana")
    r1, r2 = reports
    assert r1["labels"]["total"] == 60  # the truth labeller never says "can't tell"
    assert r2["labels"]["total"] == r1["labels"]["total"] + 60
    for r in reports:
        est = r["held_aside_estimate"]
        assert est["n"] == r["labels"]["held_aside"] > 0
        assert 0.0 <= est["accuracy"] <= 1.0
        need = r["calibration_needs"]
        assert set(need) == set(cfg.classes)
        assert all(v["needed"] > v["held_aside"] or v["more"] == 0 for v in need.values())
        assert r["queued"] == {"to_label": 42, "held_aside": 18}
    # labels are never lost: everything in the audit is in the project's labels
    st = ReviewStore(str(db))
    labels = read_labels(st, cfg, pool)
    assert len(labels.index) == len(set(labels.index.tolist())) == 180
    st.close()
    # round 1's active picks are more uncertain under round 1's model than its random ones
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT reason, probs FROM items WHERE priority <= -1 AND priority > -2")
        margin = {"to_label": [], "held_aside": []}
        for reason, probs in rows:
            p_sorted = np.sort(list(json.loads(probs).values()))
            margin[reason].append(p_sorted[-1] - p_sorted[-2])
    assert len(margin["to_label"]) == 42 and len(margin["held_aside"]) == 18
    # (medians: a confident start model gives margins near 1 with a few outliers either way)
    assert np.median(margin["to_label"]) < np.median(margin["held_aside"])

    out = cli("label", "--calibrate", str(proj)).stdout
    assert "calibrated" in out
    card = json.loads((p.round_dir(2) / "bundle" / "card.json").read_text())
    # round 2 fine-tuned round 1's bundle; round 1 the shipped model (the project's init)
    assert card["training"]["config"]["train"]["init"] == str(p.round_dir(1) / "bundle")
    first = json.loads((p.round_dir(1) / "bundle" / "card.json").read_text())
    assert first["training"]["config"]["train"]["init"] == str(resolve_model(cfg.init))
    assert first["training"]["init"]["name"] == DEFAULT_MODEL
    assert first["architecture"]["backbone"] == "regnet_y_400mf"
    assert card["gate"]["classes"] == cfg.classes
    assert card["calibration"]["n_cells"] == int(labels.held_aside.sum())
    assert "temperature" in card and card["ood"]
    # the calibrated bundle classifies a lab slide with its own gate
    cli("infer", str(slides[0]), "--model", str(p.round_dir(2) / "bundle"), "--out",
        str(tmp_path / "infer"), "--backend", "torch", "--workers", "2")
    summary = json.loads((tmp_path / "infer" / "lab21" / "summary.json").read_text())
    assert summary["n_cells"] > 50


def test_round_training_config(tmp_path):
    """A default project fine-tunes the shipped model for the label loop's short schedule with no
    validation split; the previous round's bundle wins over init; "" trains from scratch; a
    project's own YAML is used as written; a missing init is refused at the start."""
    cfg = ProjectConfig(classes=["a", "b", "rest"], other_class="rest")
    tc = cfg.training_config()
    assert tc.train.init == str(resolve_model(DEFAULT_MODEL))
    assert tc.data.val_fraction == 0 and tc.train.patience == 0
    assert tc.train.min_steps == 150 and tc.model.backbone == "regnet_y_400mf"
    assert list(tc.data.classes) == ["a", "b", "rest"] and tc.data.other_class == "rest"
    previous = tmp_path / "rounds" / "01" / "bundle"
    assert cfg.training_config(previous).train.init == tc.train.init  # no bundle there yet
    previous.mkdir(parents=True)
    (previous / "card.json").write_text("{}")
    assert cfg.training_config(previous).train.init == str(previous)
    cfg.init = ""
    assert cfg.training_config().train.init == ""
    cfg.train_config = str(REPO / "configs" / "train-tiny.yaml")
    assert cfg.training_config().train.epochs == 2  # the YAML, not the label loop's schedule
    with pytest.raises(ConfigError, match="--init none"):
        ProjectConfig(init=str(tmp_path / "no-such-bundle")).check("project.yaml")


def test_label_refuses_a_missing_init(capsys, tmp_path):
    code, text = run_cli(capsys, "label", tmp_path / "slide.svs", "--out", tmp_path / "p",
                         "--init", tmp_path / "no-bundle")
    assert code == 2 and "--init none" in text and "no-bundle" in text
    assert not (tmp_path / "p").exists()  # refused before any detection
