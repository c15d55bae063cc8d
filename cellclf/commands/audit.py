"""CLI: ``cellclf audit`` — the running audit of auto-accepted cells and reviewer agreement."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("audit")
    def audit(
        db: str = typer.Option(..., "--db", help="Review store URL or path (the one `cellclf "
                                                 "infer` filled)."),
        model: str = typer.Option(None, "--model", "-m",
                                  help="Model bundle folder or shipped model name: α per class "
                                       "from its gate (else --alpha)."),
        alpha: float = typer.Option(0.01, help="Error bound to check when no --model is given."),
        site: str = typer.Option(None, "--site", help="Only cells tagged with this site/scanner."),
        confidence: float = typer.Option(0.95, help="Confidence of the one-sided bounds."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
        export_calibration: Path = typer.Option(
            None, "--export-calibration",
            help="Write the reviewed and audited cells (probabilities, labels, slides, weights) "
                 "as .npz: the data path for refitting the gate from review."),
    ) -> None:
        """Per class and per site: audited auto-accepted cells, their errors, the one-sided
        Clopper–Pearson bounds on the accepted error, and an alarm when the lower bound exceeds
        α; per reviewer, agreement with the model when they could see its answer vs when they
        could not. Exit code 3 when an alarm is raised."""
        from cellclf.card import resolve_model
        from cellclf.review.audit_report import collect_audit, print_audit, write_calibration

        bundle = resolve_model(model) if model else None
        report = collect_audit(db, model=bundle, alpha=alpha, site=site, confidence=confidence)
        if export_calibration is not None:
            report["calibration_export"] = write_calibration(db, export_calibration)
        if as_json:
            typer.echo(json.dumps(report, indent=2))
        else:
            print_audit(report)
        raise typer.Exit(3 if report["audit"]["alarm"] else 0)
