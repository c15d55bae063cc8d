"""The running audit: reproducible sampling, the Clopper–Pearson alarm on injected errors (real
SQLite store, real `cellclf audit`), blind review over HTTP, and reviewer agreement blind vs seen."""

from __future__ import annotations

import io
import json
import re

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from cellclf.cli import app
from cellclf.gate.audit_bound import (
    agreement_report,
    audit_mask,
    audit_priority,
    audit_state,
    blind_mask,
)
from cellclf.model.config import DEFAULT_CLASSES
from cellclf.review.app import ServerThread, create_app
from cellclf.review.auth import add_user
from cellclf.review.store import ReviewItem, ReviewStore

ALPHA = 0.01


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 80, 80)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()


def test_audit_sampling_is_reproducible_and_at_the_rate():
    ids = np.arange(200_000)
    accept = np.ones(len(ids), bool)
    accept[::3] = False
    m = audit_mask("slide-7", ids, accept, 0.02)
    assert not m[~accept].any()  # only auto-accepted cells are audited
    assert m[accept].mean() == pytest.approx(0.02, abs=0.002)
    # the same cells whatever the batch boundaries; another slide, other cells
    parts = np.concatenate([audit_mask("slide-7", ids[s:s + 777], accept[s:s + 777], 0.02)
                            for s in range(0, len(ids), 777)])
    assert np.array_equal(parts, m)
    assert (audit_mask("slide-8", ids, accept, 0.02) != m).mean() > 0.02
    assert blind_mask("slide-7", ids, 0.1).mean() == pytest.approx(0.1, abs=0.005)
    pr = audit_priority("slide-7", ids)
    assert pr.min() >= 0 and pr.max() < 1


def test_audit_bound_power_and_false_alarms_by_simulation():
    """2 % audit of 5 000 accepted cells per class on each of 24 slides: n ≈ 2 400 audited."""
    rng = np.random.default_rng(11)
    n = rng.binomial(24 * 5000, 0.02, 400)
    alarm_3a = [audit_state(int(rng.binomial(k, 3 * ALPHA)), int(k), ALPHA)["state"] == "alarm"
                for k in n]
    half = [audit_state(int(rng.binomial(k, ALPHA / 2)), int(k), ALPHA)["state"] for k in n]
    at_a = [audit_state(int(rng.binomial(k, ALPHA)), int(k), ALPHA)["state"] for k in n]
    assert np.mean(alarm_3a) > 0.99
    assert half.count("alarm") == 0 and half.count("ok") / len(half) > 0.8
    assert at_a.count("alarm") / len(at_a) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 400)


def _fill_store(db: str, error_rate: float, seed: int, n_slides: int = 24,
                accepted_per_slide: int = 5000) -> tuple[ReviewStore, int]:
    """Accepted eosinophils on synthetic slides; the audit sample goes to the store, and a
    'reviewer' labels each with an injected error at ``error_rate``."""
    rng = np.random.default_rng(seed)
    st = ReviewStore(db, classes=list(DEFAULT_CLASSES))
    probs = {"eosinophil": 0.995, "neutrophil": 0.003, "mast_cell": 0.001, "other": 0.001}
    items = []
    for s in range(n_slides):
        sid = f"synth-{s}"
        ids = np.arange(accepted_per_slide)
        for cid in ids[audit_mask(sid, ids, np.ones(len(ids), bool), 0.02)]:
            items.append(ReviewItem(sid, int(cid), float(cid), 0.0, "eosinophil", probs,
                                    ["eosinophil"], "low_confidence", 0.5, PNG, b"",
                                    audit=True, site="scanner-A" if s % 2 else "scanner-B"))
    st.add_items(items)
    wrong = rng.random(len(items)) < error_rate
    n = 0
    while (it := st.claim("ann")) is not None:
        st.label("ann", it.id, "neutrophil" if wrong[n] else "eosinophil")
        n += 1
    return st, n


@pytest.mark.parametrize(("rate", "alarm"), [(3 * ALPHA, True), (ALPHA / 2, False)])
def test_cellclf_audit_alarms_at_3_alpha_and_is_quiet_at_half_alpha(tmp_path, rate, alarm):
    db = str(tmp_path / "review.sqlite")
    st, n = _fill_store(db, rate, seed=5)
    assert 2000 < n < 2800
    st.close()
    res = CliRunner().invoke(app, ["audit", "--db", db, "--alpha", str(ALPHA), "--json"])
    assert res.exit_code == (3 if alarm else 0), res.output
    report = json.loads(res.output)
    eos = report["audit"]["per_class"]["eosinophil"]
    assert eos["n_audited"] == eos["n_labelled"] == n
    assert eos["state"] == ("alarm" if alarm else "ok")
    assert report["audit"]["alarm"] is alarm
    assert set(report["audit"]["per_site"]) == {"scanner-A", "scanner-B"}
    if alarm:
        assert eos["lower_bound"] > ALPHA
    else:
        assert eos["upper_bound"] <= ALPHA
    # the audit items are blind, so every first answer was given without the model's answer
    assert report["agreement"]["ann"]["audit"]["n"] == n
    only_a = CliRunner().invoke(app, ["audit", "--db", db, "--site", "scanner-A", "--json"])
    assert set(json.loads(only_a.output)["audit"]["per_site"]) == {"scanner-A"}
    table = CliRunner().invoke(app, ["audit", "--db", db], env={"COLUMNS": "200"})
    assert ("ALARM" in table.output) is alarm and "reviewer agreement" in table.output
    exp = tmp_path / "cal.npz"
    res = CliRunner().invoke(app, ["audit", "--db", db, "--export-calibration", str(exp)])
    data = np.load(exp)
    assert data["probs"].shape == (n, 4) and data["audit"].all() and data["weight"][0] == 50.0
    assert len(set(data["slides"])) == 24


def test_agreement_blind_vs_seen_per_reviewer():
    answers = ([{"reviewer": "ann", "label": "eosinophil", "predicted": "eosinophil",
                 "blind": False, "audit": False}] * 9
               + [{"reviewer": "ann", "label": "other", "predicted": "eosinophil",
                   "blind": False, "audit": False}]
               + [{"reviewer": "ann", "label": "eosinophil", "predicted": "eosinophil",
                   "blind": True, "audit": False}] * 6
               + [{"reviewer": "ann", "label": "other", "predicted": "eosinophil",
                   "blind": True, "audit": False}] * 4
               + [{"reviewer": "ann", "label": "cant_tell", "predicted": "eosinophil",
                   "blind": True, "audit": False}])
    r = agreement_report(answers, "cant_tell")["ann"]
    assert r["seen"] == {"n": 10, "agreement": 0.9} and r["blind"] == {"n": 10, "agreement": 0.6}
    assert r["gap"] == pytest.approx(0.3) and r["audit"]["n"] == 0


def test_blind_review_over_http_hides_then_reveals(tmp_path):
    """The web app (real HTTP, real SQLite): a blind item comes without the model's answer; the
    label call reveals it; the store records the answer as blind; `cellclf audit` reports the
    reviewer's agreement blind vs seen."""
    db = str(tmp_path / "review.sqlite")
    st = ReviewStore(db, classes=list(DEFAULT_CLASSES))
    probs = {"eosinophil": 0.6, "neutrophil": 0.3, "mast_cell": 0.05, "other": 0.05}
    st.add_items([
        ReviewItem("s", 1, 1.0, 1.0, "eosinophil", probs, ["eosinophil"], "low_confidence",
                   0.9, PNG, b"", blind=True),
        ReviewItem("s", 2, 2.0, 1.0, "eosinophil", probs, ["eosinophil", "neutrophil"],
                   "low_confidence", 0.8, PNG, b""),
    ])
    add_user(st, "ann", "ann-password")
    with ServerThread(create_app(st)) as srv:
        c = httpx.Client(base_url=srv.url, follow_redirects=False, timeout=30)
        tok = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
        c.post("/login", data={"username": "ann", "password": "ann-password", "csrf_token": tok})
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', c.get("/").text).group(1)
        h = {"X-CSRF-Token": csrf}
        assert c.get("/").text.count("hidden (blind)") == 1  # the queue page hides it too
        first = c.post("/api/claim", json={}, headers=h).json()["item"]
        assert first["cell_id"] == 1 and first["blind"] is True
        assert first["predicted"] is None and first["top"] == [] and first["conformal_set"] == []
        assert "eosinophil" not in json.dumps({k: v for k, v in first.items()
                                               if k not in ("crop_url", "context_url")})
        r = c.post(f"/api/items/{first['id']}/label", json={"label": "neutrophil"},
                   headers=h).json()
        assert r["revealed"]["predicted"] == "eosinophil" and r["revealed"]["blind"] is False
        second = r["item"]
        assert second["cell_id"] == 2 and second["blind"] is False
        assert second["predicted"] == "eosinophil"
        c.post(f"/api/items/{second['id']}/label", json={"label": "eosinophil"}, headers=h)
        # a correction after the reveal is not a blind answer
        c.post("/api/claim", json={}, headers=h)
    answers = {a["label"]: a["blind"] for a in st.first_answers()}
    assert answers == {"neutrophil": True, "eosinophil": False}
    st.close()
    res = CliRunner().invoke(app, ["audit", "--db", db, "--json"])
    agr = json.loads(res.output)["agreement"]["ann"]
    assert agr["blind"] == {"n": 1, "agreement": 0.0} and agr["seen"] == {"n": 1,
                                                                         "agreement": 1.0}
    assert agr["gap"] == 1.0


def test_blind_all_hides_every_item(tmp_path):
    st = ReviewStore(str(tmp_path / "r.sqlite"), classes=list(DEFAULT_CLASSES))
    st.add_items([ReviewItem("s", 1, 1.0, 1.0, "other", {"other": 0.9, "eosinophil": 0.1},
                             ["other"], "low_confidence", 0.5, PNG, b"")])
    add_user(st, "bob", "bob-password")
    with ServerThread(create_app(st, blind_all=True)) as srv:
        c = httpx.Client(base_url=srv.url, follow_redirects=False, timeout=30)
        tok = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
        c.post("/login", data={"username": "bob", "password": "bob-password", "csrf_token": tok})
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', c.get("/").text).group(1)
        it = c.post("/api/claim", json={}, headers={"X-CSRF-Token": csrf}).json()["item"]
        assert it["blind"] is True and it["predicted"] is None
        c.post(f"/api/items/{it['id']}/label", json={"label": "other"},
               headers={"X-CSRF-Token": csrf})
    assert st.first_answers()[0]["blind"] is True
    st.close()


def test_schema_v3_upgrade_keeps_items_and_marks_old_labels_unknown(tmp_path):
    import sqlalchemy as sa

    from cellclf.review import schema as S

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    engine = S.make_engine(url)
    S.migrate(engine, target=2)
    engine.dispose()
    st = ReviewStore(url, classes=list(DEFAULT_CLASSES))
    with st.engine.connect() as c:
        assert S.current_version(c) == S.SCHEMA_VERSION  # v3 and later
        cols = {col["name"] for col in sa.inspect(c).get_columns("items")}
    assert {"audit", "blind", "site"} <= cols
    st.close()


@pytest.mark.slow
def test_infer_audits_accepted_cells_unmarked_and_finalize_leaves_them_out(tiny_svs,
                                                                          shipped_model,
                                                                          tmp_path):
    import sqlite3

    import pyarrow.parquet as pq

    from cellclf.pipeline.batch import run_batch
    from cellclf.review.finalize import finalize_results

    out = tmp_path / "out"
    run_batch([str(tiny_svs[0])], shipped_model, out, backend="onnx", audit_rate=0.3,
              site="lab-1")
    cells = pq.read_table(out / "tiny_svs" / "cells.parquet").to_pydict()
    audit = np.array(cells["audit"])
    accepted = np.array(cells["decision"]) == "accepted"
    assert audit.sum() > 0 and not audit[~accepted].any()
    assert audit[accepted].mean() == pytest.approx(0.3, abs=0.12)
    with sqlite3.connect(out / "review.sqlite") as con:
        rows = con.execute(
            "SELECT cell_id, reason, blind, site FROM items WHERE audit = 1").fetchall()
    assert sorted(r[0] for r in rows) == sorted(np.flatnonzero(audit).tolist())
    assert {r[1] for r in rows} == {"low_confidence"} and {r[2] for r in rows} == {1}
    assert {r[3] for r in rows} == {"lab-1"}
    summary = json.loads((out / "tiny_svs" / "summary.json").read_text())
    assert summary["audit"]["rate"] == 0.3 and summary["audit"]["n_audited"] == audit.sum()
    manifest = (out / "manifest.csv").read_text()
    assert "n_audited" in manifest.splitlines()[0]
    # a reviewer labels everything; the final counts do not count audit cells twice
    st = ReviewStore(str(out / "review.sqlite"))
    while (it := st.claim("ann")) is not None:
        st.label("ann", it.id, it.predicted)
    final = finalize_results(st, out)["tiny_svs"]
    assert final["reviewed"] == int((~accepted).sum())
    for c, v in summary["counts"].items():
        assert final["counts"][c] == v["accepted"] + final["reviewed_as"].get(c, 0)
    st.close()
    # the clinical call is recomputed with the agreed labels: no pending cell is left
    after = json.loads((out / "tiny_svs" / "summary.json").read_text())
    assert after["clinical_call_at_inference"] == summary["clinical_call"]
    for old, new in zip(summary["clinical_call"], after["clinical_call"], strict=True):
        assert new["rule"] == old["rule"]
        assert old["interval"][0] <= new["interval"][0] <= new["interval"][1] \
            <= old["interval"][1]
        assert "pending review cell(s) in the densest field" not in new["reason"] \
            or "0 pending" in new["reason"]


def _audit_cells(n: int, wrong_below: float, wrong_rate: float, seed: int):
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.5, 1.0, n)
    probs = np.zeros((n, 4))
    probs[:, 0] = conf
    probs[:, 3] = 1 - conf
    wrong = (conf < wrong_below) & (rng.random(n) < wrong_rate)
    labels = np.where(wrong, 3, 0)
    slides = rng.integers(0, 40, n).astype(str)
    return probs, labels, slides, np.ones(n, bool)


def test_refit_from_audit_only_raises_thresholds():
    from cellclf.gate.audit_bound import refit_from_audit

    old = {"eosinophil": 0.5, "neutrophil": 0.9, "mast_cell": None, "other": 0.6}
    probs, labels, slides, audit = _audit_cells(3000, 0.8, 0.3, 1)
    r = refit_from_audit(probs, labels, slides, audit, list(DEFAULT_CLASSES), old, 0.01, 0.05, 7)
    assert 0.78 <= r["thresholds"]["eosinophil"] < 0.9  # raised to the edge of the bad band
    assert r["thresholds"]["mast_cell"] is None and r["thresholds"]["neutrophil"] == 0.9
    assert "kept" in r["notes"]["neutrophil"]  # no audited neutrophils: nothing to refit
    probs, labels, slides, audit = _audit_cells(3000, 1.01, 0.05, 2)  # 5 % wrong everywhere
    r = refit_from_audit(probs, labels, slides, audit, list(DEFAULT_CLASSES), old, 0.01, 0.05, 7)
    assert r["thresholds"]["eosinophil"] is None and "go to review" in r["notes"]["eosinophil"]


@pytest.mark.slow
def test_calibrate_from_review_writes_raised_thresholds(random_bundle, tmp_path):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(random_bundle, bundle)
    probs, labels, slides, audit = _audit_cells(3000, 0.8, 0.3, 3)
    npz = tmp_path / "review.npz"
    np.savez(npz, probs=probs, labels=labels, slides=slides, audit=audit,
             classes=np.array(list(DEFAULT_CLASSES)), weight=np.full(len(labels), 50.0))
    runner = CliRunner()
    neither = runner.invoke(app, ["calibrate", str(bundle)])
    assert neither.exit_code != 0 and "--from-review" in str(neither.exception)
    res = runner.invoke(app, ["calibrate", str(bundle), "--from-review", str(npz)])
    assert res.exit_code == 0, res.output
    gate = json.loads((bundle / "card.json").read_text())["gate"]
    assert gate["thresholds"]["eosinophil"] >= 0.78
    assert gate["refit_from_audit"]["previous_thresholds"]["eosinophil"] == 0.5
    assert "eosinophil: 0.5000 →" in res.output


def test_class_filter_never_reveals_blind_cells(tmp_path):
    """Filtering the queue by the model's class would tell the reviewer a blind cell's model
    label: blind cells are left out of class-filtered queues, claims and progress."""
    st = ReviewStore(str(tmp_path / "r.sqlite"), classes=list(DEFAULT_CLASSES))
    probs = {"eosinophil": 0.7, "other": 0.3}
    st.add_items([ReviewItem("s", 1, 1.0, 1.0, "eosinophil", probs, ["eosinophil"],
                             "low_confidence", 0.9, PNG, b"", blind=True),
                  ReviewItem("s", 2, 2.0, 1.0, "eosinophil", probs, ["eosinophil"],
                             "low_confidence", 0.5, PNG, b"")])
    assert [it.cell_id for it in st.queue(predicted="eosinophil")] == [2]
    assert [it.cell_id for it in st.queue()] == [1, 2]
    assert st.progress(predicted="eosinophil")["total"] == 1
    claimed = st.claim("ann", predicted="eosinophil")
    assert claimed is not None and claimed.cell_id == 2
    assert st.claim("bob", predicted="eosinophil") is None
    assert st.claim("bob").cell_id == 1  # the blind cell is served without a class filter
    st.close()
