"""CLI: ``cellclf calibrate`` — temperature, certified gate thresholds, conformal sets, OOD guard."""

from __future__ import annotations

from pathlib import Path

import typer

from cellclf.errors import OptionError


def _alpha_overrides(items: list[str]) -> dict[str, float]:
    """``CLASS=VALUE`` strings → {class: α}; a clear error for anything else."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError(item)
            out[name.strip()] = float(value)
        except ValueError:
            raise typer.BadParameter(f"'{item}': write CLASS=VALUE, e.g. other=0.002",
                                     param_hint="--alpha-class") from None
    return out


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    def calibrate(
        bundle: Path = typer.Argument(..., help="Model bundle directory."),
        data: Path = typer.Option(None, "--data", "-d",
                                  help="Calibration slides with truth (folder or manifest) the "
                                       "model never saw in training."),
        from_review: Path = typer.Option(
            None, "--from-review",
            help="Instead of --data: raise the thresholds where the running audit shows they "
                 "do not keep α (the .npz of `cellclf audit --export-calibration`)."),
        alpha: float = typer.Option(0.01, help="Maximum error rate among auto-accepted cells, per class."),
        alpha_class: list[str] = typer.Option(
            [], "--alpha-class", metavar="CLASS=VALUE", help="Per-class α override CLASS=VALUE (repeatable), "
                                      "e.g. --alpha-class other=0.002."),
        beta: float = typer.Option(
            0.01, help="Miss bound: at most this share of each target class may be auto-accepted "
                       "as 'other' (where it would be neither counted nor reviewed); raises "
                       "the threshold of 'other' as needed. 0 turns it off."),
        delta: float = typer.Option(0.05, help="Allowed failure probability (split evenly over all "
                                                "certified statements)."),
        alpha_set: float = typer.Option(0.1, "--alpha-set",
                                        help="Miscoverage of the reviewer's conformal label sets."),
        workers: int = typer.Option(0, min=0, help="Reader threads (0 = all cores)."),
        gate_unit: str = typer.Option(
            "auto", "--gate-unit",
            help="Which statement the thresholds carry: slides (slide-level Learn-then-Test: "
                 "holds for new slides; needs many calibration slides), cells (cells as "
                 "independent draws), auto (slides when there are enough calibration slides)."),
    ) -> None:
        """Fit the temperature and the risk-controlled per-class thresholds (error bound per class,
        miss bound per target class) on calibration slides and store them in card.json
        (re-exporting model.onnx if present)."""
        from rich.console import Console
        from rich.table import Table

        from cellclf.calibration.bundle_gate import (
            PREVIOUS_CARD,
            calibrate_bundle,
            refit_from_review,
        )
        from cellclf.card import load_card

        for name, value in (("--alpha", alpha), ("--delta", delta), ("--alpha-set", alpha_set)):
            if not 0 < value < 1:
                raise OptionError(f"{name} must lie between 0 and 1 (exclusive), got {value}")
        if not 0 <= beta < 1:
            raise OptionError(f"--beta must lie in [0, 1) (0 turns the miss bound off), got {beta}")
        load_card(bundle)  # a missing or invalid bundle is refused before reading any slide

        if (data is None) == (from_review is None):
            raise OptionError("give either --data SLIDES or --from-review FILE.npz")
        if gate_unit not in ("auto", "cells", "slides"):
            raise OptionError(f"--gate-unit must be auto, cells or slides, got {gate_unit!r}")
        if from_review is not None:
            r = refit_from_review(bundle, from_review)
            typer.echo(f"refit from {r['n_audit_cells']} audited cells on {r['n_slides']} slides:")
            for c, thr in r["thresholds"].items():
                old = r["previous_thresholds"].get(c)
                fmt = (lambda t: "—" if t is None else f"{t:.4f}")  # noqa: E731
                note = r["notes"].get(c, "")
                typer.echo(f"  {c}: {fmt(old)} → {fmt(thr)} ({r['n_audited'][c]} audited, "
                           f"{r['n_errors'][c]} wrong) {note}".rstrip())
            typer.echo(f"written to {bundle / 'card.json'}")
            return
        s = calibrate_bundle(bundle, data, alpha=alpha, delta=delta, alpha_set=alpha_set,
                             workers=workers, beta=beta if beta > 0 else None,
                             alpha_per_class=_alpha_overrides(alpha_class), unit=gate_unit)
        gate = s["gate"]
        console = Console()
        console.print(f"temperature {s['temperature']:.3f}; ECE {s['ece_before']:.4f} → "
                      f"{s['ece_after']:.4f} on {s['n_cells']} calibration cells")
        miss_txt = f", β = {gate['beta']:g}" if gate.get("beta") is not None else ", no miss bound"
        table = Table(title=f"gate: α = {alpha}{miss_txt}, δ = {delta} over {gate['n_tests']} "
                            "statements")
        for col in ("class", "α", "threshold", "n predicted", "miss: as other / true (max)"):
            table.add_column(col)
        notes = dict(gate.get("notes", {}))
        for c in gate["classes"]:
            thr = gate["thresholds"].get(c)
            if thr is None and c not in notes:
                notes[c] = "not certified: all its cells go to review"
            m = gate.get("miss", {}).get(c)
            miss = f"{m['n_missed']} / {m['n_true']} ({m['max_missed']})" if m else ""
            table.add_row(c, f"{gate['alpha_per_class'].get(c, gate['alpha']):g}",
                          "—" if thr is None else f"{thr:.4f}", str(gate["n_cal"].get(c)), miss)
        console.print(table)
        for c, note in notes.items():
            console.print(f"{c}: {note}", soft_wrap=True, markup=False)
        sg = s["gate_slides"]
        console.print(f"calibration slides ({sg['n_slides']}): {', '.join(sg['slides'])}",
                      soft_wrap=True, markup=False)
        console.print(f"gate unit: {sg['unit']}. {sg['statement']}", soft_wrap=True,
                      markup=False)
        if not sg["established"]:
            for c, n_need in sg["slides_needed_at_half_alpha"].items():
                console.print(f"  {c}: slide-level needs ≥ {sg['min_slides'][c]} slides with no "
                              f"errors, ≈ {n_need} when its accepted error runs at α/2",
                              soft_wrap=True, markup=False)
        if all(t is None for t in gate["thresholds"].values()):
            console.print(f"[yellow]warning:[/] no class could be certified with "
                          f"{s['n_cells']} calibration cells: every cell will go to review. Add "
                          "calibration slides with more labelled cells of each class.",
                          soft_wrap=True)
        console.print(f"written to {bundle / 'card.json'}; the previous card is kept as "
                      f"{bundle / PREVIOUS_CARD} (to go back: copy it over card.json, then run "
                      f"`cellclf export {bundle}`)", soft_wrap=True)
