"""What a pathologist reads: ``overlay.png`` (thumbnail, class density, hotspot HPF) and
``report.html`` (counts, densities, hotspot, gate statistics, model summary), per slide.

Sits at the end of the flow, called by :mod:`cellclf.outputs.results` after inference and by
``cellclf review finalize`` after review (the report is rebuilt from ``summary.json`` alone, so the
final counts show once reviewers have labelled the queued cells). Needs only Pillow (no torch).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cellclf.annotations.geojson import class_color
from cellclf.gate.slide_guard import OOD_ACTION
from cellclf.outputs.atomic import atomic_write_text

if TYPE_CHECKING:
    from cellclf.outputs.slide_result import SlideResult

def write_overlay(path: Path, result: SlideResult, summary: dict, max_px: int = 1600) -> None:
    """Thumbnail with a translucent density map of the first target class (the card's order),
    coloured dots of the target classes and that class's hotspot HPF."""
    from PIL import Image, ImageDraw, ImageFilter

    thumb = Image.fromarray(np.ascontiguousarray(result.thumbnail)).convert("RGB")
    ds = float(result.thumb_downsample)
    scale = min(1.0, max_px / max(thumb.size))
    if scale < 1.0:
        thumb = thumb.resize((max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale))),
                             Image.Resampling.LANCZOS)
        ds = ds / scale
    pred = result.pred
    # density of the first target class, blurred at ~1/2 HPF
    dens_cls = (result.target_classes or result.classes)[0]
    k = result.classes.index(dens_cls)
    pts = result.xy0[pred == k] / ds
    w, h = thumb.size
    if len(pts):
        hist, _, _ = np.histogram2d(pts[:, 1], pts[:, 0], bins=(h, w), range=((0, h), (0, w)))
        radius_px = summary["peak_hpf"].get(dens_cls, {}).get("radius_px", 500.0) / ds
        img = Image.fromarray((hist / hist.max() * 255).astype(np.uint8))
        img = img.filter(ImageFilter.GaussianBlur(max(radius_px / 2, 1.0)))
        dens = np.asarray(img, dtype=np.float32)
        if dens.max() > 0:
            alpha = (dens / dens.max() * 140).astype(np.uint8)
            layer = np.zeros((h, w, 4), np.uint8)
            layer[..., 0], layer[..., 1], layer[..., 3] = 255, 120, alpha
            thumb = Image.alpha_composite(thumb.convert("RGBA"), Image.fromarray(layer)).convert("RGB")
    draw = ImageDraw.Draw(thumb)
    dot = 1 if len(result.xy0) > 20000 else 2
    other = summary.get("model_card", {}).get("other_class")
    for kk, name in enumerate(result.classes):
        if name == other:
            continue
        colour = class_color(name)
        for x, y in result.xy0[pred == kk] / ds:
            draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=colour)
    hot = summary["peak_hpf"].get(dens_cls)
    if hot and hot["count"] > 0:
        cx, cy, r = hot["x"] / ds, hot["y"] / ds, hot["radius_px"] / ds
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(0, 0, 0), width=3)
        draw.ellipse((cx - r - 2, cy - r - 2, cx + r + 2, cy + r + 2), outline=(255, 255, 0), width=2)
    thumb.save(path)


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return html.escape(str(v))


def _hpf_text(hpf: dict) -> str:
    return "–" if hpf.get("x") is None else f"({hpf['x']:.0f}, {hpf['y']:.0f})"


def clinical_call_html(summary: dict) -> str:
    """The clinical call table (the first thing a pathologist sees) and the audit line."""
    e = html.escape
    calls = summary.get("clinical_call") or []
    colour = {"met": "#c33", "not met": "#282", "needs review": "#c80"}
    rows = "".join(
        f"<tr><td>{e(c['name'])}</td><td style='color:{colour.get(c['status'], '#222')}'>"
        f"<b>{e(c['status'])}</b></td><td>{e(c['class'])} ≥ {c['threshold']}</td>"
        f"<td>{c['interval'][0]}–{c['interval'][1]}</td>"
        f"<td>{_hpf_text(c['hpf'])}</td><td class=muted>{e(c['reason'])}</td></tr>" for c in calls)
    table = (f"<table><tr><th>rule</th><th>call</th><th>criterion (per HPF)</th>"
             f"<th>peak count interval</th><th>HPF centre (level-0 px)</th><th>reason</th></tr>"
             f"{rows}</table>" if calls else "<p>No clinical rules apply to this model.</p>")
    audit = summary.get("audit") or {}
    audit_html = (f"<p class=muted>Running audit: {audit.get('n_audited', 0)} auto-accepted "
                  f"cells ({100 * audit.get('rate', 0):g} %) queued for blind review; "
                  "<code>cellclf audit</code> reports the bound on the accepted error.</p>"
                  if audit else "")
    return (f"<h2>Clinical call</h2>{table}<p class=muted>The call is <i>met</i> or <i>not "
            f"met</i> only when no pending review cell could change it.</p>{audit_html}")


def render_report_html(summary: dict) -> str:
    e = html.escape
    counts = summary["counts"]
    final = summary.get("final")
    rows = []
    pending = int(final.get("pending", 0)) if final else 0
    for name, c in counts.items():
        dens = summary["per_mm2"].get(name, {})
        hot = summary["peak_hpf"].get(name)
        fin = final["counts"].get(name) if final else None
        # a count is final only when no queued cell is still waiting for a reviewer
        fin_txt = (_fmt(fin) if final and not pending else
                   f"pending ({pending} cells)" if final else "–")
        rows.append(
            f"<tr><td>{e(name)}</td><td>{c['accepted']}</td><td>{c['review']}</td>"
            f"<td>{c['total']}</td><td>{fin_txt}</td>"
            f"<td>{_fmt(dens.get('total'))}</td>"
            f"<td>{hot['count'] if hot else '–'}</td></tr>")
    gate = summary["gate"]
    card = summary.get("model_card", {})
    gate_card = card.get("gate") or {}
    reasons = ", ".join(f"{e(k)}: {v}" for k, v in gate.get("reasons", {}).items()) or "–"
    ood = gate.get("ood") or {}
    ood_html = (f"<p class=warn><b>Slide flagged out of distribution</b>: "
                f"{e('; '.join(ood.get('reasons', [])))}. What to do: {e(OOD_ACTION)}.</p>"
                if ood.get("flagged") else "")
    if final:
        status = (f"<p><b>Review:</b> {final.get('reviewed', 0)} reviewed, "
                  f"{final.get('pending', 0)} pending, {final.get('cant_tell', 0)} can't tell "
                  f"(updated {e(str(final.get('updated_at', '')))}).</p>")
    else:
        status = ("<p><b>Review:</b> not yet finalised — the 'total' column counts machine "
                  "predictions; queued cells await a pathologist.</p>")
    timings = timings_table(summary.get("timings_s", {}))
    versions = "".join(f"<tr><td>{e(str(k))}</td><td>{e(str(v))}</td></tr>"
                       for k, v in summary.get("versions", {}).items())
    card_classes = [c for c in card.get("classes", counts) if c != card.get("other_class")]
    legend = legend_html(card_classes)
    hotspots = hotspot_rows(summary["peak_hpf"], summary["slide"]["mpp"])
    auto = gate.get("automation_rate")
    guarantee = gate_card.get("guarantee") or "no calibrated gate in this model card"
    area = summary["hpf_area_mm2"]
    sl = summary["slide"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cellclf — {e(summary['slide_id'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}.warn{{background:#fee;padding:8px;border:1px solid #c33}}
img{{max-width:100%;border:1px solid #ccc}}.muted{{color:#666;font-size:90%}}</style></head><body>
<h1>Slide {e(summary['slide_id'])}</h1>
<p class=muted>{e(str(sl['path']))} · {sl['width']}×{sl['height']} px · {sl['mpp']:.3f} µm/px ·
tissue {summary['tissue_area_mm2']:.2f} mm² · {summary['n_cells']:,} cells</p>
{clinical_call_html(summary)}
{ood_html}{status}
<h2>Counts</h2>
<table><tr><th>class</th><th>auto-accepted</th><th>to review</th><th>total (predicted)</th>
<th>final (after review)</th><th>per mm² tissue</th><th>peak per HPF ({area} mm²)</th></tr>
{''.join(rows)}</table>
<h2>Hotspots</h2><p class=muted>The high-power field (HPF, {area} mm²) with the most cells of each
class; centre in level-0 pixels (x right, y down from the top-left corner) and in mm.</p>
<table><tr><th>class</th><th>cells in the HPF</th><th>centre x, y (px)</th><th>centre x, y (mm)</th>
</tr>{hotspots}</table>
<h2>Overlay</h2><p class=muted>Dots: predicted cells ({legend}); shading: density of
{e(card_classes[0] if card_classes else '')}; ringed: its hotspot HPF.</p>
<img src="overlay.png" alt="slide overlay">
<h2>Gate</h2><p>Automation rate {_fmt(None if auto is None else 100 * auto)} % · reasons: {reasons}</p>
<p class=muted>{e(str(guarantee))}</p>
<h2>Model</h2><p>{e(str(card.get('name', '?')))} v{e(str(card.get('version', '?')))} ·
classes {e(', '.join(card.get('classes', [])))} · {card.get('mpp', '?')} µm/px ·
crop {card.get('crop_px', '?')} px</p>
<p class=muted>{e(str(card.get('intended_use', '')))}</p>
<h2>Run</h2>
<table class=muted><tr><th>step</th><th>seconds</th></tr>{timings}</table>
<h3>Versions</h3><table class=muted><tr><th>software</th><th>version</th></tr>{versions}</table>
</body></html>
"""


def write_report(slide_dir: Path) -> Path:
    """(Re)build ``report.html`` from ``summary.json`` in ``slide_dir``."""
    slide_dir = Path(slide_dir)
    summary = json.loads((slide_dir / "summary.json").read_text())
    out = slide_dir / "report.html"
    atomic_write_text(out, render_report_html(summary))
    return out


# steps measured inside another step (shown indented, never added to the total twice)
NESTED_TIMINGS = {"classify": "read_detect_classify", "device_stage_wait": "read_detect_classify"}


def timings_table(timings: dict[str, float]) -> str:
    """Table rows: each top-level step, its nested steps as "of which …", then the total."""
    e = html.escape
    rows = []
    for k, v in timings.items():
        if k == "total" or k in NESTED_TIMINGS:
            continue
        rows.append(f"<tr><td>{e(k)}</td><td>{v:.2f}</td></tr>")
        rows += [f"<tr><td>&nbsp;&nbsp;of which {e(n)}</td><td>{timings[n]:.2f}</td></tr>"
                 for n, parent in NESTED_TIMINGS.items() if parent == k and n in timings]
    if "total" in timings:
        rows.append(f"<tr><td><b>total</b></td><td><b>{timings['total']:.2f}</b></td></tr>")
    return "".join(rows) or "<tr><td>–</td><td>–</td></tr>"


def legend_html(classes: list[str]) -> str:
    """Inline colour swatches of the classes drawn on the overlay."""
    return ", ".join(f"<span style='color:rgb{class_color(c)}'>&#9679;</span> {html.escape(c)}"
                     for c in classes)


def hotspot_rows(peaks: dict[str, dict], mpp: float) -> str:
    """One row per target class: cells in its peak HPF and the HPF centre (px and mm)."""
    e = html.escape
    rows = []
    for name, hot in peaks.items():
        if not hot or not hot.get("count"):
            rows.append(f"<tr><td>{e(name)}</td><td>0</td><td>–</td><td>–</td></tr>")
            continue
        x, y = float(hot["x"]), float(hot["y"])
        rows.append(f"<tr><td>{e(name)}</td><td>{hot['count']}</td><td>{x:,.0f}, {y:,.0f}</td>"
                    f"<td>{x * mpp / 1000:.2f}, {y * mpp / 1000:.2f}</td></tr>")
    return "".join(rows)
