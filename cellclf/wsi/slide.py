"""Open a whole-slide image: the first stage of the flow (slide file → Slide → tissue, tiles…).

:class:`Slide` wraps one ``openslide.OpenSlide`` handle. It resolves the pixel size (µm per level-0
pixel) from the slide metadata, from TIFF resolution tags, or from an explicit ``mpp`` override,
and turns every failure to open or read into a :class:`~cellclf.errors.SlideOpenError` or
:class:`~cellclf.errors.MissingMppError` that names the file and says what to do.

``read_region_mpp`` maps a level-0 box to an RGB array of a requested size:

1. :func:`plan_read` (pure) picks the coarsest pyramid level whose downsample is ≤ the needed one
   (1 % tolerance) and the integer level-pixel rectangle to read, plus a float sub-box of it;
2. the level pixels are read (OpenSlide here; ``cellclf.wsi.jpeg_tiles`` serves JPEG-tiled TIFF/SVS
   levels straight from the file), transparent pixels and pixels outside the slide become white;
3. :func:`finish_read` resizes the sub-box to the output with Pillow's antialiased bilinear filter
   (``Image.resize(..., BILINEAR, box=...)``). The read keeps a margin around the box so the
   filter always sees real neighbours: the same level-0 window gives the same pixels whether it is
   read alone or cut from a bigger read. When the box is the output exactly (integer position,
   no scaling) the pixels are returned untouched.

Pixel convention: continuous coordinates, pixel ``i`` covers ``[i, i + 1)``; level-``L`` pixel ``i``
covers level-0 ``[i·ds, (i + 1)·ds)``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellclf.errors import ConfigError, MissingMppError, SlideOpenError
from cellclf.wsi.reduce import halves_exactly, reduce_half_bilinear

LEVEL_TOLERANCE = 0.01  # a level may be up to 1 % coarser than needed (0.499 µm/px serves 0.5)
MPP_RANGE = (0.01, 100.0)  # plausible µm per pixel; anything else in the metadata is ignored
_EXACT = 1e-9
_MAX_READ_PX = 48_000_000  # thumbnails read larger level regions in bands


@dataclass(frozen=True)
class ReadPlan:
    """How to serve one ``read_region_mpp`` call (see :func:`plan_read`)."""

    level: int
    x: int  # level-px rectangle to read; may extend past the level (white there)
    y: int
    w: int
    h: int
    box: tuple[float, float, float, float] | None  # sub-box of the read that becomes the output
    out_w: int
    out_h: int


def best_level(downsamples: tuple[float, ...], needed: float, tol: float = LEVEL_TOLERANCE) -> int:
    """Index of the coarsest level whose downsample is ≤ ``needed·(1 + tol)`` (level 0 at worst)."""
    best = 0
    for i, ds in enumerate(downsamples):
        if ds <= needed * (1.0 + tol) and ds > downsamples[best]:
            best = i
    return best


def plan_read(downsamples: tuple[float, ...], x0: float, y0: float, w0: float, h0: float,
              out_w: int, out_h: int, resample: bool = False,
              tol: float = LEVEL_TOLERANCE) -> ReadPlan:
    """Plan the read of level-0 box (x0, y0, w0, h0) into ``out_w × out_h`` pixels (pure).

    ``box`` is None when the level pixels are the output as they are (integer position, same
    size) unless ``resample`` forces the margin-and-resize route.
    """
    if not (w0 > 0 and h0 > 0 and out_w >= 1 and out_h >= 1):
        raise ValueError(f"empty read: box {w0}×{h0} level-0 px into {out_w}×{out_h} px")
    needed = min(w0 / out_w, h0 / out_h)
    level = best_level(downsamples, needed, tol)
    ds = downsamples[level]
    fx0, fy0, fx1, fy1 = x0 / ds, y0 / ds, (x0 + w0) / ds, (y0 + h0) / ds
    exact = (abs(fx0 - round(fx0)) < _EXACT and abs(fy0 - round(fy0)) < _EXACT
             and abs(fx1 - fx0 - out_w) < _EXACT and abs(fy1 - fy0 - out_h) < _EXACT)
    if exact and not resample:
        return ReadPlan(level, round(fx0), round(fy0), out_w, out_h, None, out_w, out_h)
    scale = max((fx1 - fx0) / out_w, (fy1 - fy0) / out_h, 1.0)
    margin = math.ceil(scale) + 1
    ix0, iy0 = math.floor(fx0) - margin, math.floor(fy0) - margin
    ix1, iy1 = math.ceil(fx1) + margin, math.ceil(fy1) + margin
    box = (fx0 - ix0, fy0 - iy0, fx1 - ix0, fy1 - iy0)
    return ReadPlan(level, ix0, iy0, ix1 - ix0, iy1 - iy0, box, out_w, out_h)


def finish_read(level_rgb: np.ndarray, plan: ReadPlan,
                shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Resize the planned sub-box of the level pixels to the output size (Pillow bilinear).

    ``shift`` is where the array's pixel (0, 0) really lies relative to ``(plan.x, plan.y)`` in
    level px (OpenSlide reads at non-integer downsamples land on a sub-pixel position).
    """
    if plan.box is None:
        return level_rgb
    if shift == (0.0, 0.0) and halves_exactly(level_rgb, plan.box, plan.out_w, plan.out_h):
        return reduce_half_bilinear(level_rgb, int(plan.box[0]), int(plan.box[1]), plan.out_w,
                                    plan.out_h)
    from PIL import Image

    bx0, by0, bx1, by1 = plan.box
    box = (bx0 - shift[0], by0 - shift[1], bx1 - shift[0], by1 - shift[1])
    img = Image.fromarray(level_rgb).resize((plan.out_w, plan.out_h), Image.Resampling.BILINEAR,
                                            box=box)
    return np.asarray(img)


def rgba_to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite non-premultiplied RGBA (OpenSlide's output) onto white glass."""
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)
    rgb = (rgba[..., :3].astype(np.uint16) * a + 127) // 255 + (255 - a)
    return rgb.astype(np.uint8)


def _valid_mpp(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and MPP_RANGE[0] <= value <= MPP_RANGE[1]


def mpp_from_tiff_tags(path: Path) -> tuple[float, float] | None:
    """(mpp-x, mpp-y) from the first page's resolution tags (inch or cm), or None."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            tags = tif.pages.first.tags
            unit = tags.get("ResolutionUnit")
            xres, yres = tags.get("XResolution"), tags.get("YResolution")
            if unit is None or xres is None or yres is None:
                return None
            um_per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
            if um_per_unit is None:
                return None
            vals = []
            for tag in (xres, yres):
                num, den = tag.value
                vals.append(um_per_unit * den / num if num else float("nan"))
    except Exception:  # not a TIFF, or unreadable tags: no fallback
        return None
    return (vals[0], vals[1]) if all(_valid_mpp(v) for v in vals) else None


def diagnose_unreadable(path: Path) -> str:
    """Why OpenSlide refused a file, as the TIFF structure tells it (truncated vs unsupported)."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[:2] not in (b"II", b"MM"):
        return ("unsupported format: not a TIFF-family file and no other format OpenSlide reads "
                "(Aperio SVS, generic tiled TIFF, NDPI, MIRAX, SCN, BIF, VMS, …)")
    order = "<" if head[:2] == b"II" else ">"
    magic = int.from_bytes(head[2:4], "little" if order == "<" else "big")
    first = (int.from_bytes(head[8:16], "little" if order == "<" else "big") if magic == 43
             else int.from_bytes(head[4:8], "little" if order == "<" else "big"))
    if first >= size:
        return (f"truncated or corrupt: the TIFF header points to data at byte {first} but the "
                f"file has only {size} bytes (an incomplete download or copy?)")
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            end = max((max((o + c for o, c in zip(p.dataoffsets, p.databytecounts, strict=True)),
                           default=0) for p in tif.pages), default=0)
            kind = "an OME-TIFF" if tif.is_ome else "a TIFF"
    except Exception as exc:
        return f"truncated or corrupt TIFF ({exc})"
    if end > size:
        return (f"truncated or corrupt: its tiles reach byte {end} but the file has only "
                f"{size} bytes (an incomplete download or copy?)")
    return (f"unsupported format: {kind} layout that OpenSlide cannot read; convert it to a "
            "tiled pyramidal TIFF or SVS (e.g. `vips tiffsave in out.tif --tile --pyramid "
            "--compression jpeg`)")


PLAIN_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
PLAIN_IMAGE_MAX_PX = 400_000_000  # a plain image is decoded whole; beyond this, convert it


def open_plain_image(path: Path):
    """An ``openslide.ImageSlide`` for a plain image (a PNG/JPEG tile, a strip TIFF) that
    OpenSlide's slide formats do not cover; None when it is not such an image. The image is one
    level, decoded whole here (so its damage shows now), with no pixel size: ``--mpp`` is needed."""
    if path.suffix.lower() not in PLAIN_IMAGE_SUFFIXES:
        return None
    import openslide
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, PLAIN_IMAGE_MAX_PX)
    try:
        im = Image.open(path)
        w, h = im.size
        if w * h > PLAIN_IMAGE_MAX_PX:
            raise SlideOpenError(
                f"{path}: a plain {w}×{h} image is too large to decode whole ({w * h / 1e6:.0f} "
                f"MP; limit {PLAIN_IMAGE_MAX_PX / 1e6:.0f} MP); convert it to a tiled pyramidal "
                "TIFF (e.g. `vips tiffsave in out.tif --tile --pyramid --compression jpeg`)")
        im.load()
    except SlideOpenError:
        raise
    except Exception as exc:  # not an image Pillow decodes, or a damaged one
        if path.suffix.lower() in (".tif", ".tiff"):
            return None  # diagnose_unreadable says what is wrong with the TIFF
        raise SlideOpenError(f"{path}: cannot open image: truncated, corrupt or not an image "
                             f"({exc})") from exc
    if im.mode not in ("RGB", "RGBA", "L", "P", "LA"):
        raise SlideOpenError(f"{path}: image mode {im.mode} (e.g. 16-bit or multi-channel) is not "
                             "an 8-bit RGB picture; save it as 8-bit RGB (PNG/JPEG/TIFF)")
    return openslide.ImageSlide(im if im.mode in ("RGB", "RGBA") else im.convert("RGBA"))


class Slide:
    """One open whole-slide image; level-0 coordinates everywhere. Use as a context manager.

    Plain images (PNG/JPEG tiles, strip TIFFs) open as a one-level slide through
    ``openslide.ImageSlide``; they carry no pixel size, so ``mpp`` must be given.
    """

    def __init__(self, path: str | Path, mpp: float | None = None, cache: object = None) -> None:
        """``cache``: an ``openslide.OpenSlideCache`` to share decoded tiles between handles."""
        import openslide

        self.path = Path(path)
        if not self.path.is_file():
            raise SlideOpenError(f"{self.path}: slide file not found (check the path)")
        self.is_plain_image = False  # a PNG/JPEG/strip-TIFF field rather than a scanner's slide
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            self.is_plain_image = True
            self._osr = open_plain_image(self.path)
            if self._osr is None:
                raise SlideOpenError(f"{self.path}: cannot open slide: "
                                     f"{diagnose_unreadable(self.path)}") from exc
        except openslide.OpenSlideError as exc:
            raise SlideOpenError(f"{self.path}: cannot open slide: truncated or corrupt "
                                 f"({exc})") from exc
        if cache is not None:
            self._osr.set_cache(cache)
        props = self._osr.properties
        self.properties: dict[str, str] = dict(props)
        self.width, self.height = self._osr.dimensions
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(self._osr.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple(float(d)
                                                          for d in self._osr.level_downsamples)
        self.vendor: str | None = props.get("openslide.vendor")
        try:
            self.objective_power: float | None = float(props["openslide.objective-power"])
        except (KeyError, ValueError):
            self.objective_power = None
        self.mpp, self.mpp_source = self._resolve_mpp(mpp)
        self._check_readable()

    # -- metadata ---------------------------------------------------------------------------
    def _resolve_mpp(self, override: float | None) -> tuple[float, str]:
        if override is not None:
            if not (isinstance(override, int | float) and math.isfinite(override)
                    and override > 0):
                raise ConfigError(f"{self.path}: --mpp must be a positive number of µm per "
                                  f"pixel (e.g. 0.25 for a 40× scan), got {override!r}")
            return float(override), "override"
        pair: tuple[float, float] | None = None
        source = "openslide"
        try:
            mx = float(self.properties["openslide.mpp-x"])
            my = float(self.properties["openslide.mpp-y"])
            if _valid_mpp(mx) and _valid_mpp(my):
                pair = (mx, my)
        except (KeyError, ValueError):
            pair = None
        if pair is None:
            pair, source = mpp_from_tiff_tags(self.path), "tiff-resolution"
        if pair is None:
            raise MissingMppError(
                f"{self.path}: the slide does not state its pixel size (µm per pixel) in its "
                "metadata; pass it with --mpp (e.g. --mpp 0.25 for a 40× scan, --mpp 0.5 for 20×)")
        mx, my = pair
        mean = (mx + my) / 2.0
        if abs(mx - my) > 0.01 * mean:
            warnings.warn(f"{self.path}: anisotropic pixels (mpp-x {mx}, mpp-y {my}); using "
                          f"their mean {mean:.4f} µm/px", stacklevel=3)
        return mean, source

    def _check_readable(self) -> None:
        """Decode a pixel in the first and last tile of the finest and coarsest level."""
        for level in {0, len(self.level_dimensions) - 1}:
            lw, lh = self.level_dimensions[level]
            ds = self.level_downsamples[level]
            for lx, ly in ((0, 0), (lw - 1, lh - 1)):
                self._os_read((int(lx * ds), int(ly * ds)), level, (1, 1))

    def _os_read(self, location: tuple[int, int], level: int, size: tuple[int, int]):
        import openslide

        try:
            return self._osr.read_region(location, level, size)
        except openslide.OpenSlideError as exc:
            raise SlideOpenError(f"{self.path}: cannot read slide pixels at level {level}, "
                                 f"level-0 {location}: truncated or corrupt ({exc})") from exc

    # -- pixels -----------------------------------------------------------------------------
    def read_level(self, level: int, x: int, y: int, w: int,
                   h: int) -> tuple[np.ndarray, tuple[float, float]]:
        """Level-px rectangle via OpenSlide, white outside; also the sub-pixel origin shift."""
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        cx0, cy0, cx1, cy1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if cx1 <= cx0 or cy1 <= cy0:
            return np.full((h, w, 3), 255, np.uint8), (0.0, 0.0)
        loc = (round(cx0 * ds), round(cy0 * ds))
        shift = (loc[0] / ds - cx0, loc[1] / ds - cy0)
        rgb = rgba_to_rgb_on_white(np.asarray(self._os_read(loc, level, (cx1 - cx0, cy1 - cy0))))
        if (cx0, cy0, cx1, cy1) == (x, y, x + w, y + h):
            return rgb, shift
        out = np.full((h, w, 3), 255, np.uint8)
        out[cy0 - y:cy1 - y, cx0 - x:cx1 - x] = rgb
        return out, shift

    def read_region_mpp(self, x0: float, y0: float, w0: float, h0: float, out_w: int,
                        out_h: int) -> np.ndarray:
        """Level-0 box (x0, y0, w0, h0) → RGB uint8 (out_h, out_w, 3); white outside the slide.

        Integer boxes are the usual case; float boxes read sub-pixel windows (OpenSlide; the fast
        JPEG path is :meth:`cellclf.wsi.tile_reader.TileReader.read_box`).
        """
        plan = plan_read(self.level_downsamples, x0, y0, w0, h0, out_w, out_h)
        if not float(self.level_downsamples[plan.level]).is_integer() and plan.box is None:
            plan = plan_read(self.level_downsamples, x0, y0, w0, h0, out_w, out_h, resample=True)
        rgb, shift = self.read_level(plan.level, plan.x, plan.y, plan.w, plan.h)
        return finish_read(rgb, plan, shift)

    def thumbnail(self, max_px: int = 2048) -> tuple[np.ndarray, float]:
        """Whole slide, longest side ≤ ``max_px``: (RGB, level-0 px per thumbnail px along x)."""
        ds = max(1.0, max(self.width, self.height) / max_px)
        out_w, out_h = max(1, round(self.width / ds)), max(1, round(self.height / ds))
        plan = plan_read(self.level_downsamples, 0, 0, self.width, self.height, out_w, out_h)
        level_px = plan.w * plan.h
        bands = max(1, math.ceil(level_px / _MAX_READ_PX))
        rows = np.linspace(0, out_h, bands + 1).round().astype(int)
        step_y = self.height / out_h
        parts = [self.read_region_mpp(0, r0 * step_y, self.width, (r1 - r0) * step_y, out_w,
                                      r1 - r0)
                 for r0, r1 in zip(rows[:-1], rows[1:], strict=True) if r1 > r0]
        return np.concatenate(parts, axis=0), self.width / out_w

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Slide({str(self.path)!r}, {self.width}×{self.height} px, mpp={self.mpp:.4f}, "
                f"vendor={self.vendor!r}, levels={len(self.level_dimensions)})")


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open a slide (see :class:`Slide`); raises SlideOpenError / MissingMppError."""
    return Slide(path, mpp)
