"""Benchmark the ``read`` stage side by side with the slide readers a user would pick instead.

The same tiles (the tile grid's read windows, 512 µm cores + 20 µm halo) of one synthetic 40×
slide (0.25 µm/px, 4× pyramid, JPEG tiles; rendered by ``cellclf synth`` and cached) are read by:

* cellclf's ``TileReader`` (raw-JPEG fast path, N worker threads);
* openslide-python: one handle per thread, ``read_region`` (its docs: handles are thread-safe,
  OpenSlideCache shared);
* tiffslide: one ``TiffSlide`` per thread, ``read_region(..., as_array=True)``;
* fastslide: one thread-safe ``FastSlide`` shared by the threads, ``read_region``.

Two workloads: **level 0** (tiles at the scan's 0.25 µm/px, no resize) and **working
resolution** (tiles at the model's 0.5 µm/px: each reader reads its best level for a 2×
downsample — level 0 here — and the peers reduce with Pillow's bilinear resize, as a user
would; cellclf reduces inside its reader). Each slide format (generic TIFF and Aperio SVS) is
read in ``--rounds`` rounds, the readers interleaved within a round; min and median seconds are
reported, with level-0 megapixels per second and the ratio to the best peer. Pixels are
compared with OpenSlide's on a sample of tiles (max |difference| in grey levels).

    .venv/bin/python scripts/bench/tiling.py [--size 20480] [--workers N] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from cellclf.wsi.tile_reader import TileReader, default_workers  # noqa: E402
from cellclf.wsi.tiling import Tile, tile_grid  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_section  # noqa: E402

SLIDE_MPP = 0.25
WORKLOADS = {"level 0 (0.25 µm/px)": SLIDE_MPP, "working resolution (0.5 µm/px)": 0.5}


def make_slide(cache: Path, size: int, fmt: str) -> Path:
    from cellclf.synth import render_slide

    cache.mkdir(parents=True, exist_ok=True)
    name = f"bench_{fmt}_{size}"
    found = [p for p in sorted(cache.glob(f"{name}.*")) if p.suffix in (".tif", ".svs")]
    if found:
        return found[0]
    print(f"rendering {name} with cellclf synth …", flush=True)
    slide, _ = render_slide(cache, size, size, mpp=SLIDE_MPP, seed=7, fmt=fmt, name=name,
                            progress=True)
    return Path(slide)


class PeerReader:
    """A peer library reading tile windows at a working mpp in a thread pool, as its docs suggest."""

    def __init__(self, kind: str, path: Path, work_mpp: float, workers: int) -> None:
        self.kind, self.path, self.workers = kind, path, workers
        self.ds = work_mpp / SLIDE_MPP
        self.local = threading.local()
        self.shared = None
        if kind == "fastslide":
            import fastslide

            self.shared = fastslide.FastSlide.from_file_path(str(path))
        probe = self._handle()
        self.level = probe.get_best_level_for_downsample(self.ds)
        self.level_ds = float(probe.level_downsamples[self.level])
        self.width, self.height = (int(v) for v in probe.dimensions)

    def _handle(self):
        if self.shared is not None:
            return self.shared
        handle = getattr(self.local, "h", None)
        if handle is None:
            if self.kind == "openslide":
                import openslide

                handle = openslide.OpenSlide(str(self.path))
            else:
                import tiffslide

                handle = tiffslide.TiffSlide(str(self.path))
            self.local.h = handle
        return handle

    def read(self, tile: Tile) -> np.ndarray:
        """The tile's read window at the working mpp; the part off the slide is white glass."""
        from PIL import Image

        x0, y0, x1, y1 = map(int, tile.read)
        ds = self.level_ds
        size = (round((x1 - x0) / ds), round((y1 - y0) / ds))
        # clip to the slide (fastslide takes no negative positions), paste onto white
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x1, self.width), min(y1, self.height)
        canvas = np.full((size[1], size[0], 3), 255, np.uint8)
        if cx1 > cx0 and cy1 > cy0:
            px, py = round((cx0 - x0) / ds), round((cy0 - y0) / ds)
            part = self._read_level((cx0, cy0), (min(round((cx1 - cx0) / ds), size[0] - px),
                                                 min(round((cy1 - cy0) / ds), size[1] - py)))
            canvas[py:py + part.shape[0], px:px + part.shape[1]] = part
        if (tile.out_w, tile.out_h) != size:
            canvas = np.asarray(Image.fromarray(canvas).resize((tile.out_w, tile.out_h),
                                                               Image.Resampling.BILINEAR))
        return canvas

    def _read_level(self, xy0: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        h = self._handle()
        if self.kind == "openslide":
            return np.asarray(h.read_region(xy0, self.level, size))[..., :3]
        if self.kind == "tiffslide":
            return h.read_region(xy0, self.level, size, as_array=True)[..., :3]
        return h.read_region(xy0, self.level, size).numpy()[..., :3]

    def read_all(self, tiles: list[Tile]) -> float:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(self.workers) as pool:
            for _ in pool.map(self.read, tiles):
                pass
        return time.perf_counter() - t0


def read_cellclf(path: Path, tiles: list[Tile], work_mpp: float, workers: int) -> float:
    with TileReader(path, work_mpp, workers=workers) as reader:
        t0 = time.perf_counter()
        for _ in reader.iter_tiles(tiles):
            pass
        return time.perf_counter() - t0


def pixel_gap(path: Path, tiles: list[Tile], work_mpp: float, kinds: list[str]) -> dict[str, str]:
    """Max |difference| to OpenSlide (read the same way) on a sample of tiles, per reader."""
    ref = PeerReader("openslide", path, work_mpp, 1)
    sample = tiles[:: max(1, len(tiles) // 8)]
    truth = [ref.read(t).astype(np.int16) for t in sample]
    out = {}
    with TileReader(path, work_mpp, workers=1) as reader:
        gap = max(int(np.abs(reader.read_tile(t).astype(np.int16) - r).max())
                  for t, r in zip(sample, truth, strict=True))
        out["cellclf TileReader"] = str(gap)
    for kind in kinds:
        peer = PeerReader(kind, path, work_mpp, 1)
        gap = max(int(np.abs(peer.read(t).astype(np.int16) - r).max())
                  for t, r in zip(sample, truth, strict=True))
        out[kind] = str(gap)
    return out


def available_peers() -> list[str]:
    kinds = ["openslide"]
    for mod in ("tiffslide", "fastslide"):
        try:
            __import__(mod)
            kinds.append(mod)
        except ImportError:
            print(f"{mod} not installed: `pip install {mod}` to include it", flush=True)
    return kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=20480, help="slide side, level-0 px")
    ap.add_argument("--workers", type=int, default=0, help="threads per reader (0 = all cores)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tiles", type=int, default=0, help="read only the first K tiles")
    ap.add_argument("--formats", default="tiff,svs")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/cellclf-bench"))
    ap.add_argument("--no-append", action="store_true", help="do not write docs/benchmarks.md")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console()
    workers = args.workers or default_workers()
    kinds = available_peers()
    lines = [f"Same tiles, {workers} threads per reader, {args.rounds} rounds (readers "
             "interleaved within a round); MP/s = level-0 megapixels covered per second (median "
             "round); × best peer = cellclf's median MP/s over the fastest peer's; pixel gap = max "
             "|difference| to OpenSlide read the same way, on 8 tiles.\n",
             "| slide | workload | reader | min s | median s | MP/s | × best peer | pixel gap |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for fmt in args.formats.split(","):
        path = make_slide(args.cache, args.size, fmt)
        with open(path, "rb") as fh:  # page cache warm: every reader reads from memory
            while fh.read(1 << 24):
                pass
        for workload, work_mpp in WORKLOADS.items():
            tiles = tile_grid(args.size, args.size, SLIDE_MPP, work_mpp, 512.0, 20.0)
            tiles = tiles[: args.max_tiles] if args.max_tiles else tiles
            mp = sum((t.read[2] - t.read[0]) * (t.read[3] - t.read[1]) for t in tiles) / 1e6
            runs: dict[str, Callable[[], float]] = {
                "cellclf TileReader": lambda p=path, t=tiles, m=work_mpp: read_cellclf(p, t, m,
                                                                                      workers)}
            for kind in kinds:
                runs[kind] = lambda k=kind, p=path, t=tiles, m=work_mpp: PeerReader(
                    k, p, m, workers).read_all(t)
            secs: dict[str, list[float]] = {name: [] for name in runs}
            for r in range(args.rounds):
                order = list(runs) if r % 2 == 0 else list(reversed(runs))
                for name in order:
                    console.print(f"[dim]{fmt} · {workload} · {name} · round {r + 1}[/]")
                    secs[name].append(runs[name]())
            gaps = pixel_gap(path, tiles, work_mpp, kinds)
            rate = {n: mp / statistics.median(s) for n, s in secs.items()}
            best_peer = max(rate[k] for k in kinds)
            table = Table(title=f"{path.name}: {workload}, {len(tiles)} tiles, {mp:.0f} MP level 0")
            for col in ("reader", "min s", "median s", "MP/s", "× best peer", "pixel gap"):
                table.add_column(col, justify="left" if col == "reader" else "right")
            for name, s in secs.items():
                row = (name, f"{min(s):.2f}", f"{statistics.median(s):.2f}", f"{rate[name]:.0f}",
                       f"{rate[name] / best_peer:.2f}", gaps[name])
                table.add_row(*row)
                lines.append(f"| {fmt} | {workload} | " + " | ".join(row) + " |")
            console.print(table)
    if not args.no_append:
        append_section(f"Tiling with peers ({args.size}² px synthetic 40× slides)", lines)
        console.print("appended to docs/benchmarks.md")


if __name__ == "__main__":
    main()
