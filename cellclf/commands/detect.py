"""CLI: ``cellclf detect`` — class-agnostic cell candidates of a slide, optionally scored."""

from __future__ import annotations

from pathlib import Path

import typer

from cellclf.commands._options import check_choice, check_mpp, check_output_file


def register(app: typer.Typer) -> None:
    @app.command("detect")
    def detect(
        slide: Path = typer.Argument(..., help="Slide file (any format OpenSlide opens)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output GeoJSON of candidate points."),
        mpp: float = typer.Option(None, help="µm per pixel for slides whose metadata lacks it."),
        truth: Path = typer.Option(None, help="Ground-truth GeoJSON (labelled points) to score "
                                              "the candidates against."),
        metrics_json: Path = typer.Option(None, "--metrics-json",
                                          help="Where to write the metrics (default: "
                                               "OUT_STEM.metrics.json beside OUT)."),
        workers: int = typer.Option(0, min=0, help="Reader threads (0 = all cores)."),
        backend: str = typer.Option("auto", help="auto | numpy | torch"),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        """Find cell candidates (one point per cell, any class) and write them as a
        QuPath-importable GeoJSON. With --truth, print recall per class, precision and the
        duplicate rate (match radius 4 µm) and write them as JSON."""
        from cellclf.detect.candidates import detect_to_geojson

        check_mpp(mpp)
        check_output_file("--out", out)
        if metrics_json is not None:
            check_output_file("--metrics-json", metrics_json)
        check_choice("--backend", backend, ("auto", "numpy", "torch"))

        metrics = detect_to_geojson(slide, out, mpp=mpp, truth=truth, metrics_json=metrics_json,
                                    workers=workers, progress=progress, backend=backend)
        if metrics is None:
            typer.echo(f"wrote {out}")
            return
        from rich.console import Console
        from rich.table import Table

        def pct(v: float | None) -> str:
            return "n/a" if v is None else f"{100 * v:.1f}%"

        table = Table(title=f"{slide.name} vs truth ({metrics['match_um']} µm)")
        table.add_column("truth class")
        table.add_column("found / truth", justify="right")
        table.add_column("recall", justify="right")
        for cls, rec in metrics["recall"].items():
            table.add_row(cls, f"{metrics['n_found'][cls]} / {metrics['n_truth'][cls]}", pct(rec))
        table.add_section()
        table.add_row("all", f"{sum(metrics['n_found'].values())} / "
                             f"{sum(metrics['n_truth'].values())}", pct(metrics["recall_all"]))
        table.add_row("precision", f"{metrics['n_matched']} / {metrics['n_pred']}",
                      pct(metrics["precision"]))
        table.add_row("duplicate rate", f"{metrics['n_duplicates']} / {metrics['n_pred']}",
                      pct(metrics["duplicate_rate"]))
        console = Console()
        console.print(table)
        console.print(f"wrote {out} and {metrics['metrics_json']}")
