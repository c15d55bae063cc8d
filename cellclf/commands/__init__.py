"""CLI command groups, one module per area of the flow; each exposes ``register(app)``.

Modules here import only typer at import time; library code is imported inside commands.
"""

from __future__ import annotations

import importlib
import pkgutil

import typer


def register_all(app: typer.Typer) -> None:
    """Import every ``cellclf.commands.<name>`` module and let it add its commands to ``app``."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)
