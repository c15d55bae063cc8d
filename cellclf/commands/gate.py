"""CLI: ``cellclf calibrate`` — temperature, certified gate thresholds, conformal sets, OOD guard."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    def calibrate(
        bundle: Path = typer.Argument(..., help="Model bundle directory."),
        data: Path = typer.Option(..., "--data", "-d",
                                  help="Calibration slides with truth (folder or manifest) the "
                                       "model never saw in training."),
        alpha: float = typer.Option(0.01, help="Maximum error rate among auto-accepted cells, per class."),
        delta: float = typer.Option(0.05, help="Allowed failure probability (split over classes)."),
        alpha_set: float = typer.Option(0.1, "--alpha-set",
                                        help="Miscoverage of the reviewer's conformal label sets."),
        workers: int = typer.Option(0, help="Reader threads (0 = all cores)."),
    ) -> None:
        """Fit the temperature and the risk-controlled per-class thresholds on calibration slides
        and store them in card.json (re-exporting model.onnx if present)."""
        from rich.console import Console
        from rich.table import Table

        from cellclf.calibration import calibrate_bundle

        s = calibrate_bundle(bundle, data, alpha=alpha, delta=delta, alpha_set=alpha_set,
                             workers=workers)
        gate = s["gate"]
        console = Console()
        console.print(f"temperature {s['temperature']:.3f}; ECE {s['ece_before']:.4f} → "
                      f"{s['ece_after']:.4f} on {s['n_cells']} calibration cells")
        table = Table(title=f"gate: α = {alpha}, δ = {delta}")
        for col in ("class", "threshold", "n predicted", "note"):
            table.add_column(col)
        for c in gate["classes"]:
            thr = gate["thresholds"].get(c)
            note = "" if thr is not None else (
                f"not certified: all to review; ≈{gate.get('n_more_needed', {}).get(c)} more "
                "calibration cells needed at zero errors")
            table.add_row(c, "—" if thr is None else f"{thr:.4f}", str(gate["n_cal"].get(c)), note)
        console.print(table)
        console.print(f"written to {bundle / 'card.json'}")
