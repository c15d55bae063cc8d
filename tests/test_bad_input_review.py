"""The review queue page says when it lists only the first rows, and a filtered view counts only
its filter (issue 17). Real SQLite store, the real app over HTTP (uvicorn thread, httpx)."""

from __future__ import annotations

import io
import re

import httpx
import pytest

from cellclf.review.app import QUEUE_PAGE_ROWS, ServerThread, create_app
from cellclf.review.auth import add_user
from cellclf.review.store import ReviewItem, ReviewStore


def png(size: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 80, 80)).save(buf, "PNG")
    return buf.getvalue()


def item(i: int, slide: str, predicted: str) -> ReviewItem:
    return ReviewItem(slide, i, 100.0 + i, 200.0, predicted,
                      {"eosinophil": 0.5, "neutrophil": 0.3, "mast_cell": 0.1, "other": 0.1},
                      [predicted], "low_confidence", float(i), png(8), png(16))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    st = ReviewStore(str(tmp_path_factory.mktemp("q") / "review.sqlite"))
    st.add_items([item(i, "A", "eosinophil") for i in range(QUEUE_PAGE_ROWS + 10)]
                 + [item(i, "B", "neutrophil" if i % 2 else "eosinophil") for i in range(8)])
    add_user(st, "ann", "ann-password")
    with ServerThread(create_app(st)) as srv:
        c = httpx.Client(base_url=srv.url, follow_redirects=False, timeout=30)
        tok = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
        c.post("/login", data={"username": "ann", "password": "ann-password", "csrf_token": tok})
        yield c


def stat(html: str, label: str) -> int:
    return int(re.search(rf"<b>(\d+)</b><span>{label}</span>", html).group(1))


def test_queue_says_it_shows_only_the_first_rows(client):
    html = client.get("/").text
    assert f"Showing the first {QUEUE_PAGE_ROWS} of {QUEUE_PAGE_ROWS + 18} waiting" in html
    html = client.get("/?slide=B").text
    assert "Showing the first" not in html  # 8 cells: all listed


def test_filtered_counts_count_the_filter(client):
    assert stat(client.get("/").text, "cells waiting") == QUEUE_PAGE_ROWS + 18
    assert stat(client.get("/?slide=B").text, "cells waiting") == 8
    assert stat(client.get("/?slide=B&predicted=neutrophil").text, "cells waiting") == 4
    assert stat(client.get("/?predicted=neutrophil").text, "cells waiting") == 4
    p = client.get("/api/progress", params={"slide": "B", "predicted": "neutrophil"}).json()
    assert p["slide"]["total"] == 4 and p["predicted"] == "neutrophil"
    assert client.get("/api/progress").json()["all"]["total"] == QUEUE_PAGE_ROWS + 18
