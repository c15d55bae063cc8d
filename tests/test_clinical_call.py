"""The clinical call: rules, statuses that never overrule pending review cells, and the interval's
coverage of the true peak HPF count on unseen synthetic slides (the shipped model, real inference)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cellclf.errors import ConfigError
from cellclf.outputs.clinical_call import Rule, call_for_rule, clinical_calls, load_rules
from cellclf.outputs.hpf import peak_hpf

CLASSES = ["eosinophil", "neutrophil", "mast_cell", "other"]
ALPHAS = {c: 0.01 for c in CLASSES}


def test_default_rules_load_and_bad_rules_are_refused(tmp_path):
    rules = load_rules()
    assert {r.cls for r in rules} >= {"eosinophil", "mast_cell"}
    assert any(r.cls == "eosinophil" and r.threshold == 15 for r in rules)
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - name: x\n    class: eosinophil\n    threshold: 1.5\n")
    with pytest.raises(ConfigError, match="rule 1 is malformed"):
        load_rules(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_rules(tmp_path / "missing.yaml")


def _cluster(rng, n, centre, spread=50.0):
    return centre + rng.normal(0, spread, (n, 2))


def test_status_met_not_met_and_needs_review():
    rng = np.random.default_rng(0)
    rule = Rule("EoE", "eosinophil", 15)
    eos = _cluster(rng, 30, np.array([1000.0, 1000.0]))
    xy = np.concatenate([eos, _cluster(rng, 10, np.array([5000.0, 5000.0]))])
    pred = np.array([0] * 30 + [3] * 10)
    accept = np.ones(40, bool)
    call = call_for_rule(rule, xy, pred, accept, CLASSES, ALPHAS, 0.5, 0.237)
    assert call["status"] == "met" and call["interval"][0] >= 15
    assert abs(call["hpf"]["x"] - 1000) < 300 and abs(call["hpf"]["y"] - 1000) < 300
    # 10 accepted eosinophils, 6 pending cells nearby: could reach 15 → needs review
    accept2 = np.ones(40, bool)
    accept2[10:16] = False
    pred2 = pred.copy()
    pred2[16:30] = 3  # only 10 accepted eosinophils remain; the rest accepted as other
    accept2[16:30] = True
    call = call_for_rule(rule, xy, pred2, accept2, CLASSES, {c: 0.0 for c in CLASSES}, 0.5,
                         0.237)
    assert call["status"] == "needs review"
    assert call["interval"] == [10, 16]
    # the same with the pending cells gone: not met
    call = call_for_rule(rule, xy[16:], pred2[16:], accept2[16:], CLASSES,
                         {c: 0.0 for c in CLASSES}, 0.5, 0.237)
    assert call["status"] == "not met" and call["interval"][1] < 15
    # no cells at all
    empty = call_for_rule(rule, np.zeros((0, 2)), np.zeros(0, int), np.zeros(0, bool), CLASSES,
                          ALPHAS, 0.5, 0.237)
    assert empty["status"] == "not met" and empty["interval"] == [0, 0]


def test_rules_for_classes_the_model_lacks_are_skipped():
    calls, skipped = clinical_calls([Rule("SM", "mast_cell", 15)], np.zeros((0, 2)),
                                    np.zeros(0, int), np.zeros(0, bool), ["eosinophil", "other"],
                                    None, 0.5, 0.237)
    assert calls == [] and "no class 'mast_cell'" in skipped[0]["reason"]


def test_never_met_or_not_met_while_pending_cells_could_change_it():
    """Randomised: whenever the call is met / not met, every labelling of the pending cells (and
    gate errors within the interval's allowance) leaves the truth on the same side."""
    rng = np.random.default_rng(4)
    rule = Rule("EoE", "eosinophil", 15)
    for _ in range(60):
        n = int(rng.integers(5, 80))
        xy = rng.uniform(0, 2500, (n, 2))
        pred = rng.integers(0, 4, n)
        accept = rng.random(n) < 0.8
        call = call_for_rule(rule, xy, pred, accept, CLASSES, {c: 0.0 for c in CLASSES}, 0.5,
                             0.237)
        best = peak_hpf(xy[(pred == 0) | ~accept], 0.5, 0.237).count  # all pending → eos
        worst = peak_hpf(xy[(pred == 0) & accept], 0.5, 0.237).count  # none pending → eos
        if call["status"] == "met":
            assert worst >= 15
        elif call["status"] == "not met":
            assert best < 15
        else:
            assert worst < 15 <= best or call["interval"][0] < 15 <= call["interval"][1]


@pytest.mark.slow
def test_interval_covers_true_peak_on_unseen_synthetic_slides(shipped_model, tmp_path):
    from cellclf.annotations.geojson import read_points
    from cellclf.pipeline.batch import run_batch
    from cellclf.synth import render_slide

    slides = [render_slide(tmp_path / "slides", 1024, 1024, mpp=0.5, seed=7100 + i,
                           difficulty=0.3, fmt="tiff", name=f"cc{i}") for i in range(8)]
    out = tmp_path / "out"
    report = run_batch([str(s) for s, _ in slides], shipped_model, out, backend="onnx",
                       hpf_area_mm2=0.05)
    assert report.done == 8
    card = json.loads((shipped_model / "card.json").read_text())
    rules = [Rule(f"{c} test", c, 10) for c in card["classes"] if c != card.get("other_class")]
    rows = {r["slide_id"]: r for r in csv.DictReader((out / "manifest.csv").open())}
    covered, n = 0, 0
    for path, truth in slides:
        sid = Path(path).stem
        summary = json.loads((out / sid / "summary.json").read_text())
        calls = summary["clinical_call"]
        assert [c["rule"] for c in calls] == [r.text for r in load_rules()]
        for c in calls:
            assert set(c) >= {"rule", "class", "threshold", "status", "interval", "hpf"}
            assert c["status"] in ("met", "not met", "needs review")
        assert "eosinophilic oesophagitis" in rows[sid]["clinical_call"]
        assert int(rows[sid]["n_audited"]) == summary["audit"]["n_audited"]
        html = (out / sid / "report.html").read_text()
        assert html.index("Clinical call") < html.index("Counts")
        import pyarrow.parquet as pq

        cells = pq.read_table(out / sid / "cells.parquet").to_pydict()
        xy = np.stack([cells["x"], cells["y"]], axis=1)
        pred = np.array([card["classes"].index(c) for c in cells["class"]])
        accept = np.array(cells["decision"]) == "accepted"
        pts = read_points(truth)
        for area in (0.05, 0.1):
            got, _ = clinical_calls(rules, xy, pred, accept, card["classes"], card["gate"],
                                    summary["slide"]["mpp"], area)
            for call in got:
                t_xy = np.array([[p.x, p.y] for p in pts if p.name == call["class"]])
                true_peak = peak_hpf(t_xy.reshape(-1, 2), summary["slide"]["mpp"], area).count
                n += 1
                covered += call["interval"][0] <= true_peak <= call["interval"][1]
    print(f"clinical-call interval coverage: {covered}/{n}")
    assert n == 8 * 2 * 3
    assert covered / n >= 0.95, f"interval covered the true peak in {covered}/{n} cases"


def test_review_resolves_needs_review():
    rng = np.random.default_rng(1)
    rule = Rule("EoE", "eosinophil", 15)
    xy = _cluster(rng, 20, np.array([1000.0, 1000.0]))
    pred = np.zeros(20, int)
    accept = np.arange(20) < 10  # 10 accepted eosinophils, 10 pending
    zero = {c: 0.0 for c in CLASSES}
    before = call_for_rule(rule, xy, pred, accept, CLASSES, zero, 0.5, 0.237)
    assert before["status"] == "needs review" and before["interval"] == [10, 20]
    as_eos = np.where(accept, -1, 0)
    after = call_for_rule(rule, xy, pred, accept, CLASSES, zero, 0.5, 0.237, reviewed=as_eos)
    assert after["status"] == "met" and after["interval"] == [20, 20]
    as_other = np.where(accept, -1, 3)
    after = call_for_rule(rule, xy, pred, accept, CLASSES, zero, 0.5, 0.237, reviewed=as_other)
    assert after["status"] == "not met" and after["interval"] == [10, 10]
    cant_tell = np.full(20, -1)  # labelled "can't tell": still pending for the call
    after = call_for_rule(rule, xy, pred, accept, CLASSES, zero, 0.5, 0.237, reviewed=cant_tell)
    assert after["status"] == "needs review"


@pytest.mark.parametrize("accepted_share", [0.0, 0.6, 1.0])
def test_call_and_hotspot_name_the_same_field(accepted_share):
    rng = np.random.default_rng(3)
    xy0 = np.concatenate([_cluster(rng, 40, np.array([900.0, 700.0]), 300.0),
                          _cluster(rng, 40, np.array([3000.0, 2500.0]), 250.0),
                          rng.uniform(0, 4000, (200, 2))])
    pred = rng.integers(0, len(CLASSES), len(xy0))
    pred[:80] = 0
    accept = rng.random(len(xy0)) < accepted_share
    call = call_for_rule(Rule("EoE", "eosinophil", 15), xy0, pred, accept, CLASSES, ALPHAS,
                         mpp=0.5, hpf_area_mm2=0.237)
    hot = peak_hpf(xy0[pred == 0], 0.5, 0.237)
    assert (call["hpf"]["x"], call["hpf"]["y"]) == (hot.x, hot.y)
    assert call["point_estimate"] == hot.count
    assert call["interval"][0] <= hot.count <= call["interval"][1]
