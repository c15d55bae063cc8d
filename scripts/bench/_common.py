"""Shared helpers for the benchmarks: machine description, commit, and appending a section to
docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH_MD = REPO / "docs" / "benchmarks.md"


def commit() -> str:
    """The measured commit: ``CELLCLF_COMMIT`` when set (a copy of the tree without .git), else git's."""
    if os.environ.get("CELLCLF_COMMIT"):
        return os.environ["CELLCLF_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    text = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
    try:
        import torch

        if torch.cuda.is_available():
            text += f", GPU {torch.cuda.get_device_name(0)}"
        else:
            text += ", no GPU"
    except ImportError:
        text += ", no torch"
    load = os.getloadavg()
    return text + f", load average {load[0]:.1f} at the end"


def append_lines(lines: list[str]) -> Path:
    """Append markdown lines to docs/benchmarks.md (creating it with its header)."""
    if not BENCH_MD.exists():
        BENCH_MD.write_text("# Benchmarks\n\nAppended by the scripts in `scripts/bench/`; "
                            "newest last.\n")
    with BENCH_MD.open("a", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return BENCH_MD


def append_section(title: str, lines: list[str]) -> None:
    """Append ``## title — date, commit`` with the machine line and ``lines`` (markdown)."""
    stamp = datetime.now().strftime("%Y-%m-%dT%H:%M")
    append_lines([f"\n## {title} — {stamp}, commit {commit()}\n", f"Machine: {machine()}.\n",
                  *lines])
