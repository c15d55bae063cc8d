"""CLI: ``cellclf classify-cells`` — classify existing cells (a QuPath GeoJSON export) on a slide."""

from __future__ import annotations

from pathlib import Path

import typer

from cellclf.card import DEFAULT_MODEL, resolve_model


def register(app: typer.Typer) -> None:
    @app.command("classify-cells")
    def classify_cells(
        slide: Path = typer.Argument(..., help="The slide file the cells were detected on."),
        cells: Path = typer.Option(..., "--cells",
                                   help="GeoJSON of the cells (QuPath: File > Export objects as "
                                        "GeoJSON): points, or polygons (their centroids), "
                                        "level-0 pixel coordinates."),
        model: str = typer.Option(DEFAULT_MODEL, "--model", "-m",
                                  help="Model bundle folder, or the name of a shipped model "
                                       "(models/ of cellclf, whatever the working folder)."),
        out: Path = typer.Option(Path("results"), "--out", "-o", help="Output folder."),
        device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
        backend: str = typer.Option("auto", help="auto | torch | onnx"),
        workers: int = typer.Option(0, help="Reader threads (0 = all cores)."),
        review_db: str = typer.Option(None, "--review-db",
                                      help="Review store URL (default OUT/review.sqlite)."),
        mpp: float = typer.Option(None, help="µm per pixel for slides whose metadata lacks it."),
        hpf_area: float = typer.Option(0.237, "--hpf-area", help="HPF area in mm² for peak counts."),
        batch: int = typer.Option(None, help="Crops per classification batch."),
        precision: str = typer.Option("fp32", help="fp32, or int8 (the bundle's int8 graph "
                                                    "with its own gate)."),
    ) -> None:
        """Classify exactly the given cells (no detection) and write OUT/<slide_id>/ as `infer`
        does: cells.geojson (one feature per input cell, in input order), cells.parquet,
        summary.json, report; doubtful cells go to the review store."""
        from cellclf.pipeline.classify_cells import run_classify_cells

        folder, counts, n_review = run_classify_cells(
            slide, cells, resolve_model(model), out, backend=backend, device=device, workers=workers,
            review_db=review_db, mpp=mpp, hpf_area_mm2=hpf_area, batch=batch, precision=precision)
        total = sum(v["total"] for v in counts.values())
        typer.echo(f"{total} cells: " + ", ".join(f"{k} {v['total']} ({v['accepted']} auto)"
                                                   for k, v in counts.items())
                   + f"; {n_review} to review → {folder}")
