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
from cellclf.errors import print_error, user_message  # noqa: E402

app = typer.Typer(
    name="cellclf",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: wraps at any width, never truncates values
    add_completion=False,
)
register_all(app)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"cellclf {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version_callback,
                                 help="Print the cellclf version and exit."),
) -> None:
    """Find and classify eosinophils, neutrophils and mast cells on whole-slide images, with a
    calibrated gate that sends doubtful cells to a pathologist."""


@app.command("version", help="Print the cellclf version.")
def version() -> None:
    typer.echo(__version__)


def main() -> None:
    """Run the CLI; turn errors into one clear message (no traceback) and exit code 2.

    :class:`CellclfError` carries its own message; an operating-system error (a read-only or full
    disk, a path that is a folder, a missing permission) is described with the path it concerns.
    Anything else is a bug: a one-line message, and the traceback only with ``CELLCLF_DEBUG=1``."""
    try:
        app()
    except KeyboardInterrupt:
        print_error("interrupted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the one place errors become user messages
        if os.environ.get("CELLCLF_DEBUG"):
            raise
        print_error(user_message(exc))
        sys.exit(2)


if __name__ == "__main__":
    main()
