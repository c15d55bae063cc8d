"""``cellclf audit``: the review store's audit items and first answers → bounds, alarms, agreement.

Data flow: ``cellclf infer --audit-rate`` queues audit items (:mod:`cellclf.pipeline.run_slide`) →
reviewers label them like any other cell (blind) → :meth:`ReviewStore.audited_cells` and
:meth:`ReviewStore.first_answers` → the pure statistics of :mod:`cellclf.gate.audit_bound`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cellclf.card import load_card
from cellclf.errors import CellclfError
from cellclf.gate.audit_bound import agreement_report, audit_report
from cellclf.review.store import CANT_TELL, ReviewStore


def model_alphas(model: str | Path | None, classes: list[str], alpha: float) -> dict[str, float]:
    """α per class: from the bundle's gate when given, else ``alpha`` for every class."""
    if model is None:
        return {c: float(alpha) for c in classes}

    card = load_card(model)
    if not card.gate:
        raise CellclfError(f"{model}: the model card has no calibrated gate; run `cellclf "
                           "calibrate` or give --alpha instead of --model")
    per = card.gate.get("alpha_per_class") or {}
    return {c: float(per.get(c, card.gate["alpha"])) for c in card.classes}


def collect_audit(db: str, *, model: str | Path | None = None, alpha: float = 0.01,
                  site: str | None = None, confidence: float = 0.95) -> dict[str, Any]:
    """The audit report of a store (JSON-ready): ``audit`` (per class, per site, alarm) and
    ``agreement`` (per reviewer: seen / blind / audit agreement and the gap)."""
    store = ReviewStore(db)
    try:
        alphas = model_alphas(model, list(store.classes), alpha)
        cells = store.audited_cells(site)
        answers = store.first_answers(site)
    finally:
        store.close()
    return {"db": db, "site": site, "alphas": alphas, "n_audit_items": len(cells),
            "audit": audit_report(cells, alphas, CANT_TELL, confidence),
            "agreement": agreement_report(answers, CANT_TELL)}


def write_calibration(db: str, path: str | Path, audit_rate: float = 0.02) -> dict[str, Any]:
    """Reviewed and audited cells as ``.npz`` (probs, labels, slide ids, audit flag, weight =
    1/audit rate for audit cells): what a refit of the gate from review reads."""
    store = ReviewStore(db)
    try:
        classes = list(store.classes)
        rows = store.labelled_cells()
    finally:
        store.close()
    if not rows:
        raise CellclfError(f"{db}: no reviewed cells with an agreed class label yet")
    probs = np.array([[r["probs"].get(c, 0.0) for c in classes] for r in rows], np.float64)
    labels = np.array([classes.index(r["label"]) for r in rows], np.int64)
    audit = np.array([r["audit"] for r in rows], bool)
    np.savez(path, probs=probs, labels=labels, classes=np.array(classes),
             slides=np.array([r["slide_id"] for r in rows]), audit=audit,
             weight=np.where(audit, 1.0 / audit_rate, 1.0))
    return {"path": str(path), "n_cells": len(rows), "n_audit": int(audit.sum()),
            "n_slides": len({r["slide_id"] for r in rows})}


def print_audit(report: dict[str, Any]) -> None:
    """Rich tables of a :func:`collect_audit` report."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    a = report["audit"]
    conf = a["confidence"]
    table = Table(title=f"running audit of auto-accepted cells ({report['n_audit_items']} audit "
                        f"items; one-sided {conf:g} bounds)")
    for col in ("site", "class", "audited", "labelled", "errors", "error", "lower", "upper", "α",
                "state"):
        table.add_column(col)
    rows = [("all", a["per_class"])] + sorted(a["per_site"].items())
    for site, per in rows:
        for cls, e in per.items():
            rate = "–" if e["error_rate"] is None else f"{100 * e['error_rate']:.2f} %"
            style = {"alarm": "bold red", "ok": "green"}.get(e["state"], "yellow")
            table.add_row(site, cls, str(e["n_audited"]), str(e["n_labelled"]),
                          str(e["n_errors"]), rate, f"{100 * e['lower_bound']:.2f} %",
                          f"{100 * e['upper_bound']:.2f} %", f"{e['alpha']:g}",
                          f"[{style}]{e['state']}[/]")
    console.print(table)
    if a["alarm"]:
        console.print("[bold red]ALARM[/]: the accepted error of at least one class exceeds its α "
                      "on the audited slides; recalibrate (`cellclf calibrate`) before trusting "
                      "auto-accepted counts.")
    agr = Table(title="reviewer agreement with the model (first answers)")
    for col in ("reviewer", "seen: n", "seen: agree", "blind: n", "blind: agree", "gap",
                "audit: n", "audit: agree"):
        agr.add_column(col)
    fmt = (lambda v: "–" if v is None else f"{100 * v:.1f} %")  # noqa: E731
    for reviewer, r in report["agreement"].items():
        agr.add_row(reviewer, str(r["seen"]["n"]), fmt(r["seen"]["agreement"]),
                    str(r["blind"]["n"]), fmt(r["blind"]["agreement"]),
                    "–" if r["gap"] is None else f"{100 * r['gap']:+.1f} pts",
                    str(r["audit"]["n"]), fmt(r["audit"]["agreement"]))
    console.print(agr)
    if "calibration_export" in report:
        e = report["calibration_export"]
        console.print(f"wrote {e['path']}: {e['n_cells']} labelled cells ({e['n_audit']} audit) "
                      f"from {e['n_slides']} slides")
