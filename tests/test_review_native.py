"""Review images at the scan's native resolution (issue 17): the stored views are small JPEGs at
the model's µm/px (≤ 10 KB per queued cell on real slide pixels), the app cuts the same field of
view from the slide at level 0 while the slide is reachable and falls back to the stored images
when it is not; every view carries its µm/px."""

from __future__ import annotations

import io
import re
import shutil
import sqlite3

import httpx
import numpy as np
import pytest

from cellclf.detect.classical import detect_cells
from cellclf.pipeline.host_stage import review_items
from cellclf.pipeline.stage import REVIEW_CONTEXT_PX
from cellclf.review.app import ServerThread, create_app
from cellclf.review.auth import add_user
from cellclf.review.native_view import NativeViews, native_box, native_side_px
from cellclf.review.store import ReviewItem, ReviewStore, ReviewStoreError
from cellclf.wsi.crops import cut_crops
from cellclf.wsi.slide import Slide
from tests._cli import cli

CLASSES = ["eosinophil", "neutrophil", "mast_cell", "other"]
WORK_MPP, CROP_PX = 0.5, 64


def decode(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def gated_cells(slide_path, n_max: int = 400):
    """Real crops and context views of the slide's detected cells at the model's 0.5 µm/px."""
    with Slide(slide_path) as slide:
        w, h = slide.width // 2, slide.height // 2
        rgb = slide.read_region_mpp(0, 0, slide.width, slide.height, w, h)
        slide_mpp = slide.mpp
    centres = detect_cells(rgb, WORK_MPP)
    assert len(centres) >= 50, "the tiny slide should have cells"
    centres = centres[:n_max]
    return (centres * 2.0, cut_crops(rgb, centres, CROP_PX),
            cut_crops(rgb, centres, REVIEW_CONTEXT_PX), slide_mpp)


def test_stored_views_fit_10_kb_per_queued_cell_and_stay_faithful(tiny_slide, tmp_path):
    xy0, crops, ctx, slide_mpp = gated_cells(tiny_slide[0])
    n = len(xy0)
    probs = np.full((n, 4), 0.25, np.float32)
    probs[:, 0] = 0.4
    items = review_items("tiny", str(tiny_slide[0]), np.arange(n), xy0, probs / probs.sum(1)[:, None],
                         np.array(["low_confidence"] * n), np.ones((n, 4), bool), crops, ctx,
                         CLASSES, np.linspace(1, 0, n), image_mpp=WORK_MPP, slide_mpp=slide_mpp)
    db = tmp_path / "review.sqlite"
    st = ReviewStore(str(db))
    assert st.add_items(items) == n
    st.engine.dispose()
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.execute("VACUUM")
    con.close()
    per_cell = db.stat().st_size / n
    assert per_cell <= 10 * 1024, f"{per_cell:.0f} B per queued cell"
    for it, crop, view in zip(items[:50], crops, ctx, strict=False):
        assert it.crop_png[:3] == it.context_image[:3] == b"\xff\xd8\xff"  # JPEG, both
        assert np.abs(decode(it.crop_png) - crop).mean() < 4.0
        assert np.abs(decode(it.context_image) - view).mean() < 6.0
        assert (it.image_mpp, it.slide_mpp) == (WORK_MPP, slide_mpp)


def test_store_refuses_a_bad_pixel_size(tmp_path):
    st = ReviewStore(str(tmp_path / "r.sqlite"))
    bad = ReviewItem("s", 1, 1.0, 2.0, "other", {"other": 1.0}, ["other"], "low_confidence", 1.0,
                     b"\xff\xd8\xff\xe0" + b"\0" * 20, b"", image_mpp=-0.5)
    with pytest.raises(ReviewStoreError, match="image_mpp must be a positive number"):
        st.add_items([bad])


def login(url: str, user: str, password: str) -> tuple[httpx.Client, dict]:
    c = httpx.Client(base_url=url, follow_redirects=False, timeout=30)
    tok = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
    assert c.post("/login", data={"username": user, "password": password,
                                  "csrf_token": tok}).status_code == 303
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', c.get("/").text).group(1)
    return c, {"X-CSRF-Token": csrf}


def queued_cells(slide_id: str, slide_path, n_max: int):
    """(xy0, review items, slide mpp) of up to ``n_max`` gated cells of a slide, as infer queues
    them (fixed probabilities, all low confidence)."""
    xy0, crops, ctx, slide_mpp = gated_cells(slide_path, n_max=n_max)
    n = len(xy0)
    items = review_items(slide_id, str(slide_path), np.arange(n), xy0,
                         np.tile([[0.4, 0.3, 0.2, 0.1]], (n, 1)), np.array(["low_confidence"] * n),
                         np.ones((n, 4), bool), crops, ctx, CLASSES, np.linspace(1, 0, n),
                         image_mpp=WORK_MPP, slide_mpp=slide_mpp)
    return xy0, items, slide_mpp


def test_native_views_come_from_the_slide_and_fall_back_when_it_is_gone(tiny_slide, tmp_path):
    slide_path = tmp_path / "moved-later.tif"
    shutil.copy(tiny_slide[0], slide_path)
    xy0, items, slide_mpp = queued_cells("tiny", slide_path, n_max=3)
    old = ReviewItem("old", 0, 10.0, 10.0, "other", {"other": 1.0}, ["other"], "low_confidence",
                     -1.0, items[0].crop_png, items[0].context_image, str(slide_path))
    junk_path = tmp_path / "junk.tif"
    junk_path.write_bytes(b"not a slide")
    junk = ReviewItem("junk", 0, 10.0, 10.0, "other", {"other": 1.0}, ["other"],
                      "low_confidence", -2.0, items[0].crop_png, items[0].context_image,
                      str(junk_path), image_mpp=WORK_MPP, slide_mpp=slide_mpp)
    st = ReviewStore(str(tmp_path / "review.sqlite"))
    st.add_items([*items, old, junk])
    add_user(st, "ann", "ann-password")
    with ServerThread(create_app(st)) as srv:
        c, h = login(srv.url, "ann", "ann-password")
        it = c.post("/api/claim", json={"slide": "tiny"}, headers=h).json()["item"]
        assert (it["image_mpp"], it["native_mpp"]) == (WORK_MPP, slide_mpp) == (0.5, 0.25)
        x, y = xy0[it["cell_id"]]  # full precision (the page gets them rounded)
        with Slide(slide_path) as slide:
            for kind, stored_px in (("crop", CROP_PX), ("context", REVIEW_CONTEXT_PX)):
                r = c.get(it[f"native_{kind}_url"])
                assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
                got = decode(r.content)
                side = native_side_px(stored_px, WORK_MPP, slide_mpp)
                assert got.shape == (side, side, 3) == (2 * stored_px, 2 * stored_px, 3)
                want, _ = slide.read_level(0, *native_box(x, y, side), side, side)
                assert np.abs(got - want).mean() < 3.0  # the slide's own pixels (JPEG q92)
                stored = decode(c.get(it[f"{kind}_url"]).content)
                assert stored.shape == (stored_px, stored_px, 3)
        slide_path.rename(tmp_path / "elsewhere.tif")  # the slide is no longer reachable
        again = c.get(f"/api/items/{it['id']}").json()["item"]
        assert again["native_mpp"] is None and "native_crop_url" not in again
        assert again["image_mpp"] == WORK_MPP
        gone = c.get(it["native_crop_url"])
        assert gone.status_code == 404 and "not reachable" in gone.json()["detail"]
        assert c.get(it["crop_url"]).status_code == 200  # the stored view still serves
        (tmp_path / "elsewhere.tif").rename(slide_path)
        back = c.get(f"/api/items/{it['id']}").json()["item"]
        assert back["native_mpp"] == slide_mpp
        old_id = st.queue("old")[0].id
        pre_v4 = c.get(f"/api/items/{old_id}").json()["item"]
        assert pre_v4["image_mpp"] is None and pre_v4["native_mpp"] is None
        assert c.get(f"/api/items/{old_id}/crop/native.jpg").status_code == 404
        assert c.get(f"/api/items/{it['id']}/other/native.jpg").status_code == 404
        junk_id = st.queue("junk")[0].id  # an unreadable file: the stored views, no error
        for _ in range(2):
            unreadable = c.get(f"/api/items/{junk_id}").json()["item"]
            assert unreadable["native_mpp"] is None and unreadable["image_mpp"] == WORK_MPP
        assert c.get(f"/api/items/{junk_id}/crop/native.jpg").status_code == 404


def test_a_moved_slide_is_found_by_name_in_the_slide_dirs(tiny_slide, tmp_path, capsys):
    slide_path = tmp_path / "scanned" / "case-7.tif"
    slide_path.parent.mkdir()
    shutil.copy(tiny_slide[0], slide_path)
    _, items, slide_mpp = queued_cells("case-7", slide_path, n_max=2)
    st = ReviewStore(str(tmp_path / "review.sqlite"))
    st.add_items(items)
    mounted = tmp_path / "mnt" / "slides"  # the reviewer's machine mounts them elsewhere
    mounted.mkdir(parents=True)
    slide_path.rename(mounted / "case-7.tif")
    item = st.queue("case-7")[0]
    assert NativeViews().native_mpp(item) is None
    views = NativeViews(slide_dirs=(tmp_path / "empty", mounted))
    assert views.locate(item.slide_path) == mounted / "case-7.tif"
    assert views.native_mpp(item) == slide_mpp
    assert views.view_jpeg(item, st.image(item.id, "crop"))[:3] == b"\xff\xd8\xff"
    views.close()
    code, text = cli(capsys, "review", "serve", "--db", tmp_path / "review.sqlite",
                     "--slide-dir", tmp_path / "nowhere")
    assert code == 2 and "--slide-dir" in text and "nowhere" in text
