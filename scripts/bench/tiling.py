"""Benchmark the ``read`` stage: our TileReader vs a plain ``openslide.read_region`` loop.

All methods read the same tiles (the tile grid's read windows) of one synthetic pyramidal JPEG
TIFF of at least 20k × 20k px, side by side in one run:

* plain loop: one OpenSlide handle, ``read_region`` + ``np.asarray``, one thread;
* TileReader, fast JPEG path, N worker threads (and 1 thread, for a per-core figure);
* TileReader with ``fast=False`` (OpenSlide in N threads).

The slide comes from ``cellclf.synth.render_slide`` when that exists (``--source``), otherwise a
procedural H&E-like texture written with :func:`cellclf.wsi.jpeg_tiles.write_pyramid_tiff` (512² JPEG
tiles); it is cached under ``--cache``. Prints a rich table (MP/s, ratio to the plain loop) and
appends it to docs/benchmarks.md with the machine, date and commit.

    nice .venv/bin/python scripts/bench/tiling.py [--size 20480] [--workers N] [--max-tiles K]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from cellclf.wsi.jpeg_tiles import write_pyramid_tiff  # noqa: E402
from cellclf.wsi.tile_reader import TileReader, default_workers  # noqa: E402
from cellclf.wsi.tiling import tile_grid  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_MD, append_section  # noqa: E402


def pattern_tile(level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Deterministic H&E-like texture at level-``level`` px (x, y, w, h): waves, dots, noise."""
    s = 2.0**level
    yy, xx = np.mgrid[y:y + h, x:x + w].astype(np.float32) * s
    v = (0.45 + 0.2 * np.sin(xx / 90.0) * np.cos(yy / 70.0) + 0.15 * np.sin((xx + 2 * yy) / 9.0)
         + 0.2 * (np.sin(xx / 6.0) * np.sin(yy / 6.0) > 0.8))
    rng = np.random.default_rng((level * 1_000_003 + y) * 1_000_003 + x)
    v = np.clip(v + rng.normal(0, 0.04, v.shape).astype(np.float32), 0, 1)
    rgb = np.stack([235 - 95 * v, 205 - 165 * v, 232 - 62 * v], axis=-1)
    return rgb.clip(0, 255).astype(np.uint8)


def make_slide(cache: Path, size: int, mpp: float, source: str = "auto") -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    try:
        from cellclf.synth import render_slide
    except ImportError:
        render_slide = None
    if render_slide is not None and source != "pattern":
        found = sorted(cache.glob(f"bench_synth_{size}.tif*"))
        if found:
            return found[0]
        print(f"rendering bench_synth_{size} with cellclf.synth.render_slide …", flush=True)
        slide, _ = render_slide(cache, size, size, mpp=mpp, seed=7, fmt="tiff",
                                name=f"bench_synth_{size}", progress=True)
        return Path(slide)
    slide = cache / f"bench_pattern_{size}.tif"
    if not slide.exists():
        print(f"writing {slide} (procedural texture, 512² JPEG tiles) …", flush=True)
        tmp = slide.with_suffix(".part.tif")
        write_pyramid_tiff(tmp, size, size, pattern_tile, mpp, tile_px=512, quality=90)
        tmp.rename(slide)
    return slide


def run_plain(path: Path, windows: list[tuple[int, int, int, int]]) -> float:
    import openslide

    osr = openslide.OpenSlide(str(path))
    t0 = time.perf_counter()
    for x0, y0, x1, y1 in windows:
        np.asarray(osr.read_region((x0, y0), 0, (x1 - x0, y1 - y0)))
    elapsed = time.perf_counter() - t0
    osr.close()
    return elapsed


def run_reader(path: Path, tiles, work_mpp: float, workers: int, fast: bool) -> float:
    with TileReader(path, work_mpp, workers=workers, fast=fast) as reader:
        t0 = time.perf_counter()
        for _ in reader.iter_tiles(tiles):
            pass
        return time.perf_counter() - t0


def identical_sample(path: Path, tiles, work_mpp: float) -> bool:
    with TileReader(path, work_mpp, workers=1) as fast, \
            TileReader(path, work_mpp, workers=1, fast=False) as slow:
        return all(np.array_equal(fast.read_tile(t), slow.read_tile(t)) for t in tiles)




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=20480, help="slide side, level-0 px (≥ 20480)")
    ap.add_argument("--mpp", type=float, default=0.5, help="slide µm per pixel")
    ap.add_argument("--tile-um", type=float, default=256.0, help="tile core, µm")
    ap.add_argument("--halo-um", type=float, default=20.0, help="tile halo, µm")
    ap.add_argument("--workers", type=int, default=0, help="reader threads (0 = all cores)")
    ap.add_argument("--max-tiles", type=int, default=0, help="read only the first K tiles")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/cellclf-bench"))
    ap.add_argument("--source", choices=["auto", "synth", "pattern"], default="auto",
                    help="synthetic H&E (cellclf.synth) or procedural texture; auto = synth if "
                         "available")
    ap.add_argument("--no-append", action="store_true", help="do not write docs/benchmarks.md")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console()
    path = make_slide(args.cache, args.size, args.mpp, args.source)
    with open(path, "rb") as fh:  # warm the page cache so every method reads from memory
        while fh.read(1 << 24):
            pass
    tiles = tile_grid(args.size, args.size, args.mpp, args.mpp, args.tile_um, args.halo_um)
    if args.max_tiles:
        tiles = tiles[: args.max_tiles]
    windows = [t.read for t in tiles]
    mp = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in windows) / 1e6
    workers = args.workers or default_workers()
    same = identical_sample(path, tiles[:: max(1, len(tiles) // 16)], args.mpp)

    runs = [("plain openslide.read_region loop (1 thread, 1 handle)",
             lambda: run_plain(path, windows)),
            (f"TileReader fast JPEG path, {workers} workers",
             lambda: run_reader(path, tiles, args.mpp, workers, True)),
            ("TileReader fast JPEG path, 1 worker",
             lambda: run_reader(path, tiles, args.mpp, 1, True)),
            (f"TileReader fast=False (OpenSlide), {workers} workers",
             lambda: run_reader(path, tiles, args.mpp, workers, False))]
    results = []
    for name, fn in runs:
        console.print(f"[dim]{name} …[/]")
        results.append((name, fn()))
    base = mp / results[0][1]

    tile_px = tiles[0].read[2] - tiles[0].read[0]
    title = (f"tiling: {len(tiles)} tiles of {tile_px}² px ({mp:.0f} MP) from "
             f"{path.name} ({args.size}² px, level 0, no resize); fast path pixels identical "
             f"to OpenSlide on a sample: {'yes' if same else 'NO'}")
    table = Table(title=title)
    for col in ("method", "seconds", "MP/s", "× plain loop"):
        table.add_column(col, justify="left" if col == "method" else "right")
    rows = []
    for name, secs in results:
        rate = mp / secs
        rows.append((name, f"{secs:.2f}", f"{rate:.0f}", f"{rate / base:.2f}"))
        table.add_row(*rows[-1])
    console.print(table)

    if args.no_append:
        return
    append_section("Tiling", [f"{title}.\n", "| method | seconds | MP/s | × plain loop |",
                              "| --- | ---: | ---: | ---: |", *(f"| {' | '.join(r)} |" for r in rows)])
    bench = BENCH_MD
    console.print(f"appended to {bench}")


if __name__ == "__main__":
    main()
