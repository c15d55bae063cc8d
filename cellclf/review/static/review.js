// cellclf review page: keyboard-first labelling. Data only ever goes into the page as text
// (textContent), never as HTML. Keys: 1-9 classes in the store's order, 0 can't tell,
// u undo, arrow left / right move through the cells you labelled (right on the newest one skips),
// z (or a click on an image) zooms 1x / 2x / 4x. Images: the slide's native resolution when the
// server can read the slide, else the stored ones; each carries its µm/px for the scale bar.
(() => {
  "use strict";
  const body = document.body;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const filt = { slide: body.dataset.slide || null, predicted: body.dataset.predicted || null };
  // classes in store order, then "cant_tell" (and "not_a_cell" in labelling mode)
  const labels = JSON.parse(body.dataset.labels);
  const nClasses = labels.filter((l) => l !== "cant_tell" && l !== "not_a_cell").length;
  const $ = (id) => document.getElementById(id);
  let head = null;      // the cell the queue gave us (held under our lease)
  let history = [];     // cells we labelled, newest first
  let pos = -1;         // -1: showing head; k >= 0: showing history[k]
  let skipped = [];
  let busy = false;
  let sessionCount = 0;

  const ZOOMS = [1, 2, 4];
  const NICE_UM = [0.5, 1, 2, 5, 10, 20, 50, 100, 200];
  const BAR_MAX_PX = 120;
  const RING_PX = 64;
  let zoomIdx = 0;

  const pretty = (s) => (s === "cant_tell" ? "can't tell" : s.replace(/_/g, " "));

  async function api(method, url, data) {
    const opts = { method, credentials: "same-origin", headers: { "X-CSRF-Token": csrf } };
    if (data !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(data);
    }
    const r = await fetch(url, opts);
    if (r.status === 401) {
      window.location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search);
      throw new Error("logged out");
    }
    const out = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(out.detail || r.statusText);
    return out;
  }

  function status(msg, isErr) {
    const el = $("status");
    el.textContent = msg;
    el.classList.toggle("err", !!isErr);
  }

  function setProgress(p) {
    if (!p) return;
    const s = p.slide || p.all;
    $("progress-count").textContent = `${s.done} / ${s.total} reviewed · ${s.pending} waiting`;
    $("progress-bar").max = Math.max(s.total, 1);
    $("progress-bar").value = s.done;
    $("session-count").textContent = `${sessionCount} labelled in this session`;
  }

  function shown() { return pos < 0 ? head : history[pos]; }

  function render() {
    const it = shown();
    $("empty").classList.toggle("hidden", !!it);
    $("viewer").classList.toggle("hidden", !it);
    $("keys").classList.toggle("hidden", !it && history.length === 0);
    const banner = $("banner");
    if (pos >= 0) {
      banner.textContent = `Your earlier label (${pos + 1} back). Press a key to change it, → to go forward.`;
      banner.classList.remove("hidden");
    } else {
      banner.classList.add("hidden");
    }
    $("next-text").textContent = pos >= 0 ? "forward" : "skip";
    $("prev").disabled = pos + 1 >= history.length;
    document.querySelectorAll(".key[data-label]").forEach((b) => {
      b.classList.toggle("chosen", !!it && it.label === b.dataset.label);
      b.disabled = !it;
    });
    if (!it) return;
    showView("crop", it);
    showView("context", it);
    const pred = $("predicted");
    if (it.blind) {  // blind review: the model's answer is shown only after the reviewer's
      pred.textContent = "hidden until you answer";
      pred.className = "cls blind";
      $("reason").textContent = "blind";
    } else {
      pred.textContent = pretty(it.predicted);
      pred.className = "cls cls-" + it.predicted;
      $("reason").textContent = pretty(it.reason);
    }
    const top = $("top");
    top.replaceChildren();
    for (const [cls, p] of it.top) {
      const li = document.createElement("li");
      const name = document.createElement("span");
      name.textContent = pretty(cls);
      name.className = "cls-" + cls;
      const meter = document.createElement("meter");
      meter.min = 0; meter.max = 1; meter.value = p;
      const val = document.createElement("span");
      val.className = "num";
      val.textContent = (100 * p).toFixed(1) + "%";
      li.append(name, meter, val);
      top.append(li);
    }
    const cset = $("cset");
    cset.replaceChildren();
    for (const cls of it.conformal_set) {
      const chip = document.createElement("span");
      chip.className = "chip";
      chip.textContent = pretty(cls);
      cset.append(chip);
    }
    if (it.conformal_set.length === 0) cset.textContent = it.blind ? "hidden" : "–";
    $("where-slide").textContent = it.slide_id;
    $("where-xy").textContent = `cell ${it.cell_id} · x ${it.x}, y ${it.y} (level-0 px)`;
    const mine = $("mine");
    mine.textContent = it.label ? `Your label: ${pretty(it.label)}` : "";
    mine.classList.toggle("hidden", !it.label);
  }

  // ---- images: native or stored, scale bar, zoom

  function showView(kind, it) {
    const img = $(kind);
    const nativeUrl = it.native_mpp ? it[`native_${kind}_url`] : null;
    img.dataset.storedUrl = it[`${kind}_url`];
    img.dataset.storedMpp = it.image_mpp || "";
    setSource(img, nativeUrl ? "native" : "stored", nativeUrl || it[`${kind}_url`],
              nativeUrl ? it.native_mpp : it.image_mpp);
  }

  function setSource(img, source, url, mpp) {
    img.dataset.source = source;
    img.dataset.mpp = mpp || "";
    if (img.getAttribute("src") !== url) img.src = url;
    else updateScale(img.id);
  }

  function onImageError(kind) {
    const img = $(kind);
    if (img.dataset.source === "native") {  // the slide went away: the stored image
      setSource(img, "stored", img.dataset.storedUrl, img.dataset.storedMpp);
    } else if (kind === "context") {
      $("no-context").classList.remove("hidden");
    }
  }

  function updateScale(kind) {
    const img = $(kind);
    const mpp = Number(img.dataset.mpp);
    const scale = $(`${kind}-scale`);
    const res = $(`${kind}-res`);
    const known = img.naturalWidth > 0 && mpp > 0;
    scale.classList.toggle("hidden", !known);
    if (!known) {
      res.textContent = img.naturalWidth > 0 ? "scale unknown (queued by an older cellclf)" : "";
      return;
    }
    const zoom = ZOOMS[zoomIdx];
    const screenPxPerUm = (img.clientWidth / img.naturalWidth) * zoom / mpp;
    let um = NICE_UM[0];
    for (const u of NICE_UM) if (u * screenPxPerUm <= BAR_MAX_PX) um = u;
    scale.querySelector(".bar").style.width = `${Math.round(um * screenPxPerUm)}px`;
    scale.querySelector(".txt").textContent = `${um} µm`;
    scale.dataset.um = String(um);
    scale.dataset.px = (um * screenPxPerUm).toFixed(2);
    const where = img.dataset.source === "native" ? "native, from the slide" : "stored";
    res.textContent = `${mpp.toFixed(3)} µm/px (${where})`;
  }

  function setZoom(idx) {
    zoomIdx = idx % ZOOMS.length;
    const zoom = ZOOMS[zoomIdx];
    for (const kind of ["crop", "context"]) {
      const view = $(`${kind}-view`);
      view.querySelector(".zoom-stage").style.transform = `scale(${zoom})`;
      view.classList.toggle("zoomed", zoom > 1);
      view.dataset.zoom = String(zoom);
      view.querySelector(".zoom-level").textContent = `${zoom}×`;
      $(kind).classList.toggle("pixelated", kind === "crop" || zoom > 1);
      updateScale(kind);
    }
    const ring = $("ring");  // the ring grows with the zoom, its line stays thin
    ring.style.width = ring.style.height = `${RING_PX * zoom}px`;
    ring.style.margin = `${-RING_PX * zoom / 2}px 0 0 ${-RING_PX * zoom / 2}px`;
    $("zoom-text").textContent = `${zoom}×`;
  }

  const zoomIn = () => setZoom(zoomIdx + 1);

  async function run(fn) {
    if (busy) return;
    busy = true;
    try { await fn(); } catch (e) { status(e.message, true); } finally { busy = false; }
  }

  const label = (lbl) => run(async () => {
    const it = shown();
    if (!it) return;
    const atHead = pos < 0;
    const r = await api("POST", `/api/items/${it.id}/label`,
      { label: lbl, next: atHead, slide: filt.slide, predicted: filt.predicted });
    const done = r.revealed || { ...it, label: lbl };
    if (atHead) {
      history = [done, ...history.filter((h) => h.id !== it.id)];
      head = r.item;
      sessionCount += 1;
    } else {
      history[pos] = done;
    }
    const said = it.blind && r.revealed ? ` The model said ${pretty(r.revealed.predicted)}.` : "";
    status(`Cell ${it.cell_id} labelled ${pretty(lbl)}.${said}`);
    setProgress(r.progress);
    render();
  });

  const undo = () => run(async () => {
    const r = await api("POST", "/api/undo", filt);
    if (!r.item) { status("Nothing to undo."); return; }
    history = history.filter((h) => h.id !== r.item.id);
    if (head && head.id !== r.item.id) skipped = skipped.filter((id) => id !== head.id);
    head = r.item;
    pos = -1;
    sessionCount = Math.max(0, sessionCount - 1);
    status(`Undone: cell ${r.item.cell_id} is back${r.item.label ? " (" + pretty(r.item.label) + ")" : ""}.`);
    setProgress(r.progress);
    render();
  });

  const forward = () => run(async () => {
    if (pos >= 0) { pos -= 1; render(); return; }
    if (!head) return;
    skipped.push(head.id);
    await api("POST", `/api/items/${head.id}/release`, {});
    const r = await api("POST", "/api/claim", { ...filt, exclude: skipped });
    head = r.item;
    status(head ? "Skipped." : "No other cell to show.");
    setProgress(r.progress);
    render();
  });

  function back() {
    if (pos + 1 < history.length) { pos += 1; render(); }
  }

  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const k = ev.key;
    if (k >= "1" && k <= "9" && Number(k) <= nClasses) label(labels[Number(k) - 1]);
    else if (k === "0") label("cant_tell");
    else if ((k === "x" || k === "X") && labels.includes("not_a_cell")) label("not_a_cell");
    else if (k === "u" || k === "U") undo();
    else if (k === "ArrowLeft") back();
    else if (k === "ArrowRight") forward();
    else if (k === "z" || k === "Z") zoomIn();
    else return;
    ev.preventDefault();
  });
  document.querySelectorAll(".key[data-label]").forEach((b) =>
    b.addEventListener("click", () => label(b.dataset.label)));
  for (const kind of ["crop", "context"]) {
    $(kind).addEventListener("error", () => onImageError(kind));
    $(kind).addEventListener("load", () => {
      if (kind === "context") $("no-context").classList.add("hidden");
      updateScale(kind);
    });
    $(`${kind}-view`).addEventListener("click", zoomIn);
  }
  $("zoom").addEventListener("click", zoomIn);
  setZoom(0);
  $("undo").addEventListener("click", undo);
  $("prev").addEventListener("click", back);
  $("next").addEventListener("click", forward);

  run(async () => {
    const h = await api("GET", "/api/history?limit=100");
    history = h.items;
    const r = await api("POST", "/api/claim", { ...filt, exclude: [] });
    head = r.item;
    setProgress(r.progress);
    render();
    body.dataset.ready = "1";
  });
})();
