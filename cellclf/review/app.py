"""The review web app (FastAPI, server-rendered Jinja2 pages, a little vanilla JS).

Data flow: browser ⇄ this app ⇄ :class:`cellclf.review.store.ReviewStore` (the queue database).
Images are requested by item id only: the stored crop and context (JPEG at the model's µm/px), or
the same views at the slide's native resolution, cut from the slide file whose path inference
stored with the item (:mod:`cellclf.review.native_view`) while that file is reachable. Each view's
µm/px goes to the page for its scale bar.

Security: every route except ``/login`` and ``/static`` needs a session (pages redirect to the
login page, ``/api`` answers 401); the session cookie is HttpOnly, SameSite=Lax and Secure over
https; each POST must carry the session's CSRF token (form field ``csrf_token`` or header
``X-CSRF-Token``), else 403; templates autoescape; a strict Content-Security-Policy allows only
this origin's scripts and styles.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel

from cellclf.review import auth
from cellclf.review.native_view import NativeViews
from cellclf.review.stats import agreement, reviewer_stats
from cellclf.review.store import Item, LeaseError, ReviewStore, ReviewStoreError, open_store
from cellclf.review.types import image_media_type

HERE = Path(__file__).parent
COOKIE = "cellclf_session"
LOGIN_COOKIE = "cellclf_login_csrf"
BAD_LOGIN = "invalid user name or password"
CSP = ("default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class _LoginRequired(Exception):
    pass


QUEUE_PAGE_ROWS = 50  # rows of the queue page; the review page serves every cell in this order


class ClaimIn(BaseModel):
    slide: str | None = None
    predicted: str | None = None
    exclude: list[int] = []


class LabelIn(BaseModel):
    label: str
    next: bool = True
    slide: str | None = None
    predicted: str | None = None


def item_json(item: Item | None, blind_all: bool = False,
              native_mpp: float | None = None) -> dict[str, Any] | None:
    """An item for the browser. Blind review: while the reviewer has not answered a blind item
    (audit items, a random share of the others, or every item with ``blind_all``), the model's
    label, probabilities, conformal set and reason are left out; the label call reveals them.
    ``native_mpp``: the slide is reachable, so the views at its level-0 resolution (that many
    µm/px) are offered as ``native_*_url``, with the stored images (``*_url`` at ``image_mpp``)
    as the fallback."""
    if item is None:
        return None
    hidden = (item.blind or blind_all) and item.label is None
    views: dict[str, Any] = {"image_mpp": item.image_mpp, "native_mpp": native_mpp}
    if native_mpp is not None:
        views.update(native_crop_url=f"/api/items/{item.id}/crop/native.jpg",
                     native_context_url=f"/api/items/{item.id}/context/native.jpg")
    return {**views, "id": item.id, "slide_id": item.slide_id, "cell_id": item.cell_id,
            "x": round(item.x, 1), "y": round(item.y, 1),
            "predicted": None if hidden else item.predicted,
            "top": [] if hidden else [[c, round(p, 4)] for c, p in item.top(3)],
            "conformal_set": [] if hidden else item.conformal_set,
            "reason": None if hidden else item.reason, "blind": hidden,
            "priority": round(item.priority, 4), "label": item.label,
            "crop_url": f"/api/items/{item.id}/crop.png",
            "context_url": f"/api/items/{item.id}/context.png"}


def _safe_next(path: str | None) -> str:
    """Only same-site paths: "/x" yes; "//host", "/\\host" (browsers read both as another host) no."""
    ok = bool(path) and path.startswith("/") and not path.startswith(("//", "/\\"))
    return path if ok else "/"


def create_app(store: ReviewStore | str, secure_cookies: bool | None = None,
               lease_s: float = 300, blind_all: bool = False,
               slide_dirs: tuple[Path, ...] = ()) -> FastAPI:
    """The ASGI app over ``store`` (a store or its URL).

    ``blind_all``: hide the model's answer for every cell until the reviewer has answered (by
    default only blind items are: audit items and a random share of the others).

    ``secure_cookies``: None marks the cookie Secure when the request came over https (use
    uvicorn's ``--proxy-headers`` behind a TLS proxy); True/False force it.
    """
    st = open_store(store)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    templates = Jinja2Templates(env=env)
    app = FastAPI(title="cellclf review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = st
    natives = app.state.native_views = NativeViews(slide_dirs=slide_dirs)

    def as_json(item: Item | None) -> dict[str, Any] | None:
        return item_json(item, blind_all, None if item is None else natives.native_mpp(item))

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def secure(request: Request) -> bool:
        return request.url.scheme == "https" if secure_cookies is None else secure_cookies

    def class_filter(predicted: str | None) -> str | None:
        """The queue's class filter; off in blind-all mode (it would reveal the model's label)."""
        return None if blind_all else (predicted or None)

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if "cache-control" not in response.headers:
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(_LoginRequired)
    def login_required(request: Request, _exc: _LoginRequired) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": "login required"}, status_code=401)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target)}", status_code=303)

    @app.exception_handler(ReviewStoreError)
    def store_error(_request: Request, exc: ReviewStoreError) -> Response:
        status = 409 if isinstance(exc, LeaseError) else 400
        return JSONResponse({"detail": str(exc)}, status_code=status)

    def session(request: Request) -> auth.Session:
        s = auth.get_session(st, request.cookies.get(COOKIE))
        if s is None:
            raise _LoginRequired()
        return s

    async def csrf(request: Request, s: auth.Session = Depends(session)) -> auth.Session:
        given = request.headers.get("x-csrf-token")
        if given is None and request.headers.get("content-type", "").startswith(
                ("application/x-www-form-urlencoded", "multipart/form-data")):
            given = (await request.form()).get("csrf_token")  # type: ignore[assignment]
        if not auth.csrf_ok(s.csrf, given if isinstance(given, str) else None):
            raise HTTPException(403, "missing or wrong CSRF token; reload the page")
        return s

    def admin(s: auth.Session = Depends(session)) -> auth.Session:
        if not s.is_admin:
            raise HTTPException(403, "admin only")
        return s

    def page(request: Request, name: str, s: auth.Session | None, **ctx: Any) -> HTMLResponse:
        ctx.update(user=s, classes=st.classes, labels=st.labels, mode=st.mode)
        return templates.TemplateResponse(request, name, ctx)

    # ---------------------------------------------------------------- login / logout

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/", error: str | None = None) -> Response:
        import secrets

        token = secrets.token_urlsafe(32)
        resp = page(request, "login.html", None, next=_safe_next(next), error=error,
                    login_csrf=token)
        resp.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict",
                        secure=secure(request), path="/login")
        return resp

    @app.post("/login")
    def login(request: Request, username: str = Form(""), password: str = Form(""),
              csrf_token: str = Form(""), next: str = Form("/")) -> Response:
        if not auth.csrf_ok(request.cookies.get(LOGIN_COOKIE, ""), csrf_token):
            raise HTTPException(403, "missing or wrong CSRF token; reload the login page")
        if not auth.verify_password(st, username, password):
            resp = page(request, "login.html", None, next=_safe_next(next), error=BAD_LOGIN,
                        login_csrf=request.cookies.get(LOGIN_COOKIE))
            resp.status_code = 401
            return resp
        token, _ = auth.create_session(st, username)
        resp = RedirectResponse(_safe_next(next), status_code=303)
        resp.set_cookie(COOKIE, token, httponly=True, samesite="lax", secure=secure(request),
                        max_age=int(auth.SESSION_S), path="/")
        resp.delete_cookie(LOGIN_COOKIE, path="/login")
        return resp

    @app.post("/logout")
    def logout(request: Request, s: auth.Session = Depends(csrf)) -> Response:
        auth.end_session(st, request.cookies.get(COOKIE))
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    # ---------------------------------------------------------------- pages

    @app.get("/", response_class=HTMLResponse)
    def queue_page(request: Request, slide: str | None = None, predicted: str | None = None,
                   s: auth.Session = Depends(session)) -> Response:
        slide, predicted = slide or None, class_filter(predicted)
        items = st.queue(slide, predicted, limit=QUEUE_PAGE_ROWS + 1)
        return page(request, "queue.html", s, slide=slide, predicted=predicted,
                    items=items[:QUEUE_PAGE_ROWS], more=len(items) > QUEUE_PAGE_ROWS,
                    page_rows=QUEUE_PAGE_ROWS, slides=st.progress_by_slide(), blind_all=blind_all,
                    total=st.progress(slide, predicted), required=st.required_reviews)

    @app.get("/review", response_class=HTMLResponse)
    def review_page(request: Request, slide: str | None = None, predicted: str | None = None,
                    s: auth.Session = Depends(session)) -> Response:
        return page(request, "review.html", s, slide=slide or "", predicted=predicted or "")

    @app.get("/admin", response_class=HTMLResponse)
    def admin_page(request: Request, s: auth.Session = Depends(admin)) -> Response:
        rows = st.audit()
        return page(request, "admin.html", s, reviewers=reviewer_stats(rows, time.time()),
                    agreement=agreement(st.current_votes()), required=st.required_reviews,
                    users=auth.list_users(st), total=st.progress())

    # ---------------------------------------------------------------- API

    def progress(slide: str | None, predicted: str | None = None) -> dict[str, Any]:
        """Progress of the reviewer's scope: the filter (slide and/or predicted class) when one is
        set, else the whole store."""
        slide, predicted = slide or None, class_filter(predicted)
        if slide or predicted:
            return {"slide": st.progress(slide, predicted), "predicted": predicted}
        return {"slide": None, "all": st.progress()}

    @app.get("/api/progress")
    def api_progress(slide: str | None = None, predicted: str | None = None,
                     s: auth.Session = Depends(session)) -> dict:
        return progress(slide, predicted)

    @app.post("/api/claim")
    def api_claim(body: ClaimIn, s: auth.Session = Depends(csrf)) -> dict:
        item = st.claim(s.user, body.slide or None, class_filter(body.predicted),
                        lease_s=lease_s, exclude=body.exclude)
        return {"item": as_json(item), "progress": progress(body.slide, body.predicted)}

    @app.post("/api/items/{item_id}/label")
    def api_label(item_id: int, body: LabelIn, s: auth.Session = Depends(csrf)) -> dict:
        audit_id = st.label(s.user, item_id, body.label, blind_all=blind_all)
        nxt = (st.claim(s.user, body.slide or None, class_filter(body.predicted), lease_s=lease_s)
               if body.next else None)
        # the labelled cell with the model's answer revealed (it was hidden in blind review)
        return {"audit_id": audit_id, "item": as_json(nxt),
                "revealed": item_json(st.get(item_id, s.user)),
                "progress": progress(body.slide, body.predicted)}

    @app.post("/api/items/{item_id}/release")
    def api_release(item_id: int, s: auth.Session = Depends(csrf)) -> dict:
        return {"released": st.release(s.user, item_id)}

    @app.post("/api/undo")
    def api_undo(body: ClaimIn, s: auth.Session = Depends(csrf)) -> dict:
        item = st.undo(s.user, lease_s=lease_s)
        return {"item": as_json(item), "progress": progress(body.slide, body.predicted)}

    @app.get("/api/history")
    def api_history(limit: int = 50, s: auth.Session = Depends(session)) -> dict:
        return {"items": [as_json(i) for i in st.history(s.user, min(max(limit, 1), 500))]}

    @app.get("/api/items/{item_id}")
    def api_item(item_id: int, s: auth.Session = Depends(session)) -> dict:
        item = st.get(item_id, s.user)
        if item is None:
            raise HTTPException(404, "no such item")
        return {"item": as_json(item)}

    @app.get("/api/items/{item_id}/{kind}.png")
    def api_image(item_id: int, kind: str, s: auth.Session = Depends(session)) -> Response:
        if kind not in ("crop", "context"):
            raise HTTPException(404, "no such image")
        data = st.image(item_id, kind)
        if data is None:
            raise HTTPException(404, "no such item")
        return Response(data, media_type=image_media_type(data) or "application/octet-stream",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/items/{item_id}/{kind}/native.jpg")
    def api_native_image(item_id: int, kind: str, s: auth.Session = Depends(session)) -> Response:
        """The stored view's field at the slide's native resolution, cut from the slide."""
        if kind not in ("crop", "context"):
            raise HTTPException(404, "no such image")
        item, stored = st.get(item_id), st.image(item_id, kind)
        if item is None or stored is None:
            raise HTTPException(404, "no such item")
        data = natives.view_jpeg(item, stored)
        if data is None:
            raise HTTPException(404, "the slide is not reachable from the review server; the "
                                     "stored image is shown instead")
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    return app


def serve(db: str, host: str = "127.0.0.1", port: int = 8000, secure_cookies: bool | None = None,
          lease_s: float = 300, proxy_headers: bool = False, blind_all: bool = False,
          slide_dirs: tuple[Path, ...] = ()) -> None:
    """Run the review app with uvicorn until interrupted (``cellclf review serve``)."""
    import uvicorn

    store = ReviewStore(db)
    app = create_app(store, secure_cookies=secure_cookies, lease_s=lease_s, blind_all=blind_all,
                     slide_dirs=slide_dirs)
    uvicorn.run(app, host=host, port=port, proxy_headers=proxy_headers, log_level="info",
                forwarded_allow_ips="127.0.0.1" if proxy_headers else None)


class ServerThread:
    """Serve an ASGI app with uvicorn from a background thread on a free local port.

    For tests, benchmarks and demos: ``with ServerThread(app) as srv: httpx.get(srv.url + "/")``.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app, self.host, self.port = app, host, port
        self.url = ""

    def __enter__(self) -> ServerThread:
        import socket
        import threading

        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning",
                                                    lifespan="off", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True, name="cellclf-review-server")
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"review server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
