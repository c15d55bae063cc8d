"""Running ``cellclf`` in-process for CLI-level tests: exit code and output, never a traceback."""

from __future__ import annotations

import sys

import pytest

from cellclf.cli import main


def cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str]:
    """Run ``cellclf ARGS`` through main(); (exit code, stdout + stderr on single spaces, since
    rich wraps long lines). Fails the test if a traceback reached the user."""
    old = sys.argv
    sys.argv = ["cellclf", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Traceback" not in text, text
    return code, " ".join(text.split())
