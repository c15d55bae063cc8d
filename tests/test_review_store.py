"""Review store: idempotent filling, leases, append-only audit, undo, double review, migrations —
on SQLite and on a real throwaway PostgreSQL server; plus export, finalize and the CLI."""

from __future__ import annotations

import io
import itertools
import json

import numpy as np
import pytest
import sqlalchemy as sa

from cellclf.review import schema as S
from cellclf.review.stats import agreement, cohen_kappa, labels_per_hour
from cellclf.review.store import (
    LeaseError,
    ReviewItem,
    ReviewStore,
    ReviewStoreError,
    consensus,
)

_names = itertools.count()


def png(rgb: tuple[int, int, int] = (200, 60, 60), size: int = 8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, "PNG")
    return buf.getvalue()


PNG = png()


def item(cell_id: int, slide: str = "s1", priority: float | None = None,
         predicted: str = "eosinophil", **kw) -> ReviewItem:
    return ReviewItem(slide_id=slide, cell_id=cell_id, x=10.0 * cell_id, y=5.0,
                      predicted=predicted, probs={"eosinophil": 0.55, "neutrophil": 0.3,
                                                  "other": 0.15},
                      conformal_set=["eosinophil", "neutrophil"], reason="low_confidence",
                      priority=float(cell_id if priority is None else priority),
                      crop_png=PNG, context_image=PNG, **kw)


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "review.sqlite")
    return request.getfixturevalue("pg").new_database(f"store_{next(_names)}")


def test_add_items_is_idempotent(url):
    st = ReviewStore(url)
    assert st.add_items([item(i) for i in range(5)]) == 5
    assert st.add_items([item(i) for i in range(5)]) == 0
    # overlap + a duplicate inside one batch + small batches: only the 3 new cells count
    assert st.add_items([item(3), item(5), item(5), item(6), item(7)], batch=2) == 3
    assert st.add_items([item(0, slide="s2")]) == 1
    assert st.progress() == {"total": 9, "done": 0, "pending": 9, "claimed": 0}
    assert st.progress("s2")["total"] == 1
    assert st.slides() == ["s1", "s2"]
    assert st.image(st.claim("r").id, "crop") == PNG


def test_bad_items_are_refused_with_the_cell_named(url):
    st = ReviewStore(url)
    with pytest.raises(ReviewStoreError, match=r"slide 's1', cell 4.*'basophil'"):
        st.add_items([item(4, predicted="basophil")])
    bad = item(5)
    bad.reason = "bored"
    with pytest.raises(ReviewStoreError, match="reason 'bored'"):
        st.add_items([bad])
    bad = item(6)
    bad.crop_png = b"GIF89a..."
    with pytest.raises(ReviewStoreError, match="crop_png is not a PNG"):
        st.add_items([bad])
    bad = item(7)
    bad.context_image = b"GIF89a..."
    with pytest.raises(ReviewStoreError, match="neither empty nor a PNG/JPEG"):
        st.add_items([bad])
    assert st.progress()["total"] == 0
    ok = item(8)
    ok.context_image = b"\xff\xd8\xff\xe0" + b"\0" * 20  # a JPEG context view is accepted
    assert st.add_items([ok]) == 1


def test_claim_order_filters_and_exclusive_holds(url):
    st = ReviewStore(url)
    st.add_items([item(i, priority=p) for i, p in enumerate([0.2, 0.9, 0.5, 0.7])])
    st.add_items([item(9, slide="s2", priority=5.0, predicted="mast_cell")])
    a = st.claim("ann")
    assert (a.slide_id, a.cell_id, a.claimed_by) == ("s2", 9, "ann")
    assert st.claim("ann").id == a.id, "a reviewer's own held cell comes back first"
    b = st.claim("bob")
    assert (b.slide_id, b.cell_id) == ("s1", 1)
    assert st.claim("cat", slide_id="s1").cell_id == 3
    assert st.claim("dan", predicted="mast_cell") is None
    assert st.claim("eve", exclude=[st.claim("eve").id]).cell_id == 0
    assert st.progress()["claimed"] == 5  # eve holds two
    assert [i.cell_id for i in st.queue("s1")] == [1, 3, 2, 0]
    assert st.release("ann", a.id) and not st.release("bob", a.id)
    assert st.claim("bob2").id == a.id


def test_expired_lease_returns_the_cell_to_the_queue(url):
    clock = Clock()
    st = ReviewStore(url, clock=clock)
    st.add_items([item(1)])
    a = st.claim("ann", lease_s=10)
    assert st.claim("bob") is None
    clock.t += 11
    b = st.claim("bob", lease_s=10)
    assert b is not None and b.id == a.id
    with pytest.raises(LeaseError, match="held by bob"):
        st.label("ann", a.id, "neutrophil")
    st.label("bob", b.id, "neutrophil")
    clock.t += 100
    with pytest.raises(LeaseError):  # never claimed by cat
        st.label("cat", a.id, "other")
    assert st.final_labels("s1")[0].label == "neutrophil"


def test_labels_are_append_only_and_undo_walks_back(url):
    clock = Clock()
    st = ReviewStore(url, clock=clock)
    st.add_items([item(1), item(2)])
    a = st.claim("ann")
    with pytest.raises(ReviewStoreError, match="'basophil' is not one of"):
        st.label("ann", a.id, "basophil")
    clock.t += 1
    st.label("ann", a.id, "neutrophil")
    assert st.progress()["done"] == 1
    clock.t += 1
    st.label("ann", a.id, "other")  # a correction of an own label: allowed without a lease
    assert st.get(a.id, "ann").label == "other"
    undone = st.undo("ann")
    assert (undone.id, undone.label, undone.claimed_by) == (a.id, "neutrophil", "ann")
    undone = st.undo("ann")
    assert undone.label is None and st.progress()["done"] == 0
    assert st.undo("ann") is None
    rows = [(r["reviewer"], r["label"], r["previous_label"], r["action"]) for r in st.audit()]
    assert rows == [("ann", "neutrophil", None, "label"), ("ann", "other", "neutrophil", "label"),
                    ("ann", "neutrophil", "other", "undo"), ("ann", None, "neutrophil", "undo")]
    b = st.claim("ann")
    assert b.id == a.id, "after undo the cell is held by the reviewer again"
    st.label("ann", b.id, "cant_tell")
    assert [h.label for h in st.history("ann")] == ["cant_tell"]
    assert {f.cell_id: (f.label, f.status) for f in st.final_labels("s1")} == {
        2: ("cant_tell", "done"), 1: (None, "pending")}


def test_double_review_needs_two_reviewers_and_reports_disagreement(url):
    st = ReviewStore(url, required_reviews=2)
    st.add_items([item(1, priority=2), item(2, priority=1)])
    a = st.claim("ann")
    st.label("ann", a.id, "eosinophil")
    a2 = st.claim("ann")
    assert a2.id != a.id, "a reviewer is not served a cell they already labelled"
    st.label("ann", a2.id, "neutrophil")
    assert st.claim("ann") is None
    b = st.claim("bob")
    assert b.id == a.id
    st.label("bob", b.id, "eosinophil")
    st.label("bob", st.claim("bob").id, "mast_cell")
    assert st.claim("cat") is None and st.progress()["done"] == 2
    finals = {f.cell_id: f for f in st.final_labels("s1")}
    assert (finals[1].label, finals[1].status) == ("eosinophil", "done")
    assert (finals[2].label, finals[2].status) == (None, "disputed")
    assert finals[2].votes == {"ann": "neutrophil", "bob": "mast_cell"}
    ag = agreement(st.current_votes())
    assert ag["n_items"] == 2 and ag["agree_rate"] == 0.5
    assert ReviewStore(url).required_reviews == 2, "the setting is stored"


def test_classes_are_stored_per_store(url):
    st = ReviewStore(url, classes=["a", "b"])
    assert st.labels == ["a", "b", "cant_tell"]
    assert ReviewStore(url).classes == ["a", "b"]
    with pytest.raises(ReviewStoreError, match="holds classes"):
        ReviewStore(url, classes=["x", "y"])
    st.set_classes(["b", "a"])  # empty store: may change
    assert ReviewStore(url).classes == ["b", "a"]
    it = item(1, predicted="a")
    it.probs, it.conformal_set = {"a": 0.6, "b": 0.4}, ["a"]
    st.add_items([it])
    with pytest.raises(ReviewStoreError, match="already holds cells"):
        st.set_classes(["a", "b", "c"])


def test_upgrade_from_schema_version_1(url):
    engine = S.make_engine(url)
    assert S.migrate(engine, target=1) == 1
    md = sa.MetaData()
    items_v1 = sa.Table("items", md, autoload_with=engine)
    labels_v1 = sa.Table("labels", md, autoload_with=engine)
    assert "n_labels" not in items_v1.c and "undoes" not in labels_v1.c
    row = dict(slide_id="old", x=1.0, y=2.0, predicted="other", probs="{}", conformal_set="[]",
               reason="low_confidence", created_at=0.0)
    with engine.begin() as c:
        c.execute(sa.insert(S.meta).values(key="classes", value=json.dumps(
            ["eosinophil", "neutrophil", "mast_cell", "other"])))
        c.execute(sa.insert(items_v1), [dict(row, cell_id=i, priority=float(i)) for i in range(3)])
        c.execute(sa.insert(sa.Table("images", md, autoload_with=engine)),
                  [dict(slide_id="old", cell_id=i, crop_png=PNG, context_png=PNG)
                   for i in range(3)])
        ids = [r.id for r in c.execute(sa.select(items_v1.c.id).order_by(items_v1.c.cell_id))]
        c.execute(sa.insert(labels_v1), [
            dict(item_id=ids[2], reviewer="ann", at=1.0, label="eosinophil", previous_label=None),
            dict(item_id=ids[1], reviewer="ann", at=2.0, label="other", previous_label=None),
            dict(item_id=ids[1], reviewer="ann", at=3.0, label=None, previous_label="other"),
        ])
    engine.dispose()
    st = ReviewStore(url)  # upgrades to the current version
    with st.engine.connect() as c:
        assert S.current_version(c) == S.SCHEMA_VERSION == 4
    assert st.progress("old") == {"total": 3, "done": 1, "pending": 2, "claimed": 0}
    assert {f.cell_id: f.label for f in st.final_labels("old")} == {0: None, 1: None,
                                                                   2: "eosinophil"}
    claimed = st.claim("bob")
    assert claimed.cell_id == 1, "the labelled cell (2) is not served again"
    assert (claimed.image_mpp, claimed.slide_mpp) == (None, None)  # queued before version 4
    with st.engine.begin() as c:
        c.execute(sa.update(S.schema_version).values(version=99))
    with pytest.raises(ReviewStoreError, match="newer than this cellclf"):
        ReviewStore(url)


def test_pure_maths_hand_computed():
    assert consensus([], 1) == (None, "pending")
    assert consensus(["a"], 2) == (None, "pending")
    assert consensus(["a", "a"], 2) == ("a", "done")
    assert consensus(["a", "b"], 2) == (None, "disputed")
    assert labels_per_hour([0, 60, 120, 10000, 10030]) == pytest.approx(72.0)
    assert labels_per_hour([5.0]) is None
    assert cohen_kappa(["x", "x", "y", "y"], ["x", "y", "y", "y"]) == pytest.approx(0.5)
    assert cohen_kappa(["x", "x"], ["x", "x"]) is None
    ag = agreement({1: {"a": "x", "b": "x"}, 2: {"a": "x", "b": "y"}, 3: {"a": "y"}})
    assert ag["n_items"] == 2 and ag["pairs"][0]["agree_rate"] == 0.5


def test_bad_url_and_missing_folder_are_clear_errors(tmp_path):
    with pytest.raises(ReviewStoreError, match="does not exist"):
        ReviewStore(str(tmp_path / "nope" / "r.sqlite"))
    with pytest.raises(ReviewStoreError, match="only sqlite"):
        ReviewStore("mysql://x/y")


# ------------------------------------------------------------------ export, finalize, CLI


def _reviewed_store(path) -> ReviewStore:
    st = ReviewStore(str(path))
    st.add_items([item(i, slide="case<1>", predicted="eosinophil") for i in range(4)])
    st.add_items([item(0, slide="../evil", predicted="neutrophil")])
    for lab in ["neutrophil", "eosinophil", "cant_tell"]:
        st.label("ann", st.claim("ann").id, lab)
    return st


def test_export_writes_qupath_geojson_training_can_read(tmp_path):
    from cellclf.annotations.geojson import read_points
    from cellclf.review.label_export import export_labels

    st = _reviewed_store(tmp_path / "r.sqlite")
    out = tmp_path / "labels"
    tally = export_labels(st, out)
    assert sorted(p.name for p in out.iterdir()) == ["_.._evil.geojson", "case_1_.geojson",
                                                    "export.json"]
    t = tally["case<1>"]
    assert (t["labelled"], t["cant_tell"], t["pending"], t["written"]) == (2, 1, 1, 2)
    pts = read_points(out / "case_1_.geojson")
    assert sorted((p.x, p.name) for p in pts) == [(20.0, "eosinophil"), (30.0, "neutrophil")]
    assert all(p.properties["review_status"] == "done" for p in pts)
    export_labels(st, out, include_uncertain=True)
    pts = read_points(out / "case_1_.geojson")
    assert sorted((p.x, p.name, p.properties["review_status"]) for p in pts) == [
        (0.0, None, "pending"), (10.0, None, "cant_tell"), (20.0, "eosinophil", "done"),
        (30.0, "neutrophil", "done")]


def _results_dir(tmp_path, slide_id: str, pred: list[int], accept: list[bool]):
    from cellclf.card import Card
    from cellclf.outputs.results import SlideResult, write_slide_results

    n, classes = len(pred), ["eosinophil", "neutrophil", "mast_cell", "other"]
    probs = np.full((n, 4), 0.1, np.float32)
    probs[np.arange(n), pred] = 0.7
    res = SlideResult(slide_id=slide_id, path="x.svs", mpp=0.5, width=400, height=400,
                      vendor=None, classes=classes, xy0=np.arange(2 * n, dtype=float).reshape(n, 2),
                      probs=probs, accept=np.array(accept),
                      reason=np.where(accept, "accepted", "low_confidence"),
                      conformal=np.ones((n, 4), bool), tissue_area_mm2=0.04,
                      thumbnail=np.full((40, 40, 3), 230, np.uint8), thumb_downsample=10.0,
                      other_class="other")
    card = Card(name="t", classes=tuple(classes))
    return write_slide_results(tmp_path / "results", res, card, {}, {})


def test_finalize_adds_final_counts_and_refreshes_the_report(tmp_path):
    from cellclf.review.finalize import finalize_results

    st = _reviewed_store(tmp_path / "r.sqlite")
    # 3 eosinophils accepted, 4 eosinophil predictions to review (cells 0..3 in the store)
    slide_dir = _results_dir(tmp_path, "case<1>", [0] * 7 + [1], [True] * 3 + [False] * 4 + [True])
    done = finalize_results(st, tmp_path / "results")
    final = json.loads((slide_dir / "summary.json").read_text())["final"]
    assert done["case<1>"] == final
    # reviewed: cell 3 → neutrophil, cell 2 → eosinophil, cell 1 → can't tell, cell 0 pending
    assert final["counts"] == {"eosinophil": 3 + 1, "neutrophil": 1 + 1, "mast_cell": 0,
                               "other": 0}
    assert (final["reviewed"], final["pending"], final["cant_tell"]) == (2, 1, 1)
    assert "4 reviewed" not in (slide_dir / "report.html").read_text()
    assert "2 reviewed, 1 pending, 1 can" in (slide_dir / "report.html").read_text()
    with pytest.raises(ReviewStoreError, match="no <slide>/summary.json"):
        finalize_results(st, tmp_path)


def test_cli_init_add_user_export_finalize(tmp_path):
    from typer.testing import CliRunner

    from cellclf.cli import app
    from cellclf.review.auth import verify_password

    db = str(tmp_path / "cli.sqlite")
    run = CliRunner().invoke
    r = run(app, ["review", "init", "--db", db, "--reviews", "2"])
    assert r.exit_code == 0 and "2 review(s) per cell" in r.output
    r = run(app, ["review", "add-user", "ann", "--db", db, "--admin", "--password-stdin"],
            input="correct horse\n")
    assert r.exit_code == 0, r.output
    st = ReviewStore(db)
    assert verify_password(st, "ann", "correct horse") and not verify_password(st, "ann", "x")
    r = run(app, ["review", "add-user", "ann", "--db", db, "--password-stdin"], input="another1\n")
    assert r.exit_code != 0 and "already exists" in str(r.exception)
    st.add_items([item(1)])
    r = run(app, ["review", "export", "--db", db, "--out", str(tmp_path / "x")])
    assert r.exit_code == 0 and "s1: 0 labelled" in r.output
    _results_dir(tmp_path, "s1", [0, 0], [True, False])
    r = run(app, ["review", "finalize", "--db", db, "--results", str(tmp_path / "results")])
    assert r.exit_code == 0 and "eosinophil 1" in r.output and "1 pending" in r.output
