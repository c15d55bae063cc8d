"""CLI: ``cellclf train`` (DATA + config → model bundle) and ``cellclf evaluate`` (bundle on slides
with truth → metrics.json, confusion.png, report.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from cellclf.commands._options import check_choice, check_output_dir, check_positive


def parse_pairs(items: list[str], option: str) -> dict[str, str]:
    """``NAME=VALUE`` strings → {name: value}; a clear error for anything else."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise typer.BadParameter(f"'{item}': write NAME=CLASS, e.g. lymphocyte=other",
                                     param_hint=option)
        out[name.strip()] = value.strip()
    return out


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        overrides: list[str] = typer.Argument(
            None, help="Config overrides as dotted key=value, e.g. train.epochs=5 "
                       "model.backbone=mobilenet_v3_small data.class_map.eos=eosinophil"),
        config: Path = typer.Option(None, "--config", "-c",
                                    help="YAML config (see configs/train.yaml); defaults if absent."),
        data: Path = typer.Option(..., "--data", "-d",
                                  help="A folder of slides with same-stem .geojson truth, a "
                                       "manifest (.csv/.yaml: slide, annotations, split), a points "
                                       "CSV (slide,x,y,class), a tile folder with its points.csv "
                                       "(image,x,y,class[,split]; --mpp) or a crop folder "
                                       "DIR/<class>/*.png."),
        out: Path = typer.Option(..., "--out", "-o", help="Bundle directory to write."),
        mpp: float = typer.Option(None, "--mpp",
                                  help="µm per pixel of a crop or tile folder's images "
                                       "(data.crop_mpp)."),
        coords_um: bool = typer.Option(False, "--um",
                                       help="CSV coordinates are in µm, not level-0 pixels."),
        cache: Path = typer.Option(None, "--cache",
                                   help="Crop cache folder (default DATA/.cellclf-cache)."),
        init: Path = typer.Option(None, "--init",
                                  help="Start from this bundle's weights (train.init); a new "
                                       "classification head when its classes differ."),
    ) -> None:
        """Train a cell classifier and write a bundle (card.json + model.pt + model.ckpt).

        Crops are cut at detector candidates matched to the annotations (unmatched candidates
        become `other`) and cached, so a second run never re-reads the slides.
        """
        from cellclf.model.config import load_config

        check_output_dir("--out", out)
        from cellclf.model.training import fit

        extra = list(overrides or [])
        if mpp is not None:
            extra.append(f"data.crop_mpp={mpp}")
        if coords_um:
            extra.append("data.coords=um")
        if init is not None:
            extra.append(f"train.init={init}")
        cfg = load_config(config, extra)
        bundle = fit(cfg, data, out, cache_dir=cache)
        typer.echo(f"wrote bundle {bundle}")

    @app.command("evaluate")
    def evaluate(
        bundle: Path = typer.Argument(..., help="Model bundle directory (card.json + model.pt) "
                                                "or a shipped model's name."),
        data: Path = typer.Option(..., "--data", "-d",
                                  help="Slides with truth: a folder of slide + same-stem "
                                       ".geojson pairs, or a manifest; a tile folder with its "
                                       "points.csv (image,x,y,class) with --mpp; or a labelled "
                                       "crop folder DIR/<class>/*.png with --mpp."),
        mpp: float = typer.Option(None, "--mpp", help="µm per pixel of a crop or tile folder's "
                                                      "images."),
        class_map: list[str] = typer.Option(
            [], "--class-map", metavar="FOLDER=CLASS",
            help="Crop folders: map a class folder to a model class (repeatable), e.g. "
                 "--class-map lymphocyte=other."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder for metrics.json, "
                                                          "confusion.png, report.md, cells.parquet."),
        match_um: float = typer.Option(4.0, help="Matching radius between candidates and truth."),
        workers: int = typer.Option(0, min=0, help="Reader threads (0 = automatic)."),
        progress: bool = typer.Option(True, help="Show progress bars."),
        coords_um: bool = typer.Option(False, "--um",
                                       help="CSV truth coordinates are in µm, not level-0 pixels."),
        precision: str = typer.Option("fp32", help="fp32, or int8: the bundle's model.int8.onnx "
                                                    "with its own gate."),
    ) -> None:
        """Detect, classify and match to truth; write metrics (macro-F1 over the target classes,
        balanced accuracy, per-class precision/recall/F1, count errors, detection recall)."""
        from cellclf.annotations.labelled_data import discover
        from cellclf.card import resolve_model

        check_positive("--match-um", match_um, allow_none=False, upper=50.0, unit=" µm")
        bundle = resolve_model(bundle)
        check_output_dir("--out", out)
        check_choice("--precision", precision, ("fp32", "int8"))
        if discover(data, mpp=mpp).kind == "crops":
            from cellclf.evaluation.crops import evaluate_crops

            _, metrics = evaluate_crops(bundle, data, out, crop_mpp=mpp,
                                        class_map=parse_pairs(class_map, "--class-map"),
                                        precision=precision)
            typer.echo(f"balanced accuracy {metrics['balanced_accuracy']:.3f} on "
                       f"{metrics['n_images']} crops; {metrics['ood']['message']}")
            typer.echo(f"wrote {out / 'metrics.json'}, confusion.png, report.md")
            return
        from cellclf.evaluation.evaluate import evaluate as run

        _, metrics = run(bundle, data, out, match_um=match_um, workers=workers, progress=progress,
                         coords="um" if coords_um else "px", precision=precision, mpp=mpp,
                         class_map=parse_pairs(class_map, "--class-map"))
        f1 = metrics["macro_f1"]
        typer.echo(f"macro-F1 {f1:.3f}" if f1 is not None else "macro-F1 n/a")
        typer.echo(f"wrote {out / 'metrics.json'}, confusion.png, report.md, cells.parquet")
