"""Benchmark: render a synthetic slide (``cellclf.synth.render_slide``) and report its speed.

Prints level-0 megapixels per second (all levels, truth and JPEG included), per worker, and the
peak resident memory of the main process and of the largest worker, then appends a section to
docs/benchmarks.md with the machine, date and commit.

    python scripts/bench/synth.py                       # 20000 x 20000 at 0.25 µm/px
    python scripts/bench/synth.py --large --workers 16  # 100000 x 80000 (the lent GPU machine)
    python scripts/bench/synth.py --style v2            # the v2 renderer (tissue architecture)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))




sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import commit as _commit  # noqa: E402


def _append_section(text: str) -> Path:
    path = REPO / "docs" / "benchmarks.md"
    if not path.exists():
        path.write_text("# Benchmarks\n\nAppended by the scripts in `scripts/bench/`; newest "
                        "last.\n")
    with path.open("a", encoding="utf-8") as fh:
        fh.write("\n" + text)
    return path


def _run(width: int, height: int, args, workers: int) -> dict:
    from cellclf.synth import render_slide

    with tempfile.TemporaryDirectory(prefix="bench-synth-") as tmp:
        out = args.out or Path(tmp)
        t0 = time.perf_counter()
        slide, truth = render_slide(out, width, height, mpp=args.mpp, seed=args.seed,
                                    difficulty=args.difficulty, fmt=args.format,
                                    workers=workers, progress=sys.stderr.isatty(),
                                    style=args.style)
        seconds = time.perf_counter() - t0
        size_mb = slide.stat().st_size / 1e6
        with truth.open() as fh:
            n_cells = sum(1 for line in fh if line.startswith('{"type":"Feature"'))
    mp = width * height / 1e6
    return {"workers": workers, "seconds": seconds, "mps": mp / seconds, "cells": n_cells,
            "mb": size_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=20000)
    ap.add_argument("--height", type=int, default=20000)
    ap.add_argument("--large", action="store_true", help="100000 x 80000 px")
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--workers", type=int, default=0, help="0 = all cores")
    ap.add_argument("--single", action="store_true",
                    help="also render with 1 worker (same slide) for the per-core rate")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--difficulty", type=float, default=0.3)
    ap.add_argument("--format", default="tiff", choices=("tiff", "svs"))
    ap.add_argument("--style", default="v1", choices=("v1", "v2"))
    ap.add_argument("--out", type=Path, default=None, help="keep the files here")
    ap.add_argument("--no-record", action="store_true", help="do not append to benchmarks.md")
    args = ap.parse_args()
    if args.large:
        args.width, args.height = 100_000, 80_000
    workers = args.workers or os.cpu_count() or 1
    runs = [_run(args.width, args.height, args, workers)]
    if args.single and workers > 1:
        runs.append(_run(args.width, args.height, args, 1))
    rss_main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    lines = ["| workers | seconds | level-0 MP/s | MP/s per worker | cells | file MB |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        lines.append(f"| {r['workers']} | {r['seconds']:.1f} | {r['mps']:.1f} | "
                     f"{r['mps'] / r['workers']:.2f} | {r['cells']} | {r['mb']:.0f} |")
    when = datetime.datetime.now().strftime("%Y-%m-%dT%H:%M")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = (f"## Synthetic slides — {when}, commit {_commit()}\n\n"
            f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()} (load average {load} "
            f"after the run). synth: `render_slide` {args.width}x{args.height} px at "
            f"{args.mpp} µm/px, d={args.difficulty:g}, {args.format}, seed {args.seed}, style "
            f"{args.style}; all "
            f"pyramid levels, truth GeoJSON and JPEG encoding included. Peak RSS {rss_main:.0f} "
            f"MB main process, {rss_child:.0f} MB largest worker.\n\n" + "\n".join(lines) + "\n")
    print(text)
    if not args.no_record:
        print(f"appended to {_append_section(text)}")


if __name__ == "__main__":
    main()
