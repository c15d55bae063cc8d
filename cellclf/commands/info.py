"""CLI: ``cellclf info`` — what a slide is (vendor, pixel size, pyramid, tissue area)."""

from __future__ import annotations

from pathlib import Path

import typer

from cellclf.commands._options import check_mpp


def register(app: typer.Typer) -> None:
    @app.command("info")
    def info(
        slide: Path = typer.Argument(..., help="Slide file (any format OpenSlide opens)."),
        mpp: float = typer.Option(None, help="µm per pixel for slides whose metadata lacks it "
                                             "(e.g. 0.25 for a 40× scan)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """Print a slide's vendor, µm per pixel (and where it came from), pyramid levels (and
        which the fast JPEG reader serves) and tissue area from a thumbnail mask."""
        from cellclf.wsi.info import slide_info

        check_mpp(mpp)
        facts = slide_info(slide, mpp=mpp)
        if as_json:
            import json

            typer.echo(json.dumps(facts, indent=2))
            return
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        power = facts["objective_power"]
        table = Table(title=escape(Path(facts["path"]).name), show_header=False)
        table.add_row("vendor", escape(str(facts["vendor"])))
        table.add_row("µm per pixel", "not stated in the slide" if facts["mpp"] is None else
                      f"{facts['mpp']:.4f} ({facts['mpp_source']})")
        table.add_row("objective", "unknown" if power is None else f"{power:g}×")
        table.add_row("size (level 0)", f"{facts['width']} × {facts['height']} px")
        for i, lv in enumerate(facts["levels"]):
            table.add_row(f"level {i}", f"{lv['width']} × {lv['height']} px, downsample "
                                        f"{lv['downsample']:.4g}, "
                                        f"{'fast JPEG' if lv['fast_jpeg'] else 'OpenSlide'}")
        if facts["tissue_area_mm2"] is None:
            table.add_row("tissue", "needs the pixel size (pass --mpp)")
        else:
            table.add_row("tissue", f"{facts['tissue_area_mm2']:.2f} mm² "
                                    f"({100 * facts['tissue_fraction']:.1f}% of the slide)")
        console = Console()
        console.print(table)
        if facts["note"]:
            console.print(f"[yellow]note:[/] {escape(facts['note'])}", soft_wrap=True)
