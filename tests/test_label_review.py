"""Labelling mode of the review app (``cellclf label`` projects): the extra "not a cell" key and
label, over real HTTP and in headless Chromium (skipped without Chromium)."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import httpx
import pytest

from cellclf.review.app import ServerThread, create_app
from cellclf.review.auth import add_user
from cellclf.review.store import NOT_A_CELL, ReviewItem, ReviewStore, ReviewStoreError

CHROMIUM = os.environ.get("CELLCLF_CHROMIUM", "/usr/bin/chromium")
CLASSES = ["eosinophil", "neutrophil", "mast_cell", "other"]


def png(rgb: tuple[int, int, int], size: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, "PNG")
    return buf.getvalue()


def labelling_store(path: Path, n: int) -> ReviewStore:
    st = ReviewStore(str(path), classes=CLASSES)
    st.set_mode("labelling")
    st.add_items([ReviewItem("slide-L", i, 100.0 + 30 * i, 50.0, "other",
                             {c: 0.25 for c in CLASSES}, [],
                             "held_aside" if i % 4 == 3 else "to_label", -i / n,
                             png((200, 90 + 10 * i, 120), 64), png((230, 200, 215), 160))
                  for i in range(n)])
    add_user(st, "lab", "label-all-day")
    return st


def login(url: str) -> tuple[httpx.Client, str]:
    c = httpx.Client(base_url=url, follow_redirects=False, timeout=30)
    tok = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
    r = c.post("/login", data={"username": "lab", "password": "label-all-day", "csrf_token": tok})
    assert r.status_code == 303, r.text
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', c.get("/").text).group(1)
    return c, csrf


def test_labelling_mode_over_http(tmp_path):
    st = labelling_store(tmp_path / "review.sqlite", 4)
    assert st.labels == [*CLASSES, "cant_tell", NOT_A_CELL]
    reopened = ReviewStore(str(tmp_path / "review.sqlite"))
    assert reopened.mode == "labelling" and reopened.labels == st.labels  # kept in the store
    reopened.close()
    with ServerThread(create_app(st)) as srv:
        c, csrf = login(srv.url)
        page = c.get("/review").text
        assert 'data-label="not_a_cell"' in page and 'data-mode="labelling"' in page
        item = c.post("/api/claim", json={}, headers={"x-csrf-token": csrf}).json()["item"]
        r = c.post(f"/api/items/{item['id']}/label", json={"label": NOT_A_CELL, "next": True},
                   headers={"x-csrf-token": csrf})
        assert r.status_code == 200, r.text
    assert [(a["label"], a["reviewer"]) for a in st.audit()] == [(NOT_A_CELL, "lab")]
    # a review store of inference has no such label
    plain = ReviewStore(str(tmp_path / "plain.sqlite"), classes=CLASSES)
    assert NOT_A_CELL not in plain.labels
    plain.add_items([ReviewItem("s", 0, 1.0, 1.0, "other", {"other": 1.0}, [], "low_confidence",
                                0.0, png((1, 2, 3), 8), b"")])
    it = plain.claim("x")
    with pytest.raises(ReviewStoreError, match="not one of"):
        plain.label("x", it.id, NOT_A_CELL)


def test_browser_labels_a_batch_in_labelling_mode(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: run scripts/ci_services.sh "
                    "(apt-get install chromium) or set CELLCLF_CHROMIUM")
    sync_api = pytest.importorskip("playwright.sync_api")
    from playwright.sync_api import expect

    st = labelling_store(tmp_path / "review.sqlite", 8)
    keys = ["1", "x", "2", "0", "3", "4", "X", "1"]
    errors: list[str] = []
    with sync_api.sync_playwright() as p, ServerThread(create_app(st)) as srv:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        page = b.new_page(viewport={"width": 1360, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(srv.url + "/review")
        page.fill("input[name=username]", "lab")
        page.fill("input[name=password]", "label-all-day")
        page.press("input[name=password]", "Enter")
        page.wait_for_selector("body[data-ready='1']")
        assert page.locator("button[data-label=not_a_cell]").is_visible()
        progress = page.locator("[data-testid=progress]")
        for n, key in enumerate(keys, start=1):
            page.keyboard.press(key)
            expect(progress).to_have_text(re.compile(rf"^{n} / 8 "))
        page.wait_for_selector("#empty:not(.hidden)")
        page.screenshot(path=tmp_path / "labelling-done.png")
        b.close()
    assert not errors, errors
    got = [a["label"] for a in st.audit()]
    assert got == ["eosinophil", NOT_A_CELL, "neutrophil", "cant_tell", "mast_cell", "other",
                   NOT_A_CELL, "eosinophil"]
    assert st.progress()["pending"] == 0
