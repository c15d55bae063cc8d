"""CLI command groups, one module per area of the flow; each exposes ``register(app)``.

Modules here import only typer at import time; library code is imported inside commands.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import typer

# commands in the order of the work: make test data, look at a slide, find cells, train, measure,
# calibrate, deploy, run; then the review queue
WORKFLOW_ORDER = ("synth", "info", "detect", "train", "evaluate", "calibrate", "export", "infer",
                  "version")


def register_all(app: typer.Typer) -> None:
    """Import every ``cellclf.commands.<name>`` module and let it add its commands to ``app``;
    list them in workflow order with help text that reflows to the terminal width."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)
    rank = {name: i for i, name in enumerate(WORKFLOW_ORDER)}
    app.registered_commands.sort(key=lambda c: rank.get(c.name or "", len(rank)))
    commands = list(app.registered_commands)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            commands += group.typer_instance.registered_commands
            info = group.typer_instance.info
            info.help = reflow(info.help if isinstance(info.help, str) else None)
            group.short_help = first_sentence(info.help)
    for cmd in commands:
        cmd.help = reflow(cmd.help or (cmd.callback.__doc__ if cmd.callback else None))
        cmd.short_help = cmd.short_help or first_sentence(cmd.help)


def reflow(text: str | None) -> str | None:
    """Docstring → help text: lines of one paragraph joined (the terminal wraps them), paragraphs
    kept, indentation dropped; so ``--help`` never breaks mid-sentence at 80 columns."""
    if not text:
        return text
    paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(text))
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def first_sentence(text: str | None) -> str | None:
    """The first sentence of a help text, whole (click would cut it at 45 characters)."""
    if not text:
        return text
    head = re.split(r"(?<=[.])\s", text.split("\n\n")[0], maxsplit=1)[0]
    return head.rstrip(".")
