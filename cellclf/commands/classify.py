"""CLI: ``cellclf classify`` — a folder of single-cell images → classified.csv and a summary."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("classify")
    def classify(
        crops: Path = typer.Argument(..., help="Folder of single-cell images: DIR/*.png or "
                                               "DIR/<anything>/*.png (png, jpg, tif)."),
        model: str = typer.Option(..., "--model", "-m",
                                  help="Model bundle folder, or the name of a shipped model."),
        mpp: float = typer.Option(..., "--mpp", help="µm per pixel of the images (they are "
                                                     "resampled to the model's)."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder for classified.csv and "
                                                          "summary.json."),
        backend: str = typer.Option("auto", help="auto, torch or onnx."),
    ) -> None:
        """Classify each image and gate it: OUT/classified.csv has one row per image (image path
        relative to CROPS, class, decision accepted|review, reason, prob_<class>…)."""
        from cellclf.card import resolve_model
        from cellclf.evaluation.crops import classify_crops

        s = classify_crops(resolve_model(model), crops, out, crop_mpp=mpp, backend=backend)
        typer.echo(f"{s['n_images']} images: " + ", ".join(
            f"{c} {n} ({s['accepted'][c]} accepted)" for c, n in s["predicted"].items()))
        typer.echo(f"automation {100 * s['automation_rate']:.1f} %; review {s['review']} "
                   f"({', '.join(f'{k} {v}' for k, v in s['reasons'].items())})")
        typer.echo(f"stain/focus guard: {s['ood']['message']}")
        for key in ("note", "note_folders"):
            if key in s:
                typer.echo(f"note: {s[key]}")
        typer.echo(f"wrote {out / 'classified.csv'} and {out / 'summary.json'}")
