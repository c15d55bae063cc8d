"""The review UI in real headless Chromium (Debian's, driven by Playwright): log in, label five
cells by keyboard, undo one, see the progress change; no console or CSP errors. Screenshots go to
the test's tmp folder and, when CELLCLF_ARTIFACTS is set, to that folder too."""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import pytest

from cellclf.review.app import ServerThread, create_app
from cellclf.review.auth import add_user
from cellclf.review.store import ReviewItem, ReviewStore

CHROMIUM = os.environ.get("CELLCLF_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SLIDE = "Case 12 <b>polyp</b>"
KINDS = [  # (predicted, cytoplasm RGB, nucleus RGB, lobes)
    ("eosinophil", (236, 120, 110), (70, 40, 120), 2), ("neutrophil", (232, 196, 210), (80, 50, 130), 4),
    ("mast_cell", (150, 70, 160), (60, 30, 100), 1), ("other", (220, 170, 190), (50, 30, 110), 1),
]


def cell_png(size: int, radius: float, cyto, nucleus, lobes: int, seed: int) -> bytes:
    """A stained-looking disc cell (granular cytoplasm, lobed nucleus) centred in the image."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    bg = np.clip(rng.normal((238, 214, 226), 6, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img)
    c = size / 2
    for _ in range(int(size * size / 900)):  # neighbouring cells in the context view
        x, y = rng.uniform(0, size, 2)
        if abs(x - c) + abs(y - c) > 2.5 * radius:
            r = rng.uniform(0.5, 0.9) * radius
            d.ellipse((x - r, y - r, x + r, y + r), fill=(205, 150, 185))
            d.ellipse((x - r / 2, y - r / 2, x + r / 2, y + r / 2), fill=(90, 60, 140))
    d.ellipse((c - radius, c - radius, c + radius, c + radius), fill=tuple(cyto))
    for _ in range(int(radius * radius)):
        a, rr = rng.uniform(0, 6.283), radius * np.sqrt(rng.uniform(0, 0.9))
        x, y = c + rr * np.cos(a), c + rr * np.sin(a)
        d.point((x, y), fill=tuple(int(v * 0.8) for v in cyto))
    for k in range(lobes):
        a = 6.283 * k / lobes
        off = 0.32 * radius if lobes > 1 else 0
        x, y, r = c + off * np.cos(a), c + off * np.sin(a), radius * (0.45 if lobes == 1 else 0.3)
        d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(nucleus))
    buf = io.BytesIO()
    img.filter(ImageFilter.GaussianBlur(0.6)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: run scripts/ci_services.sh "
                    "(apt-get install chromium) or set CELLCLF_CHROMIUM")
    sync_api = pytest.importorskip("playwright.sync_api")
    # page scripts are limited by the app's CSP (no eval), so waits use locators, not JS strings
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def test_keyboard_review_session(browser, tmp_path):
    st = ReviewStore(str(tmp_path / "review.sqlite"))
    items = []
    for i in range(12):
        pred, cyto, nuc, lobes = KINDS[i % 4]
        probs = {k[0]: 0.1 for k in KINDS} | {pred: 0.55, KINDS[(i + 1) % 4][0]: 0.25}
        items.append(ReviewItem(SLIDE, i, 1000.0 + 40 * i, 2000.0 + 7 * i, pred, probs,
                                [pred, KINDS[(i + 1) % 4][0]], "low_confidence", 1.0 - i / 20,
                                cell_png(64, 14, cyto, nuc, lobes, i),
                                cell_png(256, 14, cyto, nuc, lobes, i)))
    st.add_items(items)
    add_user(st, "dr_ana", "slides-all-day")
    shots = tmp_path / "screens"
    shots.mkdir()
    errors: list[str] = []
    with ServerThread(create_app(st)) as srv:
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(srv.url + "/review")
        assert "/login" in page.url
        page.fill("input[name=username]", "dr_ana")
        page.fill("input[name=password]", "wrong password")
        page.press("input[name=password]", "Enter")
        page.wait_for_selector("text=invalid user name or password")
        errors.clear()  # the browser logs the 401 of the failed login itself
        page.fill("input[name=username]", "dr_ana")
        page.fill("input[name=password]", "slides-all-day")
        page.screenshot(path=shots / "01-login.png")
        page.press("input[name=password]", "Enter")
        page.wait_for_selector("body[data-ready='1']")
        assert page.url.endswith("/review")
        progress = page.locator("[data-testid=progress]")
        assert progress.inner_text().startswith("0 / 12 reviewed")
        page.screenshot(path=shots / "02-review.png")

        from playwright.sync_api import expect

        labelled = []
        for n, key in enumerate(["1", "2", "3", "4", "0"], start=1):
            where = page.inner_text("#where-xy")
            labelled.append(int(where.split()[1]))
            page.keyboard.press(key)
            expect(progress).to_have_text(re.compile(rf"^{n} / 12 reviewed"))
            assert page.inner_text("#where-xy") != where
        assert progress.inner_text().startswith("5 / 12 reviewed")
        assert page.inner_text("#session-count").startswith("5 labelled")
        page.screenshot(path=shots / "03-after-five.png")

        page.keyboard.press("u")
        expect(progress).to_have_text(re.compile(r"^4 / 12 reviewed"))
        assert int(page.inner_text("#where-xy").split()[1]) == labelled[-1]
        page.keyboard.press("ArrowLeft")
        page.wait_for_selector("#banner:not(.hidden)")
        expect(page.locator("#mine")).to_have_text("Your label: other")  # the 4th cell
        page.keyboard.press("ArrowLeft")
        expect(page.locator("#mine")).to_have_text("Your label: mast cell")  # the 3rd
        page.screenshot(path=shots / "04-history.png")
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowRight")
        page.wait_for_selector("#banner.hidden", state="attached")
        page.goto(srv.url + "/")
        assert SLIDE in page.inner_text("table")  # shown as text: escaped, not markup
        page.screenshot(path=shots / "05-queue.png", full_page=True)
        page.close()

    rows = [(r["label"], r["action"]) for r in st.audit()]
    assert rows == [("eosinophil", "label"), ("neutrophil", "label"), ("mast_cell", "label"),
                    ("other", "label"), ("cant_tell", "label"), (None, "undo")]
    assert [r["item_id"] for r in st.audit()][:5] == [
        st.final_labels(SLIDE)[c].item_id for c in labelled]
    assert st.progress() == {"total": 12, "done": 4, "pending": 8, "claimed": 2}
    assert not errors, errors
    if os.environ.get("CELLCLF_ARTIFACTS"):
        dest = Path(os.environ["CELLCLF_ARTIFACTS"]) / "review-browser"
        shutil.copytree(shots, dest, dirs_exist_ok=True)


def test_cell_view_shows_a_scale_bar_and_zooms(browser, tiny_slide, tmp_path):
    """The first cell's slide is reachable: both views at its native 0.25 µm/px with a scale bar;
    Z and a click zoom 1× → 2× → 4× → 1× and the bar follows. The next cell's slide is gone: the
    stored 0.5 µm/px views, still with a correct scale bar."""
    import numpy as np

    from cellclf.pipeline.host_stage import review_items
    from cellclf.wsi.crops import cut_crops
    from cellclf.wsi.slide import Slide

    with Slide(tiny_slide[0]) as slide:
        rgb = slide.read_region_mpp(0, 0, slide.width, slide.height, slide.width // 2,
                                    slide.height // 2)
    from cellclf.detect.classical import detect_cells

    centres = detect_cells(rgb, 0.5)[[5, 20]].astype(np.float64)  # px at 0.5 µm/px
    probs = np.array([[0.5, 0.3, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1]], np.float32)
    items = [review_items("tiny", path, np.array([k]), centres[k:k + 1] * 2, probs[k:k + 1],
                          np.array(["low_confidence"]), np.ones((1, 4), bool),
                          cut_crops(rgb, centres[k:k + 1], 64), cut_crops(rgb, centres[k:k + 1], 160),
                          [k[0] for k in KINDS], np.array([1.0 - k]), image_mpp=0.5,
                          slide_mpp=0.25)[0]
             for k, path in enumerate([str(tiny_slide[0]), str(tmp_path / "gone.tif")])]
    st = ReviewStore(str(tmp_path / "review.sqlite"))
    st.add_items(items)
    add_user(st, "dr_ana", "slides-all-day")
    errors: list[str] = []
    with ServerThread(create_app(st)) as srv:
        from playwright.sync_api import expect

        page = browser.new_page(viewport={"width": 1360, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(srv.url + "/review")
        page.fill("input[name=username]", "dr_ana")
        page.fill("input[name=password]", "slides-all-day")
        page.press("input[name=password]", "Enter")
        page.wait_for_selector("body[data-ready='1']")
        crop_res, ctx_res = page.locator("[data-testid=crop-res]"), page.locator(
            "[data-testid=context-res]")
        expect(crop_res).to_have_text("0.250 µm/px (native, from the slide)")
        expect(ctx_res).to_have_text("0.250 µm/px (native, from the slide)")
        assert page.locator("#crop").get_attribute("src").endswith("/crop/native.jpg")
        bar = page.locator("[data-testid=crop-scale]")
        # 128 native px shown 352 px wide: 2.75 screen px per pixel / 0.25 µm = 11 px per µm
        for zoom, um, px in ((1, "10", 110.0), (2, "5", 110.0), (4, "2", 88.0)):
            expect(page.locator("#crop-view")).to_have_attribute("data-zoom", str(zoom))
            expect(bar).to_have_attribute("data-um", um)
            assert abs(float(bar.get_attribute("data-px")) - px) < 0.5
            assert bar.locator(".txt").inner_text() == f"{um} µm"
            assert abs(bar.locator(".bar").bounding_box()["width"] - px) <= 3  # incl. border
            assert f"scale({zoom})" in page.locator("#crop-view .zoom-stage").get_attribute(
                "style")
            page.screenshot(path=tmp_path / f"zoom-{zoom}.png")
            page.keyboard.press("z")
        expect(page.locator("#crop-view")).to_have_attribute("data-zoom", "1")
        # context: 320 native px in 352: 1.1 px per pixel / 0.25 µm = 4.4 px per µm → 20 µm
        expect(page.locator("[data-testid=context-scale]")).to_have_attribute("data-um", "20")
        page.locator("#context-view").click()
        expect(page.locator("#context-view")).to_have_attribute("data-zoom", "2")
        assert page.locator("#ring").bounding_box()["width"] == pytest.approx(128, abs=1)
        expect(page.locator("[data-testid=context-scale]")).to_have_attribute("data-um", "10")
        page.keyboard.press("1")  # label: the next cell's slide is not reachable
        expect(crop_res).to_have_text("0.500 µm/px (stored)")
        assert page.locator("#crop").get_attribute("src").endswith("/crop.png")
        # 64 stored px in 352 at 2×: 11 px per pixel / 0.5 µm = 22 px per µm → 5 µm
        expect(bar).to_have_attribute("data-um", "5")
        page.close()
    assert not errors, errors
