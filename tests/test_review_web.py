"""Review web app over real HTTP (uvicorn in a thread, httpx): login, sessions, CSRF, escaping,
path traversal, every route refusing anonymous users, the label round trip, the admin page."""

from __future__ import annotations

import io
import re
import socket
from urllib.parse import urlparse

import httpx
import pytest
from fastapi.routing import APIRoute

from cellclf.review.app import BAD_LOGIN, ServerThread, create_app
from cellclf.review.auth import add_user
from cellclf.review.store import ReviewItem, ReviewStore

EVIL = '<script>alert("x")</script>'


def png(rgb: tuple[int, int, int], size: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, "PNG")
    return buf.getvalue()


def jpeg(rgb: tuple[int, int, int], size: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def item(i: int, slide: str) -> ReviewItem:
    return ReviewItem(slide, i, 100.0 + i, 200.0, "eosinophil",
                      {"eosinophil": 0.5, "neutrophil": 0.3, "mast_cell": 0.1, "other": 0.1},
                      ["eosinophil", "neutrophil"], "low_confidence", float(i),
                      png((200, 80, 80), 16), jpeg((230, 200, 210), 64))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    db = tmp_path_factory.mktemp("web") / "review.sqlite"
    st = ReviewStore(str(db))
    st.add_items([item(i, "slide-A") for i in range(6)] + [item(i, EVIL) for i in range(3)])
    add_user(st, "ann", "ann-password", admin=True)
    add_user(st, "bob", "bob-password")
    app = create_app(st)
    with ServerThread(app) as srv:
        srv.app, srv.store = app, st
        yield srv


def login(server, user: str, password: str) -> tuple[httpx.Client, str]:
    c = httpx.Client(base_url=server.url, follow_redirects=False, timeout=30)
    form = c.get("/login")
    tok = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    r = c.post("/login", data={"username": user, "password": password, "csrf_token": tok})
    assert r.status_code == 303, r.text
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', c.get("/").text).group(1)
    return c, csrf


def raw_get(server, path: str) -> tuple[int, bytes]:
    """Send the request line exactly as given (no client-side path normalisation)."""
    u = urlparse(server.url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def test_every_route_refuses_anonymous_users(server):
    routes = [r for r in server.app.routes if isinstance(r, APIRoute)]
    assert len(routes) >= 12
    anon = httpx.Client(base_url=server.url, follow_redirects=False, timeout=30)
    checked = 0
    for route in routes:
        if route.path == "/login":
            continue
        path = route.path.replace("{item_id}", "1").replace("{kind}", "crop")
        for method in route.methods:
            r = anon.request(method, path, json={})
            if path.startswith("/api/"):
                assert r.status_code == 401, (method, path, r.status_code)
            else:
                assert r.status_code == 303, (method, path, r.status_code)
                assert r.headers["location"].startswith("/login")
            checked += 1
    assert checked >= 12
    assert anon.get("/static/app.css").status_code == 200  # static needs no login
    forged = httpx.Client(base_url=server.url, cookies={"cellclf_session": "forged"}, timeout=30)
    assert forged.get("/api/items/1/crop.png").status_code == 401


def test_login_failure_is_generic_and_cookies_are_strict(server):
    c = httpx.Client(base_url=server.url, follow_redirects=False, timeout=30)
    tok = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
    bad_pw = c.post("/login", data={"username": "ann", "password": "nope", "csrf_token": tok})
    no_user = c.post("/login", data={"username": "zed", "password": "nope", "csrf_token": tok})
    for r in (bad_pw, no_user):
        assert r.status_code == 401 and BAD_LOGIN in r.text and "cellclf_session" not in str(
            r.headers.get("set-cookie"))
    assert c.post("/login", data={"username": "ann", "password": "ann-password"}).status_code == 403
    for nxt, where in (("//evil.example/", "/"), ("/\\evil.example/", "/"),
                       ("https://evil.example/", "/"), ("/review?slide=a", "/review?slide=a")):
        tok = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
        r = c.post("/login", data={"username": "ann", "password": "ann-password",
                                   "csrf_token": tok, "next": nxt})
        assert r.status_code == 303 and r.headers["location"] == where, nxt
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Secure" not in cookie
    with ServerThread(create_app(server.store, secure_cookies=True)) as srv2:
        c2 = httpx.Client(base_url=srv2.url, follow_redirects=False, timeout=30)
        tok2 = re.search(r'name="csrf_token" value="([^"]+)"', c2.get("/login").text).group(1)
        c2.cookies.set("cellclf_login_csrf", tok2)  # httpx keeps Secure cookies off plain http
        r2 = c2.post("/login", data={"username": "bob", "password": "bob-password",
                                     "csrf_token": tok2})
        assert r2.status_code == 303 and "Secure" in r2.headers["set-cookie"]


def test_csrf_is_required_on_state_changing_requests(server):
    c, csrf = login(server, "bob", "bob-password")
    assert c.post("/api/claim", json={}).status_code == 403
    assert c.post("/api/claim", json={}, headers={"X-CSRF-Token": "wrong"}).status_code == 403
    assert c.post("/api/undo", json={}).status_code == 403
    assert c.post("/logout").status_code == 403
    r = c.post("/api/claim", json={}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json()["item"] is not None
    c.post(f"/api/items/{r.json()['item']['id']}/release", json={},
           headers={"X-CSRF-Token": csrf})
    assert c.post("/logout", data={"csrf_token": csrf}).status_code == 303
    assert c.get("/").status_code == 303, "the session is gone after logout"


def test_html_in_slide_names_is_escaped(server):
    c, _ = login(server, "ann", "ann-password")
    for path in ("/", "/?slide=" + EVIL, "/review?slide=" + EVIL):
        text = c.get(path, params=None).text
        assert EVIL not in text
        assert "&lt;script&gt;" in text
    headers = c.get("/").headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", [
    "/static/../store.py", "/static/..%2f..%2freview%2fstore.py", "/static/%2e%2e/app.py",
    "/api/items/..%2f..%2fetc%2fpasswd/crop.png", "/api/items/1/..%2f..%2fstore.py",
    "/api/items/1/crop.png/../../../../etc/passwd", "/static//etc/passwd",
])
def test_path_traversal_is_refused(server, path):
    assert raw_get(server, "/static/app.css")[0] == 200  # the raw client itself works
    status, data = raw_get(server, path)
    assert status in (303, 400, 401, 404, 422), (path, status)
    assert b"import sqlalchemy" not in data and b"root:" not in data


def test_label_round_trip_undo_and_images(server):
    c, csrf = login(server, "ann", "ann-password")
    h = {"X-CSRF-Token": csrf}
    first = c.post("/api/claim", json={"slide": "slide-A"}, headers=h).json()
    it = first["item"]
    assert it["slide_id"] == "slide-A" and [p[0] for p in it["top"]] == [
        "eosinophil", "neutrophil", "mast_cell"]
    crop = c.get(it["crop_url"])
    assert crop.status_code == 200 and crop.headers["content-type"] == "image/png"
    assert crop.content[:8] == b"\x89PNG\r\n\x1a\n"
    context = c.get(it["context_url"])  # batch inference stores context views as JPEG
    assert context.status_code == 200 and context.headers["content-type"] == "image/jpeg"
    assert c.get("/api/items/99999/crop.png").status_code == 404
    assert c.get(f"/api/items/{it['id']}/other.png").status_code == 404
    before = first["progress"]["slide"]["done"]
    r = c.post(f"/api/items/{it['id']}/label", json={"label": "neutrophil", "slide": "slide-A"},
               headers=h).json()
    assert r["progress"]["slide"]["done"] == before + 1 and r["item"]["id"] != it["id"]
    assert c.post(f"/api/items/{r['item']['id']}/label", json={"label": "basophil"},
                  headers=h).status_code == 400
    bob, bob_csrf = login(server, "bob", "bob-password")
    held = bob.post(f"/api/items/{r['item']['id']}/label", json={"label": "other"},
                    headers={"X-CSRF-Token": bob_csrf})
    assert held.status_code == 409 and "held by ann" in held.json()["detail"]
    u = c.post("/api/undo", json={"slide": "slide-A"}, headers=h).json()
    assert u["item"]["id"] == it["id"] and u["progress"]["slide"]["done"] == before
    hist = c.get("/api/history").json()["items"]
    assert all(x["id"] != it["id"] for x in hist)


def test_admin_page_is_for_admins_and_shows_agreement(server, tmp_path):
    bob, _ = login(server, "bob", "bob-password")
    assert bob.get("/admin").status_code == 403
    st = ReviewStore(str(tmp_path / "double.sqlite"), required_reviews=2)
    st.add_items([item(i, "slide-D") for i in range(2)])
    add_user(st, "ann", "ann-password", admin=True)
    for who, labs in (("ann", ["eosinophil", "other"]), ("bob", ["eosinophil", "mast_cell"])):
        for lab in labs:
            st.label(who, st.claim(who).id, lab)
    with ServerThread(create_app(st)) as srv:
        ann, _ = login(srv, "ann", "ann-password")
        page = ann.get("/admin").text
    assert "2 cells labelled by two or more reviewers" in page
    assert "50.0 %" in page and "ann · bob" in page
    assert re.search(r"<td>ann</td><td class=\"num\">2</td>", page)
