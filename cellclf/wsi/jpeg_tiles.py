"""Fast read path: JPEG tiles taken straight out of TIFF/SVS-family files (stage ``read``).

OpenSlide stays the reader of record (formats, metadata, levels). For Aperio SVS and generic tiled
TIFF files whose pyramid levels are JPEG-tiled pages that tifffile sees, this module reads the raw
tile bytes (``page.dataoffsets`` / ``page.databytecounts``) with ``os.pread`` on a file handle of
its own, decodes them with ``imagecodecs.jpeg8_decode`` (libjpeg-turbo, releases the GIL) and
assembles the requested level-pixel rectangle; :func:`cellclf.wsi.slide.finish_read` then resizes it
exactly as the OpenSlide path does.

Decoding matches OpenSlide's own: abbreviated tile streams get the page's ``JPEGTables``; the JPEG
colour space follows the TIFF photometric tag (``RGB`` → the components are decoded as RGB, which
is Aperio's convention, ``YCbCr`` → converted); pixels past the level edge and missing tiles
(byte count 0) are white. At integer downsamples the pixels equal OpenSlide's bit for bit (tested).
At a non-integer downsample (a pyramid with odd sizes) OpenSlide resamples its read by a sub-pixel
shift, so the two paths differ by that interpolation only (tolerance tested).

Anything else (JPEG 2000 SVS, other vendors, non-JPEG levels) is left to OpenSlide: ``probe``
returns the levels it can serve, possibly none. :class:`TileCache` shares decoded tiles between
threads (neighbouring read windows overlap by their halos). :func:`write_pyramid_tiff` writes the
files this path reads (tests, benchmarks, conversions).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellclf.errors import SlideOpenError

FAST_VENDORS = frozenset({"aperio", "generic-tiff"})
_JPEG = 7
_COLORSPACE = {2: "RGB", 6: "YCbCr"}  # TIFF photometric → JPEG component colour space


@dataclass(frozen=True)
class JpegLevel:
    """Where one pyramid level's JPEG tiles lie in the file."""

    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: np.ndarray  # int64, row-major tile order
    counts: np.ndarray
    tables: bytes | None
    colorspace: str  # "RGB" or "YCbCr"

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_w)

    def spans(self, x: int, y: int, w: int, h: int):
        """The tiles meeting the level-px rectangle (x, y, w, h), clipped to the level: yields
        ``(index, ox, oy, ax0, ay0, ax1, ay1)`` with the tile's origin and the intersection."""
        cx0, cy0 = max(x, 0), max(y, 0)
        cx1, cy1 = min(x + w, self.width), min(y + h, self.height)
        if cx1 <= cx0 or cy1 <= cy0:
            return
        for ty in range(cy0 // self.tile_h, (cy1 - 1) // self.tile_h + 1):
            for tx in range(cx0 // self.tile_w, (cx1 - 1) // self.tile_w + 1):
                ox, oy = tx * self.tile_w, ty * self.tile_h
                yield (ty * self.tiles_across + tx, ox, oy, max(cx0, ox), max(cy0, oy),
                       min(cx1, ox + self.tile_w), min(cy1, oy + self.tile_h))


def _page_ok(page) -> bool:
    return bool(page.is_tiled and int(page.compression) == _JPEG and page.samplesperpixel == 3
                and page.bitspersample == 8 and int(page.planarconfig) == 1
                and getattr(page, "tiledepth", 1) == 1 and not page.extrasamples
                and int(page.photometric) in _COLORSPACE)


def probe(path: str | Path, level_dimensions: tuple[tuple[int, int], ...],
          vendor: str | None) -> dict[int, JpegLevel]:
    """The OpenSlide levels this path can serve: {level index: JpegLevel}; {} if none."""
    if vendor not in FAST_VENDORS:
        return {}
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            pages = [p for p in tif.pages if p.is_tiled]
            found: dict[int, JpegLevel] = {}
            used: set[int] = set()
            for level, (lw, lh) in enumerate(level_dimensions):
                for i, page in enumerate(pages):
                    if i in used or (page.imagewidth, page.imagelength) != (lw, lh):
                        continue
                    used.add(i)
                    if _page_ok(page):
                        found[level] = JpegLevel(
                            lw, lh, int(page.tilewidth), int(page.tilelength),
                            np.asarray(page.dataoffsets, np.int64),
                            np.asarray(page.databytecounts, np.int64),
                            page.jpegtables, _COLORSPACE[int(page.photometric)])
                    break
    except Exception:  # tifffile cannot parse it: OpenSlide serves everything
        return {}
    return found


class TileCache:
    """Decoded JPEG tiles shared by all worker threads, least recently used out first.

    Neighbouring read windows overlap by their halos and share JPEG tiles; tiles being read in
    parallel are neighbours (row-major order). A tile is decoded once: a thread asking for a tile
    another thread is decoding waits for it instead of decoding it again. Bounded by bytes.
    """

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[tuple[int, int], np.ndarray | None] = OrderedDict()
        self._pending: dict[tuple[int, int], threading.Event] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int],
            decode: Callable[[], np.ndarray | None]) -> np.ndarray | None:
        """The cached tile for ``key``, else ``decode()`` it (once across threads) and keep it."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            event = self._pending.get(key)
            owner = event is None
            if owner:
                event = self._pending[key] = threading.Event()
        if not owner:
            event.wait()
            with self._lock:
                if key in self._items:
                    self.hits += 1
                    return self._items[key]
            return decode()  # the owner failed or the tile was evicted already
        value = None
        try:
            value = decode()
        finally:
            with self._lock:
                del self._pending[key]
                self.misses += 1
                size = 0 if value is None else value.nbytes
                if size <= self.max_bytes:
                    self._items[key] = value
                    self.bytes += size
                    while self.bytes > self.max_bytes:
                        _, old = self._items.popitem(last=False)
                        self.bytes -= 0 if old is None else old.nbytes
            event.set()
        return value


class JpegTileSource:
    """Reads level-pixel rectangles from raw JPEG tiles; one instance per worker thread."""

    def __init__(self, path: str | Path, levels: dict[int, JpegLevel],
                 cache: TileCache | None = None) -> None:
        self.path = Path(path)
        self.levels = levels
        self.cache = cache
        self._fd: int | None = None
        self._lock = threading.Lock()

    def serves(self, level: int) -> bool:
        return level in self.levels

    def _fileno(self) -> int:
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def raw_tile(self, level: int, index: int) -> bytes | None:
        """Tile ``index`` (row-major) of ``level`` as stored (None for a missing tile)."""
        lv = self.levels[level]
        count = int(lv.counts[index])
        if count == 0:
            return None
        offset = int(lv.offsets[index])
        data = os.pread(self._fileno(), count, offset)
        if len(data) != count:
            raise SlideOpenError(f"{self.path}: cannot read JPEG tile {index} of level {level} at "
                                 f"byte {offset}: short read ({len(data)} of {count} bytes), "
                                 "truncated file")
        return data

    def decode_tile(self, level: int, index: int) -> np.ndarray | None:
        """Decoded tile ``index`` (row-major) of ``level``, or None for a missing tile."""
        import imagecodecs

        data = self.raw_tile(level, index)
        if data is None:
            return None
        lv = self.levels[level]
        try:
            return imagecodecs.jpeg8_decode(data, tables=lv.tables, colorspace=lv.colorspace,
                                            outcolorspace="RGB")
        except Exception as exc:
            raise SlideOpenError(f"{self.path}: cannot decode JPEG tile {index} of level {level} "
                                 f"at byte {int(lv.offsets[index])}: truncated or corrupt "
                                 f"({exc})") from exc

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Level-px rectangle (x, y, w, h) as RGB uint8 (h, w, 3); white outside the level."""
        lv = self.levels[level]
        out = np.full((h, w, 3), 255, np.uint8)
        for index, ox, oy, ax0, ay0, ax1, ay1 in lv.spans(x, y, w, h):
            if self.cache is None:
                tile = self.decode_tile(level, index)
            else:
                tile = self.cache.get((level, index), lambda i=index: self.decode_tile(level, i))
            if tile is not None:
                out[ay0 - y:ay1 - y, ax0 - x:ax1 - x] = tile[ay0 - oy:ay1 - oy, ax0 - ox:ax1 - ox, :3]
        return out

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def array_tile_fn(rgb: np.ndarray):
    """A ``tile_fn`` for :func:`write_pyramid_tiff` serving an in-memory RGB image; each level
    is the previous one box-averaged 2× (Pillow ``reduce``), sizes rounded down."""
    from PIL import Image

    levels = [np.ascontiguousarray(rgb[..., :3])]

    def tile_fn(level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        while len(levels) <= level:
            levels.append(np.asarray(Image.fromarray(levels[-1]).reduce(2)))
        return levels[level][y:y + h, x:x + w]

    return tile_fn


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """JFIF (full-range BT.601) YCbCr of an RGB uint8 image, as a JPEG decoder inverts it."""
    m = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
                 np.float32)
    ycc = rgb.astype(np.float32) @ m.T + np.array([0.0, 128.0, 128.0], np.float32)
    return np.clip(np.rint(ycc), 0, 255).astype(np.uint8)


def write_pyramid_tiff(path: str | Path, width: int, height: int, tile_fn, mpp: float, *,
                       tile_px: int = 256, min_level_px: int = 512, photometric: str = "ycbcr",
                       quality: int = 90, aperio: bool = False) -> Path:
    """Write a JPEG-tiled pyramidal TIFF that OpenSlide opens (tests, benchmarks, conversions).

    Levels halve (sizes rounded down) while the longest side stays ≥ ``min_level_px``; each
    level is its own page. ``tile_fn(level, x, y, w, h)`` returns that level's RGB uint8 pixels
    (edge tiles are padded white). ``photometric`` "ycbcr" (generic default) or "rgb" (JPEG
    components stored as RGB, Aperio's convention); ``aperio`` writes an Aperio ImageDescription
    so OpenSlide reports vendor ``aperio``. Resolution tags carry ``mpp`` (in cm).
    """
    import tifffile

    dims = [(width, height)]
    while max(dims[-1]) // 2 >= min_level_px:
        dims.append((dims[-1][0] // 2, dims[-1][1] // 2))
    args = {"outcolorspace": "RGB"} if photometric == "rgb" else {}
    args["level"] = quality

    def tiles(level: int, lw: int, lh: int):
        for ty in range(0, lh, tile_px):
            for tx in range(0, lw, tile_px):
                h, w = min(tile_px, lh - ty), min(tile_px, lw - tx)
                block = np.full((tile_px, tile_px, 3), 255, np.uint8)
                block[:h, :w] = tile_fn(level, tx, ty, w, h)
                # tifffile stores the samples of a YCbCr page as given: convert RGB first
                yield rgb_to_ycbcr(block) if photometric == "ycbcr" else block

    with tifffile.TiffWriter(path, bigtiff=width * height > 2**31) as tw:
        for level, (lw, lh) in enumerate(dims):
            desc = None
            if aperio and level == 0:
                desc = (f"Aperio Image Library v12.0.0\r\n{width}x{height} ({tile_px}x{tile_px}) "
                        f"JPEG/RGB Q={quality}|AppMag = {10 / mpp:g}|MPP = {mpp}")
            scale = 2**level
            tw.write(tiles(level, lw, lh), shape=(lh, lw, 3), dtype=np.uint8,
                     tile=(tile_px, tile_px), photometric=photometric, compression="jpeg",
                     compressionargs=args, description=desc, metadata=None,
                     resolution=(1e4 / (mpp * scale), 1e4 / (mpp * scale)),
                     resolutionunit="CENTIMETER", subfiletype=0 if level == 0 else 1)
    return Path(path)
