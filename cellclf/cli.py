"""Command-line entry point: a thin layer over library functions.

Each command lives in ``cellclf/commands/<area>.py`` and imports its heavy dependencies inside the
function body, so ``cellclf --help`` stays fast. Errors derived from
:class:`cellclf.errors.CellclfError` are printed as one clear message (no traceback), exit code 2.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import typer  # noqa: E402

from cellclf import __version__  # noqa: E402
from cellclf.commands import register_all  # noqa: E402
from cellclf.errors import CellclfError  # noqa: E402

app = typer.Typer(
    name="cellclf",
    help="Find and classify eosinophils, neutrophils and mast cells on whole-slide images, "
    "with a calibrated gate that sends doubtful cells to a pathologist.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
register_all(app)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(show_version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version,
        help="Print the cellclf version and exit.")) -> None:
    """Find and classify cells on whole-slide images (see the commands below)."""


@app.command("version", help="Print the cellclf version.")
def version() -> None:
    typer.echo(__version__)


def main() -> None:
    """Run the CLI; turn CellclfError into a one-line message and exit code 2."""
    try:
        app()
    except CellclfError as exc:
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
