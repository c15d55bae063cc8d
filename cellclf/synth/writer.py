"""Synthetic slides, step 4: the files — truth GeoJSON, then a pyramidal JPEG-tiled TIFF/SVS.

``render_slide`` is the entry point of the ``cellclf synth`` command. Pass 1 computes the cells
block row by block row (``placement``), streams them into the truth GeoJSON and keeps each row
as a small ``.npy`` file in a scratch folder. Pass 2 renders every pyramid level directly at its
own resolution (``render``), chunk by chunk, JPEG-encodes the tiles in the workers and lets
tifffile write the already-encoded tiles page by page (one page per level, not SubIFDs). Both
passes run on a process pool with ordered ``imap``, so the output bytes do not depend on the
number of workers, and memory stays flat in the slide size.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cellclf.errors import ConfigError

from .celltypes import CELL_TYPES, CLASS_COLORS, MAX_RADIUS_UM, NO_TYPE
from .layout import STYLES, SlideLayout, make_layout
from .placement import BLOCK_UM, STRAY_UM, block_row_cells, n_blocks
from .render import Optics, make_optics, render_region

TILE_PX = 512          # TIFF tile edge
CHUNK_TILES = 4        # tiles per render task (one tile row, up to this many columns)
LEVEL_FACTOR = 4       # downsample between pyramid levels
MIN_LEVEL_PX = 1024    # the smallest level is at most this large
MAX_CELL_PX_UM = 4.0   # coarser levels draw tissue only (cells would be ~1 px)
FORMATS = ("tiff", "svs")
POOL_MIN_PIXELS = 6_000_000   # with workers=0, smaller slides render in-process


def pyramid_levels(width: int, height: int, factor: int = LEVEL_FACTOR,
                   min_px: int = MIN_LEVEL_PX) -> list[tuple[int, int]]:
    """Level sizes: level 0 is (width, height); each next is ``ceil(size / factor)`` of the
    previous, down to the first level whose larger side is ≤ ``min_px``."""
    levels = [(int(width), int(height))]
    while max(levels[-1]) > min_px:
        w, h = levels[-1]
        levels.append((max(1, math.ceil(w / factor)), max(1, math.ceil(h / factor))))
    return levels


def default_name(seed: int, difficulty: float) -> str:
    """``synth_s<seed>_d<difficulty>``, e.g. ``synth_s0_d0.3``."""
    return f"synth_s{seed}_d{difficulty:g}"


def _validate(width, height, mpp, seed, difficulty, fmt, name, workers, style) -> None:
    if style not in STYLES:
        raise ConfigError(f"unknown synthetic slide style {style!r}; use one of: "
                          f"{', '.join(STYLES)} (v2 adds tissue architecture)")
    for label, value in (("width", width), ("height", height)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"synthetic slide {label} must be a positive whole number of "
                              f"pixels, got {value!r}; pass e.g. --{label} 2048")
    if int(width) * int(height) > 2 ** 40:
        raise ConfigError(f"synthetic slide {width}x{height} px is too large; keep it below "
                          "2^40 pixels")
    if not (isinstance(mpp, (int, float)) and 0.05 <= float(mpp) <= 16.0):
        raise ConfigError(f"synthetic slide mpp must be between 0.05 and 16 µm per pixel, got "
                          f"{mpp!r}; 0.25 is a 40x scan, 0.5 a 20x scan")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"synthetic slide seed must be a whole number ≥ 0, got {seed!r}")
    if not (isinstance(difficulty, (int, float)) and 0.0 <= float(difficulty) <= 1.0):
        raise ConfigError(f"synthetic slide difficulty must be between 0 and 1, got "
                          f"{difficulty!r}; 0 is clean, 0.3 is the realistic default")
    if fmt not in FORMATS:
        raise ConfigError(f"unknown synthetic slide format {fmt!r}; use one of: "
                          f"{', '.join(FORMATS)}")
    if name is not None and (not name or not re.fullmatch(r"[\w.\-]+", name)):
        raise ConfigError(f"synthetic slide name {name!r} must be a plain file name (letters, "
                          "digits, '.', '_', '-')")
    if not isinstance(workers, (int, np.integer)) or workers < 0:
        raise ConfigError(f"workers must be 0 (all cores) or a positive number, got {workers!r}")


# --- worker state (set once per process) -------------------------------------------------------

_STATE: dict = {}


def _init_worker(layout: SlideLayout, optics: Optics, rows_dir: str, mpp: float) -> None:
    _STATE.clear()
    _STATE.update(layout=layout, optics=optics, rows_dir=rows_dir, mpp=mpp, rows=OrderedDict())


def _row(by: int) -> np.ndarray:
    cache: OrderedDict = _STATE["rows"]
    arr = cache.get(by)
    if arr is None:
        arr = np.load(os.path.join(_STATE["rows_dir"], f"{by}.npy"))
        cache[by] = arr
        while len(cache) > 48:
            cache.popitem(last=False)
    else:
        cache.move_to_end(by)
    return arr


def _feature_text(cells: np.ndarray, mpp: float) -> str:
    parts = []
    for c in cells:
        name = CELL_TYPES[int(c["type"])]
        amb = int(c["amb_with"])
        props = {
            "objectType": "detection",
            "classification": {"name": name, "color": list(CLASS_COLORS[name])},
            "ambiguous": amb != NO_TYPE,
            "ambiguous_with": CELL_TYPES[amb] if amb != NO_TYPE else None,
            "diameter_um": round(float(c["diam"]), 2),
        }
        geom = {"type": "Point", "coordinates": [round(float(c["x"]) / mpp, 2),
                                                 round(float(c["y"]) / mpp, 2)]}
        parts.append(json.dumps({"type": "Feature", "geometry": geom, "properties": props},
                                separators=(",", ":")))
    return ",\n".join(parts)


def _cells_task(by: int) -> tuple[int, str]:
    """Pass 1: cells of one block row -> scratch .npy and GeoJSON text."""
    cells = block_row_cells(_STATE["layout"], by)
    np.save(os.path.join(_STATE["rows_dir"], f"{by}.npy"), cells)
    return len(cells), _feature_text(cells, _STATE["mpp"])


def _render_task(task: tuple[int, int, int, int, int, int]) -> list[bytes]:
    """Pass 2: one tile row segment of one level -> JPEG bytes per tile."""
    import imagecodecs

    level, ty, tx0, tx1, lw, lh = task
    layout: SlideLayout = _STATE["layout"]
    optics: Optics = _STATE["optics"]
    ds = LEVEL_FACTOR ** level
    px_um = _STATE["mpp"] * ds
    x0, y0 = tx0 * TILE_PX, ty * TILE_PX
    w = min(tx1 * TILE_PX, lw) - x0
    h = min((ty + 1) * TILE_PX, lh) - y0
    cells = np.zeros(0)
    if px_um <= MAX_CELL_PX_UM:
        reach = MAX_RADIUS_UM + STRAY_UM + 2.0
        r_lo = int((y0 * px_um - reach) // BLOCK_UM)
        r_hi = int(((y0 + h) * px_um + reach) // BLOCK_UM)
        rows = range(max(0, r_lo), min(n_blocks(layout)[0], r_hi + 1))
        parts = [_row(r) for r in rows]
        cells = np.concatenate(parts) if parts else cells
    rgb = render_region(layout, optics, cells, x0, y0, w, h, px_um, noise_scale=1.0 / ds)
    full = np.empty((TILE_PX, (tx1 - tx0) * TILE_PX, 3), np.uint8)
    full[...] = np.clip(optics.i0 + 0.5, 0, 255).astype(np.uint8)
    full[:h, :w] = rgb
    out = []
    for k in range(tx1 - tx0):
        tile = np.ascontiguousarray(full[:, k * TILE_PX:(k + 1) * TILE_PX])
        out.append(imagecodecs.jpeg_encode(tile, level=optics.jpeg_quality, colorspace="RGB",
                                           outcolorspace="YCBCR", subsampling=(2, 2)))
    return out


# --- orchestration ------------------------------------------------------------------------------

@contextmanager
def _mapper(n_workers: int, initargs: tuple):
    """An ordered ``imap``: a process pool, or in-process for one worker."""
    if n_workers <= 1:
        _init_worker(*initargs)
        yield map
        return
    # fork (Linux): no re-import of the caller's __main__, so scripts need no main guard;
    # the workers use no threads or BLAS. Elsewhere, spawn.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ctx.Pool(n_workers, initializer=_init_worker, initargs=initargs)
    finished = False
    try:
        yield lambda fn, items: pool.imap(fn, items, chunksize=1)
        finished = True
    finally:
        # close() lets the workers leave on their own; terminate() (errors only) can race the
        # pool's worker handler, which may start a fresh worker that then waits forever on a
        # queue lock held by a killed one (seen: a hung test run)
        if finished:
            pool.close()
        else:
            pool.terminate()
        pool.join()


def _render_tasks(levels: list[tuple[int, int]]) -> list[tuple[int, int, int, int, int, int]]:
    tasks = []
    for level, (lw, lh) in enumerate(levels):
        nty, ntx = math.ceil(lh / TILE_PX), math.ceil(lw / TILE_PX)
        for ty in range(nty):
            for tx0 in range(0, ntx, CHUNK_TILES):
                tasks.append((level, ty, tx0, min(ntx, tx0 + CHUNK_TILES), lw, lh))
    return tasks


def _aperio_description(w: int, h: int, lw: int, lh: int, mpp: float, quality: int) -> str:
    mag = 10.0 / mpp
    head = f"Aperio Image Library v12.0.0 \n{w}x{h} [0,0 {w}x{h}] ({TILE_PX}x{TILE_PX})"
    if (lw, lh) != (w, h):
        head += f" -> {lw}x{lh}"
    return f"{head} JPEG/RGB Q={quality}|AppMag = {mag:g}|MPP = {mpp:g}|Filename = cellclf-synth"


def _write_pyramid(path: Path, levels, mpp: float, optics: Optics, fmt: str, meta: str,
                   results: Iterator[list[bytes]]) -> None:
    import tifffile

    w0, h0 = levels[0]
    bigtiff = w0 * h0 * 3 * 1.4 > 2 ** 31

    def tiles(n_tasks: int) -> Iterable[bytes]:
        for _ in range(n_tasks):
            yield from next(results)

    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        for level, (lw, lh) in enumerate(levels):
            nty, ntx = math.ceil(lh / TILE_PX), math.ceil(lw / TILE_PX)
            n_tasks = nty * math.ceil(ntx / CHUNK_TILES)
            lmpp = mpp * LEVEL_FACTOR ** level
            desc = (_aperio_description(w0, h0, lw, lh, mpp, optics.jpeg_quality)
                    if fmt == "svs" else meta)
            tw.write(tiles(n_tasks), shape=(lh, lw, 3), dtype=np.uint8,
                     tile=(TILE_PX, TILE_PX), photometric="rgb", compression="jpeg",
                     compressionargs={"level": optics.jpeg_quality},
                     subfiletype=0 if level == 0 else 1, description=desc, metadata=None,
                     resolution=(1e4 / lmpp, 1e4 / lmpp), resolutionunit="CENTIMETER",
                     software="cellclf synth")


def render_slide(out_dir, width: int, height: int, mpp: float = 0.25, seed: int = 0,
                 difficulty: float = 0.3, fmt: str = "tiff", name: str | None = None,
                 workers: int = 0, progress: bool = False, style: str = "v1"
                 ) -> tuple[Path, Path]:
    """Render a synthetic H&E slide and its ground truth; returns (slide path, truth path).

    Writes ``out_dir/<name>.tif`` (generic pyramidal TIFF, mpp in the resolution tags) or
    ``.svs`` (Aperio-style description: vendor ``aperio``, MPP, AppMag) and
    ``out_dir/<name>.geojson`` (one QuPath detection point per cell, level-0 px). The same
    arguments give byte-identical files for any ``workers`` (0 = all cores). ``style`` "v2"
    adds tissue architecture and real-range optics (``architecture``); "v1" is the original.
    """
    _validate(width, height, mpp, seed, difficulty, fmt, name, workers, style)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = name or default_name(int(seed), float(difficulty)) + ("" if style == "v1"
                                                                  else f"_{style}")
    slide_path = out / f"{name}.{'svs' if fmt == 'svs' else 'tif'}"
    truth_path = out / f"{name}.geojson"
    layout = make_layout(width * mpp, height * mpp, int(seed), float(difficulty), style)
    optics = make_optics(int(seed), float(difficulty), style)
    levels = pyramid_levels(width, height)
    rows = n_blocks(layout)[0]
    tasks = _render_tasks(levels)
    n_cpu = os.cpu_count() or 1
    n_workers = min(n_cpu if workers == 0 else int(workers), len(tasks))
    if workers == 0 and width * height < POOL_MIN_PIXELS:
        n_workers = 1                   # small: starting a pool would cost more than it saves
    meta = (f"cellclf synthetic H&E slide; seed={seed}; difficulty={difficulty:g}; "
            f"mpp={mpp:g}; not real tissue" + ("" if style == "v1" else f"; style={style}"))
    scratch = tempfile.mkdtemp(prefix=".synth-", dir=out)
    try:
        with _mapper(n_workers, (layout, optics, scratch, float(mpp))) as imap, \
                _progress(progress, rows + len(tasks)) as advance:
            tmp_truth = truth_path.with_suffix(".geojson.part")
            with open(tmp_truth, "w", encoding="utf-8") as fh:
                fh.write('{"type":"FeatureCollection","features":[\n')
                first = True
                for count, text in imap(_cells_task, range(rows)):
                    if count:
                        fh.write(text if first else ",\n" + text)
                        first = False
                    advance(1)
                fh.write("\n]}\n")
            results = _advancing(imap(_render_task, tasks), advance)
            tmp_slide = slide_path.with_name(slide_path.name + ".part")
            _write_pyramid(tmp_slide, levels, float(mpp), optics, fmt, meta, results)
        os.replace(tmp_truth, truth_path)
        os.replace(tmp_slide, slide_path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return slide_path, truth_path


def _advancing(results: Iterable[list[bytes]], advance) -> Iterator[list[bytes]]:
    for r in results:
        advance(1)
        yield r


@contextmanager
def _progress(enabled: bool, total: int):
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("synth"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn()) as bar:
        job = bar.add_task("render", total=total)
        yield lambda n: bar.advance(job, n)
