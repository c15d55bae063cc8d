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
    ) -> None:
        from cellclf.synth import render_slide

        check_output_dir("OUT_DIR", out_dir)
        check_mpp(mpp)
        if width < 1 or height < 1:
            raise OptionError(f"--width and --height must be at least 1 px, got {width} × {height}")

        slide, truth = render_slide(out_dir, width, height, mpp=mpp, seed=seed,
                                    difficulty=difficulty, fmt=fmt, name=name,
                                    workers=workers, progress=True)
        typer.echo(f"slide: {slide}")
        typer.echo(f"truth: {truth}")
