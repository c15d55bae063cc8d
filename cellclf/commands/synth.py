"""``cellclf synth``: render a synthetic H&E slide with ground-truth cells (cellclf.synth)."""

from __future__ import annotations

from pathlib import Path

import typer

from cellclf.commands._options import check_mpp, check_output_dir
from cellclf.errors import OptionError


def register(app: typer.Typer) -> None:
    @app.command("synth", help="Render a synthetic H&E whole-slide image (pyramidal JPEG TIFF "
                 "or Aperio-style SVS) and its ground-truth cells as QuPath GeoJSON. Test "
                 "data, not real tissue.")
    def synth(
        out_dir: Path = typer.Argument(..., help="Folder for <name>.tif/.svs and "
                                       "<name>.geojson (created if missing)."),
        width: int = typer.Option(..., "--width", help="Level-0 width in pixels."),
        height: int = typer.Option(..., "--height", help="Level-0 height in pixels."),
        mpp: float = typer.Option(0.25, "--mpp", help="µm per level-0 pixel (0.25 = 40x, "
                                  "0.5 = 20x)."),
        seed: int = typer.Option(0, "--seed", help="Random seed; same seed, same bytes."),
        difficulty: float = typer.Option(0.3, "--difficulty", help="0 = clean; 0.3 = "
                                         "realistic stain/scanner variation and ambiguous "
                                         "cells; 1 = hard."),
        fmt: str = typer.Option("tiff", "--format", help="tiff (generic pyramidal TIFF) or "
                                "svs (Aperio-style)."),
        name: str | None = typer.Option(None, "--name", help="File stem; default "
                                        "synth_s<seed>_d<difficulty>."),
        workers: int = typer.Option(0, "--workers", min=0, help="Processes; 0 = all cores."),
        style: str = typer.Option("v1", "--style", help="v1 (default: the original clean "
                                  "renderer) or v2 (glands, crowded and overlapping nuclei, "
                                  "lymphoid aggregates, larger vessels, out-of-plane nuclei, "
                                  "uneven staining, real-range stain/scanner variation)."),
    ) -> None:
        from cellclf.synth import render_slide

        check_output_dir("OUT_DIR", out_dir)
        check_mpp(mpp)
        if width < 1 or height < 1:
            raise OptionError(f"--width and --height must be at least 1 px, got {width} × {height}")

        slide, truth = render_slide(out_dir, width, height, mpp=mpp, seed=seed,
                                    difficulty=difficulty, fmt=fmt, name=name,
                                    workers=workers, progress=True, style=style)
        typer.echo(f"slide: {slide}")
        typer.echo(f"truth: {truth}")

    @app.command("synth-hybrid", help="Render synthetic eosinophils, neutrophils, mast cells "
                 "(and their ambiguous look-alikes) into REAL tissue: a slide (the CC0 CMU "
                 "slide, a --region of any slide) or a folder of tiles with points.csv "
                 "(bm_graz). Blended in the tissue's local stain, focus and noise; writes a "
                 "pyramidal TIFF/SVS and truth GeoJSON where the real nuclei (from the points, "
                 "else the classical detector: see nucleus_source) are the catch-all class.")
    def synth_hybrid(
        background: Path = typer.Argument(..., help="Slide file, or a folder of tiles with "
                                          "points.csv (image,x,y[,class][,split])."),
        out_dir: Path = typer.Argument(..., help="Folder for <name>.tif/.svs and "
                                       "<name>.geojson (created if missing)."),
        seed: int = typer.Option(0, "--seed", help="Random seed; same seed, same bytes."),
        difficulty: float = typer.Option(0.3, "--difficulty", help="Share of ambiguous "
                                         "cells: 0.05 + 0.15 x difficulty."),
        cells_per_mm2: float = typer.Option(300.0, "--cells-per-mm2", help="Synthetic cells "
                                            "per mm² of tissue (eosinophil 35%, neutrophil "
                                            "30%, mast cell 25%, mast-like plasma cell 10%)."),
        mpp: float | None = typer.Option(None, "--mpp", help="Output µm/px (default: the "
                                         "background's own; resampled otherwise)."),
        background_mpp: float | None = typer.Option(None, "--background-mpp", help="µm/px "
                                                    "of the tiles (tile folders carry none: "
                                                    "0.26 for bm_graz, 0.55 for crchisto)."),
        region: str | None = typer.Option(None, "--region", help="X,Y,W,H level-0 box of a "
                                          "slide background (default: the whole slide)."),
        max_tiles: int | None = typer.Option(None, "--max-tiles", help="Use only the first N "
                                             "tiles of a tile folder (sorted by path)."),
        fmt: str = typer.Option("tiff", "--format", help="tiff or svs (Aperio-style)."),
        name: str | None = typer.Option(None, "--name", help="File stem; default "
                                        "hybrid_<background>_s<seed>_d<difficulty>."),
    ) -> None:
        from cellclf.synth.hybrid import render_hybrid

        check_output_dir("OUT_DIR", out_dir)
        check_mpp(mpp)
        check_mpp(background_mpp, "--background-mpp")
        box = None
        if region is not None:
            try:
                box = tuple(int(v) for v in region.split(","))
            except ValueError:
                box = ()
            if len(box) != 4:
                raise OptionError(f"--region {region!r} must be X,Y,W,H in level-0 pixels, "
                                  "e.g. --region 0,0,4096,4096")
        res = render_hybrid(out_dir, background, seed=seed, difficulty=difficulty, mpp=mpp,
                            background_mpp=background_mpp, per_mm2=cells_per_mm2, fmt=fmt,
                            name=name, region=box, max_tiles=max_tiles)
        typer.echo(f"slide: {res.slide}")
        typer.echo(f"truth: {res.truth}")
        typer.echo(f"cells: {res.n_synthetic} synthetic, {res.n_real} real nuclei "
                   f"({res.nucleus_source}), {res.n_hidden} real nuclei hidden under "
                   "synthetic cells (left out of the truth)")
