"""CLI: ``cellclf detect`` — class-agnostic cell candidates of a slide or a tile folder, scored."""

from __future__ import annotations

from pathlib import Path

import typer

from cellclf.commands._options import check_choice, check_mpp, check_output_file


def register(app: typer.Typer) -> None:
    @app.command("detect")
    def detect(
        slide: Path = typer.Argument(..., help="Slide file (any format OpenSlide opens), or a "
                                               "folder of PNG/JPEG/TIFF tiles (needs --mpp)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output: GeoJSON of candidate points "
                                                          "(slide) or points CSV (tile folder)."),
        mpp: float = typer.Option(None, help="µm per pixel: for tile folders, and slides whose "
                                             "metadata lacks it."),
        truth: Path = typer.Option(None, help="Truth to score the candidates against: a GeoJSON "
                                              "of labelled points (slide) or a points CSV "
                                              "image,x,y[,class] in 0-based px (tile folder)."),
        where: list[str] = typer.Option(None, help="Tile folders: use only the images whose "
                                                   "truth rows have COLUMN=VALUE (e.g. "
                                                   "split=validation); repeatable."),
        match_um: float = typer.Option(4.0, "--match-um", help="One-to-one match radius (µm)."),
        metrics_json: Path = typer.Option(None, "--metrics-json",
                                          help="Where to write the metrics (default: "
                                               "OUT_STEM.metrics.json beside OUT)."),
        detector: str = typer.Option("classical", help="classical (fixed H&E stain) | learned "
                                                       "(heat-map network) | classical-adaptive "
                                                       "(tile folders: the set's own Macenko "
                                                       "stain and glass)"),
        detector_bundle: Path = typer.Option(None, "--detector-bundle",
                                             help="Detector bundle for --detector learned "
                                                  "(default: models/cellclf-detector-v2)."),
        workers: int = typer.Option(0, min=0, help="Reader threads (0 = all cores)."),
        backend: str = typer.Option("auto", help="auto | numpy | torch"),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        """Find cell candidates (one point per cell, any class) and write them as a
        QuPath-importable GeoJSON (slides) or a points CSV (tile folders). With --truth, print
        recall per class, precision, F1 and the duplicate rate (one-to-one within --match-um)
        and write them as JSON."""
        from cellclf.annotations.tile_folder import parse_where
        from cellclf.detect.candidates import detect_tiles_to_csv, detect_to_geojson
        from cellclf.errors import ConfigError

        check_mpp(mpp)
        check_output_file("--out", out)
        if metrics_json is not None:
            check_output_file("--metrics-json", metrics_json)
        check_choice("--backend", backend, ("auto", "numpy", "torch"))
        check_choice("--detector", detector, ("classical", "learned", "classical-adaptive"))
        if not match_um > 0:
            raise ConfigError(f"--match-um must be positive, got {match_um}")
        if slide.is_dir():
            metrics = detect_tiles_to_csv(slide, out, mpp, truth=truth, where=parse_where(where),
                                          metrics_json=metrics_json, match_um=match_um,
                                          detector=detector, detector_bundle=detector_bundle)
        else:
            if where:
                raise ConfigError("--where applies to tile folders only")
            if detector not in ("classical", "learned"):
                raise ConfigError(f"--detector {detector}: slides take classical or learned "
                                  "(classical-adaptive is for tile folders)")
            metrics = detect_to_geojson(slide, out, mpp=mpp, truth=truth,
                                        metrics_json=metrics_json, workers=workers,
                                        progress=progress, backend=backend, match_um=match_um,
                                        detector=detector, detector_bundle=detector_bundle)
        if metrics is None:
            typer.echo(f"wrote {out}")
            return
        _print_metrics(slide.name, metrics)

    @app.command("train-detector")
    def train_detector_cmd(
        data: Path = typer.Argument(..., help="Folder of PNG/JPEG/TIFF tiles (with --mpp and a "
                                              "points CSV), or a slide (with QuPath GeoJSON "
                                              "points)."),
        truth: Path = typer.Option(..., help="Points: CSV image,x,y (tiles, 0-based px) or "
                                             "QuPath GeoJSON (slide, level-0 px)."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder for the detector bundle."),
        mpp: float = typer.Option(None, help="µm per pixel (tile folders; slides lacking it)."),
        where: list[str] = typer.Option(None, help="Tile folders: only rows with COLUMN=VALUE."),
        init: Path = typer.Option(None, help="Fine-tune this detector bundle (e.g. "
                                             "models/cellclf-detector-v2) instead of starting "
                                             "from scratch."),
        minutes: float = typer.Option(10.0, help="Training time budget."),
        val_share: float = typer.Option(0.2, help="Share of tiles held out to choose the "
                                                  "peak threshold (a slide is split in two)."),
        threads: int = typer.Option(1, help="Torch threads."),
    ) -> None:
        """Train (or fine-tune) the learned cell detector from point annotations: a heat map of
        Gaussian peaks at cell centres. Writes OUT/card.json, OUT/detector.onnx (runs without
        torch) and OUT/detector.pt."""
        from cellclf.detect.learned_train import fit_from_annotations

        card = fit_from_annotations(data, truth, out, mpp=mpp, where=where, init=init,
                                    minutes=minutes, val_share=val_share, threads=threads,
                                    log=typer.echo)
        typer.echo(f"wrote {out}: threshold {card['threshold']}, held out {card['validation']}")


def _print_metrics(name: str, metrics: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    table = Table(title=f"{name} vs truth ({metrics['match_um']} µm)")
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
    table.add_row("F1", "", pct(metrics["f1"]))
    table.add_row("duplicate rate", f"{metrics['n_duplicates']} / {metrics['n_pred']}",
                  pct(metrics["duplicate_rate"]))
    console = Console()
    console.print(table)
    console.print(f"wrote {metrics['candidates']} and {metrics['metrics_json']}")
